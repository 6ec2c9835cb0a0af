"""MX resolution and site naming (mta.egress.sites) against a real DNS server
(unbound on loopback, tools/dnsserver.py): MX order and shuffle, implicit and
null MX, failures and their classification, the TTL cache, shared in-flight
lookups, static routes, smarthost, address literals and IDNA."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from dnsserver import DnsServer, silent_nameserver
from mta.egress.dnsclient import QueryFailure
from mta.egress.sites import (FAILURES, QUERY_FAILURES, Failure, ResolveError, Site,
                              SiteResolver)

RECORDS = [
    # MX order: 5 first, the two 10s in either order, 20 last
    "order.test. 300 IN MX 10 mx-a.order.test.",
    "order.test. 300 IN MX 10 mx-b.order.test.",
    "order.test. 300 IN MX 5 mx-first.order.test.",
    "order.test. 300 IN MX 20 mx-last.order.test.",
    "mx-a.order.test. 300 IN A 127.0.1.1",
    "mx-b.order.test. 300 IN A 127.0.1.2",
    "mx-first.order.test. 300 IN A 127.0.1.3",
    "mx-last.order.test. 300 IN A 127.0.1.4",
    # two domains, one provider (names differ in case and order)
    "shared1.test. IN MX 10 mx1.provider.test.",
    "shared1.test. IN MX 20 mx2.provider.test.",
    "shared2.test. IN MX 20 MX2.Provider.test.",
    "shared2.test. IN MX 10 mx1.provider.test.",
    "mx1.provider.test. IN A 127.0.2.1",
    "mx2.provider.test. IN A 127.0.2.2",
    # implicit MX, null MX, no MX and no A
    "implicit.test. 300 IN A 127.0.3.1",
    "nullmx.test. IN MX 0 .",
    "nodata.test. IN TXT v=spf1",
    # an IP-literal exchange (a name that does not exist) next to a CNAME'd one
    "mixed.test. IN MX 10 127.0.0.9.",
    "mixed.test. IN MX 20 alias.mixed.test.",
    "alias.mixed.test. IN CNAME real.mixed.test.",
    "real.mixed.test. IN A 127.0.4.1",
    # one MX host REFUSED (transient), the other fine
    "partial.test. IN MX 10 mx.broken.test.",
    "partial.test. IN MX 20 mx1.provider.test.",
    # MX whose only host has no address
    "noaddr.test. IN MX 10 gone.noaddr.test.",
    # TTLs: the smaller one (the A record) wins
    "ttl.test. 120 IN MX 10 mx.ttl.test.",
    "mx.ttl.test. 60 IN A 127.0.5.1",
    # IDNA: bücher.test
    "xn--bcher-kva.test. IN MX 10 mx.xn--bcher-kva.test.",
    "mx.xn--bcher-kva.test. IN A 127.0.6.1",
    # IPv6
    "v6.test. IN A 127.0.7.1",
    "v6.test. IN AAAA ::1",
    # a relay host for static routes and the smarthost
    "relay.test. 90 IN A 127.0.8.1",
]


@pytest.fixture(scope="module")
def zone():
    with DnsServer(RECORDS, zones={"broken.test.": "refuse"}) as server:
        yield server


def run(coro, *, loop: str = "asyncio", timeout: float = 10.0):
    """Run `coro` on a fresh loop with a per-test timeout."""
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


def resolver(zone, **kwargs) -> SiteResolver:
    return SiteResolver(nameservers=zone.nameservers, timeout=1.0, **kwargs)


async def failure_of(res: SiteResolver, domain: str) -> ResolveError:
    try:
        site = await res.resolve(domain)
    except ResolveError as exc:
        return exc
    raise AssertionError(f"{domain}: got site {site.name!r}, want a ResolveError")


def test_failure_tables_are_complete():
    assert set(FAILURES) == set(Failure), "got unclassified Failure members"
    assert set(QUERY_FAILURES) == set(QueryFailure), "got unmapped QueryFailure members"
    for failure, (permanent, code, status, _) in FAILURES.items():
        want = "5" if permanent else "4"
        assert status[0] == want and str(code)[0] == want, \
            f"{failure}: got {code} {status}, want both to start with {want}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_mx_order_and_equal_preference_shuffle(zone, loop):
    async def main():
        res = resolver(zone)
        return [await res.resolve("order.test") for _ in range(40)], res.stats

    sites, stats = run(main(), loop=loop)
    orders = set()
    for site in sites:
        names = [h.name for h in site.hosts]
        assert names[0] == "mx-first.order.test" and names[3] == "mx-last.order.test", \
            f"got {names}, want mx-first first and mx-last last"
        prefs = [h.preference for h in site.hosts]
        assert prefs == [5, 10, 10, 20], f"got preferences {prefs}, want ascending"
        orders.add(tuple(names[1:3]))
    assert orders == {("mx-a.order.test", "mx-b.order.test"),
                      ("mx-b.order.test", "mx-a.order.test")}, \
        f"got orders {orders}, want both orders of the equal-preference pair"
    site = sites[0]
    assert site.name == "mx-a.order.test,mx-b.order.test,mx-first.order.test,mx-last.order.test"
    assert site.port == 25
    assert dict((h.name, h.addresses) for h in site.hosts)["mx-first.order.test"] == ("127.0.1.3",)
    assert stats["misses"] == 1 and stats["hits"] == 39, f"got {stats}, want 1 miss, 39 hits"


# name, domain, want site name, want (host, addresses) in order
SITE_CASES = [
    ("implicit MX", "implicit.test", "implicit.test", [("implicit.test", ("127.0.3.1",))]),
    ("upper case and trailing dot", "IMPLICIT.Test.", "implicit.test",
     [("implicit.test", ("127.0.3.1",))]),
    ("IP-literal exchange skipped, CNAME exchange followed", "mixed.test",
     "127.0.0.9,alias.mixed.test", [("alias.mixed.test", ("127.0.4.1",))]),
    ("IDNA", "bücher.test", "mx.xn--bcher-kva.test", [("mx.xn--bcher-kva.test", ("127.0.6.1",))]),
    ("IDNA A-label", "XN--BCHER-KVA.test", "mx.xn--bcher-kva.test",
     [("mx.xn--bcher-kva.test", ("127.0.6.1",))]),
    ("address literal", "[127.0.0.7]", "[127.0.0.7]:25", [("127.0.0.7", ("127.0.0.7",))]),
    ("IPv6 address literal", "[IPv6:0::1]", "[::1]:25", [("::1", ("::1",))]),
]


@pytest.mark.parametrize("domain,want_name,want_hosts", [c[1:] for c in SITE_CASES],
                         ids=[c[0] for c in SITE_CASES])
def test_site(zone, domain, want_name, want_hosts):
    site = run(resolver(zone).resolve(domain))
    got = [(h.name, h.addresses) for h in site.hosts]
    assert (site.name, got) == (want_name, want_hosts), \
        f"got {site.name!r} {got}, want {want_name!r} {want_hosts}"


# name, domain, want failure
FAILURE_CASES = [
    ("NXDOMAIN", "nope.test", Failure.NXDOMAIN),
    ("null MX", "nullmx.test", Failure.NULL_MX),
    ("no MX and no A", "nodata.test", Failure.NO_ROUTE),
    ("no address for any MX", "noaddr.test", Failure.NO_MX_ADDRESS),
    ("REFUSED", "x.broken.test", Failure.DNS_TEMPFAIL),
    ("bad label", "a..test", Failure.BAD_NAME),
    ("underscore", "_dmarc.test", Failure.BAD_NAME),
    ("leading hyphen", "-a.test", Failure.BAD_NAME),
    ("label too long", "a" * 64 + ".test", Failure.BAD_NAME),
    ("empty", "", Failure.BAD_NAME),
    ("bad address literal", "[300.1.1.1]", Failure.BAD_NAME),
    ("untagged IPv6 literal", "[::1]", Failure.BAD_NAME),
    ("bad IDNA", "a\u200d.test", Failure.BAD_NAME),
]


@pytest.mark.parametrize("domain,want", [c[1:] for c in FAILURE_CASES],
                         ids=[c[0] for c in FAILURE_CASES])
def test_failure(zone, domain, want):
    exc = run(failure_of(resolver(zone), domain))
    permanent, code, status, _ = FAILURES[want]
    got = (exc.failure, exc.permanent, exc.status, exc.code)
    assert got == (want, permanent, status, code), \
        f"got {got}, want {(want, permanent, status, code)}: {exc.reason}"
    shown = ascii(domain)[1:-1]
    assert shown in exc.reason and exc.reason.isascii(), \
        f"got reason {exc.reason!r}, want ASCII text naming {shown!r}"


def test_null_mx_and_refused_statuses(zone):
    """The statuses the bounce and the deferral carry (RFC 7505 3, RFC 3463)."""
    res = resolver(zone)
    null = run(failure_of(res, "nullmx.test"))
    assert (null.code, null.status, null.permanent) == (556, "5.1.10", True)
    nx = run(failure_of(res, "nope.test"))
    assert (nx.status, nx.permanent) == ("5.1.2", True)
    refused = run(failure_of(res, "x.broken.test"))
    assert (refused.status, refused.permanent) == ("4.4.3", False)
    assert "REFUSED" in refused.reason, f"got {refused.reason!r}, want it to say REFUSED"


def test_timeout_is_transient():
    with silent_nameserver() as ns:
        res = SiteResolver(nameservers=[ns], timeout=0.2, attempts=2)
        start = time.monotonic()
        exc = run(failure_of(res, "example.test"))
        took = time.monotonic() - start
    assert (exc.failure, exc.permanent, exc.status) == (Failure.DNS_TEMPFAIL, False, "4.4.3")
    assert "timeout" in exc.reason, f"got {exc.reason!r}, want it to say timeout"
    assert took < 2.0, f"got {took:.2f} s, want about timeout x attempts = 0.4 s"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache(zone):
    clock = Clock()
    res = resolver(zone, clock=clock, min_ttl=10, max_ttl=3600)

    async def main():
        first = await res.resolve("ttl.test")
        assert first.expires == 1060.0, f"got expires {first.expires}, want 1000 + min TTL 60"
        await res.resolve("ttl.test")
        assert res.stats["hits"] == 1 and res.stats["misses"] == 1, f"got {res.stats}"
        clock.now = 1060.5
        await res.resolve("ttl.test")
        assert res.stats["misses"] == 2, f"got {res.stats}, want a miss after expiry"
        res.invalidate("TTL.test.")
        await res.resolve("ttl.test")
        assert res.stats["misses"] == 3, f"got {res.stats}, want a miss after invalidate"

    run(main())


def test_ttl_clamp(zone):
    clock = Clock()
    low = run(resolver(zone, clock=clock, min_ttl=100).resolve("ttl.test"))
    high = run(resolver(zone, clock=clock, min_ttl=0, max_ttl=30).resolve("ttl.test"))
    assert (low.expires, high.expires) == (1100.0, 1030.0), \
        f"got {low.expires}, {high.expires}, want 1100 (min_ttl) and 1030 (max_ttl)"


def test_incomplete_answer_lives_min_ttl(zone):
    """A host that failed transiently keeps the rest of the MX set for min_ttl only;
    an exchange that authoritatively does not exist does not shorten the TTL."""
    clock = Clock()
    partial = run(resolver(zone, clock=clock, min_ttl=10).resolve("partial.test"))
    assert [h.name for h in partial.hosts] == ["mx1.provider.test"]
    assert partial.name == "mx.broken.test,mx1.provider.test"
    assert partial.expires == 1010.0, f"got {partial.expires}, want 1000 + min_ttl"
    mixed = run(resolver(zone, clock=clock, min_ttl=10).resolve("mixed.test"))
    assert mixed.expires == 4600.0, f"got {mixed.expires}, want 1000 + TTL 3600"


def test_negative_cache(zone):
    clock = Clock()
    res = resolver(zone, clock=clock, negative_ttl=60, transient_ttl=5)

    async def main():
        for domain in ("nope.test", "nope.test", "x.broken.test", "x.broken.test"):
            await failure_of(res, domain)
        assert (res.stats["misses"], res.stats["hits"], res.stats["errors"]) == (2, 2, 2), \
            f"got {res.stats}, want each failure looked up once"
        clock.now += 6               # the transient failure is forgotten, the NXDOMAIN is not
        await failure_of(res, "nope.test")
        await failure_of(res, "x.broken.test")
        assert (res.stats["misses"], res.stats["hits"]) == (3, 3), f"got {res.stats}"

    run(main())


def test_concurrent_resolves_share_one_lookup(zone):
    async def main():
        res = resolver(zone)
        sites = await asyncio.gather(*(res.resolve("shared1.test") for _ in range(10)))
        return sites, res.stats

    sites, stats = run(main())
    assert {s.name for s in sites} == {"mx1.provider.test,mx2.provider.test"}
    assert (stats["misses"], stats["joined"], stats["queries"]) == (1, 9, 3), \
        f"got {stats}, want 1 lookup (MX + 2 A queries) shared by 10 resolves"


def test_cancelled_caller_does_not_cancel_shared_lookup():
    async def main():
        with silent_nameserver() as ns:
            res = SiteResolver(nameservers=[ns], timeout=0.2, attempts=1)
            first = asyncio.ensure_future(res.resolve("example.test"))
            second = asyncio.ensure_future(res.resolve("example.test"))
            await asyncio.sleep(0.05)
            first.cancel()
            exc = await failure_of(res, "example.test")
            with pytest.raises(ResolveError):
                await second
        return exc, res.stats

    exc, stats = run(main())
    assert exc.failure is Failure.DNS_TEMPFAIL
    assert (stats["misses"], stats["joined"]) == (1, 2), f"got {stats}"


def test_same_mx_set_same_site(zone):
    async def main():
        res = resolver(zone)
        return await res.resolve("shared1.test"), await res.resolve("SHARED2.test")

    one, two = run(main())
    assert one.name == two.name == "mx1.provider.test,mx2.provider.test", \
        f"got {one.name!r} and {two.name!r}, want one site"
    assert [h.name for h in two.hosts] == ["mx1.provider.test", "mx2.provider.test"]


def test_ipv6(zone):
    v4 = run(resolver(zone).resolve("v6.test"))
    both = run(resolver(zone, ipv6=True).resolve("v6.test"))
    assert v4.hosts[0].addresses == ("127.0.7.1",)
    assert both.hosts[0].addresses == ("127.0.7.1", "::1"), \
        f"got {both.hosts[0].addresses}, want IPv4 then IPv6"


def test_static_route_and_wildcard(zone):
    res = resolver(zone, static_routes={
        "example.test": [("127.0.0.5", 2525)],
        "*.sub.test": [("relay.test", 2526), ("127.0.0.6", 2526)]})

    async def main():
        exact = await res.resolve("Example.test")
        deep = [await res.resolve(d) for d in ("a.sub.test", "b.c.sub.test")]
        apex = await failure_of(res, "sub.test")          # the wildcard covers subdomains only
        other = await failure_of(res, "a.example.test")   # an exact route covers only itself
        return exact, deep, apex, other

    exact, deep, apex, other = run(main())
    assert exact == Site("[127.0.0.5]:2525", exact.hosts, 2525, exact.expires)
    assert [(h.name, h.addresses) for h in exact.hosts] == [("127.0.0.5", ("127.0.0.5",))]
    for site in deep:
        assert (site.name, site.port) == ("[relay.test]:2526,[127.0.0.6]:2526", 2526)
        got = [(h.name, h.preference, h.addresses) for h in site.hosts]
        assert got == [("relay.test", 0, ("127.0.8.1",)), ("127.0.0.6", 1, ("127.0.0.6",))], \
            f"got {got}, want the route's hosts in the configured order"
    assert res.stats["hits"] == 1, f"got {res.stats}, want both subdomains to share one entry"
    assert apex.failure is Failure.NXDOMAIN and other.failure is Failure.NXDOMAIN


def test_smarthost(zone):
    res = resolver(zone, smarthost=("relay.test", 587),
                   static_routes={"order.test": [("127.0.0.5", 25)]})

    async def main():
        return [await res.resolve(d) for d in ("nope.test", "implicit.test", "[127.0.0.9]",
                                               "order.test")]

    nope, implicit, literal, routed = run(main())
    for site in (nope, implicit, literal):
        assert (site.name, site.port) == ("[relay.test]:587", 587), f"got {site.name!r}"
        assert site.hosts[0].addresses == ("127.0.8.1",)
    assert routed.name == "[127.0.0.5]:25", f"got {routed.name!r}, want the static route to win"
    missing = SiteResolver(nameservers=zone.nameservers, smarthost=("gone.test", 25))
    exc = run(failure_of(missing, "implicit.test"))
    assert (exc.failure, exc.permanent) == (Failure.DNS_TEMPFAIL, False), \
        "got a bounce for a smarthost that does not resolve, want a deferral"


def test_smarthost_ip_needs_no_dns():
    res = SiteResolver(nameservers=[("127.0.0.1", 9)], smarthost=("127.0.0.8", 2525))
    site = run(res.resolve("anything.example"))
    assert (site.name, site.hosts[0].addresses) == ("[127.0.0.8]:2525", ("127.0.0.8",))
    assert res.stats["queries"] == 0


@pytest.mark.parametrize("kwargs", [
    {"static_routes": {"a.test": [("127.0.0.1", 25), ("127.0.0.2", 26)]}},
    {"static_routes": {"a.test": []}},
    {"static_routes": {"a..test": [("127.0.0.1", 25)]}},
    {"static_routes": {"a.test": [("127.0.0.1", 0)]}},
    {"smarthost": ("bad_host", 25)},
    {"min_ttl": 10, "max_ttl": 5},
], ids=["mixed ports", "no hosts", "bad domain", "bad port", "bad smarthost", "ttl bounds"])
def test_config_errors(kwargs):
    with pytest.raises(ValueError):
        SiteResolver(nameservers=[("127.0.0.1", 53)], **kwargs)


def test_dns_server_fixture(dns_server):
    server = dns_server(["solo.test. IN MX 10 mx.solo.test.", "mx.solo.test. IN A 127.0.9.1"])
    site = run(SiteResolver(nameservers=server.nameservers).resolve("solo.test"))
    assert site.hosts[0].addresses == ("127.0.9.1",)
