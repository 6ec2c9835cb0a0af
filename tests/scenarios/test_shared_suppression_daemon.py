"""Suppression shared across nodes by real daemons (issue 15, mta/feedback/suppression/
shared.py): two nodes with [cluster] backend = "redis" and one suppression key file;
node 2 runs two workers (worker 0 applies the entries, worker 1 sees them through the
host's store). A recipient hard-bounces on node 1 (the sink answers 550 5.1.1); within
seconds node 2 refuses it at RCPT as it does any suppressed address (550 5.7.1), on
every connection, while it still takes mail for others; its entry names node 1 and
nothing comes back to node 1; /metrics counts what was published and applied.
Uses tools/cluster_rig.py (moved to 127.0.121.210-215) and tools/sink.py.
"""
from __future__ import annotations

import smtplib
import time
import urllib.request

import cluster_rig
import pytest
from cluster_rig import ClusterRig
from conftest import move_rig
from prometheus_client.parser import text_string_to_metric_families

from mta.feedback.suppression import SuppressionList


@pytest.fixture
def rig_addresses(monkeypatch):
    move_rig(monkeypatch, "127.0.121.210", "127.0.121.211", "127.0.121.211", "127.0.121.213")


def _refused(node: cluster_rig.Node, rcpt: str) -> bool:
    """Does the node refuse `rcpt` at RCPT as suppressed (one new connection)?"""
    with smtplib.SMTP(node.host, node.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("rig@sender.test")
        code, text = s.rcpt(rcpt)
        s.rset()
    if code == 250:
        return False
    assert code == 550 and b"5.7.1" in text, (code, text)
    return True


def _with_metrics(node: cluster_rig.Node) -> int:
    """Give the node an admin API with a public /metrics: worker 0's port."""
    port = cluster_rig.free_port(node.host)
    text = node.config.read_text()
    node.config.write_text(text.replace('[admin]\nlisten = ""\n', f'[admin]\nlisten = '
                                        f'"{node.host}:{port}"\nmetrics_public = true\n', 1))
    return port


def _metric(node: cluster_rig.Node, port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{node.host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def _entries(node: cluster_rig.Node) -> list:
    with SuppressionList(node.workdir / "var/suppression/suppression.sqlite",
                         bytes(range(32)), private=False) as store:
        return list(store.export())


def test_a_hard_bounce_on_one_node_suppresses_on_the_other(tmp_path, rig_addresses):
    if not cluster_rig.RedisServer.available():
        from conftest import missing_tool
        missing_tool("redis-server (apt install redis-server)")
    key = tmp_path / "suppression.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    rig = ClusterRig(tmp_path / "rig", nodes=2, workers=2, connections=4, rate="1000/s",
                     extra=f'[suppression]\nkey_file = "{key}"\n')
    ports = [_with_metrics(n) for n in rig.nodes]
    rig.start()
    try:
        n1, n2 = rig.nodes
        assert not _refused(n2, "reject-1@dest.test")
        rig.inject(n1, ["reject-1@dest.test"])
        deadline = time.time() + 30
        while not n1.records("Bounce") and time.time() < deadline:
            time.sleep(0.2)
        assert n1.records("Bounce"), "node 1 saw no hard bounce"
        # on every connection (both workers of node 2: worker 1 reads what worker 0
        # applied within its store refresh, a second)
        t0 = time.time()
        while not all(_refused(n2, "reject-1@dest.test") for _ in range(8)):
            assert time.time() < t0 + 15, "node 2 did not refuse the address everywhere"
            time.sleep(0.2)
        took = time.time() - t0
        assert took < 10, took
        assert not _refused(n2, "fine@dest.test")     # others' mail still flows
        # node 2's entry names node 1; nothing came back to node 1 as another node's
        time.sleep(1.5)
        assert [e.source for e in _entries(n2)] == ["shared by node n1"]
        assert [e.reason for e in _entries(n1)] == ["hard_bounce"]
        assert "shared by" not in _entries(n1)[0].source
        assert _metric(n1, ports[0], "mta_suppression_shared_published_total") == 1
        assert _metric(n1, ports[0], "mta_suppression_shared_imported_total") == 0
        assert _metric(n2, ports[1], "mta_suppression_shared_imported_total") == 1
        assert _metric(n2, ports[1], "mta_suppression_shared_published_total") == 0
        assert _metric(n2, ports[1], "mta_suppression_shared_lag_seconds") < 5
    finally:
        rig.stop()
