"""Sites: where mail for a destination domain goes (MX resolution and rollup).

The dispatcher asks `SiteResolver.resolve(domain)` for the `Site` of the
domain's ready queue and connects to its hosts in order. A site is named after
its MX set, so every domain hosted by one provider maps to one site and is
shaped together (KumoMTA's MX rollup). Static routes (per domain or
`*.domain`) and a smarthost bypass the MX lookup; a static route wins over the
smarthost, the smarthost over DNS (Postfix: transport_maps, then relayhost).

Reads: MX, A and AAAA records through `mta.egress.dnsclient`; routes from config.
Writes: nothing; keeps a bounded in-RAM LRU of sites and of failures.
Diagnostics: `ResolveError` (warning level: trouble at the destination, never
a bug), whose permanence and enhanced status come from the `FAILURES` table;
its scope is the site: every recipient at the domain shares the outcome.
`ValueError` at construction for a bad route or smarthost (fatal: config).
Trust: DNS answers are network data. MX sets are capped at `MAX_MX_HOSTS`,
addresses per host at `MAX_ADDRESSES`, exchange names must be host names, and
TTLs are clamped to [min_ttl, max_ttl].
RFCs: 5321 2.3.5, 4.1.3 and 5.1 (domains, address literals, MX selection and
implicit MX), 7505 (null MX), 3463 (enhanced status), 5891 (IDNA).
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from mta.egress.dnsclient import DnsClient, QueryError, QueryFailure, to_ascii

MAX_MX_HOSTS = 16       # lowest-preference MX records beyond this are ignored
MAX_ADDRESSES = 16      # addresses kept per host (Postfix smtp_mx_address_limit is 5)


@dataclass(slots=True, frozen=True)
class MxHost:
    name: str                     # MX exchange (or route host), lower-case A-label, no trailing dot
    preference: int               # MX preference; 0 for an implicit MX, list position for a route
    addresses: tuple[str, ...]    # IPv4 (then IPv6 when enabled) addresses, in try order


@dataclass(slots=True, frozen=True)
class Site:
    name: str                     # sorted MX names joined by ","; "[host]:port" for a route
    hosts: tuple[MxHost, ...]     # try order: ascending preference, ties shuffled per resolve
    port: int                     # 25, or the port of a static route / smarthost
    expires: float                # clock time after which this answer is stale


class Failure(enum.Enum):
    """Why a domain has no site."""
    BAD_NAME = "bad-name"               # not a syntactically valid domain
    NXDOMAIN = "nxdomain"               # the domain does not exist
    NULL_MX = "null-mx"                 # "MX 0 ." : the domain accepts no mail (RFC 7505)
    NO_ROUTE = "no-route"               # no MX and no A/AAAA record
    DNS_TEMPFAIL = "dns-tempfail"       # SERVFAIL, REFUSED, timeout or another DNS error
    NO_MX_ADDRESS = "no-mx-address"     # MX records exist but none of their hosts has an address


# Failure -> (permanent, SMTP code for the DSN, enhanced status, text). The one
# place where DNS trouble is classified; a test checks every member is here.
FAILURES: dict[Failure, tuple[bool, int, str, str]] = {
    Failure.BAD_NAME: (True, 550, "5.1.2", 'invalid domain name "{domain}": {detail}'),
    Failure.NXDOMAIN: (True, 550, "5.1.2", "domain {domain} does not exist ({detail})"),
    Failure.NULL_MX: (True, 556, "5.1.10", "domain {domain} does not accept mail "
                                           "(null MX, RFC 7505)"),
    Failure.NO_ROUTE: (True, 550, "5.4.4", "domain {domain} has no MX and no address "
                                           "record ({detail})"),
    Failure.DNS_TEMPFAIL: (False, 451, "4.4.3", "DNS lookup for {domain} failed ({detail})"),
    Failure.NO_MX_ADDRESS: (False, 451, "4.4.4", "no address for any MX of {domain} "
                                                 "({detail})"),
}

# What a failed query means for the domain being resolved.
QUERY_FAILURES: dict[QueryFailure, Failure] = {
    QueryFailure.NXDOMAIN: Failure.NXDOMAIN,
    QueryFailure.SERVFAIL: Failure.DNS_TEMPFAIL,
    QueryFailure.TIMEOUT: Failure.DNS_TEMPFAIL,
    QueryFailure.ERROR: Failure.DNS_TEMPFAIL,
}


class ResolveError(Exception):
    """A domain has no usable site; classified by `FAILURES`."""

    scope: ClassVar[str] = "site"   # the outcome applies to every recipient at the domain

    def __init__(self, failure: Failure, domain: str, detail: str = "") -> None:
        permanent, code, status, text = FAILURES[failure]
        self.failure = failure      # why, as a Failure member
        self.domain = domain        # the domain (or route) as resolved
        self.detail = detail        # what the DNS said, e.g. "MX example.com: REFUSED"
        self.permanent = permanent  # bounce (True) or defer (False)
        self.code = code            # SMTP-style code for the DSN diagnostic (556 for null MX)
        self.status = status        # enhanced status (RFC 3463), e.g. "5.1.10"
        shown = domain if domain.isascii() and domain.isprintable() else ascii(domain)[1:-1]
        self.reason = text.format(domain=shown, detail=detail)  # ASCII text for logs and DSNs
        super().__init__(f"{status} {self.reason}")

    def copy(self) -> ResolveError:
        """A fresh instance, so cached failures do not accumulate tracebacks."""
        return ResolveError(self.failure, self.domain, self.detail)


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot (RFC 5321 2.3.5, 5891).

    Raises ResolveError(BAD_NAME) for anything that is not a valid domain.
    """
    name = domain[:-1] if domain.endswith(".") else domain   # absolute form
    if not name.isascii():
        try:
            name = to_ascii(name)
        except ValueError as exc:
            raise ResolveError(Failure.BAD_NAME, domain, str(exc)) from None
    name = name.lower()
    if not name or len(name) > 253:
        raise ResolveError(Failure.BAD_NAME, domain, "empty or longer than 253 octets")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ResolveError(Failure.BAD_NAME, domain,
                               f"bad label {label!r} (letters, digits, inner hyphens; 1-63)")
    return name


def _parse_literal(domain: str) -> str:
    """The address of an address literal "[192.0.2.1]" / "[IPv6:2001:db8::1]" (RFC 5321 4.1.3)."""
    inner = domain[1:-1] if domain.endswith("]") else ""
    if inner[:5].lower() == "ipv6:":
        inner, version = inner[5:], 6
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(inner)
    except ValueError:
        raise ResolveError(Failure.BAD_NAME, domain, "bad address literal") from None
    if addr.version != version:
        raise ResolveError(Failure.BAD_NAME, domain, "IPv6 literals need the IPv6: tag")
    return str(addr)


def _site_name(hosts: list[tuple[str, int]]) -> str:
    return ",".join(f"[{host}]:{port}" for host, port in hosts)


def _any_transient(errors: list[QueryError]) -> bool:
    """Did a query fail for a reason other than an authoritative NXDOMAIN?"""
    return any(QUERY_FAILURES[e.failure] is not Failure.NXDOMAIN for e in errors)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True, frozen=True)
class _Route:
    name: str                     # site name, "[host]:port[,...]"; also the cache key
    port: int                     # the one port all hosts of the route share
    hosts: tuple[str, ...]        # IP addresses or host names, in try order
    static: Site | None           # the whole answer when every host is an IP address


def _make_route(what: str, hosts: list[tuple[str, int]]) -> _Route:
    """Validate one static route or the smarthost; ValueError names `what`."""
    if not hosts:
        raise ValueError(f"{what}: no hosts")
    ports = {port for _, port in hosts}
    if len(ports) != 1:
        raise ValueError(f"{what}: all hosts of a route must share one port, got {sorted(ports)}")
    port = ports.pop()
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what}: port {port!r} is not in 1..65535")
    names = []
    for host, _ in hosts:
        if _is_ip(host):
            names.append(str(ipaddress.ip_address(host)))
            continue
        try:
            names.append(normalize_domain(host))
        except ResolveError as exc:
            raise ValueError(f"{what}: {exc.reason}") from None
    name = _site_name([(host, port) for host in names])
    static = None
    if all(_is_ip(host) for host in names):
        static = Site(name, tuple(MxHost(host, i, (host,)) for i, host in enumerate(names)),
                      port, math.inf)
    return _Route(name, port, tuple(names), static)


class _Entry:
    """One cached answer: a site (with its preference groups when ties need a
    shuffle on every resolve) or a failure."""

    __slots__ = ("expires", "site", "groups", "error")

    def __init__(self, expires: float, site: Site | None = None,
                 groups: tuple[tuple[MxHost, ...], ...] | None = None,
                 error: ResolveError | None = None) -> None:
        self.expires = expires    # clock time after which the entry is stale
        self.site = site          # the answer, in the order of the first resolve
        self.groups = groups      # hosts by preference, only when some preference has ties
        self.error = error        # the failure, for negative entries

    def result(self) -> Site:
        if self.error is not None:
            raise self.error.copy()
        assert self.site is not None
        if self.groups is None:
            return self.site
        hosts: list[MxHost] = []
        for group in self.groups:
            if len(group) > 1:
                group_list = list(group)
                random.shuffle(group_list)     # RFC 5321 5.1: spread load over equal MXs
                hosts.extend(group_list)
            else:
                hosts.extend(group)
        return Site(self.site.name, tuple(hosts), self.site.port, self.site.expires)


class SiteResolver:
    """Domain -> Site, with a TTL cache and one shared query per domain in flight."""

    def __init__(self, *, nameservers: list[tuple[str, int]] | None = None,
                 timeout: float = 5.0, attempts: int = 2, min_ttl: float = 30,
                 max_ttl: float = 3600, negative_ttl: float = 60,
                 transient_ttl: float = 5.0, ipv6: bool = False,
                 static_routes: dict[str, list[tuple[str, int]]] | None = None,
                 smarthost: tuple[str, int] | None = None, cache_size: int = 100_000,
                 clock: Callable[[], float] | None = None, port: int = 25) -> None:
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"min_ttl {min_ttl} must be in 0..max_ttl ({max_ttl})")
        if cache_size < 1:
            raise ValueError(f"cache_size {cache_size} must be at least 1")
        self._dns = DnsClient(nameservers, timeout, attempts)
        self._port = port                        # of MX hosts (tests use receivers on other ports)
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl        # permanent failures
        self._transient_ttl = transient_ttl      # transient failures: only to avoid hammering
        self._rdtypes = ("A", "AAAA") if ipv6 else ("A",)
        self._routes: dict[str, _Route] = {}
        for key, hosts in (static_routes or {}).items():
            wildcard = key.startswith("*.")
            try:
                domain = normalize_domain(key[2:] if wildcard else key)
            except ResolveError as exc:
                raise ValueError(f"static_routes[{key!r}]: {exc.reason}") from None
            self._routes[("*." if wildcard else "") + domain] = _make_route(
                f"static_routes[{key!r}]", hosts)
        self._smarthost = _make_route("smarthost", [smarthost]) if smarthost else None
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._clock = clock
        # hits/misses: resolves answered from / not found in the cache (misses start
        # a lookup); joined: resolves that shared a lookup in flight; errors: lookups
        # that ended in a ResolveError; queries: DNS queries sent.
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "joined": 0,
                                      "errors": 0, "queries": 0}

    async def resolve(self, domain: str) -> Site:
        """The site for `domain` (a recipient's domain); raises ResolveError."""
        if domain.startswith("["):
            addr = _parse_literal(domain)
            route = self._smarthost or _make_route(domain, [(addr, self._port)])
        else:
            name = normalize_domain(domain)
            route = self._route_for(name) or self._smarthost
            if route is None:
                return await self._cached(name, partial(self._lookup_mx, name))
        if route.static is not None:
            return route.static
        return await self._cached(route.name, partial(self._lookup_route, route))

    def invalidate(self, domain: str) -> None:
        """Forget the cached answer for `domain` (e.g. after an operator change)."""
        try:
            key = normalize_domain(domain)
        except ResolveError:
            return
        route = self._route_for(key) or self._smarthost
        self._cache.pop(route.name if route else key, None)

    def cached_site_name(self, domain: str) -> str | None:
        """The site `domain` resolved to, from the cache only (never a query); None when
        not known. Attributes complaints about a recipient to a (source, site)."""
        try:
            name = normalize_domain(domain)
        except ResolveError:
            return None
        route = self._route_for(name) or self._smarthost
        if route is not None and route.static is not None:
            return route.static.name
        entry = self._cache.get(route.name if route else name)
        return entry.site.name if entry is not None and entry.site is not None else None

    def _route_for(self, name: str) -> _Route | None:
        """Exact static route, else the most specific "*.parent" wildcard."""
        routes = self._routes
        if not routes:
            return None
        route = routes.get(name)
        while route is None and "." in name:
            name = name.partition(".")[2]
            route = routes.get("*." + name)
        return route

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def _cached(self, key: str, lookup: Callable[[], Coroutine[Any, Any, _Entry]]) -> Site:
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._now():
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return entry.result()
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            self.stats["misses"] += 1
            task = asyncio.ensure_future(lookup())
            self._inflight[key] = task
            task.add_done_callback(partial(self._on_lookup_done, key))
        else:
            self.stats["joined"] += 1
        # shield: a caller that is cancelled does not cancel the lookup others share.
        entry = await asyncio.shield(task)
        return entry.result()

    def _on_lookup_done(self, key: str, task: asyncio.Task[_Entry]) -> None:
        del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return
        entry = task.result()
        if entry.error is not None:
            self.stats["errors"] += 1
        cache = self._cache
        cache[key] = entry
        cache.move_to_end(key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _fail(self, failure: Failure, domain: str, detail: str = "") -> _Entry:
        error = ResolveError(failure, domain, detail)
        ttl = self._negative_ttl if error.permanent else self._transient_ttl
        return _Entry(self._now() + ttl, error=error)

    def _site(self, name: str, groups: list[list[MxHost]], port: int, ttl: float,
              incomplete: bool = False) -> _Entry:
        """A positive entry; an `incomplete` one (a host failed to resolve) lives min_ttl only."""
        ttl = self._min_ttl if incomplete else min(max(ttl, self._min_ttl), self._max_ttl)
        expires = self._now() + ttl
        hosts = tuple(host for group in groups for host in group)
        site = Site(name, hosts, port, expires)
        shuffle = any(len(group) > 1 for group in groups)
        return _Entry(expires, site, tuple(map(tuple, groups)) if shuffle else None)

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], float]:
        """Addresses of one host and their TTL; raises QueryError only if none was found."""
        self.stats["queries"] += len(self._rdtypes)
        results = await asyncio.gather(
            *(self._dns.addresses(name, rdtype) for rdtype in self._rdtypes),
            return_exceptions=True)
        addresses: list[str] = []
        ttl: float = math.inf
        error: QueryError | None = None
        for result in results:
            if isinstance(result, QueryError):
                error = error or result
            elif isinstance(result, BaseException):
                raise result
            elif result[0]:
                addresses.extend(result[0])
                ttl = min(ttl, result[1])
        if not addresses and error is not None:
            raise error
        return tuple(addresses[:MAX_ADDRESSES]), ttl

    async def _hosts(self, targets: list[tuple[int, str]]
                     ) -> tuple[list[list[MxHost]], float, list[QueryError], list[str]]:
        """Resolve (preference, name) targets in parallel, grouped by preference.

        Returns the groups, the smallest address TTL, the query errors and the
        names that had no address.
        """
        results = await asyncio.gather(*(self._addresses(name) for _, name in targets),
                                       return_exceptions=True)
        groups: list[list[MxHost]] = []
        ttl: float = math.inf
        errors: list[QueryError] = []
        empty: list[str] = []
        last_pref = None
        for (pref, name), result in zip(targets, results):
            if isinstance(result, QueryError):
                errors.append(result)
                continue
            if isinstance(result, BaseException):
                raise result
            addresses, addr_ttl = result
            if not addresses:
                empty.append(name)
                continue
            ttl = min(ttl, addr_ttl)
            if pref != last_pref:
                groups.append([])
                last_pref = pref
            groups[-1].append(MxHost(name, pref, addresses))
        return groups, ttl, errors, empty

    def _no_address(self, domain: str, errors: list[QueryError], empty: list[str],
                    route: bool = False) -> _Entry:
        """No host has an address. Transient for a route whatever the DNS said:
        a broken route is the operator's to fix, not a reason to bounce."""
        detail = "; ".join([e.text for e in errors] + [f"no address for {n}" for n in empty])
        transient = route or _any_transient(errors)
        return self._fail(Failure.DNS_TEMPFAIL if transient else Failure.NO_MX_ADDRESS,
                          domain, detail)

    async def _lookup_mx(self, domain: str) -> _Entry:
        self.stats["queries"] += 1
        try:
            records, mx_ttl = await self._dns.mx(domain)
        except QueryError as exc:
            return self._fail(QUERY_FAILURES[exc.failure], domain, exc.text)
        if not records:
            return await self._implicit_mx(domain)
        if len(records) == 1 and records[0][1] == "":
            return self._fail(Failure.NULL_MX, domain)
        best: dict[str, int] = {}
        for pref, host in records:
            # A "." exchange next to real ones is ignored (RFC 7505 3: null MX must be alone).
            if host and (host not in best or pref < best[host]):
                best[host] = pref
        targets = sorted((pref, host) for host, pref in best.items())[:MAX_MX_HOSTS]
        valid, invalid = [], []
        for pref, host in targets:
            try:
                valid.append((pref, normalize_domain(host)))
            except ResolveError:
                invalid.append(host)                 # e.g. "_spf.x": not a host name
        name = ",".join(sorted(host for _, host in targets))
        groups, addr_ttl, errors, empty = await self._hosts(valid)
        if not groups:
            return self._no_address(domain, errors, empty + invalid)
        return self._site(name, groups, self._port, min(mx_ttl, addr_ttl),
                          incomplete=_any_transient(errors))

    async def _implicit_mx(self, domain: str) -> _Entry:
        """No MX records: the domain itself is the host, preference 0 (RFC 5321 5.1)."""
        try:
            addresses, ttl = await self._addresses(domain)
        except QueryError as exc:
            return self._fail(QUERY_FAILURES[exc.failure], domain, exc.text)
        if not addresses:
            return self._fail(Failure.NO_ROUTE, domain, "NODATA for MX and "
                              + " and ".join(self._rdtypes))
        return self._site(domain, [[MxHost(domain, 0, addresses)]], self._port, ttl)

    async def _lookup_route(self, route: _Route) -> _Entry:
        """Addresses of a static route's or smarthost's hosts, in the configured order."""
        targets = list(enumerate(route.hosts))
        resolved = [(pref, host) for pref, host in targets if not _is_ip(host)]
        groups, ttl, errors, empty = await self._hosts(resolved)
        by_pref = {group[0].preference: group for group in groups}
        out: list[list[MxHost]] = []
        for pref, host in targets:
            if pref in by_pref:
                out.append(by_pref[pref])
            elif _is_ip(host):
                out.append([MxHost(host, pref, (host,))])
        if not out:
            return self._no_address(route.name, errors, empty, route=True)
        return self._site(route.name, out, route.port, ttl, incomplete=_any_transient(errors))
