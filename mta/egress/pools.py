"""Egress sources, pools and the rules that choose a message's pool and queue class.

A source is a local IP address outbound connections bind to (with its EHLO
name); a pool is a weighted set of sources. Each message routed through a pool
takes the next source of the pool's smooth weighted round-robin sequence
(nginx-style: weights 3:1 give a, a, b, a, ... never a, a, a, b), computed once
at start so picking a source is O(1) even with thousands of sources. A
suspended source is skipped while others are available.

Which pool and class a message uses: the first [[egress_rule]] that matches
and sets each (tenant, campaign, sender domain, a header value), else the
queue-class header (reception.class_header), else a policy hook for the pool
(`egress.pool_hook`), else the defaults. Rules are evaluated once per
scheduled queue (its identity includes class and pool, see queue_name.py).

No I/O. Diagnostics: a bad hook or unknown hook result raises EgressError at
start or is logged per queue (the message keeps the default pool).
"""
from __future__ import annotations

import heapq
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from mta.config.load import BUILTIN_CLASSES
from mta.model.rate import Rate
from mta.model.envelope import Envelope

if TYPE_CHECKING:
    from mta.config import Config

log = logging.getLogger("mta.egress")

DEFAULT_SOURCE = "default"   # the host's own address choice, when no [[source]] exists
DEFAULT_POOL = "default"     # every [[source]] with weight 1, when egress.default_pool = ""
# Built-in queue classes: name -> weight (turns per weight-1 turn at a (source, site)).
BUILTIN_CLASS_WEIGHTS = dict(zip(BUILTIN_CLASSES, (16, 1, 16)))


class EgressError(ValueError):
    """A pool hook that cannot be loaded, named in the message."""


@dataclass(slots=True, eq=False)
class Source:
    name: str
    address: str | None          # None: let the kernel choose (no [[source]] configured)
    ehlo_name: str
    port: int = 0                # remote port override; 0 = the site's port
    suspended_until: float = 0.0  # wall time

    def suspended(self, now: float | None = None) -> bool:
        return self.suspended_until > (time.time() if now is None else now)


@dataclass(slots=True, eq=False)
class Pool:
    name: str
    members: list[tuple[Source, int]]
    sequence: list[Source] = field(default_factory=list)
    cursor: int = 0

    def __post_init__(self) -> None:
        self.sequence = smooth_wrr(self.members)

    def next(self) -> Source:
        """The next source in weighted round-robin order, skipping suspended ones."""
        seq, n = self.sequence, len(self.sequence)
        now = 0.0
        for _ in range(n):
            src = seq[self.cursor]
            self.cursor = (self.cursor + 1) % n
            until = src.suspended_until
            if not until:
                return src
            now = now or time.time()
            if until <= now:
                return src
        return seq[self.cursor]   # all suspended: the message waits at its dispatcher


def smooth_wrr(members: list[tuple[Source, int]]) -> list[Source]:
    """One period of smooth weighted round-robin (length = sum of weights).

    Stride scheduling with a heap: each pick takes the source with the lowest
    virtual time and advances it by 1/weight; ties go to the earlier member.
    Same spread as nginx's smooth WRR, O(total log n) instead of O(total * n).
    """
    heap = [(1.0 / w, i) for i, (_, w) in enumerate(members)]
    heapq.heapify(heap)
    out = []
    for _ in range(sum(w for _, w in members)):
        vt, i = heapq.heappop(heap)
        out.append(members[i][0])
        heapq.heappush(heap, (vt + 1.0 / members[i][1], i))
    return out


@dataclass(frozen=True, slots=True)
class QueueClass:
    name: str
    weight: int
    max_message_rate: Rate | None = None


class Egress:
    """Sources, pools, classes and the selection rules, built from the config."""

    def __init__(self, config: Config):
        eg = config.egress
        ehlo = config.delivery.ehlo_name
        self.sources: dict[str, Source] = {
            s.name: Source(s.name, s.address, s.ehlo_name, s.port) for s in config.source}
        if not self.sources:
            self.sources[DEFAULT_SOURCE] = Source(DEFAULT_SOURCE, None, ehlo)
        self.pools: dict[str, Pool] = {
            p.name: Pool(p.name, [(self.sources[n], w) for n, w in p.sources]) for p in config.pool}
        self.default_pool = self.pools.get(eg.default_pool) if eg.default_pool else None
        if self.default_pool is None:
            self.default_pool = self.pools.setdefault(
                DEFAULT_POOL, Pool(DEFAULT_POOL, [(s, 1) for s in self.sources.values()]))
        self.classes: dict[str, QueueClass] = {n: QueueClass(n, w)
                                                for n, w in BUILTIN_CLASS_WEIGHTS.items()}
        for c in config.queue_class:
            self.classes[c.name] = QueueClass(c.name, c.weight, c.max_message_rate)
        self.default_class = eg.default_class
        self.rules = config.egress_rule
        # header names (lower case) rules look at: reception copies their values
        self.rule_headers = tuple(sorted({r.header for r in self.rules if r.header}))
        self.hook: Callable[[Envelope, str], str | None] | None = (
            load_hook(eg.pool_hook) if eg.pool_hook else None)

    def select(self, envelope: Envelope) -> tuple[str, str]:
        """(queue class, pool name) for a message, from its envelope."""
        klass = pool = ""
        if self.rules:
            klass, pool = self._match_rules(envelope)
        if not klass:
            wanted = envelope.queue_class
            klass = wanted if wanted in self.classes else self.default_class
        if not pool and self.hook is not None:
            pool = self._ask_hook(envelope, klass)
        assert self.default_pool is not None
        return klass, pool or self.default_pool.name

    def _match_rules(self, envelope: Envelope) -> tuple[str, str]:
        """The first matching rule's class and the first matching rule's pool ("": none)."""
        klass = pool = ""
        sender_domain = envelope.sender.rpartition("@")[2].lower()
        headers = envelope.headers or {}
        for r in self.rules:
            if (r.tenant and r.tenant != envelope.tenant) or \
                    (r.campaign and r.campaign != envelope.campaign) or \
                    (r.sender_domain and r.sender_domain.lower() != sender_domain):
                continue
            if r.header:
                value = headers.get(r.header)
                if value is None or (r.header_value and value.lower() != r.header_value.lower()):
                    continue
            klass = klass or r.queue_class
            pool = pool or r.pool
            if klass and pool:
                break
        return klass, pool

    def _ask_hook(self, envelope: Envelope, klass: str) -> str:
        assert self.hook is not None
        try:
            chosen = self.hook(envelope, klass)
        except Exception:
            log.exception("egress.pool_hook failed; using the default pool")
            return ""
        if chosen is not None and chosen not in self.pools:
            log.warning("egress.pool_hook returned unknown pool %r; using the default", chosen)
            return ""
        return chosen or ""


def load_hook(spec: str) -> Callable[[Envelope, str], str | None]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise EgressError(f"egress.pool_hook {spec!r} cannot be loaded: {exc}") from None
    if not callable(fn):
        raise EgressError(f"egress.pool_hook {spec!r} is not callable")
    return fn
