"""Shared limits in real daemons, beside the 3-node test (tests/scenarios/test_cluster.py):
- backend host: one node with 2 worker processes shares a site's connections and rate
  through the table under its spool root, no service;
- backend redis with the redis-server stopped under load: each node holds the limits
  alone at fallback_fraction, logs it once, and logs once more when Redis is back;
  nothing is lost.
Uses tools/cluster_rig.py and tools/sink.py (arrival times, concurrent connections).
"""
from __future__ import annotations

import threading
import time

from cluster_rig import ClusterRig, RedisServer
from conftest import missing_tool


def _count(times: list, a: float, b: float) -> int:
    return sum(1 for t, _, _ in times if a <= t < b)


def _fill_and_count(rig: ClusterRig, node, sent: list[str], seconds: int) -> tuple[dict, int]:
    """Inject `sent` over 4 connections at once (SO_REUSEPORT: both workers get mail), then
    count what the sink received in `seconds` from a second after: (sink stats, count)."""
    fill = [threading.Thread(target=rig.inject, args=(node, sent[i::4], 25)) for i in range(4)]
    for t in fill:
        t.start()
    for t in fill:
        t.join(120)
    window = (time.time() + 1, time.time() + 1 + seconds)
    time.sleep(max(0.0, window[1] + 0.5 - time.time()))
    st = rig.sink_stats()
    return st, _count(st["times"], *window)


def test_host_backend_shares_limits_between_workers(tmp_path):
    """One node, 2 worker processes, [cluster] backend = "host" (the table in shared memory
    under the spool root, no service): the site's 3 connections and 50/s hold for both
    workers together, and every message arrives."""
    rig = ClusterRig(tmp_path / "rig", nodes=1, workers=2, connections=3, rate="50/s",
                     delay_ms=10, backend="host")
    rig.start()
    try:
        (node,) = rig.nodes
        assert (node.spool / "shared-limits").exists()
        sent = [f"h-{k}@dest.test" for k in range(700)]
        st, n = _fill_and_count(rig, node, sent, 8)
        assert 50 * 8 * 0.9 <= n <= 50 * 8 * 1.1, n
        deadline = time.time() + 60
        while {r for _, _, r in st["times"]} < set(sent) and time.time() < deadline:
            time.sleep(1)
            st = rig.sink_stats()
        assert {r for _, _, r in st["times"]} >= set(sent)
        assert st["peak_open"] <= 3, st["peak_open"]
        # both workers delivered (each logs to its own mta.wN.jsonl)
        for w in ("mta.w0.jsonl", "mta.w1.jsonl"):
            assert b'"Delivery"' in (node.log_dir / w).read_bytes(), w
    finally:
        rig.stop()


def test_queue_class_rate_holds_for_both_workers(tmp_path):
    """A queue class's max_message_rate (40/s for bulk, the default class) with 2 worker
    processes and backend host: 40/s at the receiver, not 40/s per worker (it was 80/s:
    each worker's lanes had their own bucket)."""
    rig = ClusterRig(tmp_path / "rig", nodes=1, workers=2, connections=8, rate="1000/s",
                     backend="host",
                     extra='[[queue_class]]\nname = "bulk"\nmax_message_rate = "40/s"\n')
    rig.start()
    try:
        (node,) = rig.nodes
        sent = [f"q-{k}@dest.test" for k in range(500)]
        _, n = _fill_and_count(rig, node, sent, 6)
        assert 40 * 6 * 0.85 <= n <= 40 * 6 * 1.1, n
        for w in ("mta.w0.jsonl", "mta.w1.jsonl"):
            assert b'"Delivery"' in (node.log_dir / w).read_bytes(), w
    finally:
        rig.stop()


def test_redis_stopped_under_load_limits_held_locally(tmp_path):
    """Two nodes; the redis-server stops while they deliver: each goes on alone at
    fallback_fraction (0.5) of the site's 4 connections and 40/s, logs it once, and logs
    again once Redis is back (a redis-server started again on the same port). A node
    holding more than its share when Redis goes away closes the excess (after the message
    in hand), and the other opens no more than it held until then: the receiver never
    sees more than the 4 (it saw 6 when one node held all 4 at the outage's start)."""
    if not RedisServer.available():
        missing_tool("redis-server (apt install redis-server)")
    rig = ClusterRig(tmp_path / "rig", nodes=2, workers=1, connections=4, rate="40/s",
                     delay_ms=10, lease_ttl="3s", max_deliveries=20)
    rig.start()
    try:
        sent = {n.name: [f"{n.name}-{k}@dest.test" for k in range(450)] for n in rig.nodes}
        fill = [threading.Thread(target=rig.inject, args=(n, sent[n.name])) for n in rig.nodes]
        for t in fill:
            t.start()
        for t in fill:
            t.join(120)
        assert rig.sink_stats()["peak_open"] <= 4
        rig.redis.stop()
        stopped = time.time()
        # from after the outage's first lease_ttl/3 + timeout + 1 s (2.25 s here), when
        # neither node takes a lease more than it held
        window = (stopped + 3, stopped + 11)
        time.sleep(window[0] - time.time())
        open_now = []
        while time.time() < window[1]:
            open_now.append(rig.sink_stats()["open"])
            time.sleep(0.3)
        st = rig.sink_stats()
        alone = _count(st["times"], *window)
        # each node alone at 2 connections and 20/s: 40/s together
        assert 40 * 8 * 0.85 <= alone <= 40 * 8 * 1.15, alone
        assert max(open_now) <= 4, open_now
        assert st["peak_open"] <= 4, st["peak_open"]     # at no moment, the outage's start too
        rig.redis.start()
        recovered = time.time()
        everything = {r for rs in sent.values() for r in rs}
        open_now = []
        while time.time() < recovered + 60:
            st = rig.sink_stats()
            if time.time() > recovered + 2:
                open_now.append(st["open"])
            if {r for _, _, r in st["times"]} >= everything:
                break
            time.sleep(0.3)
        assert {r for _, _, r in st["times"]} >= everything
        assert max(open_now, default=0) <= 4, open_now
        assert st["peak_open"] <= 4, st["peak_open"]     # nor when Redis came back
        for n in rig.nodes:
            err = (n.workdir / "daemon.err").read_text()
            assert err.count("unreachable") == 1, err[-3000:]
            assert err.count("shared limits back") == 1, err[-3000:]
    finally:
        rig.stop()
