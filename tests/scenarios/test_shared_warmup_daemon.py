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

WARMUP = """
[warmup]
day_length = "24h"
default = [20]
hour_divisor = 4
"""


@pytest.fixture
def rig_addresses(monkeypatch):
    monkeypatch.setattr(cluster_rig, "REDIS_IP", "127.0.150.1")
    monkeypatch.setattr(cluster_rig, "SINK_IP", "127.0.150.2")
    monkeypatch.setattr(cluster_rig, "listen_ip", lambda i: f"127.0.151.{i}")
    monkeypatch.setattr(cluster_rig, "source_ip", lambda i: f"127.0.152.{i}")


def _warming(node: cluster_rig.Node) -> None:
    """The node's source starts warming at its first start."""
    text = node.config.read_text()
    line = f'address = "{cluster_rig.source_ip(node.index)}"\n'
    node.config.write_text(text.replace(line, line + 'warmup_start = "now"\n', 1))


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
        fill = [threading.Thread(target=rig.inject, args=(node, sent[i::6], 2))
                for i in range(6)]       # many connections: both workers get mail
        for t in fill:
            t.start()
        for t in fill:
            t.join(120)
        received = []
        deadline = time.time() + 8
        while time.time() < deadline:
            received = rig.sink_stats()["times"]
            time.sleep(0.5)
        # each worker took mail (its own log records the receptions)
        for w in ("mta.w0.jsonl", "mta.w1.jsonl"):
            assert b'"Reception"' in (node.log_dir / w).read_bytes(), w
        assert len(received) == 5, len(received)
    finally:
        rig.stop()
