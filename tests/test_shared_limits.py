"""Shared limits (mta/egress/shared): each backend against what it must hold.

redis: a real redis-server of our own (tools/cluster_rig.py RedisServer) shared by several
RedisLimits stores, as the processes of a cluster share it: GCRA accuracy, connection
leases counted across stores, a dead holder's leases expiring within the TTL, renewal,
and the fallback while the server is stopped (fast calls, limits at the fraction, one
log line each way, leases taken alone registered when it is back). host: two workers'
HostLimits on one table file: leases and rates across them, a restarted worker's column
cleared, nothing touched before start. local: no store at all.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from mta.config.load import parse_config
from mta.egress.shared import open_shared
from mta.egress.shared.host_table import HostLimits
from mta.model.node import WorkerSlot
from mta.model.rate import Rate


def _stores(url: str, n: int, **kw):
    from mta.egress.shared.redis_store import RedisLimits
    args = dict(prefix="t:", lease_ttl=1.5, timeout=0.2, fallback_fraction=0.5)
    args.update(kw)
    return [RedisLimits(url, member=f"n{i}/w0", **args) for i in range(n)]


async def _paced(rate, until: float, times: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        wait = rate.delay(loop.time())
        if wait > 0:
            await asyncio.sleep(wait)
            continue
        times.append(loop.time())


def test_redis_gcra_holds_the_rate_across_stores(redis_server):
    async def main():
        loop = asyncio.get_running_loop()
        stores = _stores(redis_server.url, 3)
        for s in stores:
            s.start(loop)
        times: list[float] = []
        start = loop.time()
        await asyncio.gather(*(_paced(s.rate("rate:x", Rate(200, 1)), start + 4.0, times)
                               for s in stores))
        for s in stores:
            await s.close()
        return start, times

    start, times = asyncio.run(main())
    # a full burst (one second's worth) at first, then the rate: 3 s x 200/s
    steady = sum(1 for t in times if start + 1.0 <= t < start + 4.0)
    assert 600 * 0.92 <= steady <= 600 * 1.08, steady
    assert len(times) <= 200 + 800 + 20


def test_redis_leases_count_across_stores_and_expire(redis_server):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = _stores(redis_server.url, 2)
        a.start(loop)
        b.start(loop)
        keys = [("conn:p", 10), ("conn:site", 3)]
        held = [await a.acquire(keys), await a.acquire(keys), await b.acquire(keys)]
        assert all(held)
        assert await b.acquire(keys) is None           # the site is at 3, cluster-wide
        assert await b.acquire([("conn:other", 1)]) is not None
        held[2].release()
        await asyncio.sleep(0.1)
        again = await b.acquire(keys)
        assert again is not None
        # renewal keeps live leases past the TTL
        await asyncio.sleep(2.5)
        assert await b.acquire(keys) is None
        # a dies without giving anything back (no release, no renewal): its two leases
        # expire within the TTL (1.5 s) and b takes them
        a._renewer.cancel()
        a.leases.clear()
        got, t0 = [], loop.time()
        while len(got) < 2 and loop.time() - t0 < 5:
            lease = await b.acquire(keys)
            if lease is not None:
                got.append(lease)
            else:
                await asyncio.sleep(0.05)
        waited = loop.time() - t0
        await b.close()
        await a.client.aclose()
        return len(got), waited

    n, waited = asyncio.run(main())
    assert n == 2
    assert waited <= 1.5 + 0.5 + 1.0     # the TTL since the last renewal (every TTL/3) + slack


def test_redis_unreachable_falls_back_and_recovers(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="mta.cluster")

    async def main():
        loop = asyncio.get_running_loop()
        (s,) = _stores(redis_server.url, 1)
        s.start(loop)
        keys = [("conn:site", 6)]
        first = await s.acquire(keys)
        assert first is not None
        redis_server.stop()
        t0 = loop.time()
        alone = [await s.acquire(keys) for _ in range(4)]
        took = loop.time() - t0
        # the others' leases still stand at first: none more than the one held
        assert alone == [None] * 4
        await asyncio.sleep(max(0.0, s.settled_at - s.clock()))
        alone = [await s.acquire(keys) for _ in range(4)]
        # 6 x 0.5 = 3 held alone, one of them the lease taken before
        assert sum(1 for x in alone if x is not None) == 2
        times: list[float] = []
        rate = s.rate("rate:y", Rate(100, 1))
        await _paced(rate, loop.time() + 2.0, times)
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        redis_server.start()
        deadline = loop.time() + 10
        while s.down and loop.time() < deadline:
            await asyncio.sleep(0.1)
        recovered = not s.down
        await s.renew()
        count = await s.client.zcard("t:conn:site")
        await s.close()
        return took, times, warnings, recovered, count

    took, times, warnings, recovered, count = asyncio.run(main())
    assert took < 4 * 0.2 + 0.5           # never longer than the timeout per call
    # locally at half the rate: 50/s with its own burst of 50 over 2 s
    assert 100 * 0.85 <= len(times) <= 50 + 100 + 2, len(times)
    assert len(warnings) == 1
    assert recovered
    assert [r for r in caplog.records if "answers again" in r.getMessage()]
    assert count == 3                      # leases taken alone are registered again


def test_redis_outage_adds_no_connection_until_the_others_have_seen_it(redis_server):
    """a holds all 4 of a site's connections when the redis-server stops; b, alone at
    half (2), must not open 2 more at once: a has not seen the outage yet (it does at its
    next renewal, within lease_ttl/3) and still holds 4, so the receiver would see 6. b
    may replace a connection it held; above that it waits until a has closed its excess."""
    async def main():
        loop = asyncio.get_running_loop()
        a, b = _stores(redis_server.url, 2)
        a.start(loop)
        b.start(loop)
        site, other = [("conn:site", 4)], [("conn:other", 4)]
        held = [await a.acquire(site) for _ in range(4)]
        assert all(held)
        mine = await b.acquire(other)
        assert mine is not None
        redis_server.stop()
        early = [await b.acquire(site), await b.acquire(site)]
        mine.release()                     # b closes its connection to the other site ...
        replaced = await b.acquire(other)  # ... and may open it again: it held one
        extra = await b.acquire(other)
        settled = b.settled_at - b.clock()
        await asyncio.sleep(max(0.0, settled))
        late = [await b.acquire(site) for _ in range(3)]
        for s in (a, b):
            await s.close()
        return early, replaced, extra, settled, late

    early, replaced, extra, settled, late = asyncio.run(main())
    assert early == [None, None]
    assert replaced is not None and extra is None
    assert 1.5 / 3 <= settled <= 1.5 / 3 + 0.2 + 1.0
    assert sum(1 for x in late if x is not None) == 2      # then its share, 4 x 0.5


def test_host_table_shares_leases_and_rate_between_workers(tmp_path):
    path = tmp_path / "shared-limits"
    w0 = HostLimits(path, worker=WorkerSlot(0, 2, "n"), member="n/w0")
    w1 = HostLimits(path, worker=WorkerSlot(1, 2, "n"), member="n/w1")
    assert not path.exists()               # nothing touched before start
    w0.start()
    w1.start()
    keys = [("conn:p", 10), ("conn:site", 3)]
    held = [w0.take(keys), w1.take(keys), w1.take(keys)]
    assert all(held)
    assert w0.take(keys) is None
    assert w0.connections("conn:site") == 3
    held[0].release()
    assert w1.take(keys) is not None
    # worker 1 dies holding 3 and starts again: its column is cleared
    w1b = HostLimits(path, worker=WorkerSlot(1, 2, "n"), member="n/w1")
    w1b.start()
    assert w0.connections("conn:site") == 0
    # a rate across both workers: over 2 s of alternating asks, burst + rate
    clock = [1000.0]
    for w in (w0, w1b):
        w.clock = lambda: clock[0]
    r0, r1 = w0.rate("rate:z", Rate(50, 1)), w1b.rate("rate:z", Rate(50, 1))
    sent = 0
    while clock[0] < 1002.0:
        for r in (r0, r1):
            if r.delay(clock[0]) == 0.0:
                sent += 1
        clock[0] += 0.001
    assert 50 + 100 - 2 <= sent <= 50 + 100 + 2, sent
    for w in (w0, w1, w1b):
        asyncio.run(w.close())


def test_local_backend_builds_nothing(tmp_path):
    cfg = parse_config("")
    assert cfg.cluster.backend == "auto"     # one worker: local
    assert open_shared(cfg.cluster, WorkerSlot(), Path(tmp_path)) is None
    assert open_shared(parse_config('[cluster]\nbackend = "local"\n').cluster,
                       WorkerSlot(1, 2, "n"), Path(tmp_path)) is None


def test_auto_backend_shares_between_workers(tmp_path):
    """The default with several workers: the host table, so the configured limits hold
    for the host, not per worker."""
    from mta.egress.shared.host_table import HostLimits
    shared = open_shared(parse_config("").cluster, WorkerSlot(0, 2, "n"), Path(tmp_path))
    try:
        assert isinstance(shared, HostLimits)
    finally:
        asyncio.run(shared.close())


def test_two_engines_share_a_site_through_the_host_table(monkeypatch, tmp_path):
    """The delivery seam on virtual time: two DeliveryEngines as workers 0 and 1 of one
    node, backend host: the site's 3 connections and 2/s hold for both together; a worker
    refused a lease looks again and ramps up when the other's connections close."""
    from delivery_fakes import FakeSpool, Net, make_id
    from virtual_time import VirtualLoop

    import mta.delivery.dispatcher as dispatcher_module
    from mta.delivery.engine import DeliveryEngine

    loop = VirtualLoop()
    (tmp_path / "shaping.toml").write_text(
        '["default"]\nsite_connection_limit = 3\nsite_max_message_rate = "2/s"\n'
        'max_deliveries_per_connection = 4\n')
    config = parse_config(
        f'[server]\nhostname = "mx.test"\n[spool]\ndirectory = "{tmp_path / "spool"}"\n'
        f'[egress]\nshaping = ["{tmp_path / "shaping.toml"}"]\n'
        f'[delivery]\nroutes = {{"example.test" = "127.0.0.1:2525"}}\n'
        f'[cluster]\nbackend = "host"\n')
    net = Net(loop, send_time=0.2)
    monkeypatch.setattr(dispatcher_module, "SmtpClient", net.client())
    engines = []
    for i in range(2):
        spool = FakeSpool()
        e = DeliveryEngine(config, spool, None, lambda s, r, c: None, clock=loop.clock,
                           worker=WorkerSlot(i, 2, "n1"))
        e.shared.clock = loop.time          # the table's GCRA on virtual time too
        e.start(loop)
        engines.append((e, spool))
    assert (tmp_path / "spool" / "shared-limits").exists()
    for e, spool in engines:
        for _ in range(20):
            msg_id = make_id(loop.clock())
            e.submit(msg_id, spool.add(msg_id, "a@x.test", ["user@example.test"]))
    loop.run(asyncio.sleep(60))
    times = sorted(t for _, _, t in net.sends)
    assert len(times) == 40
    assert net.peak <= 3
    # GCRA: at most the burst (2) plus 2/s over any window
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 5) <= 2 + 2 * 5
    assert times[-1] - times[0] >= (40 - 2) / 2 - 1
    for e, _ in engines:
        loop.run(e.stop())
    while pending := asyncio.all_tasks(loop):
        for t in pending:
            t.cancel()
        loop.run(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def test_a_bad_redis_url_names_the_key(tmp_path):
    cfg = parse_config('[cluster]\nbackend = "redis"\nredis_url = "foo://x"\n')
    with pytest.raises(ValueError, match=r"\[cluster\] redis_url: "):
        open_shared(cfg.cluster, WorkerSlot(), Path(tmp_path))
