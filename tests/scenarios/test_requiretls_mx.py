"""REQUIRETLS tries every MX host before bouncing (RFC 8689 4.2.1, X.7.30), end to end.

Daemon A (`mta serve`, certificate on its listener so smtplib can send MAIL ... REQUIRETLS
over STARTTLS) relays through DNS from unbound on loopback. Receivers on 127.0.131.x:25:
.1 aiosmtpd without STARTTLS; .2 an mta daemon B with a certificate for mx2.rt2.test from
the CA A trusts (offers REQUIRETLS; it holds what it gets); .3 aiosmtpd with a good
certificate but no REQUIRETLS; .4 nobody listening.

- rt2.test: MX 10 .1 (no TLS), MX 20 .2: delivered through the second, REQUIRETLS kept
- rtno.test: MX 10 .1, MX 20 .3: no MX can meet it: bounced 5.7.30 at the first attempt
- rtdown.test: MX 10 .1, MX 20 .4 (unreachable): deferred, not bounced
- plain mail to rt2.test still goes to the first MX (only REQUIRETLS mail moves)
"""
from __future__ import annotations

import smtplib
import ssl
import time

import pytest
from aiosmtpd.controller import Controller
from peers import Receiver
from tls_certs import Ca, txt_dns_server

NET = "127.0.131"
ZONE = [
    "rt2.test. 60 IN MX 10 mx1.rt2.test.", "rt2.test. 60 IN MX 20 mx2.rt2.test.",
    f"mx1.rt2.test. 60 IN A {NET}.1", f"mx2.rt2.test. 60 IN A {NET}.2",
    "rtno.test. 60 IN MX 10 mx1.rt2.test.", "rtno.test. 60 IN MX 20 mx3.rtno.test.",
    f"mx3.rtno.test. 60 IN A {NET}.3",
    "rtdown.test. 60 IN MX 10 mx1.rt2.test.", "rtdown.test. 60 IN MX 20 mx4.rtdown.test.",
    f"mx4.rtdown.test. 60 IN A {NET}.4",
]


@pytest.fixture
def rig(tmp_path, daemon_factory):
    ca = Ca()
    ca_file = ca.write(tmp_path / "ca.pem")
    b_cert = ca.issue("mx2.rt2.test").write(tmp_path, "b")
    a_cert = ca.issue("a.test").write(tmp_path, "a")
    dns = txt_dns_server(ZONE)
    plain, notls_rt = Receiver(), Receiver()
    ctls = [Controller(plain, hostname=f"{NET}.1", port=25),
            Controller(notls_rt, hostname=f"{NET}.3", port=25,
                       tls_context=ca.issue("mx3.rtno.test").server_context(tmp_path, "rx3"))]
    for ctl in ctls:
        ctl.start()
    b = daemon_factory(extra=(
        '[delivery]\nhold = true\n'
        f'[[listener]]\naddress = "{NET}.2"\nport = 25\ntls_cert = "{b_cert[0]}"\n'
        f'tls_key = "{b_cert[1]}"\n'))
    a = daemon_factory(
        listener=f'tls_cert = "{a_cert[0]}"\ntls_key = "{a_cert[1]}"\n',
        extra=(f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
               '[delivery]\nretry_initial = "1m"\nretry_max = "1m"\nconnect_timeout = "3s"\n'
               f'tls_ca_file = "{ca_file}"\n'))
    yield a, b, plain, notls_rt
    for ctl in ctls:
        ctl.stop()
    dns.stop()


def _submit(port: int, rcpt: str, requiretls: bool = True) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.starttls(context=ctx)
        s.ehlo()
        s.sendmail("s@sender.test", [rcpt], b"From: <s@sender.test>\r\nSubject: rt\r\n\r\nsecret\r\n",
                   mail_options=["REQUIRETLS"] if requiretls else [])


def _wait(d, rtype: str, rcpt: str, timeout: float = 25.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in d.log_records(rtype):
            if r.get("recipient") == rcpt:
                return r
        time.sleep(0.1)
    raise AssertionError(f"no {rtype} for {rcpt}: {d.log_records()[-6:]}")


def test_requiretls_tries_the_next_mx_then_bounces_5_7_30_or_defers(rig):
    a, b, plain, notls_rt = rig
    _submit(a.port, "x@rt2.test")
    got = _wait(a, "Delivery", "x@rt2.test")
    assert got["mx"] == "mx2.rt2.test", got
    _submit(a.port, "y@rtno.test")
    bounce = _wait(a, "Bounce", "y@rtno.test")
    assert (bounce["code"], bounce["status"], bounce["attempt"]) == (550, "5.7.30", 1), bounce
    assert "REQUIRETLS support required" in bounce["text"], bounce
    _submit(a.port, "z@rtdown.test")
    deferred = _wait(a, "TransientFailure", "z@rtdown.test")
    assert deferred["code"] < 500, deferred
    assert not [r for r in a.log_records("Bounce") if r["recipient"] == "z@rtdown.test"]
    _submit(a.port, "w@rt2.test", requiretls=False)      # ordinary mail: the first MX
    assert _wait(a, "Delivery", "w@rt2.test")["mx"] == "mx1.rt2.test"
    assert [r for _, rcpts, _ in plain.messages for r in rcpts] == ["w@rt2.test"]
    assert notls_rt.messages == []
    b.stop()
    [env] = list(b.spooled().envelopes.values())
    assert env.requiretls and [r.address for r in env.recipients] == ["x@rt2.test"], env
