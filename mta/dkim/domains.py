"""Which DKIM signatures a message gets: keys per signing domain, chosen by the From domain.

Built once at start from the [[dkim]] tables: every key is loaded and checked
then (a bad key is fatal at start, naming the file; never a surprise at the
first message). For a message, the signing domain is the From header's
domain, else its nearest parent that has keys (so news.example.com is signed
by example.com, aligned for DMARC in relaxed mode); a policy hook
(`signing.policy = "module:function"`, called with (from_domain, Envelope)
and returning a list of signing domains, or None to keep the default) can
override it. Several [[dkim]] tables for one domain give several
signatures (e.g. Ed25519 and RSA, RFC 8463 3).
"""
from __future__ import annotations

import importlib
import re
from email.utils import getaddresses
from typing import Any, Callable

from mta.dkim.signer import (DEFAULT_HEADERS, DkimConfigError, SignSpec, load_key)
from mta.model.envelope import Envelope

_FROM = re.compile(rb"(?im)^From[ \t]*:(.*(?:\r?\n[ \t].*)*)")
_HEADER_SCAN = 64 << 10


def from_domain(content: bytes | bytearray | memoryview) -> str | None:
    """Domain of the (first) From header address, lower case; None when there is none."""
    head = bytes(content[:_HEADER_SCAN])
    end = head.find(b"\r\n\r\n")
    m = _FROM.search(head if end < 0 else head[:end + 2])
    if m is None:
        return None
    value = re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).decode("utf-8", "replace")
    addrs = [a for _, a in getaddresses([value]) if "@" in a]
    return addrs[0].rsplit("@", 1)[1].strip().lower().rstrip(".") if addrs else None


def load_policy(spec: str) -> Callable[[str | None, Envelope], Any] | None:
    if not spec:
        return None
    module, _, func = spec.partition(":")
    try:
        hook = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise DkimConfigError(f"signing.policy: cannot load {spec!r}: {exc}") from None
    if not callable(hook):
        raise DkimConfigError(f"signing.policy: {spec!r} is not callable")
    return hook


class SigningDomains:
    def __init__(self, tables: tuple, policy: str = ""):
        self.specs: dict[str, list[SignSpec]] = {}
        for i, t in enumerate(tables):
            try:
                key = load_key(str(t.key_file), t.domain, t.selector,
                               None if t.algorithm == "auto" else t.algorithm)
                spec = SignSpec(key, t.headers or DEFAULT_HEADERS, t.oversign, t.canonicalization,
                                int(t.expire_after) or None)
            except DkimConfigError as exc:
                raise DkimConfigError(f"dkim[{i}]: {exc}") from None
            self.specs.setdefault(t.domain.lower(), []).append(spec)
        self.policy = load_policy(policy)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def for_domain(self, domain: str | None) -> list[SignSpec]:
        while domain:
            specs = self.specs.get(domain)
            if specs:
                return specs
            _, _, domain = domain.partition(".")
        return []

    def for_message(self, content: bytes | bytearray, envelope: Envelope) -> list[SignSpec]:
        domain = from_domain(content)
        if self.policy is not None:
            chosen = self.policy(domain, envelope)
            if chosen is not None:
                return [s for d in chosen for s in self.specs.get(d.lower(), [])]
        return self.for_domain(domain)


class DkimStage:
    """What the delivery engine and reception need to sign: domains, batcher, policy."""

    def __init__(self, domains: SigningDomains, batcher: Any, stage: str, on_error: str):
        self.domains = domains
        self.batcher = batcher      # SigningBatcher
        self.stage = stage          # "delivery" | "reception"
        self.on_error = on_error    # "send_unsigned" | "defer"
