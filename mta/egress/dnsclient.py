"""Stub DNS client for egress routing: the only module that imports dnspython.

`mta.egress.sites` asks it for the MX records and the addresses of a name; it
answers with plain Python values or a `QueryError` that says which kind of
failure the DNS reported. Deciding what a failure means for mail (permanent or
transient, which enhanced status) is left to sites.py.

Reads: answers from the configured recursive nameservers (or /etc/resolv.conf).
Writes: nothing; no cache of its own (sites.py caches whole MX sets).
Diagnostics: raises `QueryError` for every DNS failure; at construction
`ValueError` when no nameserver is configured and `RuntimeError` when
dnspython lacks IDNA 2008 (the `idna` package): both fatal, at start-up.
Trust: answers are network data. Only MX, A and AAAA rdata that dnspython
parsed are used, CNAME chains are capped at `MAX_CNAME_HOPS`, and names are
returned in lower-case A-label form without the trailing dot.
RFCs: 1035 (messages, rcodes), 2181 10.1 (CNAME), 5891 (IDNA A-labels).
"""
from __future__ import annotations

import enum
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

# A recursive resolver follows CNAMEs for us; some (unbound's static local
# zones among them) return only the first link, so we follow at most this many.
MAX_CNAME_HOPS = 8


class QueryFailure(enum.Enum):
    """What the DNS said when a query gave no usable answer."""
    NXDOMAIN = "NXDOMAIN"        # the name does not exist (rcode 3)
    SERVFAIL = "SERVFAIL"        # every nameserver failed: SERVFAIL, REFUSED, FORMERR, ...
    TIMEOUT = "timeout"          # no answer within the lifetime (timeout x attempts)
    ERROR = "error"              # anything else: YXDOMAIN, CNAME loop, socket error


class QueryError(Exception):
    """One failed query: the kind of failure and a short text for logs and DSNs."""

    def __init__(self, failure: QueryFailure, text: str) -> None:
        super().__init__(text)
        self.failure = failure   # kind of failure, classified by sites.FAILURES
        self.text = text         # e.g. "MX example.com: REFUSED"; no server addresses


def to_ascii(domain: str) -> str:
    """IDNA-encode a non-ASCII domain (UTS 46 mapping, IDNA 2008; RFC 5891).

    Raises ValueError for a name IDNA cannot encode.
    """
    try:
        name = dns.name.from_unicode(domain, idna_codec=dns.name.IDNA_2008_Practical)
        return name.to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"not an IDNA domain: {first_line}") from None


class DnsClient:
    """MX and address queries through dnspython's asyncio resolver."""

    __slots__ = ("_resolver", "_secure")

    def __init__(self, nameservers: list[tuple[str, int]] | None,
                 timeout: float, attempts: int) -> None:
        if not dns.name.have_idna_2008:
            # Without it every SMTPUTF8 domain would bounce as invalid: refuse to start.
            raise RuntimeError("dnspython has no IDNA 2008 support: install dnspython[idna]")
        try:
            # configure=False: with explicit nameservers /etc/resolv.conf is not read.
            resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.resolver.NoResolverConfiguration:
            raise ValueError("no nameservers configured and /etc/resolv.conf "
                             "names none") from None
        if nameservers is not None:
            if not nameservers:
                raise ValueError("nameservers: empty list")
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in nameservers]
        resolver.timeout = timeout                 # one try at one server
        resolver.lifetime = timeout * attempts     # the whole query, all retries
        self._resolver = resolver
        self._secure: dns.asyncresolver.Resolver | None = None   # AD/DO queries (TLSA)

    async def mx(self, name: str) -> tuple[list[tuple[int, str]], int]:
        """(preference, exchange) pairs of `name` and their TTL; [] for NODATA.

        The exchange of a null MX (RFC 7505) is returned as "".
        """
        records, ttl = await self._query(name, dns.rdatatype.MX)
        out = []
        for rd in records:
            exchange = rd.exchange
            host = "" if exchange == dns.name.root else _text(exchange)
            out.append((int(rd.preference), host))
        return out, ttl

    async def addresses(self, name: str, rdtype: str) -> tuple[list[str], int]:
        """Addresses of `name` from its A or AAAA records and their TTL; [] for NODATA."""
        records, ttl = await self._query(name, dns.rdatatype.from_text(rdtype))
        return [rd.address for rd in records], ttl

    async def txt(self, name: str) -> tuple[list[str], int]:
        """The TXT strings of `name` (each record's strings joined) and their TTL; [] for
        NODATA. Bytes that are not ASCII are replaced (the callers parse ASCII grammars)."""
        records, ttl = await self._query(name, dns.rdatatype.TXT)
        return [b"".join(rd.strings).decode("ascii", "replace") for rd in records], ttl

    async def tlsa(self, name: str) -> tuple[list[tuple[int, int, int, bytes]], int, bool]:
        """(usage, selector, matching type, data) of the TLSA records of `name`, their TTL,
        and whether the answer was authenticated (AD bit from the configured resolver,
        which must be a validating one we trust, RFC 7672 2.1). [] for NODATA/NXDOMAIN."""
        records, ttl, ad = await self.secure(name, dns.rdatatype.TLSA)
        return ([(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
                 for rd in records], ttl, ad)

    async def secure_mx(self, name: str) -> tuple[list[str], bool]:
        """The MX exchanges of `name` (a null MX's "." left out) and whether the answer
        (or its denial: NODATA, NXDOMAIN) was authenticated: the AD bit, RFC 7672 2.2.1.
        A validator's SERVFAIL (bogus data) is a QueryError, as any failure."""
        records, _, ad = await self.secure(name, dns.rdatatype.MX)
        return [_text(rd.exchange) for rd in records if rd.exchange != dns.name.root], ad

    async def secure_addresses(self, name: str, rdtype: str) -> tuple[list[str], bool]:
        """The A or AAAA addresses of `name` and whether the answer (the whole CNAME chain
        with it) was authenticated (RFC 7672 2.2.2)."""
        records, _, ad = await self.secure(name, dns.rdatatype.from_text(rdtype))
        return [rd.address for rd in records], ad

    async def secure(self, name: str, rdtype: dns.rdatatype.RdataType
                     ) -> tuple[list[Any], int, bool]:
        """Records of `rdtype` at `name` asked with DO (and AD) set, their TTL, and the
        response's AD bit; ([], 0, ad) for NODATA and NXDOMAIN. Raises QueryError."""
        if self._secure is None:
            secure = dns.asyncresolver.Resolver(configure=False)
            secure.nameservers = self._resolver.nameservers
            secure.timeout, secure.lifetime = self._resolver.timeout, self._resolver.lifetime
            secure.flags = dns.flags.RD | dns.flags.AD
            secure.use_edns(0, dns.flags.DO, 1232)
            self._secure = secure
        qname = dns.name.from_text(name + ".")
        label = f"{dns.rdatatype.to_text(rdtype)} {name}"
        try:
            answer = await self._secure.resolve(qname, rdtype,
                                                raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            try:
                resp = exc.response(qname)
            except (KeyError, AttributeError):
                resp = None
            ad = bool(resp is not None and resp.flags & dns.flags.AD)
            return [], 0, ad
        except dns.resolver.NoNameservers as exc:
            raise QueryError(QueryFailure.SERVFAIL, f"{label}: {_rcodes(exc)}") from None
        except dns.exception.Timeout:
            raise QueryError(QueryFailure.TIMEOUT, f"{label}: timeout") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise QueryError(QueryFailure.ERROR, f"{label}: {type(exc).__name__}") from None
        ad = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None or answer.rrset.rdtype != rdtype:
            return [], 0, ad
        return list(answer.rrset), answer.rrset.ttl, ad

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[list[Any], int]:
        qname = dns.name.from_text(name + ".")     # absolute: no search list
        label = f"{dns.rdatatype.to_text(rdtype)} {name}"
        min_ttl: int | None = None
        for _ in range(MAX_CNAME_HOPS):
            try:
                answer = await self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False)
            except dns.resolver.NXDOMAIN:
                raise QueryError(QueryFailure.NXDOMAIN, f"{label}: NXDOMAIN") from None
            except dns.resolver.NoNameservers as exc:
                raise QueryError(QueryFailure.SERVFAIL, f"{label}: {_rcodes(exc)}") from None
            except dns.exception.Timeout:
                raise QueryError(QueryFailure.TIMEOUT, f"{label}: timeout") from None
            except (dns.exception.DNSException, OSError) as exc:
                raise QueryError(QueryFailure.ERROR,
                                 f"{label}: {type(exc).__name__}") from None
            chain = answer.chaining_result
            if chain.cnames:
                ttl = min(rrset.ttl for rrset in chain.cnames)
                min_ttl = ttl if min_ttl is None else min(min_ttl, ttl)
            if answer.rrset is not None:
                ttl = answer.rrset.ttl
                min_ttl = ttl if min_ttl is None else min(min_ttl, ttl)
                return list(answer.rrset), min_ttl
            if answer.canonical_name == qname:
                return [], 0                       # NODATA
            qname = answer.canonical_name          # partial CNAME chain: follow it
        raise QueryError(QueryFailure.ERROR, f"{label}: CNAME chain longer than "
                                             f"{MAX_CNAME_HOPS}")


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _rcodes(exc: dns.resolver.NoNameservers) -> str:
    """The distinct failures of a NoNameservers, e.g. "REFUSED" (no server addresses)."""
    seen: list[str] = []
    for entry in exc.kwargs.get("errors") or ():
        what = entry[3]
        text = what if isinstance(what, str) else type(what).__name__
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) or "no nameserver answered"
