"""An event loop on virtual time, for unit tests of timers, retries and rate limits.

The loop's selector never sleeps: when nothing is ready it moves the clock to the
next timer instead, so `asyncio.sleep(3600)` returns at once with the clock an hour
later, and a test reads exact due times instead of bounding wall-clock delays (which
flake on a loaded machine). The same `VirtualClock` is handed to the classes under
test as their wall clock (`clock=`), so wall time and loop time move together.
A loop with nothing scheduled and nothing ready would wait forever: it raises instead
(the test has a deadlock). No sockets: the components under test get fakes.
"""
from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

START = 1_800_000_000.0   # 2027-01-15: any fixed wall time


class VirtualClock:
    """A clock that moves only when told (or when the loop has nothing else to do)."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("virtual time never goes back")
        self.now += seconds


class _Selector(selectors.DefaultSelector):
    """Polls without blocking; a wait for a timer becomes a jump of the clock."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise RuntimeError("virtual loop: nothing scheduled and nothing ready (deadlock)")
        self.clock.advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        super().__init__(_Selector(self.clock))
        # A timer runs when its time < now + resolution. asyncio's default (1 ns) is below
        # a float's step at today's epoch (~0.2 us), so a timer met exactly would never run.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self.clock.now

    def settle(self, seconds: float = 1e-6) -> None:
        """Run everything due within `seconds` of virtual time from now (by default: what
        is ready, and what that makes ready, without moving the clock noticeably)."""
        self.run_until_complete(asyncio.sleep(seconds))

    def run(self, coro: Awaitable[T]) -> T:
        return self.run_until_complete(coro)
