"""The interface of shared limits (see the package docstring): a lease, a shared rate,
warm-up counts, shared adaptive actions, record streams, and what every backend
implements. No I/O here."""
from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mta.egress.throttle import Throttle
from mta.model.rate import Rate

__all__ = ["ACTION_MAX", "ALONE", "DAY", "GRANTED", "HOUR", "WAIT", "Lease", "RecordStream",
           "SharedCount", "SharedLimits", "SharedRate", "StreamRead", "count_batch",
           "fallback_limit", "gcra", "stream_id"]

log = logging.getLogger("mta.cluster")

TOKEN_LIFE = 1.0      # seconds a batch of unused tokens stays good (then it is dropped)
ACTION_MAX = 4096     # bytes of one shared adaptive action (JSON), sent or received
ACTIONS_MAX = 256     # shared actions in force at once (the ones ending last are kept)
ACTION_POLL = 1.0     # seconds between looks for other processes' actions
ACTION_LONGEST = 7 * 86400.0   # a shared action's remaining time is capped at this


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


# what SharedCount.take answers
GRANTED = 0     # one message counted
DAY = 1         # the day's cap is reached (for this day)
HOUR = 2        # the hour's cap is reached (for this hour)
WAIT = 3        # the store was asked (redis): ask again in a moment
ALONE = 4       # the store is away (or the table full): count locally at the fallback fraction


def count_batch(hour_cap: int) -> int:
    """Messages of allowance taken per store call: a 50th of the hour's cap (1 to 100), so
    what a worker holds unused when its hour ends is at most 2 % of the cap."""
    return max(1, min(100, hour_cap // 50))


class SharedCount:
    """Warm-up counts of one (source, target) held by the store (mta/egress/warmup.py):
    how many messages every process together gave the source in the current warm-up day
    and hour, against a day cap and an hour cap.

    The store adds a batch of allowance at a time, only while both counts stay within
    their caps (atomic per call: all processes together never pass a cap); `take` spends
    it one message at a time, locally. Allowance left when the hour changes is given back
    to the day's count with the next call (the hour's count expires with the hour).
    Days and hours are warm-up units (the caller's day and hour numbers): the store keys
    carry them, so a new day or hour starts from zero everywhere."""

    __slots__ = ("capped", "day", "hour", "hour_length", "key", "pending", "store", "tokens")

    def __init__(self, store: SharedLimits, key: str, hour_length: float) -> None:
        self.store = store
        self.key = key
        self.hour_length = hour_length    # seconds of a warm-up hour (key expiries)
        self.day = -1
        self.hour = -1
        self.tokens = 0                  # allowance held for (day, hour)
        self.capped = GRANTED            # DAY or HOUR once the store said so for (day, hour)
        self.pending = False             # a call is on its way (redis)

    def take(self, day: int, hour: int, day_cap: int, hour_cap: int) -> int:
        """Count one message of warm-up day `day`, hour `hour` (hours since the start):
        GRANTED, DAY, HOUR, WAIT or ALONE (see above)."""
        refund = 0
        if day != self.day or hour != self.hour:
            if day == self.day and self.tokens > 0:
                refund = self.tokens      # the day's count gets this hour's leftover back
            self.day, self.hour, self.tokens, self.capped = day, hour, 0, GRANTED
        if self.tokens > 0:
            self.tokens -= 1
            batch = count_batch(hour_cap)
            # the next batch before this one runs out (not for a batch of 1: a small cap
            # would sit unused in every worker's hand)
            if batch > 1 and self.tokens * 2 < batch and not self.capped:
                self.store._count(self, day_cap, hour_cap, 0, prefetch=True)
            return GRANTED
        if self.capped:
            return self.capped
        return self.store._count(self, day_cap, hour_cap, refund, prefetch=False)

    def answer(self, k: int, day_count: int, day_cap: int, hour_cap: int) -> None:
        """The store's reply for (self.day, self.hour): `k` messages of allowance added,
        the day's count after it."""
        self.tokens += max(0, k)
        if k < count_batch(hour_cap):    # less than asked: a cap is reached
            self.capped = DAY if day_count >= day_cap else HOUR


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


class SharedLimits(abc.ABC):
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
        # adaptive actions of other processes: called with (the action as published,
        # seconds it has left), each once; the receiver validates it (another node's data)
        self.on_action: Callable[[dict, float], None] | None = None
        self._seen_actions: dict[str, float] = {}   # id -> clock time it ends

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

    @abc.abstractmethod
    async def acquire(self, keys: list[tuple[str, int]]) -> Lease | None:
        """A lease on every (key, limit) at once, or None when one is at its limit."""

    @abc.abstractmethod
    def _release(self, lease: Lease) -> None:
        """Give the lease's places back in the store."""

    @abc.abstractmethod
    def _refill(self, r: SharedRate, now: float) -> float:
        """Take a batch of tokens for `r` from the store; the seconds until the next."""

    def count(self, key: str, hour_length: float) -> SharedCount:
        """Warm-up counts for `key` (the caller's source and target)."""
        return SharedCount(self, key, hour_length)

    def _count(self, c: SharedCount, day_cap: int, hour_cap: int, refund: int, *,
               prefetch: bool) -> int:
        """Ask for a batch of c's allowance (giving `refund` back to the day first); one
        message of it counted now: GRANTED, else DAY, HOUR, WAIT or ALONE. A prefetch
        (tokens still held) may be done later or not at all."""
        return ALONE

    # -- adaptive actions ------------------------------------------------------------------

    def share_action(self, action: dict, left: float) -> None:
        """Publish an adaptive action this process took, in force `left` more seconds,
        to every other process of the store (fire and forget; local: nothing)."""

    def _action_payload(self, action: dict, left: float) -> str | None:
        """The action as published: JSON with an id and its origin; None (logged) when
        it is over ACTION_MAX bytes or has no time left."""
        if not left > 0:
            return None
        self._seq += 1
        text = json.dumps({"id": f"{self.member}/{self._run}.{self._seq}",
                           "origin": f"{self.member}/{self._run}", "action": action},
                          separators=(",", ":"), default=str)
        if len(text.encode()) > ACTION_MAX:
            log.warning("cluster: adaptive action not shared: %d bytes > %d",
                        len(text.encode()), ACTION_MAX)
            return None
        return text

    def _received(self, raw: object, left: float, now: float) -> None:
        """One published action read back (any process's, this one's too): handed to
        on_action once per id, if it is well formed and another process's."""
        if not isinstance(raw, (str, bytes)) or len(raw) > ACTION_MAX:
            return
        try:
            item = json.loads(raw)
        except ValueError:
            return
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) \
                or not isinstance(item.get("action"), dict) or len(item["id"]) > 300:
            return
        if item.get("origin") == f"{self.member}/{self._run}":
            return
        if item["id"] in self._seen_actions:
            return
        if len(self._seen_actions) >= 4 * ACTIONS_MAX:
            self._seen_actions = {k: t for k, t in self._seen_actions.items() if t > now}
            if len(self._seen_actions) >= 4 * ACTIONS_MAX:
                return
        left = min(left, ACTION_LONGEST)
        if not left > 0:
            return
        self._seen_actions[item["id"]] = now + left
        if self.on_action is not None:
            try:
                self.on_action(item["action"], left)
            except Exception:       # the receiver's bug must not stop the polling
                log.exception("cluster: applying a shared adaptive action")

    def add_stats(self, key: str, day: int, delta: list[int],
                  done: Callable[[list[int]], None], hour_length: float = 3600.0) -> None:
        """Add a warm-up (source, class)'s counts of warm-up day `day` (tried, bounced,
        deferred, complaints); `done` gets the day's totals of every process once known
        (host: before this returns; redis: when the reply comes; local: never)."""

    def stream(self, name: str, max_length: int) -> RecordStream | None:
        """A record stream shared by every node (None: this backend shares nothing
        across nodes; host: one host's processes already share their files)."""
        return None

    def start(self, loop) -> None:
        """Begin background work (lease renewal); the loop is the delivery engine's."""

    async def close(self) -> None:
        """Give back what this process holds and stop."""


RECORD_MAX = 2048           # bytes of one stream record (names and values), sent or received
READ_MAX = 1 << 20          # bytes of the records one stream read returns
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})\Z")


def stream_id(text: str) -> tuple[int, int] | None:
    """A stream id "ms-seq" as a comparable pair; None when it is not one."""
    m = _STREAM_ID.match(text) if isinstance(text, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True)
class StreamRead:
    """One bounded read of a record stream, checked for shape only: `records` holds
    (id, fields) in stream order, fields None when the record was not a flat map of short
    strings (or over the size bound): the reader skips and counts it. Ids are "ms-seq".
    `first` is the oldest id the stream still holds, `last` the newest ever added; `gap`:
    records after the reader's position may be gone (trimmed, or the stream lost) before
    it read them."""
    records: list[tuple[str, dict[str, str] | None]]
    first: str = ""
    last: str = ""
    gap: bool = False


class RecordStream(Protocol):
    """An append-only stream every node reads (redis: a Redis stream, bounded by an
    approximate length). Both calls return None when the store is away (reported once
    by the backend, as for the limits)."""

    async def add(self, records: list[dict[str, str]]) -> bool | None:
        """Append the records in order; True once the store has them all."""

    async def read(self, after: str, count: int) -> StreamRead | None:
        """Up to `count` records after id `after` ("0-0": from the oldest)."""


def fallback_limit(limit: int, fraction: float) -> int:
    """A connection limit held alone while the store is away: the fraction, at least 1."""
    return max(1, int(limit * fraction))
