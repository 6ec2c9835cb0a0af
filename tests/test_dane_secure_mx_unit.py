"""TlsPolicy.dane_for (mta/delivery/tls_policy.py) with a scripted resolver: DANE only for
an MX of a DNSSEC-secure MX RRset whose address and TLSA answers are secure too
(RFC 7672 2.2); a failed DNSSEC lookup is a refusal (defer) with "dnssec-invalid"."""
from __future__ import annotations

import asyncio

import mta.delivery.tls_policy as tp
from mta.egress.dnsclient import QueryError, QueryFailure

REC = (3, 1, 1, b"\x01" * 32)


class FakeDns:
    """answers: (kind, name) -> (value, secure) or a QueryError to raise."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def _get(self, kind: str, name: str):
        self.asked.append((kind, name))
        a = self.answers.get((kind, name), ([], False))
        if isinstance(a, QueryError):
            raise a
        return a

    async def secure_mx(self, name):
        return self._get("MX", name)

    async def secure_addresses(self, name, rdtype):
        return self._get(rdtype, name)

    async def tlsa(self, name):
        records, secure = self._get("TLSA", name)
        return records, 300, secure

    async def txt(self, name):
        return [], 0


def _servfail(what: str) -> QueryError:
    return QueryError(QueryFailure.SERVFAIL, f"{what}: SERVFAIL")


def _run(answers: dict, domain: str, mx: str):
    async def go():
        pol = tp.TlsPolicy(FakeDns(answers), mta_sts=False)
        p = await pol.for_domain(domain)
        return p, await pol.dane_for(p, mx), pol.dns.asked
    return asyncio.run(go())


def test_secure_mx_secure_address_secure_tlsa_is_dane():
    p, (tlsa, ref), _ = _run({("MX", "d.test"): (["mx.d.test"], True),
                              ("A", "mx.d.test"): (["192.0.2.1"], True),
                              ("TLSA", "_25._tcp.mx.d.test"): ([REC], True)}, "d.test", "mx.d.test")
    assert p.dane_mx == frozenset({"mx.d.test"}) and tlsa == [REC] and ref is None


def test_insecure_mx_means_no_dane_and_no_tlsa_query():
    _, (tlsa, ref), asked = _run({("MX", "d.test"): (["mx.d.test"], False),
                                  ("A", "mx.d.test"): (["192.0.2.1"], True),
                                  ("TLSA", "_25._tcp.mx.d.test"): ([REC], True)}, "d.test", "mx.d.test")
    assert (tlsa, ref) == ([], None)
    assert ("TLSA", "_25._tcp.mx.d.test") not in asked


def test_host_outside_the_secure_mx_rrset_gets_no_dane():
    _, (tlsa, ref), _ = _run({("MX", "d.test"): (["mx.d.test"], True),
                              ("A", "evil.test"): (["192.0.2.1"], True),
                              ("TLSA", "_25._tcp.evil.test"): ([REC], True)}, "d.test", "evil.test")
    assert (tlsa, ref) == ([], None)


def test_insecure_address_means_no_dane():
    _, (tlsa, ref), asked = _run({("MX", "d.test"): (["mx.d.test"], True),
                                  ("A", "mx.d.test"): (["192.0.2.1"], False),
                                  ("TLSA", "_25._tcp.mx.d.test"): ([REC], True)}, "d.test", "mx.d.test")
    assert (tlsa, ref) == ([], None)
    assert ("TLSA", "_25._tcp.mx.d.test") not in asked


def test_bogus_mx_or_tlsa_defers():
    _, (tlsa, ref), _ = _run({("MX", "d.test"): _servfail("MX d.test")}, "d.test", "mx.d.test")
    assert tlsa == [] and ref.policy == "dane" and ref.result == tp.DNSSEC_INVALID
    _, (tlsa, ref), _ = _run({("MX", "d.test"): (["mx.d.test"], True),
                              ("A", "mx.d.test"): (["192.0.2.1"], True),
                              ("TLSA", "_25._tcp.mx.d.test"): _servfail("TLSA x")}, "d.test", "mx.d.test")
    assert tlsa == [] and ref.result == tp.DNSSEC_INVALID


def test_secure_denial_of_mx_makes_the_domain_its_own_mx():
    p, (tlsa, ref), _ = _run({("MX", "d.test"): ([], True),
                              ("A", "d.test"): (["192.0.2.1"], True),
                              ("TLSA", "_25._tcp.d.test"): ([REC], True)}, "d.test", "d.test")
    assert p.dane_mx == frozenset({"d.test"}) and tlsa == [REC] and ref is None


def test_dane_off_asks_nothing():
    async def go():
        dns = FakeDns({})
        pol = tp.TlsPolicy(dns, mta_sts=False, dane=False)
        p = tp.DomainPolicy("d.test", dane_mx=frozenset({"mx.d.test"}))
        return await pol.dane_for(p, "mx.d.test"), dns.asked
    assert asyncio.run(go()) == (([], None), [])
