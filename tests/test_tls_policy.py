"""Unit and integration tests of mta/delivery/tls_policy.py: certificate verification
after the handshake, DANE TLSA matching, MTA-STS parsing, and the MTA-STS lookup through a
real resolver (unbound on loopback) and a real HTTPS server (aiohttp, test CA), cached
and persisted across a restart."""
from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tls_certs import Ca, https_policy_server, txt_dns_server

from mta.delivery import tls_policy as tp
from mta.egress.dnsclient import DnsClient

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmx: *.backup.sts.test\r\nmax_age: 86400\r\n"


@pytest.fixture(scope="module")
def ca():
    return Ca()


def _store(ca):
    from cryptography.x509.verification import Store
    return Store([ca.cert])


def test_verify_chain_good_wrong_name_expired_untrusted(ca):
    good = ca.issue("mx.a.test")
    assert tp.verify_chain(good.der, "mx.a.test", _store(ca)) is None
    assert tp.verify_chain(good.der, "MX.A.TEST.", _store(ca)) is None
    assert tp.verify_chain(good.der, "other.test", _store(ca))[0] == tp.HOST_MISMATCH
    assert tp.verify_chain(ca.issue("mx.a.test", expired=True).der, "mx.a.test",
                           _store(ca))[0] == tp.EXPIRED
    assert tp.verify_chain(Ca("other").issue("mx.a.test").der, "mx.a.test",
                           _store(ca))[0] == tp.NOT_TRUSTED
    assert tp.verify_chain([], "mx.a.test", _store(ca))[0] == tp.VALIDATION_FAILURE
    assert tp.verify_chain([b"garbage"], "mx.a.test", _store(ca))[0] == tp.VALIDATION_FAILURE
    wild = ca.issue("*.a.test")
    assert tp.verify_chain(wild.der, "mx.a.test", _store(ca)) is None
    assert tp.verify_chain(wild.der, "x.mx.a.test", _store(ca))[0] == tp.HOST_MISMATCH


def test_trust_store_from_ca_file_and_ssl_cert_file(ca, tmp_path, monkeypatch):
    path = ca.write(tmp_path / "ca.pem")
    leaf = ca.issue("mx.a.test")
    assert tp.TrustStore(path).verify(leaf.der, "mx.a.test") is None
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    store = tp.TrustStore()
    assert store.count == 1 and store.verify(leaf.der, "mx.a.test") is None


def _spki(cert) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def test_dane_ee_and_ta_records(ca):
    leaf = ca.issue("mx.d.test")
    full = leaf.der[0]
    chain_with_ta = leaf.der + [ca.cert.public_bytes(Encoding.DER)]
    # DANE-EE(3): every selector / matching type; names and dates are not checked
    for rec in [(3, 0, 0, full), (3, 0, 1, hashlib.sha256(full).digest()),
                (3, 1, 1, hashlib.sha256(_spki(leaf.cert)).digest()),
                (3, 1, 2, hashlib.sha512(_spki(leaf.cert)).digest())]:
        assert tp.dane_match(leaf.der, [rec], "elsewhere.test") is None, rec
    expired = ca.issue("mx.d.test", expired=True)
    assert tp.dane_match(expired.der, [(3, 1, 1, hashlib.sha256(_spki(expired.cert)).digest())],
                         "mx.d.test") is None
    # DANE-TA(2): the CA in the chain matches, the leaf chains to it and names the MX
    ta = (2, 1, 1, hashlib.sha256(_spki(ca.cert)).digest())
    assert tp.dane_match(chain_with_ta, [ta], "mx.d.test") is None
    assert tp.dane_match(chain_with_ta, [ta], "other.test")[0] == tp.HOST_MISMATCH
    other = Ca("x").issue("mx.d.test")
    assert tp.dane_match(other.der, [ta], "mx.d.test")[0] == tp.VALIDATION_FAILURE
    assert tp.dane_match(leaf.der, [(3, 1, 1, b"\0" * 32)], "mx.d.test")[0] == tp.VALIDATION_FAILURE
    # PKIX usages are not usable for SMTP (RFC 7672 3.1.3)
    assert tp.dane_match(leaf.der, [(1, 0, 0, full)], "mx.d.test")[0] == tp.TLSA_INVALID


def test_sts_txt_and_policy_parsing():
    assert tp.parse_sts_txt(["v=STSv1; id=20260101T000000"]) == "20260101T000000"
    assert tp.parse_sts_txt(["v=STSv1;id=abc;", "other"]) == "abc"
    assert tp.parse_sts_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None   # two: invalid
    assert tp.parse_sts_txt(["v=STSv1; id=bad-id!"]) is None
    assert tp.parse_sts_txt([]) is None
    p = tp.parse_sts_policy(POLICY, "1", 1000.0)
    assert (p.mode, p.mx, p.max_age, p.expires) == ("enforce", ("mx.sts.test", "*.backup.sts.test"),
                                                    86400, 87400.0)
    assert p.matches("mx.sts.test") and p.matches("MX.STS.TEST.") and p.matches("a.backup.sts.test")
    assert not p.matches("a.b.backup.sts.test") and not p.matches("backup.sts.test")
    assert not p.matches("evil-mx.sts.test")
    for bad in ["version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: x\n"]:
        with pytest.raises(ValueError):
            tp.parse_sts_policy(bad, "1", 0.0)
    assert tp.parse_sts_policy("version: STSv1\nmode: none\nmax_age: 5\n", "1", 0).mode == "none"


class _Session:
    """What TlsPolicy.check() reads of an SmtpClient."""

    def __init__(self, mx, chain, tls=True):
        self.mx_name, self._chain, self.tls, self.v = mx, chain, tls, {}

    def chain(self):
        return self._chain

    def verdict(self, key, check):
        if key not in self.v:
            self.v[key] = check()
        return self.v[key]


def test_check_decisions(ca, tmp_path):
    pol = tp.TlsPolicy(None, mta_sts=False, dane=False, ca_file=ca.write(tmp_path / "ca.pem"))
    good = _Session("mx.sts.test", ca.issue("mx.sts.test").der)
    wrong = _Session("mx.sts.test", ca.issue("other.test").der)
    plain = _Session("mx.sts.test", [], tls=False)
    enforce = tp.DomainPolicy("sts.test", sts=tp.parse_sts_policy(POLICY, "1", 0))
    testing = tp.DomainPolicy("sts.test", sts=tp.parse_sts_policy(
        POLICY.replace("enforce", "testing"), "1", 0))
    assert pol.check(tp.NO_POLICY, plain, []) is None               # nothing required
    assert pol.check(enforce, good, []) is None
    r = pol.check(enforce, wrong, [])
    assert (r.policy, r.result) == ("mta-sts", tp.HOST_MISMATCH)
    assert pol.check(enforce, plain, []).result == tp.STARTTLS_NOT_SUPPORTED
    assert pol.check(testing, wrong, []) is None                    # testing: reported only
    assert pol.host_allowed(enforce, "evil.test").policy == "mta-sts"
    assert pol.check(tp.NO_POLICY, wrong, [], verified=True).policy == "verified"
    assert pol.check(tp.NO_POLICY, good, [], verified=True) is None
    # DANE first: a matching EE record passes a wrong-name certificate
    rec = (3, 0, 1, hashlib.sha256(wrong.chain()[0]).digest())
    assert pol.check(enforce, _Session("mx.sts.test", wrong.chain()), [rec]) is None
    assert pol.check(tp.NO_POLICY, good, [rec]).policy == "dane"


@pytest.fixture
def sts_world(ca, tmp_path):
    """unbound with MX/TXT/A for sts.test and an HTTPS policy server on 127.0.85.10:443."""
    dns = txt_dns_server([
        "sts.test. 60 IN MX 10 mx.sts.test.",
        "mx.sts.test. 60 IN A 127.0.85.11",
        'sts.test. 60 IN TXT "v=spf1 -all"',
        '_mta-sts.sts.test. 60 IN TXT "v=STSv1; id=one"',
        "mta-sts.sts.test. 60 IN A 127.0.85.10",
        '_mta-sts.nopolicy.test. 60 IN TXT "v=STSv1; id=one"',
        "mta-sts.nopolicy.test. 60 IN A 127.0.85.12",       # nobody listens there
    ])
    yield dns
    dns.stop()


def _policy(dns, ca, tmp_path, clock=None):
    import time as _t
    return tp.TlsPolicy(DnsClient(dns.nameservers, 2.0, 1), ca_file=ca.write(tmp_path / "ca.pem"),
                        state_dir=tmp_path, clock=clock or _t.time)


def test_mta_sts_fetched_cached_persisted(ca, tmp_path, sts_world, monkeypatch):
    # the policy host (mta-sts.sts.test) is resolved through the same test resolver
    async def main():
        runner = await https_policy_server("127.0.85.10", ca.issue("mta-sts.sts.test"), tmp_path,
                                           POLICY)
        try:
            pol = _policy(sts_world, ca, tmp_path)
            p = await pol.for_domain("sts.test")
            assert p.enforce and p.sts.mx == ("mx.sts.test", "*.backup.sts.test")
            assert await pol.for_domain("sts.test") is p and len(runner.hits) == 1   # cached
            saved = json.loads((tmp_path / "mta-sts.json").read_text())
            assert saved["sts.test"]["mode"] == "enforce"
            # no TXT: no policy; a TXT whose HTTPS server is down: no policy, error noted
            assert (await pol.for_domain("plain.test")).sts is None
            broken = await pol.for_domain("nopolicy.test")
            assert broken.sts is None and "sts-policy-fetch-error" in broken.sts_error
            # a restart: the saved policy is used without another fetch (same TXT id)
            pol2 = _policy(sts_world, ca, tmp_path)
            p2 = await pol2.for_domain("sts.test")
            assert p2.enforce and len(runner.hits) == 1
            # both at once: one lookup
            pol3 = tp.TlsPolicy(DnsClient(sts_world.nameservers, 2.0, 1), ca_file=tmp_path / "ca.pem")
            a, b = await asyncio.gather(pol3.for_domain("sts.test"), pol3.for_domain("sts.test"))
            assert a is b and len(runner.hits) == 2
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_mta_sts_policy_from_an_untrusted_server_or_wrong_type_is_not_used(ca, tmp_path, sts_world,
                                                                           monkeypatch):
    async def main():
        for issued, ctype in [(Ca("rogue").issue("mta-sts.sts.test"), "text/plain"),
                              (ca.issue("mta-sts.sts.test"), "text/html")]:
            runner = await https_policy_server("127.0.85.10", issued, tmp_path, POLICY, ctype)
            try:
                p = await tp.TlsPolicy(DnsClient(sts_world.nameservers, 2.0, 1),
                                       ca_file=ca.write(tmp_path / "ca.pem")).for_domain("sts.test")
                assert p.sts is None and p.sts_error, (ctype, p)
            finally:
                await runner.cleanup()
    asyncio.run(main())
