"""Adaptive delivery end to end: a real daemon, a real receiver that answers like Yahoo.

The receiver (aiosmtpd on 127.0.40.1:25, this file's own loopback range) is the MX of
ts.test, a provider named in an operator shaping file; while it is "complaining" it
answers every RCPT with Yahoo's [TS01] deferral. The daemon's shipped rule "ts-complaints"
(shortened here to 15 s by a rule of the same name in the operator's file) must suspend
that (source, provider): an AdaptiveAction record, a Backoff record, `mta shaping show`
listing the action and the pair paused, no delivery while it holds even after the
receiver forgives, the action kept across a restart, then an AdaptiveRestore record and
the waiting mail delivered.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import orjson
import pytest
from aiosmtpd.controller import Controller

from conftest import ROOT

NET = "127.0.40"
MX = f"{NET}.1"
HOLD = 15          # seconds the shortened ts-complaints rule suspends for
ZONE = ["ts.test. 60 IN MX 10 mx.ts.test.", f"mx.ts.test. 60 IN A {MX}"]
SHAPING = """
[provider.tsprov]
match = ["*.ts.test"]

[[default.automation]]
name = "ts-complaints"
text = '\\[TS0[12]\\]'
action = ["suspend"]
duration = "%ds"
""" % HOLD
TS01 = ("421 4.7.0 [TS01] Messages from %s temporarily deferred due to user complaints "
        "- 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")


class Complaining:
    """RCPT: the [TS01] deferral while `complaining`, else accepted."""

    def __init__(self) -> None:
        self.complaining = True
        self.messages: list[list[str]] = []
        self.deferred = 0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            if self.complaining:
                self.deferred += 1
                return TS01 % session.peer[0]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(list(envelope.rcpt_tos))
        return "250 2.0.0 accepted"


@pytest.fixture
def receiver():
    handler = Complaining()
    ctl = Controller(handler, hostname=MX, port=25)
    ctl.start()
    yield handler
    ctl.stop()


def _send(port: int, rcpt: str) -> None:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("sender@x.test", [rcpt], b"From: <sender@x.test>\r\nSubject: t\r\n\r\nhi\r\n")


def _wait(what: str, fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _mta(d, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=30)
    assert out.returncode == 0, f"mta {' '.join(args)}: {out.stderr.decode()}"
    return out.stdout.decode()


def test_ts01_suspends_the_source_provider_then_restores_across_a_restart(
        daemon_factory, dns_server, receiver, tmp_path):
    dns = dns_server(ZONE)
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    d = daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                             f'[delivery]\nretry_initial = "1s"\nretry_max = "2s"\n'
                             f'[egress]\nshaping = ["{shaping}"]\n')
    _send(d.port, "first@ts.test")
    act = _wait("an AdaptiveAction record", lambda: d.log_records("AdaptiveAction"))[0]
    assert (act["rule"], act["action"], act["provider"]) == ("ts-complaints", "suspend",
                                                            "tsprov"), act
    assert "[TS01]" in act["reason"]
    assert HOLD - 5 < act["until"] - time.time() <= HOLD + 1
    backoff = _wait("a Backoff record", lambda: d.log_records("Backoff"))[0]
    assert backoff["source"] == act["source"] and backoff["code"] == 421
    deferred = receiver.deferred

    # the operator sees it: the pair paused, the action with its reason and time left
    rows = orjson.loads(_mta(d, "shaping", "show", "--json"))
    (row,) = [r for r in rows if r["site"] == "mx.ts.test"]
    assert row["paused_until"] and row["backoffs"] == 1, row
    shown = _mta(d, "shaping", "show")
    assert "adaptive delivery, actions in force" in shown
    line = next(ln for ln in shown.splitlines() if "ts-complaints" in ln)
    assert "tsprov" in line and "suspend" in line and "[TS01]" in line, shown

    # the provider forgives, but the pair stays suspended: nothing is tried
    receiver.complaining = False
    _send(d.port, "second@ts.test")
    time.sleep(3)
    assert receiver.messages == [] and receiver.deferred == deferred, \
        "a suspended (source, provider) was tried"

    # a restart keeps the action (adaptive.json in the spool directory)
    state = orjson.loads((d.spool_dir / "adaptive.json").read_bytes())
    assert [a["rule"] for a in state["actions"]] == ["ts-complaints"]
    assert d.stop() == 0
    d.start()
    shown = _mta(d, "shaping", "show")
    assert "ts-complaints" in shown, f"the action did not survive the restart:\n{shown}"
    time.sleep(1)
    assert receiver.messages == [], "delivered right after the restart, while suspended"

    # then it ends on time: a restore record, and both messages go out
    restore = _wait("an AdaptiveRestore record", lambda: d.log_records("AdaptiveRestore"),
                    timeout=HOLD + 15)[0]
    assert (restore["rule"], restore["action"], restore["provider"]) == (
        "ts-complaints", "suspend", "tsprov")
    assert restore["time"] >= act["until"] - 0.5
    got = _wait("both messages at the receiver",
                lambda: len(receiver.messages) >= 2 and receiver.messages)
    assert sorted(r for m in got for r in m) == ["first@ts.test", "second@ts.test"]
    assert "ts-complaints" not in _mta(d, "shaping", "show")
    assert d.stop() == 0


class Unknowns:
    """RCPT: "nobody*" local parts are unknown users (550 5.1.1), the rest accepted."""

    def __init__(self) -> None:
        self.messages: list[list[str]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("nobody"):
            return ("550 5.1.1 <%s>: Recipient address rejected: User unknown in virtual "
                    "mailbox table" % address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(list(envelope.rcpt_tos))
        return "250 2.0.0 accepted"


def test_a_hard_bounce_rate_over_the_threshold_suspends_the_pair(daemon_factory, dns_server):
    mx = f"{NET}.2"
    handler = Unknowns()
    ctl = Controller(handler, hostname=mx, port=25)
    ctl.start()
    try:
        dns = dns_server(["list.test. 60 IN MX 10 mx.list.test.", f"mx.list.test. 60 IN A {mx}"])
        d = daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                                 '[adaptive]\nmin_volume = 20\nsuspend_for = "1h"\n')
        import smtplib
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            for i in range(5):             # 5 delivered, then 15 unknown users: 75 % hard
                s.sendmail("sender@x.test", [f"user{i}@list.test"], b"Subject: t\r\n\r\nhi\r\n")
            for i in range(15):
                s.sendmail("sender@x.test", [f"nobody{i}@list.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
        act = _wait("an AdaptiveAction record", lambda: d.log_records("AdaptiveAction"))[0]
        assert (act["rule"], act["action"], act["provider"]) == ("rate:bounce", "suspend",
                                                                "mx.list.test"), act
        assert "bounce rate 75.00 % of 20 recipients" in act["reason"], act
        delivered = len(handler.messages)
        _send(d.port, "user99@list.test")
        time.sleep(2)
        assert len(handler.messages) == delivered, "a suspended (source, provider) delivered"
        assert "rate:bounce" in _mta(d, "shaping", "show")
        assert d.stop() == 0
    finally:
        ctl.stop()
