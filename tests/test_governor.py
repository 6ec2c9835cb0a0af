"""The DATA memory governor (mta/ingest/governor.py) against stand-in sessions: the
budget, the runner that keeps memory being freed, hysteresis, and shedding."""
from __future__ import annotations

import asyncio

from mta.ingest.governor import DataMemory


class Session:
    """What the governor uses of an SmtpSession."""

    def __init__(self):
        self.storing = False
        self.in_content = True
        self.paused = False
        self.closed_with = None

    def memory_pause(self):
        self.paused = True

    def memory_resume(self):
        self.paused = False

    def close_with(self, name):
        self.closed_with = name


def test_budget_pauses_all_but_the_oldest_and_reopens_below_seven_eighths():
    async def run():
        m = DataMemory(800, wait=60)
        a, b, c, d = Session(), Session(), Session(), Session()
        m.charge(a, 300)
        m.charge(b, 300)
        assert not m.full and not a.paused
        d.storing, d.in_content = True, False
        m.charge(d, 100)                 # a message on its way to the spool
        m.charge(c, 150)                 # 850 >= 800: full
        assert m.full and m.used == 850
        assert not a.paused, "the oldest holder runs so that memory keeps being freed"
        assert b.paused and c.paused and not d.paused
        e = Session()
        m.charge(e, 0)                   # a session starting DATA waits too
        assert e.paused
        m.charge(a, 400)                 # the runner goes on, past the budget
        assert not a.paused and m.peak == 950
        m.release(a)                     # stored: 550 < 700, everyone is read again
        assert not m.full and not (b.paused or c.paused or e.paused)
        assert m.stats()["used"] == 550 and m.stats()["times_full"] == 1
    asyncio.run(run())


def test_when_the_runner_is_done_the_next_oldest_runs():
    async def run():
        m = DataMemory(1000, wait=60)
        s = [Session() for _ in range(5)]
        for x in s:
            m.charge(x, 220)             # the fifth fills it
        assert m.full and [x.paused for x in s] == [False, True, True, True, True]
        m.release(s[0])                  # 880: still over 875
        assert m.full and [x.paused for x in s[1:]] == [False, True, True, True]
        m.release(s[1])                  # 660: open
        assert not m.full and not any(x.paused for x in s[2:])
    asyncio.run(run())


def test_held_full_past_the_wait_sheds_the_largest_paused_sessions():
    async def run():
        m = DataMemory(1000, wait=0.05)
        runner, big, mid, small = Session(), Session(), Session(), Session()
        m.charge(runner, 100)
        m.charge(small, 100)
        m.charge(big, 500)
        m.charge(mid, 300)               # 1000: full; the runner makes no progress
        await asyncio.sleep(0.2)
        assert big.closed_with == "MEMORY_SHED"        # 1000 - 500 = 500 < 875: enough
        assert mid.closed_with is small.closed_with is runner.closed_with is None
        assert not m.full and not mid.paused and m.used == 500
        assert m.stats()["sessions_shed"] == 1
    asyncio.run(run())
