"""Adaptive actions shared between workers and nodes (mta/egress/shared share_action /
on_action, mta/egress/adaptive.py Adaptive.share / remote).

host: two workers' HostLimits on one table (the actions file beside it): an action
published by one is handed to the other once, never back to itself; junk and oversized
lines are skipped; the file is compacted past its size. Two Adaptive objects wired through
the table: a rule's suspension and a `set` on one are in force on the other for the
remaining time, with their way back local. redis: the same through a real redis-server
of our own (tools/cluster_rig.py RedisServer); malformed items from the store are dropped.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from conftest import host_stores, missing_tool
from test_adaptive_unit import DELIVERY, Hands, config
from virtual_time import VirtualLoop

from mta.egress.adaptive import Adaptive
from mta.egress.limits import LimitsSource
from mta.egress.shaping import Shaping
from mta.egress.shared import host_table
from mta.egress.shared.base import ACTION_MAX
from mta.model.attempt import RemoteReply

RULES = """
[provider.slowpoke]
match = ["*.slow.test"]
max_message_rate = "100/m"

[[provider.slowpoke.automation]]
name = "blocked"
text = 'blocked'
action = ["suspend"]
duration = "30m"

[[provider.slowpoke.automation]]
name = "slow-down"
text = 'slow down'
set = { max_message_rate = "10/m" }
duration = "10m"
steps = 1
"""


def test_host_actions_reach_the_other_worker_once(tmp_path):
    w0, w1 = host_stores(tmp_path)
    got0: list = []
    got1: list = []
    w0.on_action = lambda a, left: got0.append((a, left))
    w1.on_action = lambda a, left: got1.append((a, left))
    w0.share_action({"rule": "r", "action": "suspend"}, 30.0)
    w0.share_action({"big": "x" * ACTION_MAX}, 30.0)        # too big: not shared
    w0.share_action({"rule": "gone"}, 0.0)                   # no time left: not shared
    with open(w0.actions_path, "ab") as f:                   # junk from anywhere
        f.write(b"nonsense\n99999999999\t{not json\n" + b"1\t" + b"x" * 9000 + b"\n")
    w1.poll_actions()
    w0.poll_actions()
    assert got0 == []                                         # never back to its sender
    assert len(got1) == 1 and got1[0][0] == {"rule": "r", "action": "suspend"}
    assert 20.0 < got1[0][1] <= 30.01   # less the time since (a loaded box); clocks round
    w1.poll_actions()
    assert len(got1) == 1                                     # each once
    w1.share_action({"rule": "r2", "action": "suspend"}, 5.0)
    w0.poll_actions()
    assert [a["rule"] for a, _ in got0] == ["r2"]
    for w in (w0, w1):
        asyncio.run(w.close())


def test_host_actions_file_is_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(host_table, "ACTIONS_FILE_MAX", 2000)
    w0, w1 = host_stores(tmp_path)
    got: list = []
    w1.on_action = lambda a, left: got.append(a["n"])
    for n in range(40):
        w0.share_action({"n": n}, 0.001 if n < 30 else 60.0)
        if n == 5:
            w1.poll_actions()
    w1.poll_actions()
    assert w0.actions_path.stat().st_size < 4000
    assert set(range(30, 40)) <= set(got)
    for w in (w0, w1):
        asyncio.run(w.close())


def _adaptive(tmp_path, loop, store):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    limits = LimitsSource(Shaping.load([rules], DELIVERY), clock=loop.clock)
    limits.start(loop)
    hands = Hands()
    ad = Adaptive(limits, hands, config(), clock=loop.clock)
    ad.start(loop)
    ad.share = store.share_action
    store.on_action = ad.remote
    return ad, hands, limits


def _send(ad: Adaptive, limits: LimitsSource, text: str) -> None:
    p = limits.path("ip-1", "mx1.slow.test", "slow.test", ("mx1.slow.test",))
    ad.observe("ip-1", p.provider, False, limits.limits(p),
               [(0, RemoteReply(421, "4.7.0", text))], "t1", "c1", lambda r: False)


def test_host_suspension_and_set_reach_the_other_worker(tmp_path):
    loop = VirtualLoop()
    w0, w1 = host_stores(tmp_path)
    a0, _h0, l0 = _adaptive(tmp_path, loop, w0)
    a1, h1, l1 = _adaptive(tmp_path, loop, w1)
    _send(a0, l0, "you are blocked")
    _send(a0, l0, "slow down please")
    assert a0.counters["shared"] == 2
    w1.poll_actions()
    assert a1.counters["received"] == 2
    assert [c[:4] for c in h1.calls] == [("pause_pair", "ip-1", "slowpoke", False)]
    assert a1.pair_until("ip-1", "slowpoke") == pytest.approx(loop.clock() + 1800, abs=2)
    p = l1.path("ip-1", "mx1.slow.test", "slow.test", ("mx1.slow.test",))
    assert str(l1.limits(p).max_message_rate) == "10/m"
    assert a1.counters["shared"] == 0              # not published again
    w0.poll_actions()
    assert a0.counters["received"] == 0
    # the way back is local: the set steps back and ends, the suspension ends
    loop.run(asyncio.sleep(1801 + 600))
    assert not a1.active
    assert ("lift_pair", "ip-1", "slowpoke", False) in h1.calls
    assert str(l1.limits(p).max_message_rate) == "100/m"
    for a, lim in ((a0, l0), (a1, l1)):
        a.stop()
        lim.stop()
    for w in (w0, w1):
        loop.run(w.close())
    loop.close()


def test_remote_refuses_malformed_actions(tmp_path):
    loop = VirtualLoop()
    (w0,) = host_stores(tmp_path, 1)
    a, hands, limits = _adaptive(tmp_path, loop, w0)
    good = {"rule": "x", "action": "suspend", "source": "ip-1", "provider": "p",
            "site": False, "target": "", "reason": "r"}
    for bad in ({**good, "action": "explode"}, {**good, "source": 7},
                {**good, "provider": "a\r\nb"}, {**good, "site": "yes"},
                {**good, "action": "set", "values": {"no_such_key": 1}, "base": {},
                 "steps": 1, "step_for": 1, "recover_after": 0},
                {**good, "action": "set", "values": {"max_message_rate": "fast"},
                 "base": {}, "steps": 1, "step_for": 1, "recover_after": 0},
                "not a dict", {"rule": "x"}):
        assert not a.remote(bad, 60.0)
    assert not a.remote(good, -1.0) and not a.remote(good, 1e9)
    assert not a.active and not hands.calls
    assert a.remote(good, 60.0)
    assert hands.calls[0][:3] == ("pause_pair", "ip-1", "p")
    a.stop()
    limits.stop()
    loop.run(w0.close())
    loop.close()


def test_redis_actions_reach_the_other_node(redis_server):
    from mta.egress.shared.redis_store import RedisLimits

    async def main():
        loop = asyncio.get_running_loop()
        stores = [RedisLimits(redis_server.url, member=f"n{i}/w0", prefix="t:",
                              lease_ttl=1.5, timeout=0.2) for i in range(2)]
        got: list[list] = [[], []]
        for i, s in enumerate(stores):
            s.start(loop)
            s.on_action = lambda a, left, i=i: got[i].append((a, left))
        stores[0].share_action({"rule": "r", "action": "suspend"}, 20.0)
        stores[0].share_action({"rule": "short", "action": "suspend"}, 0.3)
        await asyncio.sleep(0.1)
        # junk in the set (another program, or a node of another version): skipped
        await stores[0].client.zadd("t:adaptive", {"{junk": 1e12, json.dumps({"id": 5}): 1e12})
        await asyncio.sleep(0.5)        # "short" ended before anyone looked
        for s in stores:
            await s.poll_actions()
        await asyncio.sleep(1.3)        # and the pollers ran too
        n = await stores[0].client.zcard("t:adaptive")
        for s in stores:
            await s.close()
        return got, n

    got, n = asyncio.run(main())
    assert got[0] == []
    assert [a["rule"] for a, _ in got[1]] == ["r"]
    assert 10.0 < got[1][0][1] <= 20.01   # less the time since (a loaded box); clocks round
    assert n == 3              # "short" is dropped once it ended


def test_redis_actions_taken_while_it_was_away_are_shared_when_it_is_back(tmp_path):
    """An action taken while the redis-server is down stays this node's only until Redis
    answers again (a server started again on the same port): then it is published for
    the time it has left and the other node takes it (before, it was never shared)."""
    from cluster_rig import RedisServer

    from mta.egress.shared.redis_store import RedisLimits
    if not RedisServer.available():
        missing_tool("redis-server (apt install redis-server)")
    server = RedisServer(tmp_path / "redis").start()

    async def main():
        loop = asyncio.get_running_loop()
        stores = [RedisLimits(server.url, member=f"n{i}/w0", prefix="t:",
                              lease_ttl=1.5, timeout=0.2) for i in range(2)]
        got: list[list] = [[], []]
        for i, s in enumerate(stores):
            s.start(loop)
            s.on_action = lambda a, left, i=i: got[i].append((a, left))
        server.stop()
        stores[0].share_action({"rule": "while-away", "action": "suspend"}, 30.0)
        stores[0].share_action({"rule": "too-short", "action": "suspend"}, 1.5)
        await asyncio.sleep(1.2)
        assert stores[0].down and got == [[], []]
        await loop.run_in_executor(None, server.start)
        deadline = loop.time() + 8
        while not got[1] and loop.time() < deadline:
            await asyncio.sleep(0.2)
        for s in stores:
            await s.close()
        return got

    try:
        got = asyncio.run(main())
    finally:
        server.stop()
    assert got[0] == []
    assert [a["rule"] for a, _ in got[1]] == ["while-away"], got[1]
    assert 15.0 < got[1][0][1] < 30.0


def test_host_actions_of_a_previous_boot_are_dropped(tmp_path, monkeypatch):
    """Their ends are on that boot's monotonic clock: a table made before this boot is
    cleared, and the actions file with it."""
    (w0,) = host_stores(tmp_path, 1)
    w0.share_action({"rule": "r"}, 3600.0)
    asyncio.run(w0.close())
    assert w0.actions_path.exists()
    monkeypatch.setattr(host_table, "boot_id", lambda: b"another-boot".ljust(36))
    (w1,) = host_stores(tmp_path, 1)
    got: list = []
    w1.on_action = lambda a, left: got.append(a)
    w1.poll_actions()
    assert got == [] and not w1.actions_path.exists()
    asyncio.run(w1.close())
