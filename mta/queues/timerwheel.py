"""The one timer wheel all scheduled queues share: O(1) insert, O(due) expiry.

Slots of `tick` seconds (1 s) over a horizon of `slots` ticks (65,536 ≈ 18 h);
entries due further out wait in an overflow list that is re-sorted into the
wheel once per wheel turn. Entries are cancelled lazily: the owner checks that
an entry is still wanted when it pops (a message that was suspended, rebound
or finished in between simply carries a newer `due`).
This is KumoMTA's choice over a heap: inserts dominate (every deferral),
and a heap's log n per insert is what hurts with ten million queued.
"""
from __future__ import annotations

import math
from typing import Any, Callable


class TimerWheel:
    def __init__(self, now: float, *, tick: float = 1.0, slots: int = 1 << 16):
        self.tick = tick
        self.slots = slots
        self._wheel: list[list[Any] | None] = [None] * slots
        self._overflow: list[tuple[float, Any]] = []
        self._cursor = math.floor(now / tick)   # absolute tick number last expired
        self.count = 0

    def insert(self, due: float, item: Any) -> None:
        t = max(math.ceil(due / self.tick), self._cursor + 1)  # never early, at most a tick late
        if t - self._cursor >= self.slots:
            self._overflow.append((due, item))
        else:
            i = t % self.slots
            bucket = self._wheel[i]
            if bucket is None:
                self._wheel[i] = [item]
            else:
                bucket.append(item)
        self.count += 1

    def advance(self, now: float, fire: Callable[[Any], None]) -> int:
        """Call `fire(item)` for every item due at or before `now`; returns how many."""
        target = math.floor(now / self.tick)
        fired = 0
        if target - self._cursor > self.slots:
            # Slept longer than a turn: every wheel entry is due; fire them in order.
            for k in range(1, self.slots + 1):
                fired += self._fire_slot((self._cursor + k) % self.slots, fire)
            self._cursor = target - 1
            self._rewheel()   # overdue overflow entries land on `target`, fired below
        while self._cursor < target:
            self._cursor += 1
            i = self._cursor % self.slots
            fired += self._fire_slot(i, fire)
            if i == 0 and self._overflow:
                self._rewheel()
        return fired

    def _fire_slot(self, i: int, fire: Callable[[Any], None]) -> int:
        bucket = self._wheel[i]
        if bucket is None:
            return 0
        self._wheel[i] = None
        self.count -= len(bucket)
        for item in bucket:
            fire(item)
        return len(bucket)

    def items(self):
        """Every entry in the wheel and the overflow, stale ones and repeats included
        (the owner filters them as at expiry); for operator scans, O(entries)."""
        for bucket in self._wheel:
            if bucket:
                yield from bucket
        for _, item in self._overflow:
            yield item

    def _rewheel(self) -> None:
        pending, self._overflow = self._overflow, []
        self.count -= len(pending)
        for due, item in pending:
            self.insert(due, item)
