"""Sealed recipients and what comes back later (issue 16 item 7 leftovers): out-of-band
DSNs and ARF complaints, the admin API's queue views, HTTP injection and a keyring
reload by SIGHUP, against a real daemon (`mta serve`), aiosmtpd receivers on
127.0.135.x:25 and the test DNS server.

Remote servers got the CLEAR address at RCPT TO, so the DSNs and complaints they send
back name it. The records they cause (OOB, Feedback), the suppression store and the
daemon's stderr must name the sealed form (a VERP return path proves which one) or
the suppression hash, never the clear local part. (The returned message itself is
content: it rests in the spool until processed, as any received message does.)
"""
from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from peers import Receiver, _records
from test_bounces import _arf, _dsn

from mta.feedback.suppression import address_hash, hash_text, load_key
from mta.model.sealed import Keyring

NET = "127.0.135"
BOUNCE_DOMAIN = "bounces.test"
ZONE = [
    "sealed.test. 60 IN MX 10 mx.sealed.test.",
    f"mx.sealed.test. 60 IN A {NET}.1",
    "later.test. 60 IN MX 10 mx.later.test.",
    f"mx.later.test. 60 IN A {NET}.2",
    "sender.test. 60 IN MX 10 mx.sender.test.",
    f"mx.sender.test. 60 IN A {NET}.3",
]
K1 = bytes(range(64))
K2 = bytes(range(100, 164))
# distinctive clear local parts: none of them may show up in records or stores
ALICE, BOB, EVE, CAROL = "alice.m4q", "bob.r8t", "eve.w2p", "carol.j6x"
LOCALS = (ALICE, BOB, EVE, CAROL)


def _keyring_file(path: Path, keys: dict[str, bytes], mode: int = 0o600) -> None:
    path.write_text("".join(f"{k} {base64.b64encode(v).decode()}\n" for k, v in keys.items()))
    os.chmod(path, mode)


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


def _daemon(daemon_factory, dns_server, tmp_path: Path, keys: dict[str, bytes], extra: str = ""):
    dns = dns_server(ZONE)
    ring = tmp_path / "recipients.keyring"
    _keyring_file(ring, keys)
    conf = (f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
            '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n'
            f'[privacy]\nkeyring = "{ring}"\n'
            f'[bounces]\ndomain = "{BOUNCE_DOMAIN}"\n'
            '[suppression]\ncomplaint_scope = "global"\n' + extra)
    return daemon_factory(extra=conf), ring


def _submit(port: int, rcpt: str, content: bytes, sender: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [rcpt], content)


def _rcpt_reply(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("app.sender.test")
        s.mail("app@sender.test")
        return s.rcpt(rcpt)


def _refused_soon(port: int, rcpt: str, timeout: float = 10.0) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        code, text = _rcpt_reply(port, rcpt)
        if code == 550 or time.monotonic() > deadline:
            return code, text
        time.sleep(0.2)


def _kept(d) -> bytes:
    """What the daemon keeps about people apart from message content: the log files,
    its stderr and the suppression store."""
    out = b""
    for root in (d.log_dir, d.workdir / "var"):
        for p in Path(root).rglob("*"):
            if p.is_file():
                out += p.read_bytes()
    err = d.workdir / "daemon.err"
    return out + (err.read_bytes() if err.exists() else b"")


def _assert_no_clear(blob: bytes | str, where: str) -> None:
    low = (blob if isinstance(blob, bytes) else blob.encode()).lower()
    for local in LOCALS:
        assert local.encode() not in low, f"clear local part {local!r} found in {where}"


def _hash(d, address: str) -> str:
    return hash_text(address_hash(load_key(d.workdir / "var" / "suppression" / "suppression.key"),
                                  address))


def test_oob_dsn_and_arf_about_sealed_recipients_name_the_sealed_form(daemon_factory, dns_server,
                                                                      sinks, tmp_path):
    mx = sinks(f"{NET}.1")
    d, _ = _daemon(daemon_factory, dns_server, tmp_path, {"k1": K1, "k2": K2})
    ring = Keyring({"k1": K1, "k2": K2})
    alice = ring.seal(f"{ALICE}@sealed.test", "k1")     # sealed under the older key
    bob = ring.seal(f"{BOB}@sealed.test", "k2")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.sendmail("app@sender.test", [alice, bob],
                   b"From: <app@sender.test>\r\nSubject: s\r\nMessage-ID: <s1@sender.test>\r\n\r\nhi\r\n")
    got = mx.wait(2, timeout=30)
    paths = {rcpts[0]: mail_from for mail_from, rcpts, _ in got}
    assert set(paths) == {f"{ALICE}@sealed.test", f"{BOB}@sealed.test"}, paths   # clear at RCPT
    assert all(p.endswith("@" + BOUNCE_DOMAIN) for p in paths.values()), paths

    # the remote server returns alice's message later, naming her CLEAR address (and two
    # more it made up: nothing proves we sent to them)
    _submit(d.port, paths[f"{ALICE}@sealed.test"],
            _dsn(f"{ALICE}@sealed.test", "5.1.1", f"550 5.1.1 <{ALICE}@sealed.test> user unknown",
                 also=(f"{EVE}@sealed.test", f"{CAROL}@other.test")))
    recs = _records(d, "OOB", 3, timeout=30)
    mine = [r for r in recs if r["recipient"] == alice]
    assert len(mine) == 1, recs
    assert (mine[0]["suppressed"], mine[0]["proof"]) == ("global", "verp_envelope"), mine[0]
    others = [r for r in recs if r is not mine[0]]
    assert sorted(r["recipient_hash"] for r in others) == sorted(
        [_hash(d, f"{EVE}@sealed.test"), _hash(d, f"{CAROL}@other.test")]), others
    assert all(r["recipient"] is None and r["suppressed"] is None for r in others), others
    # the suppression holds alice's clear address (hashed): her sealed form is refused now
    code, text = _refused_soon(d.port, alice)
    assert code == 550 and b"5.7.1" in text, (code, text)

    # a feedback loop returns bob's original (Return-Path: our VERP path for bob) with his
    # clear address in Original-Rcpt-To
    _submit(d.port, f"fbl@{BOUNCE_DOMAIN}",
            _arf(f"{BOB}@sealed.test", "127.0.0.1", "acme", return_path=paths[f"{BOB}@sealed.test"]),
            sender="fbl@isp.test")
    fb, = _records(d, "Feedback", 1, timeout=30)
    assert (fb["recipient"], fb["suppressed"], fb["proof"]) == (bob, "global", "verp_return_path"), fb
    code, text = _refused_soon(d.port, bob)
    assert code == 550 and b"5.7.1" in text, (code, text)

    time.sleep(0.5)     # the last records and suppression writes reach the disk
    _assert_no_clear(_kept(d), "the log files, the suppression store or the daemon's stderr")
