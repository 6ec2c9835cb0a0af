"""The memory governor: one budget for the message content all SMTP sessions hold.

Why: the native core keeps a message's content in memory until it is spooled
(ServerCore.held: the DATA/BDAT bytes received so far plus unprocessed input),
so without a global bound thousands of slow clients each holding part of a
large message would exhaust RAM long before any per-connection limit trips.

How: each session reports what it holds after every read (`charge`) and when it
lets go (stored, session ended: `release`). At the budget the governor is full:
new transactions are refused at MAIL with 452 4.3.1 (`full`, read by
Reception's MAIL hook) and every session holding content, or starting it,
stops being read (the kernel's socket buffers and TCP flow control push back
on the client) except one, the runner: the oldest holder, which may finish its
message so that memory keeps being freed; when it is done the next oldest
runs. Below 7/8 of the budget all paused sessions are read again. No deadlock
where every session holds part of the budget and none can finish, even when
the runner is a slow client: if the governor stays full for `wait` seconds,
the paused sessions holding the most are closed with 421 4.3.2 until usage is
back under 7/8 (their clients retry later; nothing was acknowledged).
Bound: usage stays under budget + one message (the runner's, at most
max_message_size) + one read (uvloop reads up to 256 KiB) per session that
had not started its content when the budget was reached.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("mta.governor")
_REPORT_EVERY = 60.0   # seconds between reports of reaching the budget (it can flip often)


class Holder(Protocol):
    """A session as the governor sees it (the SMTP sessions of session.py implement it)."""

    @property
    def storing(self) -> bool: ...        # its message is on its way to the spool
    @property
    def in_content(self) -> bool: ...     # inside DATA/BDAT content
    def memory_pause(self) -> None: ...   # stop reading it
    def memory_resume(self) -> None: ...  # read it again
    def close_with(self, name: str) -> None: ...   # end it with the named 421 reply


class DataMemory:
    def __init__(self, budget: int, wait: float):
        self.budget = budget
        self.low_water = budget - budget // 8
        self.wait = wait
        self.used = 0                 # bytes held by all sessions
        self.full = False
        self._held: dict[Holder, int] = {}
        self._paused: set[Holder] = set()
        self._runner: Holder | None = None   # the one session read while full
        self._shed_timer: asyncio.TimerHandle | None = None
        # counters for metrics
        self.times_full = 0
        self.sessions_shed = 0
        self.peak = 0
        self._reported_at = -_REPORT_EVERY   # loop time of the last report
        self._reported_times = 0

    def charge(self, session: Holder, held: int) -> None:
        """`session` now holds `held` bytes; pauses it when the budget is reached."""
        old = self._held.get(session, 0)
        if held:
            self._held[session] = held   # a new key goes last: the dict is in age order
        elif old:
            del self._held[session]
            if session is self._runner:
                self._runner = None
        self.used += held - old
        if self.used > self.peak:
            self.peak = self.used
        if self.full:
            if self.used < self.low_water:
                self._open()
                return
            if (held > old or session.in_content) and not session.storing \
                    and session is not self._runner and session not in self._paused:
                self._pause(session)
            if self._runner is None and self._paused:
                self._next_runner()
        elif self.used >= self.budget:
            self._close()

    def release(self, session: Holder) -> None:
        self._paused.discard(session)
        if session is self._runner:
            self._runner = None
        self.charge(session, 0)

    def stats(self) -> dict[str, object]:
        return {"budget": self.budget, "used": self.used, "peak": self.peak, "full": self.full,
                "paused_sessions": len(self._paused), "times_full": self.times_full,
                "sessions_shed": self.sessions_shed}

    # -- internals ---------------------------------------------------------------------

    def _close(self) -> None:
        self.full = True
        self.times_full += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self._reported_at >= _REPORT_EVERY:
            log.warning("message content in memory reached the budget (%d bytes in %d "
                        "sessions; %d times since the last report): sessions in DATA paused, "
                        "new transactions refused", self.used, len(self._held),
                        self.times_full - self._reported_times)
            self._reported_at, self._reported_times = loop.time(), self.times_full
        for s in list(self._held):
            if not s.storing:
                self._pause(s)
        self._next_runner()
        self._shed_timer = loop.call_later(self.wait, self._shed)

    def _next_runner(self) -> None:
        """Let the oldest paused holder go on, so that memory keeps being freed."""
        runner = next((s for s in self._held if s in self._paused), None)
        if runner is not None:
            self._paused.discard(runner)
            self._runner = runner
            runner.memory_resume()

    def _open(self) -> None:
        self.full = False
        self._runner = None
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        paused, self._paused = self._paused, set()
        for s in paused:
            s.memory_resume()

    def _pause(self, session: Holder) -> None:
        self._paused.add(session)
        session.memory_pause()

    def _shed(self) -> None:
        """Held full for `wait` seconds: close the largest holders until below 7/8."""
        self._shed_timer = None
        if not self.full:
            return
        victims = sorted((s for s in self._paused if not s.storing),
                         key=lambda s: self._held.get(s, 0),
                         reverse=True)
        projected = self.used
        shed = []
        for s in victims:
            if projected < self.low_water:
                break
            projected -= self._held.get(s, 0)
            shed.append(s)
        log.warning("message content in memory at the budget for %g s: closing the %d "
                    "sessions holding the most (%d bytes)", self.wait, len(shed),
                    self.used - projected)
        self.sessions_shed += len(shed)
        for s in shed:
            self.release(s)
            s.close_with("MEMORY_SHED")
        if self.full:   # what is left is being stored: look again later
            self._shed_timer = asyncio.get_running_loop().call_later(self.wait, self._shed)
