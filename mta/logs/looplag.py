"""How late the event loop runs a 100 ms timer: the daemon's loop-lag probe (issue 15).

Anything that blocks the loop (a synchronous fsync, a lock wait, a long parse, CPU the
machine does not give the process) delays every session and delivery sharing it; this
probe makes that visible. Every `interval` the loop is asked to run a callback; how much
later than due it ran is one sample. GET /metrics shows the samples as a histogram
(mta_event_loop_lag_seconds, since start) and the max and 99th percentile of the last
`window` seconds (mta_control/metrics.py); bench/loop_lag_bench.py measures the same way.
Cost: `1 / interval` callbacks a second (10), a few microseconds each, and as many
wake-ups of an idle loop: at 10 ms the probe was 85 % of an idle daemon's CPU (2 % of a
core per process). A stall is caught with a probability of its length over the interval:
one of 100 ms or more always.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopLag:
    def __init__(self, interval: float = 0.100, window: float = 60.0):
        self.interval = interval
        self.hist = [0] * (len(BOUNDS) + 1)     # the last one: over the largest bound
        self.total = 0.0
        self._recent: deque[float] = deque(maxlen=max(1, int(window / interval)))
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = time.perf_counter() + self.interval
        self._handle = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = time.perf_counter()
        lag = max(0.0, now - self._due)
        self._recent.append(lag)
        self.total += lag
        i = 0
        while i < len(BOUNDS) and lag > BOUNDS[i]:
            i += 1
        self.hist[i] += 1
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_later(self.interval, self._tick)

    def recent(self) -> tuple[float, float]:
        """(max, 99th percentile) of the lag over the last window, in seconds."""
        if not self._recent:
            return 0.0, 0.0
        s = sorted(self._recent)
        return s[-1], s[min(len(s) - 1, int(len(s) * 0.99))]
