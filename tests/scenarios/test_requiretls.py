"""REQUIRETLS (RFC 8689) end to end through two mta daemons.

Daemon A takes a message over STARTTLS with MAIL FROM ... REQUIRETLS (smtplib) and
relays it. Daemon B listens on 127.0.85.20:25 (certificate for mx.rt.test from the test
CA that A trusts) and 127.0.85.21:25 (a certificate naming other.test); B holds its mail
([delivery] hold) so what it received stays in its spool. An aiosmtpd receiver on
127.0.85.22:25 has a good certificate but does not offer REQUIRETLS. DNS: unbound.

- verified session offering REQUIRETLS: delivered with REQUIRETLS on MAIL FROM; B's
  envelope has requiretls
- wrong-name certificate, or a server without REQUIRETLS (the only MX): bounced 5.7.30 at once
  (no retries)
- TLS-Required: No (RFC 8689 5) under tls = "verified": delivered to the wrong-name
  server; the same message without the field is deferred
"""
from __future__ import annotations

import smtplib
import ssl
import time

import pytest
from aiosmtpd.controller import Controller
from peers import Receiver
from tls_certs import Ca, txt_dns_server

NET = "127.0.85"
ZONE = [
    "rt.test. 60 IN MX 10 mx.rt.test.", f"mx.rt.test. 60 IN A {NET}.20",
    "rtbad.test. 60 IN MX 10 mx.rtbad.test.", f"mx.rtbad.test. 60 IN A {NET}.21",
    "rtnone.test. 60 IN MX 10 mx.rtnone.test.", f"mx.rtnone.test. 60 IN A {NET}.22",
]


@pytest.fixture
def rig(tmp_path, daemon_factory):
    ca = Ca()
    ca_file = ca.write(tmp_path / "ca.pem")
    good = ca.issue("mx.rt.test").write(tmp_path, "b-good")
    bad = ca.issue("other.test").write(tmp_path, "b-bad")
    a_cert = ca.issue("mx.test.example").write(tmp_path, "a")
    dns = txt_dns_server(ZONE)
    handler = Receiver()
    ctl = Controller(handler, hostname=f"{NET}.22", port=25,
                     tls_context=ca.issue("mx.rtnone.test").server_context(tmp_path, "none"))
    ctl.start()
    b = daemon_factory(extra=(
        '[delivery]\nhold = true\n'
        f'[[listener]]\naddress = "{NET}.20"\nport = 25\ntls_cert = "{good[0]}"\n'
        f'tls_key = "{good[1]}"\n'
        f'[[listener]]\naddress = "{NET}.21"\nport = 25\ntls_cert = "{bad[0]}"\n'
        f'tls_key = "{bad[1]}"\n'))

    def sender(delivery: str = ""):
        return daemon_factory(
            listener=f'tls_cert = "{a_cert[0]}"\ntls_key = "{a_cert[1]}"\n',
            extra=(f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
                   f'[delivery]\nretry_initial = "1m"\nretry_max = "1m"\n'
                   f'tls_ca_file = "{ca_file}"\n{delivery}\n'))
    yield sender, b, handler
    ctl.stop()
    dns.stop()


def _submit(port: int, rcpt: str, *, requiretls: bool = True, header: str = "") -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.starttls(context=ctx)
        s.ehlo()
        if requiretls:
            assert s.has_extn("requiretls")
        s.sendmail("s@sender.test", [rcpt],
                   f"From: <s@sender.test>\r\nSubject: rt\r\n{header}\r\nsecret\r\n".encode(),
                   mail_options=["REQUIRETLS"] if requiretls else [])


def _wait(d, rtype: str, rcpt: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in d.log_records(rtype):
            if r.get("recipient") == rcpt:
                return r
        time.sleep(0.1)
    raise AssertionError(f"no {rtype} for {rcpt}: {d.log_records()[-6:]}")


def test_requiretls_relayed_over_verified_tls_and_bounced_otherwise(rig):
    sender, b, aiosmtpd_rx = rig
    a = sender()
    _submit(a.port, "x@rt.test")
    _wait(a, "Delivery", "x@rt.test")
    for rcpt in ("y@rtbad.test", "z@rtnone.test"):
        _submit(a.port, rcpt)
    bad = _wait(a, "Bounce", "y@rtbad.test")
    assert (bad["code"], bad["status"]) == (550, "5.7.30"), bad
    assert "certificate-host-mismatch" in bad["text"] and bad["attempt"] == 1, bad
    none = _wait(a, "Bounce", "z@rtnone.test")
    assert none["status"] == "5.7.30" and "REQUIRETLS" in none["text"], none
    assert aiosmtpd_rx.messages == [], "not sent to a server without REQUIRETLS"
    # B kept what it received: the one message, flagged requiretls (it came with
    # MAIL FROM ... REQUIRETLS over TLS)
    b.stop()
    [env] = list(b.spooled().envelopes.values())
    assert env.requiretls and [r.address for r in env.recipients] == ["x@rt.test"], env


def test_tls_required_no_lets_mail_past_verification(rig):
    sender, b, _ = rig
    a = sender('tls = "verified"')
    _submit(a.port, "p@rtbad.test", requiretls=False, header="TLS-Required: No\r\n")
    _wait(a, "Delivery", "p@rtbad.test")
    _submit(a.port, "q@rtbad.test", requiretls=False)
    r = _wait(a, "TransientFailure", "q@rtbad.test")
    assert r["status"] == "4.7.5" and "verified: certificate-host-mismatch" in r["text"], r
