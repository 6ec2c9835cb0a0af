"""Delivery end to end against real peers: unbound for MX records, aiosmtpd
receivers on 127.0.x.y port 25, the daemon as a subprocess. Asserts on what
the receivers got, the log records and the DSNs (parsed back with email).
"""
from __future__ import annotations

import email
import email.policy
import json
import smtplib
import sys
import threading
import time

import pytest

from conftest import ROOT, Daemon  # noqa: F401  (type)
from peers import NET, ZONE, _daemon, _records, _send


def test_mx_delivery_next_mx_and_content(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2")
    d = _daemon(daemon_factory, dns_server)
    body = b"line one\r\n.starts with a dot\r\n..two dots\r\n"
    _send(d.port, "alice@sender.test", ["bob@example.test"], body)
    (mail_from, rcpts, content), = mx2.wait(1)
    assert (mail_from, rcpts) == ("alice@sender.test", ["bob@example.test"])
    assert content.startswith(b"Received: from "), "our trace header comes first"
    assert content.endswith(body), f"got {content[-60:]!r}, want the body byte-identical"
    rec, = _records(d, "Delivery", 1)
    assert (rec["mx"], rec["ip"], rec["code"], rec["queue"]) == ("mx2.example.test", f"{NET}.2", 250, "example.test")
    assert rec["site"] == "mx1.example.test,mx2.example.test"


def test_per_recipient_status_and_dsn(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2")
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["a@example.test", "reject-b@example.test", "c@example.test"],
          rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;reject-b@example.test"])
    (_, rcpts, _), = mx2.wait(1)
    assert sorted(rcpts) == ["a@example.test", "c@example.test"], f"got {rcpts}"
    (dsn_from, dsn_to, dsn), = dsn_box.wait(1)
    assert dsn_from in ("", "<>") and dsn_to == ["alice@sender.test"], "a DSN goes from <> to the sender"
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    groups = status.get_payload()
    per_rcpt = groups[1]
    want = {"Final-Recipient": "rfc822; reject-b@example.test", "Action": "failed",
            "Status": "5.1.1", "Original-Recipient": "rfc822;reject-b@example.test"}
    for field, value in want.items():
        got = per_rcpt[field]
        assert got is not None and got.replace(" ", "") == value.replace(" ", ""), \
            f"{field}: got {got!r}, want {value!r}"
    assert "550" in per_rcpt["Diagnostic-Code"]
    bounces = _records(d, "Bounce", 1)
    assert [b["recipient"] for b in bounces] == ["reject-b@example.test"]


def test_transient_then_delivered(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2", defer_times=1)
    d = _daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["defer-x@example.test"])
    mx2.wait(1, timeout=20)
    tf = d.log_records("TransientFailure")
    assert any(r["code"] == 451 and r["attempt"] == 1 for r in tf), f"got {tf}"
    delivered = _records(d, "Delivery", 1)
    assert delivered[0]["attempt"] == 2, f"got attempt {delivered[0]['attempt']}, want 2"


def test_expiry_bounces_with_dsn(daemon_factory, dns_server, receivers):
    receivers(f"{NET}.2")
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server, 'max_age = "3s"')
    _send(d.port, "alice@sender.test", ["defer-forever@example.test"])
    exp = _records(d, "Expiration", 1, timeout=20)
    assert exp[0]["recipient"] == "defer-forever@example.test"
    (_, _, dsn), = dsn_box.wait(1)
    report = email.message_from_bytes(dsn, policy=email.policy.default).get_payload()[1].get_payload()[1]
    assert report["Action"] == "failed" and report["Status"].startswith("4.4.7")


@pytest.mark.parametrize("domain,status", [("nullmx.test", "5.1.10"), ("nxdomain.test", "5.1.2")])
def test_dns_permanent_failures_bounce(daemon_factory, dns_server, receivers, domain, status):
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", [f"user@{domain}"])
    bounce, = _records(d, "Bounce", 1)
    assert bounce["status"] == status, f"got {bounce['status']}, want {status}"
    (_, _, dsn), = dsn_box.wait(1)
    assert status.encode() in dsn


def test_implicit_mx_and_no_dsn_for_null_sender_or_never(daemon_factory, dns_server, receivers):
    implicit = receivers(f"{NET}.4")
    dsn_box = receivers(f"{NET}.3")
    receivers(f"{NET}.2")
    d = _daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["x@implicit.test"])
    implicit.wait(1)
    _send(d.port, "", ["reject-1@example.test"])
    _send(d.port, "alice@sender.test", ["reject-2@example.test"], rcpt_options=["NOTIFY=NEVER"])
    _records(d, "Bounce", 2)
    time.sleep(1.0)
    assert dsn_box.messages == [], f"got {len(dsn_box.messages)} DSNs, want none"


def test_restart_mid_backlog_loses_nothing_and_redelivers_nothing(daemon_factory, dns_server, receivers):
    dns = dns_server(ZONE)
    extra = (f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
             '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n')
    d = daemon_factory(extra=extra)
    # nobody listens on either MX yet: everything waits
    for i in range(30):
        _send(d.port, "alice@sender.test", [f"u{i}@example.test", f"v{i}@example.test"])
    d.kill()
    mx2 = receivers(f"{NET}.2")
    d.start()
    got = mx2.wait(30, timeout=30)
    time.sleep(2.0)   # a redelivery would show up here
    d.stop()
    got = list(mx2.messages)
    assert len(got) == 30, f"got {len(got)} deliveries, want exactly 30"
    assert sorted(r for _, rcpts, _ in got for r in rcpts) == sorted(
        [f"u{i}@example.test" for i in range(30)] + [f"v{i}@example.test" for i in range(30)])
    d.start()            # and again: a clean restart delivers nothing more
    time.sleep(2.0)
    d.stop()
    assert len(mx2.messages) == 30, "a finished message was delivered again after a restart"
    assert not d.spooled().messages, "the spool still holds finished messages"


def test_partially_delivered_message_is_not_redelivered_after_restart(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2", defer_times=10**9)
    d = _daemon(daemon_factory, dns_server, retry="4s")
    _send(d.port, "alice@sender.test", ["done@example.test", "defer-later@example.test"])
    mx2.wait(1)
    _records(d, "TransientFailure", 1)
    time.sleep(0.5)      # let the RCPTS_DONE and SCHEDULE records reach the disk
    d.kill()
    mx2.defer_times = 0  # the deferred recipient is now welcome
    d.start()
    # the retry keeps its due time (~4 s after the deferral) across the restart
    msgs = mx2.wait(2, timeout=30)
    assert [m[1] for m in msgs] == [["done@example.test"], ["defer-later@example.test"]], f"got {msgs}"


def test_queue_summary_and_inspect_cli(daemon_factory, dns_server):
    d = _daemon(daemon_factory, dns_server)    # no receiver: the message waits
    _send(d.port, "alice@sender.test", ["someone@example.test"])
    import subprocess
    env = {"PYTHONPATH": str(ROOT)}
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run([sys.executable, "-m", "mta", "queue", "summary", "-c", str(d.config)],
                             capture_output=True, text=True, env=env)
        if "example.test" in out.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.returncode == 0 and "example.test" in out.stdout, out.stdout + out.stderr
    rec, = _records(d, "Reception", 1)
    out = subprocess.run([sys.executable, "-m", "mta", "queue", "inspect", rec["id"], "-c", str(d.config)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "someone@example.test" in out.stdout, out.stdout + out.stderr


def test_stalling_mx_times_out_and_next_mx_delivers(daemon_factory, dns_server, receivers):
    """mx1 accepts the connection and never greets; the greeting timeout moves on to mx2."""
    import socket as socketmod
    stall = socketmod.socket()
    stall.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_REUSEADDR, 1)
    stall.bind((f"{NET}.1", 25))
    stall.listen(16)
    try:
        mx2 = receivers(f"{NET}.2")
        d = _daemon(daemon_factory, dns_server, 'command_timeout = "1s"')
        _send(d.port, "alice@sender.test", ["bob@example.test"])
        mx2.wait(1, timeout=20)
        rec, = _records(d, "Delivery", 1)
        assert rec["mx"] == "mx2.example.test", f"got {rec['mx']}, want the second MX"
    finally:
        stall.close()


def test_bulk_to_postfix_smtp_sink(daemon_factory, dns_server, tmp_path):
    """Postfix's smtp-sink as the receiver: 200 messages over reused connections."""
    import shutil
    import subprocess
    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    sink = subprocess.Popen([sink_bin, "-u", "nobody", "-c", f"{NET}.2:25", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        d = _daemon(daemon_factory, dns_server)
        with smtplib.SMTP("127.0.0.1", d.port) as s:
            for i in range(200):
                s.sendmail("alice@sender.test", [f"r{i}@example.test"], b"Subject: %d\r\n\r\nx\r\n" % i)
        recs = _records(d, "Delivery", 200, timeout=30)
        assert {r["ip"] for r in recs} == {f"{NET}.2"}
        summary = subprocess.run([sys.executable, "-m", "mta", "queue", "summary", "--json", "-c",
                                  str(d.config)], capture_output=True, text=True,
                                 env={"PYTHONPATH": str(ROOT)})
        data = json.loads(summary.stdout)
        ready, = data["ready"].values()
        assert ready["sent"] == 200 and data["outcomes"]["delivered"] == 200, data
    finally:
        sink.terminate()
        sink.wait()


def test_connections_are_reused_within_the_limit(daemon_factory, dns_server):
    """300 messages to one site over at most connection_limit connections (tools/sink.py counts)."""
    import signal
    import subprocess
    sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), f"{NET}.5:25"],
                            stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()
        d = _daemon(daemon_factory, dns_server,
                    f'connection_limit = 4\nroutes = {{"reuse.test" = "{NET}.5:25"}}')

        def inject(k: int) -> None:
            with smtplib.SMTP("127.0.0.1", d.port) as s:
                for i in range(100):
                    s.sendmail("a@sender.test", [f"r{k}-{i}@reuse.test"], b"Subject: x\r\n\r\nx\r\n")
        threads = [threading.Thread(target=inject, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _records(d, "Delivery", 300, timeout=30)
    finally:
        sink.send_signal(signal.SIGTERM)
        stats = json.loads(sink.communicate(timeout=10)[0].strip().splitlines()[-1])
    assert stats["messages"] == 300, f"got {stats['messages']} at the sink, want 300"
    assert stats["peak_per_source"]["127.0.0.1"] <= 4, f"got {stats['peak_per_source']}, want <= 4 at once"
    assert stats["connections"] <= 8, f"got {stats['connections']} connections, want reuse (<= 8)"


def test_delay_dsn_once(daemon_factory, dns_server, receivers):
    receivers(f"{NET}.2", defer_times=10**9)
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server, 'delay_dsn_after = "1s"\nmax_age = "1h"')
    _send(d.port, "alice@sender.test", ["defer-slow@example.test"])
    (_, to, dsn), = dsn_box.wait(1, timeout=20)
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    assert report["Subject"].startswith("Delayed Mail"), report["Subject"]
    group = report.get_payload()[1].get_payload()[1]
    assert group["Action"] == "delayed" and group["Will-Retry-Until"], f"got {dict(group.items())}"
    time.sleep(3)   # more retries happen, but the delay DSN is sent once
    assert len(dsn_box.messages) == 1, f"got {len(dsn_box.messages)} delay DSNs, want 1"


def test_hold_queues_without_routing_then_delivers_after_restart(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2")
    dns = dns_server(ZONE)
    held = f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n[delivery]\nhold = true\n'
    d = daemon_factory(extra=held)
    _send(d.port, "alice@sender.test", ["bob@example.test"])
    time.sleep(1.5)
    assert mx2.messages == [] and d.log_records("TransientFailure") == [], "held mail must not move"
    d.stop()
    d.config.write_text(d.config.read_text().replace("hold = true", "hold = false"))
    d.start()
    mx2.wait(1)
