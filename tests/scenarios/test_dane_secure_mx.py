"""DANE applies only through a DNSSEC-secure MX (RFC 7672 2.2), end to end: a real daemon
(`mta serve`), aiosmtpd receivers with STARTTLS on 127.0.130.x:25 (certificates from a CA
nobody trusts), a validating unbound serving the signed zone sec.test (AD bit) and the
unsigned zone plain.test (no AD) on loopback.

- attacker: an insecure MX (victim.plain.test, forgeable) points at a host of a signed
  zone whose secure TLSA matches the attacker's certificate. Under tls = "verified" that
  must not count as DANE: deferred (PKIX fails), nothing reaches the receiver. The same
  host behind a secure MX (good.sec.test) is DANE-verified and gets its mail.
- the opposite: an insecure MX (lax.plain.test) to a host whose secure TLSA does not
  match: no DANE, opportunistic TLS delivers; behind a secure MX (bad.sec.test) deferred.
- RFC 7672 2.2.2: a secure MX whose host's address is insecure (a CNAME into plain.test):
  no DANE, delivered.
- a TLSA RRset whose signature is broken (the validator says SERVFAIL) behind a secure MX:
  deferred with "dnssec-invalid", not sent without DANE.
"""
from __future__ import annotations

import time

import pytest
from aiosmtpd.controller import Controller
from peers import Receiver, _send
from tls_certs import Ca, SignedDnsServer, tlsa_rdata

NET = "127.0.130"


@pytest.fixture
def world(tmp_path):
    stranger = Ca("nobody trusts me")
    evil = stranger.issue("mx.evil.sec.test")
    other = stranger.issue("mx.bad.sec.test")
    ctls, rx = [], {}
    for n, issued in ((1, evil), (2, other)):
        handler = Receiver()
        ctl = Controller(handler, hostname=f"{NET}.{n}", port=25,
                         tls_context=issued.server_context(tmp_path, f"rx{n}"))
        ctl.start()
        ctls.append(ctl)
        rx[n] = handler
    mismatch = "3 1 1 " + "00" * 32
    dns = SignedDnsServer("sec.test", [
        f"mx.evil IN A {NET}.1", f"_25._tcp.mx.evil IN TLSA {tlsa_rdata(evil.cert)}",
        "good IN MX 10 mx.evil.sec.test.",
        f"mx.bad IN A {NET}.2", f"_25._tcp.mx.bad IN TLSA {mismatch}",
        "bad IN MX 10 mx.bad.sec.test.",
        # 2.2.2: secure MX, host address only through a CNAME into the unsigned zone
        "cn IN MX 10 mx.cn.sec.test.", "mx.cn IN CNAME host.plain.test.",
        f"_25._tcp.mx.cn IN TLSA {mismatch}",
        # a TLSA RRset with a broken signature (bogus)
        "bt IN MX 10 mx.bt.sec.test.", f"mx.bt IN A {NET}.2",
        f"_25._tcp.mx.bt IN TLSA {mismatch}",
    ], tmp_path, unsigned={"plain.test": [
        "victim IN MX 10 mx.evil.sec.test.",
        "lax IN MX 10 mx.bad.sec.test.",
        f"host IN A {NET}.2",
    ]}, bogus=("_25._tcp.mx.bt",))
    yield dns, rx
    for ctl in ctls:
        ctl.stop()
    dns.stop()


def _daemon(daemon_factory, dns, delivery: str = ""):
    return daemon_factory(extra=(
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
        f'[delivery]\nretry_initial = "1m"\nretry_max = "1m"\n{delivery}\n'))


def _wait(d, rtype: str, rcpt: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in d.log_records(rtype):
            if r.get("recipient") == rcpt:
                return r
        time.sleep(0.1)
    raise AssertionError(f"no {rtype} for {rcpt}: {d.log_records()[-6:]}")


def _rcpts(rx: Receiver) -> list[str]:
    return [r for _, rcpts, _ in rx.messages for r in rcpts]


def test_insecure_mx_gets_no_dane_even_when_the_host_tlsa_is_signed(world, daemon_factory):
    """The attacker test: a forged (insecure) MX must not borrow DANE from a signed host."""
    dns, rx = world
    d = _daemon(daemon_factory, dns, 'tls = "verified"')
    _send(d.port, "s@sender.test", ["a@victim.plain.test"])
    _send(d.port, "s@sender.test", ["b@good.sec.test"])
    r = _wait(d, "TransientFailure", "a@victim.plain.test")
    assert r["status"] == "4.7.5" and "verified: certificate-not-trusted" in r["text"], r
    _wait(d, "Delivery", "b@good.sec.test")          # DANE-EE through the secure MX
    assert _rcpts(rx[1]) == ["b@good.sec.test"]


def test_dane_only_behind_secure_mx_and_secure_address(world, daemon_factory):
    dns, rx = world
    d = _daemon(daemon_factory, dns)
    for rcpt in ("c@lax.plain.test", "d@bad.sec.test", "e@cn.sec.test", "f@bt.sec.test"):
        _send(d.port, "s@sender.test", [rcpt])
    _wait(d, "Delivery", "c@lax.plain.test")         # insecure MX: opportunistic TLS
    _wait(d, "Delivery", "e@cn.sec.test")            # insecure address (2.2.2)
    r = _wait(d, "TransientFailure", "d@bad.sec.test")
    assert r["status"] == "4.7.5" and "dane: validation-failure" in r["text"], r
    r = _wait(d, "TransientFailure", "f@bt.sec.test")
    assert r["status"] == "4.7.5" and "dane: dnssec-invalid" in r["text"], r
    assert sorted(_rcpts(rx[2])) == ["c@lax.plain.test", "e@cn.sec.test"]


def test_a_session_opened_without_dane_does_not_carry_mail_that_needs_it(world, daemon_factory):
    """The attacker test for connection reuse: lax.plain.test (insecure MX) and bad.sec.test
    (secure MX, TLSA that does not match) share the MX host, so they share a site and its
    idle connections. The session opened for lax.plain.test (opportunistic TLS, no DANE)
    must not be reused for bad.sec.test: DANE applies to that message and fails."""
    dns, rx = world
    d = _daemon(daemon_factory, dns)
    _send(d.port, "s@sender.test", ["c@lax.plain.test"])
    _wait(d, "Delivery", "c@lax.plain.test")     # its session now waits idle (5 s)
    _send(d.port, "s@sender.test", ["d@bad.sec.test"])
    r = _wait(d, "TransientFailure", "d@bad.sec.test")
    assert r["status"] == "4.7.5" and "dane: validation-failure" in r["text"], r
    assert _rcpts(rx[2]) == ["c@lax.plain.test"]
