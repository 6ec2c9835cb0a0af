"""What the log records say about people: addresses in clear, hashed, or domain only.

Two field groups, each with its own setting ([log] recipient_privacy, sender_privacy):
recipients (`recipient`, `recipients`) and senders (`sender`). "hashed" writes the
address's HMAC in the suppression list's exported form ("hmac-sha256:<hex>", keyed
with the suppression key), so an operator can join log lines with suppression
entries and with each other without the logs naming anyone; "domain" keeps only
what follows the last "@" (per-provider statistics still work). The hash function
comes from the composition root (the key belongs to the suppression store).
"""
from __future__ import annotations

from collections.abc import Callable

MODES = ("clear", "hashed", "domain")
_GROUPS = {"recipient": "recipients", "recipients": "recipients", "sender": "senders"}


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if address else address


class Privacy:
    """Rewrites a record's address fields in place; None when everything is in clear."""

    __slots__ = ("_by_field",)

    def __init__(self, recipients: str, senders: str, hasher: Callable[[str], str] | None):
        for mode in (recipients, senders):
            if mode not in MODES:
                raise ValueError(f"log privacy {mode!r}: want one of {', '.join(MODES)}")
        if "hashed" in (recipients, senders) and hasher is None:
            raise ValueError("hashed log addresses need the suppression key")

        def hashed(address: str) -> str:
            try:
                return hasher(address)   # type: ignore[misc]
            except ValueError:           # not an address (e.g. "<>" or garbage): nothing to join on
                return "unparsable"

        per_group = {"recipients": recipients, "senders": senders}
        funcs = {"hashed": hashed, "domain": _domain}
        self._by_field = {f: funcs[per_group[g]] for f, g in _GROUPS.items()
                          if per_group[g] != "clear"}

    @classmethod
    def make(cls, recipients: str, senders: str,
             hasher: Callable[[str], str] | None) -> Privacy | None:
        if recipients == senders == "clear":
            return None
        return cls(recipients, senders, hasher)

    def apply(self, fields: dict) -> None:
        for name, func in self._by_field.items():
            value = fields.get(name)
            if not value:        # absent, None, or the null sender "": nothing to hide
                continue
            if isinstance(value, str):
                fields[name] = func(value)
            elif isinstance(value, list):
                fields[name] = [func(v) if isinstance(v, str) and v else v for v in value]
