"""GET /metrics: the exposition parsed with prometheus_client's text parser.

Unit: the writer (escaping, histograms), the fold of sites into providers (configured
provider, top N, "other"). Scenario: a real daemon (`mta serve`) relays N messages to
30 sites (static routes to 30 ports of a real SMTP sink) with metrics_top_sites = 5:
delivered by source sums to N, received by listener is N, the queue depth returns to 0,
the histograms are well-formed (cumulative buckets, +Inf = count), the provider label
has at most 5 + "other" values; no token 401, a read-only token 200; with
metrics_public = true no token is needed; mta_start_time_seconds is the start.
"""
from __future__ import annotations

import http.client
import os
import smtplib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from mta.control.metrics import CONTENT_TYPE, Exposition, Metrics

sys.path.insert(0, str(Path(__file__).parent / "scenarios"))
from multisink import MultiSink

RO = "ro-" + "e" * 40


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def check_histogram(fam) -> None:
    buckets = [s for s in fam.samples if s.name.endswith("_bucket")]
    values = [s.value for s in buckets]
    assert values == sorted(values), "buckets are cumulative"
    assert buckets[-1].labels["le"] == "+Inf"
    count = next(s.value for s in fam.samples if s.name.endswith("_count"))
    assert buckets[-1].value == count
    bounds = [float(s.labels["le"]) for s in buckets]
    assert bounds == sorted(bounds)


# -- unit ----------------------------------------------------------------------------------


def test_exposition_escapes_and_parses():
    x = Exposition()
    x.family("t_total", "counter", "a counter", [({"a": 'q"uo\\te\nnl'}, 3), ({"a": "b"}, 0)])
    x.histogram("h_seconds", "a histogram", (0.1, 1.0), [1, 2, 3], 4.5)
    fams = families(x.text())
    assert {s.labels["a"]: s.value for s in fams["t"].samples} == {'q"uo\\te\nnl': 3, "b": 0}
    check_histogram(fams["h_seconds"])
    assert [s.value for s in fams["h_seconds"].samples if s.name == "h_seconds_bucket"] == \
        [1, 3, 6]


def _engine(by_pair, dispatchers):
    return SimpleNamespace(outcomes=SimpleNamespace(by_pair=by_pair), dispatchers=dispatchers)


def test_sites_fold_into_provider_top_n_and_other():
    by_pair = {"ip-1": {f"site{i}": {"default": {"default": [i, 0, 0]}} for i in range(10)}}
    gmail = SimpleNamespace(limits=SimpleNamespace(matched=("default", "provider:google")),
                            ready=[], active=1)
    plain = SimpleNamespace(limits=SimpleNamespace(matched=("default",)), ready=[], active=0)
    dispatchers = {("ip-1", "site0"): gmail, ("ip-1", "site9"): plain}
    server = SimpleNamespace(delivery=_engine(by_pair, dispatchers))
    got = Metrics(server, top_sites=3)._providers()
    # site0 is google's (configured provider, however small); then the 3 busiest others
    assert got == {"site0": "google", "site9": "site9", "site8": "site8", "site7": "site7"}
    assert Metrics(server, top_sites=0)._providers() == {"site0": "google"}


def test_outcome_rows_are_bounded(monkeypatch):
    from mta.delivery import outcome
    monkeypatch.setattr(outcome, "MAX_SITES", 3)
    o = outcome.Outcomes.__new__(outcome.Outcomes)
    o.by_pair = {}
    rows = [o._row("ip-1", f"s{i}", "bulk", "p") for i in range(6)]
    assert rows[0] is o._row("ip-1", "s0", "bulk", "p")     # made once, then found
    assert list(o.by_pair["ip-1"]) == ["s0", "s1", "s2", "other"]
    assert rows[3] is rows[5]


# -- scenario --------------------------------------------------------------------------------


def get(port: int, path: str, token: str | None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


@pytest.fixture
def sink():
    s = MultiSink(30)
    yield s
    s.close()


def test_relay_then_scrape(daemon_factory, tmp_path, sink):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read-only {RO}\n")
    os.chmod(tokens, 0o600)
    port = free_port()
    routes = ", ".join(f'"d{i}.test" = "127.0.0.1:{p}"' for i, p in enumerate(sink.ports))
    before = time.time()
    d = daemon_factory(extra=(
        f'[delivery]\nroutes = {{{routes}}}\nretry_initial = "1s"\n'
        f'[admin]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{tokens}"\n'
        f'metrics_top_sites = 5\n'))
    # busier sites first: d0 gets 6 messages, d1..d9 2 each, d10..d29 one each
    rcpts = ["a@d0.test"] * 6 + [f"b@d{i}.test" for i in range(1, 10) for _ in range(2)] + \
        [f"c@d{i}.test" for i in range(10, 30)]
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        for r in rcpts:
            s.sendmail("s@sender.test", [r], b"Subject: m\r\n\r\nbody\r\n")
    n = len(rcpts)
    sink.wait(n)
    assert get(port, "/metrics", None)[0] == 401
    deadline = time.monotonic() + 20
    while True:
        status, ctype, text = get(port, "/metrics", RO)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        fams = families(text)
        delivered = fams["mta_recipients_delivered"].samples
        depth = sum(s.value for s in fams["mta_queue_messages"].samples)
        if sum(s.value for s in delivered) == n and depth == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_source: dict[str, float] = {}
    for s in delivered:
        by_source[s.labels["source"]] = by_source.get(s.labels["source"], 0) + s.value
        assert set(s.labels) == {"source", "pool", "provider", "class"}
    assert sum(by_source.values()) == n, text
    assert depth == 0
    providers = {s.labels["provider"] for s in delivered}
    assert len(providers) <= 6 and "other" in providers, providers
    assert f"[127.0.0.1]:{sink.ports[0]}" in providers     # the busiest site has its own
    received = fams["mta_messages_received"].samples
    assert sum(s.value for s in received) == n
    assert before - 5 < fams["mta_start_time_seconds"].samples[0].value <= time.time()
    for name in ("mta_spool_batch_records", "mta_spool_commit_seconds"):
        check_histogram(fams[name])
    count = next(s.value for s in fams["mta_spool_batch_records"].samples
                 if s.name.endswith("_count"))
    assert count >= 1
    deadline = time.monotonic() + 20   # tombstones are written after the deliveries
    while families(get(port, "/metrics", RO)[2])["mta_spool_messages"].samples[0].value:
        assert time.monotonic() < deadline, "the spool still holds messages"
        time.sleep(0.2)
    assert {"mta_connections_open", "mta_dkim_signatures", "mta_log_written_bytes",
            "mta_adaptive_actions", "mta_limits_overrides"} <= set(fams)
    # cardinality: every labelled family stays within the bound
    for fam in fams.values():
        assert len(fam.samples) <= 200, fam.name


def test_metrics_public_opens_it(daemon_factory):
    port = free_port()
    d = daemon_factory(extra=f'[admin]\nlisten = "127.0.0.1:{port}"\nmetrics_public = true\n')
    status, ctype, text = get(port, "/metrics", None)
    assert status == 200 and ctype == CONTENT_TYPE.replace("; charset=utf-8", "") + \
        "; charset=utf-8"
    assert "mta_start_time_seconds" in families(text)
    assert get(port, "/queue/summary", None)[0] == 401   # only /metrics is open
    d.stop()
