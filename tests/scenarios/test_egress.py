"""Egress at scale against real receivers: 4,096 sources, pools, shaping, classes, controls.

One daemon with 4,096 egress sources on 127.1.0.0/20 delivers through static
routes to counting sinks (tools/sink.py, separate processes) on 127.0.8.x,
which record each message's source address and arrival time and the peak
of concurrent connections per source. Checked: every source is really used,
pool weights hold, connection_limit per (source, site) is never exceeded,
max_message_rate holds within 5 % over 30 s, a suspended site stops within a
second and resumes within a second, and a transactional message overtakes
a 100,000-message bulk backlog for the same site.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from conftest import ROOT, Daemon

SOURCES = 4096
NET = ipaddress.ip_network("127.1.0.0/20")
SINKS = {"spread": "127.0.8.1", "weighted": "127.0.8.2", "rate": "127.0.8.3",
         "pause": "127.0.8.4", "slow": "127.0.8.5", "tls": "127.0.8.6", "sitewide": "127.0.8.7",
         "ops": "127.0.8.8", "crate": "127.0.8.9", "backoff": "127.0.8.10"}
PORT = 2525
RATE = 20          # messages/s for rate.test
CONN_RATE = 5      # new connections/s for crate.test (one message per connection)
SHAPING = f"""
[site."[{SINKS['weighted']}]:{PORT}"]
connection_limit = 2

[site."[{SINKS['rate']}]:{PORT}"]
max_message_rate = "{RATE}/s"

[site."[{SINKS['slow']}]:{PORT}"]
connection_limit = 2

[site."[{SINKS['tls']}]:{PORT}"]
tls = "required"

[site."[{SINKS['sitewide']}]:{PORT}"]
site_connection_limit = 3

[site."[{SINKS['crate']}]:{PORT}"]
max_connection_rate = "{CONN_RATE}/s"
max_deliveries_per_connection = 1

[site."[{SINKS['backoff']}]:{PORT}"]
backoff_on = ['try again later \\(scripted\\)']
backoff_for = "1h"
"""


class Sink:
    def __init__(self, address: str, workdir: Path, *args: str):
        self.stats_file = workdir / f"sink-{address}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "sink.py"), f"{address}:{PORT}", "--times",
             "--stats-file", str(self.stats_file), *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert b"ready" in line, f"sink on {address} did not start: {line!r}"

    def stats(self) -> dict:
        before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                return json.loads(self.stats_file.read_text())
            time.sleep(0.02)
        raise AssertionError("the sink wrote no statistics")

    def wait(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: timed out; sink has {st['messages']} messages")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)   # drain the final statistics line (can be large)


def _source_config() -> str:
    parts = []
    for i in range(SOURCES):
        parts.append(f'[[source]]\nname = "s{i:04d}"\naddress = "{NET[i]}"\n')
    names = ", ".join(f'"s{i:04d}"' for i in range(SOURCES))
    parts.append(f'[[pool]]\nname = "all"\nsources = [{names}]\n')
    parts.append('[[pool]]\nname = "weighted"\nsources = [{source = "s0000", weight = 3}, '
                 '{source = "s0001", weight = 1}]\n')
    parts.append('[[pool]]\nname = "one"\nsources = ["s0002"]\n')
    parts.append('[[egress_rule]]\ntenant = "w"\npool = "weighted"\n')
    parts.append('[[egress_rule]]\ntenant = "r"\npool = "one"\n')
    parts.append('[[egress_rule]]\ntenant = "p"\npool = "one"\n')
    parts.append('[[egress_rule]]\ntenant = "s"\npool = "one"\n')
    parts.append('[[egress_rule]]\ntenant = "o"\npool = "weighted"\n')
    parts.append('[[egress_rule]]\ntenant = "bd"\npool = "one"\n')
    return "\n".join(parts)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    work = tmp_path_factory.mktemp("egress")
    (work / "shaping.toml").write_text(SHAPING)
    routes = ", ".join(f'"{name}.test" = "{addr}:{PORT}"' for name, addr in SINKS.items())
    extra = (f'[delivery]\nroutes = {{{routes}}}\nretry_initial = "1s"\nretry_max = "1s"\n'
             f'idle_timeout = "2s"\n'
             f'[egress]\ndefault_pool = "all"\nshaping = ["{work / "shaping.toml"}"]\n'
             f'max_connections = 12000\n' + _source_config())
    daemon = Daemon(work / "d", listener="max_messages_per_session = 1000000", extra=extra)
    sinks: dict[str, Sink] = {}
    try:           # whatever fails to start, the sinks started so far are stopped
        for name, addr in SINKS.items():
            slow = name in ("weighted", "slow", "sitewide")
            sinks[name] = Sink(addr, work, *(["--delay-ms", "20"] if slow else []))
        daemon.start(timeout=60)
        yield daemon, sinks
    finally:
        daemon.kill()
        for s in sinks.values():
            s.stop()


def _message(sender: str, headers: str = "") -> bytes:
    return (f"From: <{sender}>\r\nSubject: egress\r\n{headers}\r\nbody\r\n").encode()


def _send_many(port: int, sender: str, rcpts: list[str], count: int, headers: str = "") -> None:
    for start in range(0, count, 500):      # under the listener's messages per session
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            for _ in range(min(500, count - start)):
                s.sendmail(sender, rcpts, _message(sender, headers))


def _admin(d: Daemon, *args: str) -> dict | list:
    out = subprocess.run([sys.executable, "-m", "mta", *args, "--json", "-c", str(d.config)]
                         if args[0] == "shaping" else
                         [sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=30)
    assert out.returncode == 0, f"mta {' '.join(args)}: {out.stderr.decode()}"
    return orjson.loads(out.stdout)


def test_every_one_of_4096_sources_delivers(rig):
    d, sinks = rig
    # 8,192 messages: each takes the next source of pool "all" (4,096 sources, weight
    # 1, smooth round-robin), so every source sends exactly 2.
    _send_many(d.port, "sender@x.test", ["user@spread.test"], 8192)
    st = sinks["spread"].wait(lambda s: s["messages"] >= 8192, 120, "8,192 messages")
    by_source = Counter(st["by_source"])
    want = {str(NET[i]) for i in range(SOURCES)}
    missing = want - set(by_source)
    assert not missing, f"{len(missing)} sources never delivered, e.g. {sorted(missing)[:5]}"
    assert set(by_source) == want, f"unexpected peers: {set(by_source) - want}"
    assert set(by_source.values()) == {2}, \
        f"got per-source counts {Counter(by_source.values())}, want exactly 2 each (round-robin)"


def test_pool_weights_and_connection_limit(rig):
    d, sinks = rig
    n = 400
    _send_many(d.port, "sender@x.test", ["user@weighted.test"], n, "X-Tenant: w\r\n")
    st = sinks["weighted"].wait(lambda s: s["messages"] >= n, 60, f"{n} messages")
    by_source = Counter(st["by_source"])
    a, b = by_source[str(NET[0])], by_source[str(NET[1])]
    assert a + b == n, f"got {dict(by_source)}, want only the weighted pool's two sources"
    assert abs(a / n - 0.75) <= 0.03, f"got {a}:{b}, want 3:1 within 3 %"
    peaks = st["peak_per_source"]
    assert max(peaks.values()) <= 2, f"got peak connections per source {peaks}, limit is 2"
    assert max(peaks.values()) == 2, f"got {peaks}: the limit of 2 was never even reached"


def test_max_message_rate_holds_over_30s(rig):
    d, sinks = rig
    n = RATE * 36
    _send_many(d.port, "sender@x.test", ["user@rate.test"], n, "X-Tenant: r\r\n")
    st = sinks["rate"].wait(lambda s: s["messages"] >= n, 90, f"{n} messages")
    times = sorted(t for t, _, _ in st["times"])
    start = times[0] + 1.0            # after the initial burst of one second's tokens
    window = [t for t in times if start <= t < start + 30]
    rate = len(window) / 30
    # The limit is the promise: never above it. Below it only says the box was busy (the
    # exact pacing is checked on virtual time in tests/test_dispatcher_unit.py).
    assert 0.8 * RATE <= rate <= 1.05 * RATE, \
        f"got {rate:.2f}/s over 30 s, want {RATE}/s, at most 5 % above (20 % below on a busy box)"


def test_suspend_and_resume_a_site_take_effect_within_a_second(rig):
    d, sinks = rig
    sink = sinks["pause"]
    _send_many(d.port, "sender@x.test", ["user@pause.test"], 5, "X-Tenant: p\r\n")
    sink.wait(lambda s: s["messages"] >= 5, 30, "5 messages")
    site = f"[{SINKS['pause']}]:{PORT}"
    _admin(d, "suspend", "site", site, "--for", "1h")
    suspended_at = time.time()
    _send_many(d.port, "sender@x.test", ["user@pause.test"], 5, "X-Tenant: p\r\n")
    time.sleep(3)
    st = sink.stats()
    assert st["messages"] == 5, f"got {st['messages'] - 5} deliveries while the site was suspended"
    shaping = _admin(d, "shaping", "show")
    row = next(r for r in shaping if r["site"] == site)
    assert row["paused_until"] and row["paused_until"] > suspended_at + 3000
    resumed = time.time()
    _admin(d, "resume", "site", site)
    # measured from the CLI's answer: starting the CLI (a new Python process) takes most
    # of a second on a loaded 2-core machine, and it is not the daemon's reaction time
    answered = time.time()
    st = sink.wait(lambda s: s["messages"] >= 10, 10, "5 more after resume")
    first_after = min(t for t, _, _ in st["times"] if t >= resumed)
    assert first_after - answered < 1.0, f"first delivery {first_after - answered:.2f}s after resume"


def test_transactional_overtakes_100k_bulk_backlog(rig, tmp_path):
    d, sinks = rig
    sink = sinks["slow"]        # 1 source x 2 connections x 20 ms: ~100 msg/s at best
    bulk = tmp_path / "bulk.eml"
    bulk.write_bytes(_message("bulk@x.test", "X-Tenant: s\r\nX-Queue-Class: bulk\r\n")
                     .replace(b"\r\n", b"\n"))    # smtp-source sends each line with CRLF
    out = subprocess.run(["smtp-source", "-d", "-s", "20", "-m", "100000", "-f", "bulk@x.test",
                          "-t", "user@slow.test", "-F", str(bulk), f"127.0.0.1:{d.port}"],
                         capture_output=True, timeout=400)
    assert out.returncode == 0, out.stderr.decode()
    summary = _admin(d, "queue", "summary", "--json")
    queued = summary["scheduled"].get("s@slow.test#one", {}).get("count", 0)
    assert queued > 90000, f"got {queued} bulk messages queued for slow.test, want ~100,000"
    sent = time.time()
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        s.sendmail("tx@x.test", ["vip@slow.test"],
                   _message("tx@x.test", "X-Tenant: s\r\nX-Queue-Class: transactional\r\n"))
    st = sink.wait(lambda s: any(r == "vip@slow.test" for _, _, r in s["times"]), 10,
                   "the transactional message")
    arrived = next(t for t, _, r in st["times"] if r == "vip@slow.test")
    # behind the backlog it would wait ~1000 s; a busy 2-core box may take a few seconds
    assert arrived - sent < 5.0, f"transactional message took {arrived - sent:.2f}s"
    summary = _admin(d, "queue", "summary", "--json")
    left = summary["scheduled"].get("s@slow.test#one", {}).get("count", 0)
    assert left > 90000, f"got {left} bulk messages left: the backlog must still be there " \
                         "for the test to show anything"


def test_tls_required_by_shaping_refuses_a_server_without_starttls(rig):
    d, sinks = rig
    _send_many(d.port, "sender@x.test", ["user@tls.test"], 1, "X-Tenant: r\r\n")
    recs = _wait_records(d, "TransientFailure", lambda r: r["queue"] == "r@tls.test#one")
    assert "TLS is required" in recs[0]["text"], recs[0]
    assert sinks["tls"].stats()["messages"] == 0, "nothing may be sent in the clear"


def test_site_connection_limit_holds_across_4096_sources(rig):
    d, sinks = rig
    # pool "all": 200 messages spread over 200 different sources, 20 ms each at the
    # receiver; the site-wide limit (3) must hold although every source may open its own.
    _send_many(d.port, "sender@x.test", ["user@sitewide.test"], 200)
    st = sinks["sitewide"].wait(lambda s: s["messages"] >= 200, 60, "200 messages")
    assert st["sources"] >= 50, f"got {st['sources']} sources: the spread did not happen"
    assert st["peak_open"] <= 3, f"got {st['peak_open']} connections at once, site limit 3"


def test_queue_and_source_suspension_and_rebind(rig):
    d, sinks = rig
    sink = sinks["ops"]
    queue = "o@ops.test#weighted"
    _send_many(d.port, "sender@x.test", ["user@ops.test"], 4, "X-Tenant: o\r\n")
    sink.wait(lambda s: s["messages"] >= 4, 30, "4 messages")
    # a suspended scheduled queue keeps its messages, even ones routed already
    _admin(d, "suspend", "queue", queue, "--for", "1h")
    _send_many(d.port, "sender@x.test", ["user@ops.test"], 4, "X-Tenant: o\r\n")
    time.sleep(2)
    assert sink.stats()["messages"] == 4, "a suspended queue delivered"
    summary = _admin(d, "queue", "summary", "--json")
    assert summary["scheduled"][queue]["held"] == 4, summary["scheduled"][queue]
    _admin(d, "resume", "queue", queue)
    sink.wait(lambda s: s["messages"] >= 8, 10, "the 4 held messages after resume")
    # a suspended source is skipped by its pool: everything goes through the other one
    before = Counter(sink.stats()["by_source"])
    _admin(d, "suspend", "source", "s0000", "--for", "1h")
    _send_many(d.port, "sender@x.test", ["user@ops.test"], 8, "X-Tenant: o\r\n")
    st = sink.wait(lambda s: s["messages"] >= 16, 20, "8 more")
    after = Counter(st["by_source"]) - before
    assert after == {str(NET[1]): 8}, f"got {dict(after)}, want all 8 from s0001"
    _admin(d, "resume", "source", "s0000")
    # rebind waiting messages: held by a suspension, moved to pool "one" (s0002)
    _admin(d, "suspend", "queue", queue, "--for", "1h")
    _send_many(d.port, "sender@x.test", ["user@ops.test"], 4, "X-Tenant: o\r\n")
    result = _admin(d, "queue", "rebind", queue, "one")
    assert result["pool"] == "one"
    before = Counter(sink.stats()["by_source"])
    _admin(d, "resume", "queue", queue)
    st = sink.wait(lambda s: s["messages"] >= 20, 20, "4 more after rebind")
    after = Counter(st["by_source"]) - before
    assert after == {str(NET[2]): 4}, f"got {dict(after)}, want all 4 from s0002 (pool one)"


def _wait_records(d: Daemon, rtype: str, match, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = [r for r in d.log_records(rtype) if match(r)]
        if recs:
            return recs
        time.sleep(0.2)
    raise AssertionError(f"no matching {rtype} record")


def test_max_connection_rate_holds(rig):
    d, sinks = rig
    n = CONN_RATE * 12
    _send_many(d.port, "sender@x.test", ["user@crate.test"], n, "X-Tenant: r\r\n")
    st = sinks["crate"].wait(lambda s: s["messages"] >= n, 60, f"{n} messages")
    assert st["connections"] == n, f"got {st['connections']} connections, want one per message"
    times = sorted(t for t, _, _ in st["times"])
    start = times[0] + 1.0            # after the initial burst of one second's tokens
    window = [t for t in times if start <= t < start + 10]
    rate = len(window) / 10
    assert 0.7 * CONN_RATE <= rate <= 1.1 * CONN_RATE, \
        f"got {rate:.2f} connections/s over 10 s, want {CONN_RATE}/s, at most 10 % above " \
        "(30 % below on a busy box)"


def test_throttling_reply_backs_off_the_source_site_pair(rig):
    d, sinks = rig
    sink = sinks["backoff"]
    site = f"[{SINKS['backoff']}]:{PORT}"
    # the sink answers RCPT for defer* with "451 4.2.0 try again later (scripted)": the
    # shaping backoff_on pattern for this site, so s0002 -> site pauses for an hour
    _send_many(d.port, "sender@x.test", ["defer1@backoff.test"], 1, "X-Tenant: bd\r\n")
    rec = _wait_records(d, "Backoff", lambda r: r["site"] == site)[0]
    assert rec["source"] == "s0002" and rec["code"] == 451, rec
    assert rec["until"] > time.time() + 3000
    _send_many(d.port, "sender@x.test", ["user@backoff.test"], 1, "X-Tenant: r\r\n")
    time.sleep(2)
    assert sink.stats()["messages"] == 0, "a backed-off (source, site) delivered"
    row = next(r for r in _admin(d, "shaping", "show") if r["site"] == site)
    assert row["backoffs"] == 1 and row["paused_until"], row
    # the operator lifts it (after holding the deferring queue so it cannot trigger again)
    _admin(d, "suspend", "queue", "bd@backoff.test#one", "--for", "1h")
    _admin(d, "resume", "pair", "s0002", site)
    st = sink.wait(lambda s: s["messages"] >= 1, 10, "the waiting message after resume")
    assert st["times"][0][2] == "user@backoff.test"
