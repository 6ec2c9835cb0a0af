"""Outbound TLS policy end to end: a real daemon (`mta serve`) delivering to aiosmtpd
receivers with STARTTLS on 127.0.85.x:25, DNS from unbound on loopback (MX, A, TXT),
MTA-STS policies from an aiohttp HTTPS server on 127.0.85.10:443 with a test CA that
the daemon trusts through [delivery] tls_ca_file.

- enforce + good certificate: delivered; the policy is cached in the spool directory
- enforce + wrong-name / expired certificate: deferred 4.7.5 naming mta-sts and the
  RFC 8460 result type, nothing reaches the receiver
- enforce + an MX outside the policy's mx list: that MX is never used
- testing mode + wrong-name certificate: delivered
- shaping tls = "verified" without any policy: a wrong-name certificate is deferred
- tls = "opportunistic-fallback": a receiver whose STARTTLS handshake breaks gets the
  message in plaintext at once; the same receiver under an enforced policy gets nothing
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from peers import Receiver, _records, _send
from tls_certs import Ca, txt_dns_server

NET = "127.0.85"
POLICY_HOST = f"{NET}.10"


def _policy(mx: str, mode: str = "enforce") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


ZONE = [
    # good.test: MTA-STS enforce, certificate for mx.good.test
    "good.test. 60 IN MX 10 mx.good.test.", f"mx.good.test. 60 IN A {NET}.1",
    # wrongname.test: enforce, the receiver's certificate names other.test
    "wrongname.test. 60 IN MX 10 mx.wrongname.test.", f"mx.wrongname.test. 60 IN A {NET}.2",
    # expired.test: enforce, an expired certificate
    "expired.test. 60 IN MX 10 mx.expired.test.", f"mx.expired.test. 60 IN A {NET}.3",
    # testing.test: testing mode, the wrong-name receiver
    "testing.test. 60 IN MX 10 mx.testing.test.", f"mx.testing.test. 60 IN A {NET}.2",
    # outside.test: enforce naming only mx2; mx1 (preferred) must be skipped
    "outside.test. 60 IN MX 10 mx1.outside.test.", "outside.test. 60 IN MX 20 mx2.outside.test.",
    f"mx1.outside.test. 60 IN A {NET}.5", f"mx2.outside.test. 60 IN A {NET}.6",
    # nopolicy.test: no MTA-STS, the wrong-name receiver (for tls = "verified")
    "nopolicy.test. 60 IN MX 10 mx.nopolicy.test.", f"mx.nopolicy.test. 60 IN A {NET}.2",
    # broken.test: STARTTLS is offered and the handshake breaks; brokensts.test the same
    # receiver under an enforced policy
    "broken.test. 60 IN MX 10 mx.broken.test.", f"mx.broken.test. 60 IN A {NET}.4",
    "brokensts.test. 60 IN MX 10 mx.broken.test.",
]
for _d in ("good", "wrongname", "expired", "testing", "outside", "brokensts"):
    ZONE += [f'_mta-sts.{_d}.test. 60 IN TXT "v=STSv1; id=p1"',
             f"mta-sts.{_d}.test. 60 IN A {POLICY_HOST}"]

POLICIES = {
    "good.test": _policy("mx.good.test"),
    "wrongname.test": _policy("mx.wrongname.test"),
    "expired.test": _policy("mx.expired.test"),
    "testing.test": _policy("mx.testing.test", "testing"),
    "outside.test": _policy("mx2.outside.test"),
    "brokensts.test": _policy("mx.broken.test"),
}


class _BrokenTls(SMTP):
    """Says 220 to STARTTLS, then sends bytes that are not a TLS ServerHello."""

    async def smtp_STARTTLS(self, arg):
        await self.push("220 2.0.0 Ready to start TLS")
        self.transport.write(b"this is not TLS\r\n" * 8)
        self.transport.close()


class _BrokenController(Controller):
    def factory(self):
        return _BrokenTls(self.handler, **self.SMTP_kwargs)


class World:
    """The receivers, the policy server (in its own thread's loop) and DNS."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.ca = Ca()
        self.ca_file = self.ca.write(tmp_path / "ca.pem")
        self.ctls: list[Controller] = []
        self.rx: dict[str, Receiver] = {}
        certs = {1: ("mx.good.test",), 2: ("other.test",), 3: ("mx.expired.test",),
                 5: ("mx1.outside.test",), 6: ("mx2.outside.test",), 4: ("mx.broken.test",)}
        for n, names in certs.items():
            issued = self.ca.issue(*names, expired=(n == 3))
            ctx = issued.server_context(tmp_path, f"rx{n}")
            handler = Receiver()
            cls = _BrokenController if n == 4 else Controller
            ctl = cls(handler, hostname=f"{NET}.{n}", port=25, tls_context=ctx)
            ctl.start()
            self.ctls.append(ctl)
            self.rx[str(n)] = handler
        self.dns = txt_dns_server(ZONE)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        issued = self.ca.issue(*[f"mta-sts.{d}" for d in POLICIES])
        self.hits: list[str] = []

        async def start():
            from aiohttp import web

            async def policy(request):
                host = request.host.split(":")[0]
                self.hits.append(host)
                body = POLICIES.get(host.removeprefix("mta-sts."))
                if body is None:
                    return web.Response(status=404)
                return web.Response(text=body, content_type="text/plain")
            app = web.Application()
            app.router.add_get("/.well-known/mta-sts.txt", policy)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, POLICY_HOST, 443,
                              ssl_context=issued.server_context(tmp_path, "https")).start()
            return runner
        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def daemon(self, daemon_factory, delivery: str = ""):
        return daemon_factory(extra=(
            f'[dns]\nnameservers = ["127.0.0.1:{self.dns.port}"]\ntimeout = "2s"\n'
            f'[delivery]\nretry_initial = "1m"\nretry_max = "1m"\n'
            f'tls_ca_file = "{self.ca_file}"\n{delivery}\n'))

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        for ctl in self.ctls:
            ctl.stop()
        self.dns.stop()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def _failure(d, rcpt: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in d.log_records("TransientFailure"):
            if r["recipient"] == rcpt:
                return r
        time.sleep(0.1)
    raise AssertionError(f"no TransientFailure for {rcpt}: {d.log_records()[-5:]}")


def test_mta_sts_enforce_verifies_and_defers(world, daemon_factory):
    d = world.daemon(daemon_factory)
    _send(d.port, "s@sender.test", ["a@good.test"])
    got = world.rx["1"].wait(1)
    assert got[0][1] == ["a@good.test"]
    saved = json.loads((d.spool_dir / "mta-sts.json").read_text())
    assert saved["good.test"]["mode"] == "enforce" and saved["good.test"]["mx"] == ["mx.good.test"]

    _send(d.port, "s@sender.test", ["b@wrongname.test"])
    r = _failure(d, "b@wrongname.test")
    assert (r["code"], r["status"]) == (451, "4.7.5"), r
    assert "mta-sts: certificate-host-mismatch" in r["text"], r

    _send(d.port, "s@sender.test", ["c@expired.test"])
    r = _failure(d, "c@expired.test")
    assert r["status"] == "4.7.5" and "mta-sts: certificate-expired" in r["text"], r

    # testing mode: the same wrong-name receiver gets the mail
    _send(d.port, "s@sender.test", ["d@testing.test"])
    assert any(m[1] == ["d@testing.test"] for m in world.rx["2"].wait(1))
    assert not any(m[1] == ["b@wrongname.test"] for m in world.rx["2"].messages)
    assert world.rx["3"].messages == []


def test_mta_sts_enforce_skips_an_mx_outside_the_policy(world, daemon_factory):
    d = world.daemon(daemon_factory)
    _send(d.port, "s@sender.test", ["e@outside.test"])
    world.rx["6"].wait(1)
    assert world.rx["5"].messages == [], "mx1 is not in the policy's mx list"


def test_verified_shaping_without_policy(world, daemon_factory):
    d = world.daemon(daemon_factory, 'tls = "verified"')
    _send(d.port, "s@sender.test", ["f@nopolicy.test"])
    r = _failure(d, "f@nopolicy.test")
    assert r["status"] == "4.7.5" and "verified: certificate-host-mismatch" in r["text"], r
    assert world.rx["2"].messages == []
    _send(d.port, "s@sender.test", ["g@good.test"])          # a good certificate passes
    world.rx["1"].wait(1)


def test_fallback_to_plaintext_after_a_broken_handshake(world, daemon_factory):
    d = world.daemon(daemon_factory, 'tls = "opportunistic-fallback"')
    _send(d.port, "s@sender.test", ["h@broken.test"])
    got = world.rx["4"].wait(1)
    assert got[0][1] == ["h@broken.test"]
    assert _records(d, "Delivery", 1)[0]["attempt"] == 1, "the fallback is at once, not a retry"
    # an enforced MTA-STS policy forbids the fallback: the plaintext session (same MX, so
    # maybe the idle one) is refused for this domain, or a new handshake breaks again
    _send(d.port, "s@sender.test", ["i@brokensts.test"])
    r = _failure(d, "i@brokensts.test")
    assert r["code"] == 451 and ("TLS handshake" in r["text"] or (
        r["status"] == "4.7.4" and "mta-sts: starttls-not-supported" in r["text"])), r
    assert len(world.rx["4"].messages) == 1


def test_opportunistic_without_fallback_defers_a_broken_handshake(world, daemon_factory):
    d = world.daemon(daemon_factory)
    _send(d.port, "s@sender.test", ["j@broken.test"])
    r = _failure(d, "j@broken.test")
    assert "TLS handshake" in r["text"], r
    assert world.rx["4"].messages == []


@pytest.fixture
def dane_world(tmp_path):
    """A signed zone dane.test behind a validating unbound (AD bit), three receivers:
    .30 DANE-EE matches (its certificate is from a CA nobody trusts and names nothing
    useful), .31 DANE-EE does not match, .32 DANE-TA: the chain holds the CA the record
    names and the leaf names the MX."""
    from tls_certs import SignedDnsServer, tlsa_rdata
    stranger = Ca("nobody trusts me")
    ee = stranger.issue("unrelated.invalid")
    ta_ca = Ca("dane ta")
    ta = ta_ca.issue("mx.danet.dane.test")
    ta.chain = [ta.cert, ta_ca.cert]
    ctls = []
    rx = {}
    for n, issued in ((30, ee), (31, stranger.issue("mx.bad.dane.test")), (32, ta)):
        handler = Receiver()
        ctl = Controller(handler, hostname=f"{NET}.{n}", port=25,
                         tls_context=issued.server_context(tmp_path, f"dane{n}"))
        ctl.start()
        ctls.append(ctl)
        rx[n] = handler
    dns = SignedDnsServer("dane.test", [
        "ee IN MX 10 mx.ee", f"mx.ee IN A {NET}.30", f"_25._tcp.mx.ee IN TLSA {tlsa_rdata(ee.cert)}",
        "bad IN MX 10 mx.bad", f"mx.bad IN A {NET}.31", "_25._tcp.mx.bad IN TLSA 3 1 1 " + "00" * 32,
        "danet IN MX 10 mx.danet", f"mx.danet IN A {NET}.32",
        f"_25._tcp.mx.danet IN TLSA {tlsa_rdata(ta_ca.cert, usage=2)}",
    ], tmp_path)
    yield dns, rx
    for ctl in ctls:
        ctl.stop()
    dns.stop()


def test_dane_ee_ta_and_mismatch(dane_world, daemon_factory):
    dns, rx = dane_world
    d = daemon_factory(extra=(
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
        '[delivery]\nretry_initial = "1m"\nretry_max = "1m"\n'))
    _send(d.port, "s@sender.test", ["a@ee.dane.test"])
    _send(d.port, "s@sender.test", ["b@danet.dane.test"])
    _send(d.port, "s@sender.test", ["c@bad.dane.test"])
    rx[30].wait(1)
    rx[32].wait(1)
    r = _failure(d, "c@bad.dane.test")
    assert (r["code"], r["status"]) == (451, "4.7.5"), r
    assert "dane: validation-failure" in r["text"], r
    assert rx[31].messages == []


def test_dane_off_by_config(dane_world, daemon_factory):
    dns, rx = dane_world
    d = daemon_factory(extra=(
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = "2s"\n'
        '[delivery]\ndane = false\n'))
    _send(d.port, "s@sender.test", ["c@bad.dane.test"])
    rx[31].wait(1)      # opportunistic TLS as before
