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
import os
import signal
import smtplib
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from peers import Receiver, _records
from test_bounces import _arf, _dsn
from test_webhooks import HookReceiver

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


def _admin(d, path: str, body: dict | None = None):
    from mta.config import load_config
    from mta.control.client import admin_request
    return admin_request(load_config(d.config), path, body)   # the daemon's address and token


def _wait_for(what, why: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.1)
    return got


def _hash(d, address: str) -> str:
    return hash_text(address_hash(load_key(d.workdir / "var" / "suppression" / "suppression.key"),
                                  address))


@pytest.fixture
def hook():
    r = HookReceiver()
    yield r
    r.close()


def test_oob_dsn_and_arf_about_sealed_recipients_name_the_sealed_form(daemon_factory, dns_server,
                                                                      sinks, tmp_path, hook):
    mx = sinks(f"{NET}.1")
    d, _ = _daemon(daemon_factory, dns_server, tmp_path, {"k1": K1, "k2": K2}, extra=(
        f'[[webhook]]\nname = "ops"\nurl = "{hook.url}"\nrecord_types = ["OOB", "Feedback", '
        '"Delivery"]\nbatch_size = 10\nbatch_interval = "100ms"\n'))
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
    # the webhook got the same records: sealed forms and hashes only
    got = _wait_for(lambda: [r for r in hook.records() if r["type"] == "Feedback"], "the webhook")
    assert got[0]["recipient"] == bob
    assert {r["recipient"] for r in hook.records() if r["type"] == "OOB"} == {alice, None}
    _assert_no_clear(repr(hook.records()), "the webhook's batches")


def test_http_inject_refuses_sealed_recipients_that_do_not_open_and_views_stay_sealed(
        daemon_factory, dns_server, sinks, tmp_path):
    mx = sinks(f"{NET}.1")
    d, _ = _daemon(daemon_factory, dns_server, tmp_path, {"k1": K1})
    ring = Keyring({"k1": K1})
    good = ring.seal(f"{ALICE}@sealed.test")
    waiting = ring.seal(f"{EVE}@later.test")                    # nobody listens: stays queued
    unknown = Keyring({"k9": K1}).seal(f"{BOB}@sealed.test")    # a key id not in the keyring
    local, _, dom = ring.seal(f"{CAROL}@sealed.test").partition("@")
    tampered = local[:-2] + ("AA" if local[-2:] != "AA" else "BB") + "@" + dom
    moved = good.partition("@")[0] + "@later.test"              # bound to its domain
    raw = "From: <app@sender.test>\r\nSubject: http\r\n\r\nhello\r\n"
    st, got = _admin(d, "/inject", {"from": "app@sender.test",
                                    "recipients": [good, unknown, tampered, waiting, moved],
                                    "raw": raw})
    assert st == 200, got
    assert [m["recipients"] for m in got["messages"]] == [[good, waiting]], got
    refused = {r["recipient"]: r["error"] for r in got["refused"]}
    assert set(refused) == {unknown, tampered, moved}, got
    assert all(e.startswith("550 5.1.3 sealed recipient does not open") for e in refused.values())
    assert "unknown key id 'k9'" in refused[unknown], refused
    (_, rcpts, _), = mx.wait(1, timeout=30)
    assert rcpts == [f"{ALICE}@sealed.test"]                    # clear at RCPT TO
    # nothing left: 422 with the reasons, nothing stored
    st, got = _admin(d, "/inject", {"from": "app@sender.test", "recipients": [unknown, tampered],
                                    "raw": raw})
    assert st == 422 and {r["recipient"] for r in got["refused"]} == {unknown, tampered}, got
    assert len(_records(d, "Reception", 1)) == 1

    # the admin API's queue views show the queued sealed recipient, never its clear form
    _records(d, "TransientFailure", 1, timeout=30)
    msg_id = d.log_records("Reception")[0]["id"]
    views = []
    for path in ("/queue/summary", f"/queue/messages/{msg_id}", "/queue/ages", "/live",
                 "/queue/holds"):
        st, body = _admin(d, path)
        assert st == 200, (path, body)
        views.append(repr(body))
    scheduled = _admin(d, "/queue/summary")[1]["scheduled"]
    assert scheduled, "the message to later.test is queued"
    for name in scheduled:
        st, body = _admin(d, f"/queue/list/{name}")
        assert st == 200, body
        views.append(repr(body))
    assert waiting in views[1], views[1]     # /queue/messages/<id> names it (sealed)
    _assert_no_clear("".join(views), "the admin API's views")
    time.sleep(0.5)
    _assert_no_clear(_kept(d), "the log files, the suppression store or the daemon's stderr")


def test_sighup_reloads_the_keyring_and_refuses_a_broken_one(daemon_factory, dns_server, sinks,
                                                             tmp_path):
    mx = sinks(f"{NET}.1")
    d, ring_file = _daemon(daemon_factory, dns_server, tmp_path, {"k1": K1})
    old = Keyring({"k1": K1}).seal(f"{EVE}@later.test")        # queued under k1: nobody there yet
    new = Keyring({"k2": K2}).seal(f"{ALICE}@sealed.test")     # sealed with the next key
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.sendmail("app@sender.test", [old], b"Subject: old key\r\n\r\nhi\r\n")
    _records(d, "TransientFailure", 1, timeout=30)
    assert _rcpt_reply(d.port, new) == (550, b"5.1.3 Error: bad recipient address")

    # rotation: k2 added next to k1, SIGHUP, no restart
    _keyring_file(ring_file, {"k1": K1, "k2": K2})
    d.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: [r for r in d.log_records("Reload") if r["applied"]], "an applied Reload")
    assert _rcpt_reply(d.port, new)[0] == 250
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.sendmail("app@sender.test", [new], b"Subject: new key\r\n\r\nhi\r\n")
    (_, rcpts, _), = mx.wait(1, timeout=30)
    assert rcpts == [f"{ALICE}@sealed.test"]
    later = sinks(f"{NET}.2")                  # the k1 message is still deliverable
    (_, rcpts, _), = later.wait(1, timeout=30)
    assert rcpts == [f"{EVE}@later.test"]

    # a broken keyring file (readable by others, then not base64) refuses the whole reload
    # with a clear message; the running keys stay
    for keys, mode in (({"k1": K1, "k2": K2}, 0o644), (None, 0o600)):
        if keys is None:
            ring_file.write_text("k1 !!!not-base64!!!\n")
            os.chmod(ring_file, mode)
        else:
            _keyring_file(ring_file, keys, mode)
        before = len(d.log_records("Reload"))
        d.proc.send_signal(signal.SIGHUP)
        rec = _wait_for(lambda: d.log_records("Reload")[before:], "a Reload record")[0]
        assert rec["applied"] is False and rec["problems"][0].startswith("[privacy] keyring: "), rec
        assert _rcpt_reply(d.port, new)[0] == 250, "a refused reload changed the keyring"
    err = (d.workdir / "daemon.err").read_text()
    assert "reload refused, the running config stays: [privacy] keyring:" in err
    assert "readable by group or others" in err and "is not base64" in err

    # k1 retired: its addresses no longer open (refused at RCPT), k2 still does
    _keyring_file(ring_file, {"k2": K2})
    before = len(d.log_records("Reload"))
    d.proc.send_signal(signal.SIGHUP)
    rec = _wait_for(lambda: d.log_records("Reload")[before:], "a Reload record")[0]
    assert rec["applied"] is True, rec
    assert _rcpt_reply(d.port, old) == (550, b"5.1.3 Error: bad recipient address")
    assert _rcpt_reply(d.port, new)[0] == 250
    time.sleep(0.5)
    _assert_no_clear(_kept(d), "the log files, the suppression store or the daemon's stderr")
