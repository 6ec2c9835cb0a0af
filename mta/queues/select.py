"""Selector: which queued messages an operator's action is about.

One value for every queue-surgery verb (flush, hold, release, delete, bounce: see
mta/control/actions.py) and for the holds the Scheduler keeps: a scheduled queue
by name, a site (the MX set a queue routes to), a recipient domain, a tenant, a
campaign, one message id, or everything. Fields given together must all match
(tenant and domain: that tenant's mail to that domain). Matching looks only at
the entry's scheduled queue and id, so it costs no I/O.

Trust: built from the admin API's JSON (`from_json`), which checks every field's
type and size; a selector with no field at all is refused unless `all` is set,
so an empty request can never mean "everything".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mta.model.ids import id_from_text, id_text

FIELDS = ("queue", "site", "domain", "tenant", "campaign", "id")
_MAX = 1024   # characters per field


class SelectorError(ValueError):
    """A selector that cannot be used (the text says why)."""


@dataclass(frozen=True, slots=True)
class Selector:
    queue: str = ""          # scheduled queue name, as `mta queue summary` prints it
    site: str = ""           # site name (the queue's cached route)
    domain: str = ""         # recipient domain (lower case)
    tenant: str = ""
    campaign: str = ""
    id: bytes = b""          # one message (16-byte spool id)
    all: bool = False        # every queued message (must be asked for)

    def __post_init__(self) -> None:
        if not self.all and not any(getattr(self, f) for f in FIELDS):
            raise SelectorError("select something: queue, site, domain, tenant, campaign or id "
                                "(or all)")
        if self.all and any(getattr(self, f) for f in FIELDS):
            raise SelectorError("`all` cannot be combined with other fields")

    def matches_queue(self, q: Any) -> bool:
        """Whether every message of scheduled queue `q` matches (the id aside)."""
        if self.queue and q.name != self.queue:
            return False
        if self.domain and q.domain != self.domain:
            return False
        if self.tenant and q.tenant != self.tenant:
            return False
        if self.campaign and q.campaign != self.campaign:
            return False
        if self.site and (q.site is None or q.site.name != self.site):
            return False
        return True

    def matches(self, msg: Any) -> bool:
        """Whether the queued entry `msg` (a QueuedMessage) is selected."""
        if self.id and msg.id != self.id:
            return False
        return self.matches_queue(msg.queue)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f: getattr(self, f) for f in FIELDS[:-1] if getattr(self, f)}
        if self.id:
            out["id"] = id_text(self.id)
        if self.all:
            out["all"] = True
        return out

    @classmethod
    def from_json(cls, d: Any) -> Selector:
        if not isinstance(d, dict):
            raise SelectorError("a selector is a JSON object")
        unknown = set(d) - set(FIELDS) - {"all"}
        if unknown:
            raise SelectorError(f"unknown selector field(s): {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(FIELDS)}, all)")
        kw: dict[str, Any] = {}
        for f in FIELDS:
            v = d.get(f)
            if v in (None, ""):
                continue
            if not isinstance(v, str) or len(v) > _MAX:
                raise SelectorError(f"selector field {f!r} must be a string of at most "
                                    f"{_MAX} characters")
            kw[f] = v.lower() if f == "domain" else v
        if "id" in kw:
            try:
                kw["id"] = id_from_text(kw["id"])
            except ValueError as exc:
                raise SelectorError(f"selector id: {exc}") from None
        if d.get("all") not in (None, False, True):
            raise SelectorError("selector field 'all' must be true or false")
        return cls(all=bool(d.get("all")), **kw)

    def __str__(self) -> str:
        return "all" if self.all else " ".join(f"{k}={v}" for k, v in self.to_json().items())
