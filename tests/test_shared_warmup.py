"""Warm-up caps counted in the shared store (mta/egress/shared SharedCount, used by
mta/egress/warmup.py when [cluster] backend is host or redis).

host: two workers' HostLimits on one table file: together never above the day's and the
hour's cap, a new hour and a new day start from zero, a worker's unused allowance goes back
to the day; two Warmup objects (two workers' routing) on one virtual clock. redis: a real
redis-server of our own (tools/cluster_rig.py RedisServer): three stores never above the
caps together, the keys carry the day and hour and expire, and the fallback to this
process's own counters at [cluster] fallback_fraction while the server is stopped.
"""
from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from conftest import host_stores
from test_warmup_unit import DAY, HOUR, OTHER, config, shaping
from virtual_time import VirtualClock

from mta.egress.pools import Egress
from mta.egress.shared.base import ALONE, GRANTED, WAIT
from mta.egress.shared.base import DAY as CAP_DAY
from mta.egress.shared.base import HOUR as CAP_HOUR
from mta.egress.warmup import Warmup
from mta.model.attempt import Attempt, AttemptResult, RemoteReply


def test_host_two_workers_never_above_the_caps_together(tmp_path):
    w0, w1 = host_stores(tmp_path)
    c0, c1 = w0.count("src|gmail", HOUR), w1.count("src|gmail", HOUR)
    rng = random.Random(7)
    day_cap, hour_cap = 500, 120
    granted = {0: 0, 1: 0}
    answers = set()
    for hour in range(5):                     # hours 0-4 of day 1: 120 each until 500
        got = 0
        for _ in range(400):
            i = rng.randrange(2)
            r = (c0, c1)[i].take(1, hour, day_cap, hour_cap)
            answers.add(r)
            if r == GRANTED:
                got += 1
                granted[i] += 1
        # allowance unused by one worker at the hour's end is lost for the hour only
        assert hour_cap - 2 * 2 <= got <= hour_cap or hour == 4, (hour, got)
    total = granted[0] + granted[1]
    assert total <= day_cap
    assert total >= day_cap - 2 * 2          # leftovers went back to the day
    assert granted[0] > 50 and granted[1] > 50
    assert {GRANTED, CAP_HOUR, CAP_DAY} <= answers
    assert c0.take(1, 5, day_cap, hour_cap) == CAP_DAY    # the day's cap holds all day
    # day 2 starts from zero for both
    assert c1.take(2, 24, day_cap, hour_cap) == GRANTED
    assert c0.take(2, 24, day_cap, hour_cap) == GRANTED
    for w in (w0, w1):
        asyncio.run(w.close())


def _warmups(tmp_path, stores, clock):
    cfg = config(hour_divisor=2)    # default class: day 1 cap 3, hour cap 2
    out = []
    for i, s in enumerate(stores):
        (tmp_path / f"w{i}").mkdir(exist_ok=True)
        out.append((Warmup(cfg, shaping(), state_path=tmp_path / f"w{i}" / "warmup.json",
                           clock=clock, shared=s), Egress(cfg)))
    return out


def _pick(w: Warmup, egress: Egress) -> str | None:
    p = egress.pools["warming"]
    got = w.pick(p, p.next(), OTHER)
    return got.name if got is not None else None


def test_host_two_warmups_share_the_caps(tmp_path):
    """Two workers' routing: the hour cap (2) and the day cap (3) for both together, and
    the day's rollover (day 2: 6, 3 an hour)."""
    clock = VirtualClock()
    stores = host_stores(tmp_path)
    (a, ea), (b, eb) = _warmups(tmp_path, stores, clock)
    assert a.sources["new"].start == b.sources["new"].start
    got = [_pick(a, ea), _pick(b, eb), _pick(a, ea), _pick(b, eb)]
    assert got == ["new", "new", None, None]           # the hour's 2, across both
    clock.advance(HOUR)
    got = [_pick(b, eb), _pick(a, ea), _pick(b, eb)]
    assert got == ["new", None, None]                  # the day's 3rd, then the day cap
    clock.advance(DAY)
    got = [_pick(x, e) for x, e in ((a, ea), (b, eb)) * 3]
    assert got.count("new") == 3                       # day 2: 6 a day, 3 an hour
    for s in stores:
        asyncio.run(s.close())


def _redis_stores(url: str, n: int):
    from mta.egress.shared.redis_store import RedisLimits
    return [RedisLimits(url, member=f"n{i}/w0", prefix="t:", lease_ttl=1.5, timeout=0.2,
                        fallback_fraction=0.5) for i in range(n)]


async def _take(c, day, hour, day_cap, hour_cap) -> int:
    """As a caller does: WAIT means ask again a moment later."""
    for _ in range(500):
        r = c.take(day, hour, day_cap, hour_cap)
        if r != WAIT:
            return r
        await asyncio.sleep(0.002)
    raise AssertionError("no answer from the store")


def test_redis_stores_never_above_the_caps_together(redis_server):
    async def main():
        loop = asyncio.get_running_loop()
        stores = _redis_stores(redis_server.url, 3)
        for s in stores:
            s.start(loop)
        counts = [s.count("src|gmail", 0.5) for s in stores]    # a 0.5 s warm-up hour
        granted = [0, 0, 0]

        async def worker(i: int, day: int, hour: int, n: int) -> None:
            for _ in range(n):
                if await _take(counts[i], day, hour, 400, 150) == GRANTED:
                    granted[i] += 1
                await asyncio.sleep(0)

        await asyncio.gather(*(worker(i, 1, 0, 200) for i in range(3)))
        hour0 = sum(granted)
        await asyncio.gather(*(worker(i, 1, 1, 200) for i in range(3)))
        day1 = sum(granted)
        r = stores[0].client
        ttl_hour = await r.pttl("t:warm:src|gmail:h0")
        ttl_day = await r.pttl("t:warm:src|gmail:d1")
        # day 2: new keys, from zero
        fresh = await _take(counts[1], 2, 24, 400, 150)
        await asyncio.sleep(1.2 * 2 + 1.1)             # two hours' worth and the margin
        gone = await r.exists("t:warm:src|gmail:h0")
        for s in stores:
            await s.close()
        return hour0, day1, granted, ttl_hour, ttl_day, fresh, gone

    hour0, day1, granted, ttl_hour, ttl_day, fresh, gone = asyncio.run(main())
    assert 150 - 3 * 3 <= hour0 <= 150, hour0
    assert day1 <= 300 and day1 >= 300 - 2 * 3 * 3, day1
    assert all(g > 10 for g in granted), granted
    assert 0 < ttl_hour <= 2000 and 2000 < ttl_day <= 25_000, (ttl_hour, ttl_day)
    assert fresh == GRANTED
    assert gone == 0


def test_redis_unreachable_warmup_counts_alone_at_the_fraction(redis_server, tmp_path):
    """Redis stopped: the store answers ALONE and Warmup holds its own counts at half of
    each cap; when it answers again, the shared counts are used again."""
    async def main():
        loop = asyncio.get_running_loop()
        (s,) = _redis_stores(redis_server.url, 1)
        s.start(loop)
        clock = VirtualClock()
        cfg = config(hour_divisor=1)       # default class: day 1 cap 3 = the hour cap
        cfg_major = cfg
        w = Warmup(cfg_major, shaping(), state_path=None, clock=clock, shared=s)
        e = Egress(cfg)
        redis_server.stop()
        c = s.count("probe", HOUR)
        first = c.take(1, 0, 10, 10)
        while not s.down:
            await asyncio.sleep(0.01)
            first = c.take(1, 0, 10, 10)
        alone = [_pick(w, e) for _ in range(3)]
        redis_server.start()
        deadline = loop.time() + 10
        back = None
        while loop.time() < deadline:
            back = _pick(w, e)
            if back is not None:
                break
            w._blocked.clear()
            await asyncio.sleep(0.05)
        await s.close()
        return first, alone, back

    first, alone, back = asyncio.run(main())
    assert first in (WAIT, ALONE)
    assert alone == ["new", None, None]        # max(1, int(3 * 0.5)) = 1 alone
    assert back == "new"                       # the store's count (nothing there yet)


def _reply(w: Warmup, code: int, status: str, n: int) -> None:
    at = Attempt("new", OTHER.name, mx=OTHER.name)
    msg = SimpleNamespace(rcpts=list(range(n)))
    w.observe(AttemptResult(msg, None, at, [(i, RemoteReply(code, status, "x"))
                                            for i in range(n)]))


def _steps(w: Warmup) -> int:
    return w.sources["new"].steps["default"]


def test_host_the_day_is_judged_on_every_worker_s_counts(tmp_path):
    """min_volume 10: each worker tried 6 recipients (alone: not judged, the cap would
    grow), 3 of them bounced; together 12 tried, 50 % bounced: both hold the cap."""
    clock = VirtualClock()
    stores = host_stores(tmp_path)
    (a, ea), (b, eb) = _warmups(tmp_path, stores, clock)
    for w in (a, b):
        _reply(w, 250, "2.0.0", 3)
        _reply(w, 550, "5.7.1", 3)
    a._flush_stats()
    clock.advance(DAY)
    _pick(b, eb)                      # b rolls first: a's counts are in the store
    _pick(a, ea)                      # a sends its own at its roll
    assert _steps(a) == 0 and _steps(b) == 0
    assert "held" in a.sources["new"].notes["default"]
    assert "12 recipients tried" in b.sources["new"].notes["default"] or \
        "of 12" in b.sources["new"].notes["default"], b.sources["new"].notes
    for s in stores:
        asyncio.run(s.close())


def test_redis_the_day_is_judged_on_every_node_s_counts(redis_server, tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        stores = _redis_stores(redis_server.url, 2)
        for s in stores:
            s.start(loop)
        clock = VirtualClock()
        (a, ea), (b, eb) = _warmups(tmp_path, stores, clock)
        for w in (a, b):
            _reply(w, 250, "2.0.0", 3)
            _reply(w, 550, "5.7.1", 3)
        for _ in range(2):    # each second: its new counts, or a look at the others'
            a._flush_stats()
            b._flush_stats()
            await asyncio.sleep(0.3)
        assert a._stat_seen == b._stat_seen == {("new", "default", 1): [12, 6, 0, 0]}
        clock.advance(DAY)
        _pick(a, ea)
        _pick(b, eb)
        notes = [x.sources["new"].notes["default"] for x in (a, b)]
        for s in stores:
            await s.close()
        return [_steps(a), _steps(b)], notes

    steps, notes = asyncio.run(main())
    assert steps == [0, 0], notes
    assert all("of 12" in n for n in notes), notes
