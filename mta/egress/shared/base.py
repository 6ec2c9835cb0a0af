"""The interface of shared limits (see the package docstring): a lease, a shared rate,
and what every backend implements. No I/O here."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

from mta.egress.throttle import Throttle
from mta.model.rate import Rate

__all__ = ["Lease", "SharedLimits", "SharedRate", "fallback_limit", "gcra"]

log = logging.getLogger("mta.cluster")

TOKEN_LIFE = 1.0      # seconds a batch of unused tokens stays good (then it is dropped)


class Lease:
    """One connection's hold on its keys; `release()` once when the connection ends."""

    __slots__ = ("keys", "member", "released", "store")

    def __init__(self, store: SharedLimits, keys: tuple[str, ...], member: str) -> None:
        self.store = store
        self.keys = keys
        self.member = member
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.store._release(self)


class SharedRate:
    """A rate held by the store: the Throttle interface over batches of GCRA tokens.

    `delay(now)` (now: the loop's monotonic time) takes a local token when the batch has
    one; otherwise it asks the store for the next batch (`_refill`) and returns how long to
    wait before asking again. Tokens unused after TOKEN_LIFE are dropped, so a path that
    took a batch and went quiet cannot later exceed the rate with it."""

    __slots__ = (
        "batch",
        "fallback",
        "good_until",
        "interval",
        "key",
        "next_try",
        "pending",
        "rate",
        "store",
        "tau",
        "tokens",
        "usable_at",
    )

    def __init__(self, store: SharedLimits, key: str, rate: Rate) -> None:
        self.store = store
        self.key = key
        self.tokens = 0
        self.good_until = 0.0
        self.usable_at = 0.0
        self.next_try = 0.0
        self.pending = False           # a refill is on its way (redis)
        self.fallback: Throttle | None = None   # the local bucket while the store is away
        self._tune(rate)

    def _tune(self, rate: Rate) -> None:
        if not rate.per_second > 0:
            raise ValueError(f"rate {rate} must be above 0")
        self.rate = rate
        per_second = rate.per_second
        self.interval = 1.0 / per_second
        # burst: one second's worth (at least one), as a local Throttle's default
        self.tau = (max(1.0, per_second) - 1.0) * self.interval
        self.batch = max(1, min(1000, int(per_second * self.store.rate_batch)))
        self.fallback = None

    def set_rate(self, rate: Rate, now: float) -> None:
        """A live shaping change: the store's TAT carries over (GCRA needs no refill)."""
        self._tune(rate)
        self.tokens = min(self.tokens, self.batch)

    def delay(self, now: float) -> float:
        """0.0 if a token is available (it is taken); else seconds to wait and ask again."""
        if self.tokens and now < self.good_until:
            if now < self.usable_at:        # reserved tokens, not due yet
                return self.usable_at - now
            self.tokens -= 1
            return 0.0
        if now < self.next_try:
            return self.next_try - now
        return self.store._refill(self, now)

    def local(self, now: float) -> float:
        """The fallback: a local bucket at fallback_fraction of the rate."""
        if self.fallback is None:
            self.fallback = Throttle(Rate(self.rate.count * self.store.fallback_fraction,
                                          self.rate.per))
        return self.fallback.delay(now)

    def grant(self, tokens: int, now: float, after: float = 0.0) -> None:
        """`tokens` from the store, good from `after` seconds on (a reservation)."""
        self.tokens = tokens
        self.usable_at = now + after
        self.good_until = self.usable_at + TOKEN_LIFE


def gcra(tat: float, now: float, interval: float, tau: float, want: int
         ) -> tuple[float, int, float]:
    """One GCRA step for up to `want` tokens: (new TAT, tokens, seconds until they are
    good). Tokens due now are granted at once; when none is, `want` are reserved from
    the time the first is due, so a key at its rate costs one call per batch, not one
    per message. redis_store.py's Lua script is this function."""
    base = max(tat, now)
    k = min(want, math.floor((now + tau - base) / interval) + 1)
    if k >= 1:
        return base + k * interval, k, 0.0
    return base + want * interval, want, base - tau - now


class SharedLimits:
    """What the backends have in common; subclasses do `acquire`, `_release`, `_refill`."""

    name = "local"

    def __init__(self, *, member: str, fallback_fraction: float = 0.5,
                 rate_batch: float = 0.05) -> None:
        self.member = member              # "node/wN": this process, in lease members
        self.node = member.rsplit("/", 1)[0]
        self.fallback_fraction = fallback_fraction
        self.rate_batch = rate_batch
        self._seq = 0
        # per process start: two nodes of one host name without [server] node, or a
        # worker restarted before its predecessor's leases expired, never share a member
        self._run = os.urandom(4).hex()
        # called with True when the store goes away, False when it is back (redis)
        self.on_change: Callable[[bool], None] | None = None

    def _notify(self, down: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(down)
            except Exception:     # the delivery side's bug must not break the store
                log.exception("cluster: reacting to the store %s", "going away" if down
                              else "coming back")

    def rate(self, key: str, rate: Rate) -> SharedRate:
        return SharedRate(self, key, rate)

    def _member(self) -> str:
        self._seq += 1
        return f"{self.member}/{self._run}.{self._seq}"

    async def acquire(self, keys: list[tuple[str, int]]) -> Lease | None:
        """A lease on every (key, limit) at once, or None when one is at its limit."""
        raise NotImplementedError

    def _release(self, lease: Lease) -> None:
        raise NotImplementedError

    def _refill(self, r: SharedRate, now: float) -> float:
        raise NotImplementedError

    def start(self, loop) -> None:
        """Begin background work (lease renewal); the loop is the delivery engine's."""

    async def close(self) -> None:
        """Give back what this process holds and stop."""


def fallback_limit(limit: int, fraction: float) -> int:
    """A connection limit held alone while the store is away: the fraction, at least 1."""
    return max(1, int(limit * fraction))
