"""Warm-up caps and adaptive actions shared by real daemons (issue 15 item 2):
- backend host: one node with 2 worker processes and a warming source with an hour cap
  of 5: the sink receives 5 messages in the hour, not 5 per worker;
- backend redis: two nodes; an automation rule suspends the (source, provider) pair on the
  node that saw the reply, and the other node suspends it too (its GET /adaptive).
Uses tools/cluster_rig.py (moved to 127.0.150.x-127.0.152.x) and tools/sink.py.
"""
from __future__ import annotations

import threading
import time

import cluster_rig
import pytest
from cluster_rig import ClusterRig
from conftest import move_rig

WARMUP = """
[warmup]
day_length = "24h"
default = [20]
hour_divisor = 4
"""


@pytest.fixture
def rig_addresses(monkeypatch):
    move_rig(monkeypatch, "127.0.150.1", "127.0.150.2", "127.0.151.0", "127.0.152.0")


def _warming(node: cluster_rig.Node) -> None:
    """The node's source starts warming at its first start."""
    text = node.config.read_text()
    line = f'address = "{cluster_rig.source_ip(node.index)}"\n'
    node.config.write_text(text.replace(line, line + 'warmup_start = "now"\n', 1))


def _inject_then_watch(rig: ClusterRig, jobs: list[tuple], seconds: float) -> list:
    """Each job's rig.inject(node, recipients, per_connection) at once, one thread each;
    then what the sink has received after `seconds` more (a cap must hold that long)."""
    fill = [threading.Thread(target=rig.inject, args=job) for job in jobs]
    for t in fill:
        t.start()
    for t in fill:
        t.join(120)
    time.sleep(seconds)
    return rig.sink_stats()["times"]


def test_host_backend_two_workers_share_the_hour_cap(tmp_path, rig_addresses):
    """Hour cap 5 (day cap 20, hour_divisor 4) for the warming source, 2 workers, both
    given mail: 5 messages reach the sink in the hour, the rest wait."""
    rig = ClusterRig(tmp_path / "rig", nodes=1, workers=2, connections=4, rate="1000/s",
                     backend="host", extra=WARMUP)
    (node,) = rig.nodes
    _warming(node)
    rig.start()
    try:
        sent = [f"w-{k}@dest.test" for k in range(60)]
        # many connections: both workers get mail
        received = _inject_then_watch(rig, [(node, sent[i::6], 2) for i in range(6)], 8)
        # each worker took mail (its own log records the receptions)
        for w in ("mta.w0.jsonl", "mta.w1.jsonl"):
            assert b'"Reception"' in (node.log_dir / w).read_bytes(), w
        assert len(received) == 5, len(received)
    finally:
        rig.stop()


RULE = """
[[default.automation]]
name = "scripted-defer"
text = 'try again later \\(scripted\\)'
action = ["suspend"]
duration = "10m"
"""


def _sources(rig: ClusterRig, since: float) -> set[str]:
    return {src for t, src, _ in rig.sink_stats()["times"] if t >= since}


def test_redis_an_action_on_one_node_suspends_the_pair_on_the_other(tmp_path, rig_addresses):
    """Two nodes (one worker each), one redis-server; both name their source "out" (each
    with its own address). Node 1 gets the sink's scripted 451 and its rule suspends
    (out, the sink's site); node 2 applies the same suspension (its AdaptiveAction record)
    and stops sending there, while it delivered before."""
    if not cluster_rig.RedisServer.available():
        from conftest import missing_tool
        missing_tool("redis-server (apt install redis-server)")
    rig = ClusterRig(tmp_path / "rig", nodes=2, workers=1, connections=4, rate="1000/s")
    with open(rig.shaping, "a") as f:
        f.write(RULE)
    for n in rig.nodes:
        text = n.config.read_text()
        n.config.write_text(text.replace(f'name = "{n.name}"\n', 'name = "out"\n', 1))
    rig.start()
    try:
        n1, n2 = rig.nodes
        t0 = time.time()
        rig.inject(n2, ["before-1@dest.test", "before-2@dest.test"])
        deadline = time.time() + 30
        while cluster_rig.source_ip(2) not in _sources(rig, t0) and time.time() < deadline:
            time.sleep(0.3)
        assert cluster_rig.source_ip(2) in _sources(rig, t0)     # node 2 delivers
        rig.inject(n1, ["defer-1@dest.test"])
        deadline = time.time() + 30
        mine = theirs = []
        while time.time() < deadline:
            mine = [r for r in n1.records("AdaptiveAction") if r.get("rule") == "scripted-defer"]
            theirs = [r for r in n2.records("AdaptiveAction")
                      if r.get("rule") == "scripted-defer"]
            if mine and theirs:
                break
            time.sleep(0.3)
        assert mine and mine[0]["action"] == "suspend", mine
        assert theirs and theirs[0]["action"] == "suspend" and theirs[0]["source"] == "out", \
            theirs
        assert theirs[0]["provider"] == mine[0]["provider"]
        # node 2 holds its mail for the site now
        t1 = time.time()
        rig.inject(n2, [f"after-{k}@dest.test" for k in range(3)])
        time.sleep(4)
        assert cluster_rig.source_ip(2) not in _sources(rig, t1)
    finally:
        rig.stop()


def test_redis_two_nodes_share_the_hour_cap(tmp_path, rig_addresses):
    """Two nodes, one redis-server, the warming source named alike on both ("out", each
    its own address), hour cap 5: the sink receives 5 across both nodes."""
    if not cluster_rig.RedisServer.available():
        from conftest import missing_tool
        missing_tool("redis-server (apt install redis-server)")
    rig = ClusterRig(tmp_path / "rig", nodes=2, workers=1, connections=4, rate="1000/s",
                     extra=WARMUP)
    for n in rig.nodes:
        _warming(n)
        text = n.config.read_text()
        n.config.write_text(text.replace(f'name = "{n.name}"\n', 'name = "out"\n', 1))
    rig.start()
    try:
        received = _inject_then_watch(
            rig, [(n, [f"{n.name}-{k}@dest.test" for k in range(20)], 5) for n in rig.nodes], 10)
        assert len(received) == 5, len(received)
        assert {src for _, src, _ in received} <= {cluster_rig.source_ip(1),
                                                   cluster_rig.source_ip(2)}
    finally:
        rig.stop()
