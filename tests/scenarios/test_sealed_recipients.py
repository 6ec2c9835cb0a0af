"""Sealed recipients end to end (unit tests: tests/test_privacy_at_rest.py; issue 16 item 7, mta/model/sealed.py): a real daemon, aiosmtpd
receivers on 127.0.90.x:25, unbound-style DNS from tests/dnsserver.py.

The injecting client sends sealed local parts; the receiver must get the CLEAR address at
RCPT TO, while the spool segment files, the JSONL log, the daemon's stderr, `mta queue
inspect` and the DSN for a bounced sealed recipient never hold a clear local part.
Suppression by the clear address works for sealed recipients (an operator entry, and the
hard bounce of a sealed recipient suppresses its clear address); one that does not open
(tampered, unknown key id) is refused with 550 5.1.3. Rotation: a queued message sealed
under k1 is deferred (451 4.3.0, a clear TransientFailure) while k1 is missing from the
keyring, and delivered once k1 is back next to k2.
"""
from __future__ import annotations

import base64
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from conftest import ROOT
from peers import Receiver, _records

from mta.model.sealed import Keyring

NET = "127.0.90"
ZONE = [
    "sealed.test. 60 IN MX 10 mx.sealed.test.",
    f"mx.sealed.test. 60 IN A {NET}.1",
    "later.test. 60 IN MX 10 mx.later.test.",
    f"mx.later.test. 60 IN A {NET}.2",
    "sender.test. 60 IN MX 10 mx.sender.test.",
    f"mx.sender.test. 60 IN A {NET}.3",
]
K1 = bytes(range(64))
K2 = bytes(range(64, 128))
# distinctive clear local parts: none of them may show up at rest
ALICE, REJECT, WAITING, BLOCKED = "alice.q7z", "rejectme.x4w", "waiting.z3k", "blocked.b2v"


def _keyring_file(path: Path, keys: dict[str, bytes]) -> None:
    path.write_text("".join(f"{k} {base64.b64encode(v).decode()}\n" for k, v in keys.items()))
    os.chmod(path, 0o600)


@pytest.fixture
def sinks():
    started = []

    def make(host: str) -> Receiver:
        handler = Receiver()
        ctl = Controller(handler, hostname=host, port=25)
        ctl.start()
        started.append(ctl)
        return handler

    yield make
    for ctl in started:
        ctl.stop()


def _mta(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=60)


def _privacy_daemon(daemon_factory, dns_server, tmp_path: Path, keys: dict[str, bytes],
                    start: bool = True):
    dns = dns_server(ZONE)
    ring = tmp_path / "recipients.keyring"
    _keyring_file(ring, keys)
    sup = tmp_path / "sup"
    extra = (f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
             '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n'
             f'[privacy]\nkeyring = "{ring}"\n'
             f'[suppression]\nstore = "{sup}/s.sqlite"\nkey_file = "{sup}/s.key"\n')
    return daemon_factory(extra=extra, start=start), ring


def _at_rest(d) -> bytes:
    """Every byte the daemon keeps on disk or printed: spool, logs, stderr."""
    out = b""
    for root in (d.spool_dir, d.log_dir):
        for p in Path(root).rglob("*"):
            if p.is_file():
                out += p.read_bytes()
    err = d.workdir / "daemon.err"
    return out + (err.read_bytes() if err.exists() else b"")


def _assert_no_clear(blob: bytes | str, where: str) -> None:
    low = (blob if isinstance(blob, bytes) else blob.encode()).lower()
    for local in (ALICE, REJECT, WAITING, BLOCKED):
        assert local.encode() not in low, f"clear local part {local!r} found in {where}"


def test_sealed_recipients_delivered_clear_and_kept_sealed(daemon_factory, dns_server, sinks, tmp_path):
    mx = sinks(f"{NET}.1")
    dsn_box = sinks(f"{NET}.3")
    d, _ = _privacy_daemon(daemon_factory, dns_server, tmp_path, {"k1": K1, "k2": K2}, start=False)
    # suppressed by the CLEAR address, before start (the store is the daemon's)
    r = _mta(d, "suppress", "add", f"{BLOCKED}@sealed.test", "--reason", "manual")
    assert r.returncode == 0, r.stderr
    d.start()
    ring = Keyring({"k1": K1, "k2": K2})
    alice = ring.seal(f"{ALICE}@sealed.test", "k1")          # the older key still opens
    reject = ring.seal(f"{REJECT}@sealed.test", "k2")
    waiting = ring.seal(f"{WAITING}@later.test", "k2")       # nobody listens there: stays queued
    blocked = ring.seal(f"{BLOCKED}@sealed.test", "k2")

    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("app.sender.test")
        # refusals at RCPT: suppressed (by the clear address), tampered, unknown key id
        s.mail("app@sender.test")
        code, text = s.rcpt(blocked)
        assert code == 550 and b"5.7.1" in text, (code, text)
        local, _, dom = reject.partition("@")
        tampered = local[:-2] + ("AA" if local[-2:] != "AA" else "BB") + "@" + dom
        code, text = s.rcpt(tampered)
        assert (code, text) == (550, b"5.1.3 Error: bad recipient address"), (code, text)
        code, text = s.rcpt(Keyring({"k9": K1}).seal(f"{ALICE}@sealed.test"))
        assert (code, text) == (550, b"5.1.3 Error: bad recipient address"), (code, text)
        moved = alice.partition("@")[0] + "@later.test"           # bound to its domain
        code, _ = s.rcpt(moved)
        assert code == 550, "a sealed local part must not open under another domain"
        s.rset()
        s.sendmail("app@sender.test", [alice, reject, waiting],
                   b"From: <app@sender.test>\r\nSubject: sealed\r\nMessage-ID: <p1@sender.test>\r\n"
                   b"\r\nhello\r\n")

    (mail_from, rcpts, _), = mx.wait(1, timeout=30)
    assert rcpts == [f"{ALICE}@sealed.test"], f"the receiver must get the clear address, got {rcpts}"
    (_, dsn_to, dsn), = dsn_box.wait(1, timeout=30)
    assert dsn_to == ["app@sender.test"]
    assert reject.encode() in dsn, "the DSN names the sealed recipient"
    _assert_no_clear(dsn, "the DSN")
    bounce, = _records(d, "Bounce", 1)
    assert bounce["recipient"] == reject and bounce["code"] == 550
    # the hard bounce suppressed the CLEAR address: the same sealed recipient is now refused
    deadline = time.monotonic() + 10
    while True:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
            s.ehlo("app.sender.test")
            s.mail("app@sender.test")
            code, text = s.rcpt(reject)
        if code == 550 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 550 and b"5.7.1" in text, (code, text)
    _records(d, "TransientFailure", 1, timeout=30)     # later.test: connection refused
    rec, = [r for r in _records(d, "Reception", 1) if r.get("sender") == "app@sender.test"]
    out = _mta(d, "queue", "inspect", rec["id"])
    assert out.returncode == 0 and waiting in out.stdout, out.stdout + out.stderr
    _assert_no_clear(out.stdout, "mta queue inspect")
    out = _mta(d, "queue", "inspect", rec["id"], "--json")
    _assert_no_clear(out.stdout, "mta queue inspect --json")
    time.sleep(0.5)     # the last records reach the disk
    _assert_no_clear(_at_rest(d), "the spool, the log files or the daemon's stderr")


def test_rotation_old_key_kept_delivers_removed_defers(daemon_factory, dns_server, sinks, tmp_path):
    d, ring = _privacy_daemon(daemon_factory, dns_server, tmp_path, {"k1": K1})
    sealed = Keyring({"k1": K1}).seal(f"{WAITING}@later.test")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.sendmail("app@sender.test", [sealed], b"Subject: rot\r\n\r\nhi\r\n")
    _records(d, "TransientFailure", 1, timeout=30)   # nobody at later.test yet: queued under k1
    time.sleep(0.5)
    d.kill()
    # k1 removed too early: the message is deferred with a clear record, not bounced
    _keyring_file(ring, {"k2": K2})
    later = sinks(f"{NET}.2")
    d.start()
    deadline = time.monotonic() + 30
    while True:
        recs = [r for r in d.log_records("TransientFailure") if "does not open" in r.get("text", "")
                or "does not open" in str(r)]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert recs, d.log_records("TransientFailure")
    assert recs[0]["code"] == 451 and "k1" in str(recs[0]), recs[0]
    assert later.messages == [] and d.log_records("Bounce") == []
    time.sleep(0.5)
    d.kill()
    # rotation done right: k2 added, k1 kept until no queued message uses it
    _keyring_file(ring, {"k1": K1, "k2": K2})
    d.start()
    (_, rcpts, _), = later.wait(1, timeout=30)
    assert rcpts == [f"{WAITING}@later.test"]
    _records(d, "Delivery", 1)
    time.sleep(0.5)
    _assert_no_clear(_at_rest(d), "the spool, the log files or the daemon's stderr")
