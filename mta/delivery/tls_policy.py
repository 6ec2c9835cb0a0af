"""Outbound TLS policy: verified certificates, MTA-STS (RFC 8461), DANE (RFC 7672),
and the TLS side of REQUIRETLS (RFC 8689).

Where it sits: the dispatcher (dispatcher.py) asks `TlsPolicy.for_domain()` for the
recipient domain's policy before it connects (cached per domain, so a domain without
a policy costs one dict lookup per connection after the first), skips MX hosts an
enforced MTA-STS policy does not name, and after the handshake asks `check()`
whether the session meets the policy; a message whose policy the session does not
meet is deferred (4.7.5) with the policy and the reason in its TransientFailure.

How: every handshake uses the one unverified context of client.py (the plaintext and
opportunistic hot path is unchanged); when a policy needs it, the peer's chain (from
the ssl object) is checked afterwards, in Python with `cryptography`: against the
trust store (the system's as ssl.get_default_verify_paths() finds it, so
SSL_CERT_FILE / SSL_CERT_DIR work, or the configured CA file) and the MX host name;
for DANE against the TLSA records (DANE-EE(3), DANE-TA(2); selectors 0/1; matching
types 0/1/2). The verdict is kept on the session, so a reused connection checks once.

MTA-STS: TXT _mta-sts.<domain> (v=STSv1; id=...) through our resolver, the policy
from https://mta-sts.<domain>/.well-known/mta-sts.txt over aiohttp with a verifying
context, no redirects, bounded size and time; cached for its max_age and persisted
(mta-sts.json in the spool directory, mta.files.write_atomic) so a restart keeps it;
a new TXT id refetches. enforce: only matching MX names with a verified
certificate; testing: failures are logged, mail goes; none: no policy.
DANE (RFC 7672 2.2): only for an MX host named in the domain's MX RRset when that
RRset came with the AD bit from the configured resolver (it must be a validating
resolver we trust), whose own address records are secure too (2.2.2), and whose
TLSA RRset _25._tcp.<mx> is secure; such an MX with usable TLSA records needs a TLS
session whose chain matches one of them. An insecure MX or address answer means no
DANE for that MX (MTA-STS or opportunistic TLS instead); a failed lookup (a
validator's SERVFAIL for bogus data, a timeout) defers with "dnssec-invalid".

Reads: DNS (TXT, TLSA), HTTPS (policies), the spool's mta-sts.json at start.
Writes: mta-sts.json. Diagnostics: log lines at info (policy fetched, testing-mode
failures) and warning (policy fetch failures for a domain that publishes one).
Trust: DNS answers, policy bodies and peer certificates are hostile network data:
sizes, counts and times are bounded; parse failures mean "no valid policy".
Does not: follow a secure CNAME of the MX host to a TLSA base name other than the
MX name (RFC 7672 2.2.3), or pin SNI beyond the MX name.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mta.delivery.tlsrpt import DnsResolver, TlsReports
from mta.egress.dnsclient import QueryError
from mta.files import write_atomic

if TYPE_CHECKING:
    from mta.egress.dnsclient import DnsClient

log = logging.getLogger("mta.tls")

STS_MAX_BODY = 64 * 1024        # RFC 8461 3.3: policies are small; 64 KiB is plenty
STS_FETCH_TIMEOUT = 60.0        # RFC 8461 3.3 suggests at most a minute
STS_MAX_AGE = 31557600          # RFC 8461 3.2
STS_MAX_MX = 64                 # mx lines kept from one policy
NEGATIVE_TTL = 3600.0           # "no policy" (no TXT, no TLSA) is remembered this long
DNS_ERROR_TTL = 30.0            # a failed DNSSEC lookup (MX, address, TLSA) is asked again after
MIN_TTL = 300.0                 # floor for cached DNS answers
MAX_TLSA = 16                   # TLSA records looked at per MX
MAX_DOMAINS = 100_000           # cached domain policies (the oldest go first)

# TLS-RPT result types (RFC 8460 4.3) used as our reasons
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
STS_INVALID = "sts-policy-invalid"
STS_FETCH_ERROR = "sts-policy-fetch-error"
DNSSEC_INVALID = "dnssec-invalid"


@dataclass(slots=True)
class StsPolicy:
    """One MTA-STS policy (RFC 8461 3.2)."""
    id: str
    mode: str                   # enforce | testing | none
    mx: tuple[str, ...]         # patterns: "mail.example.com" or "*.example.com"
    max_age: int
    expires: float              # wall time

    def matches(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pat in self.mx:
            if pat.startswith("*."):
                # RFC 8461 4.1: the wildcard is one leftmost label
                head, _, rest = host.partition(".")
                if head and rest == pat[2:]:
                    return True
            elif host == pat:
                return True
        return False


@dataclass(slots=True)
class DomainPolicy:
    """What a recipient domain asks of TLS; `checked` is wall time of the lookup."""
    domain: str
    sts: StsPolicy | None = None
    sts_error: str = ""             # why a published policy could not be used
    checked: float = 0.0
    # DANE (RFC 7672 2.2.1): the MX names of a DNSSEC-secure MX RRset (the domain itself
    # for a secure denial of MX records); None: insecure or not looked up, no DANE
    dane_mx: frozenset[str] | None = None
    dnssec_error: str = ""          # the MX lookup with DNSSEC failed (bogus, timeout): defer

    @property
    def enforce(self) -> bool:
        return self.sts is not None and self.sts.mode == "enforce"


@dataclass(slots=True, frozen=True)
class Refusal:
    """A session that does not meet a policy: which policy, and the TLS-RPT result type."""
    policy: str     # mta-sts | dane | verified | requiretls
    result: str     # RFC 8460 result type
    detail: str

    def text(self) -> str:
        return f"{self.policy}: {self.result}: {self.detail}"


NO_POLICY = DomainPolicy("")


# -- certificates -------------------------------------------------------------------------

def peer_chain(transport: Any) -> list[bytes]:
    """The peer's certificate chain (DER, leaf first) of a TLS transport; [] if none.
    Python 3.11 has no public API for the unverified chain; _sslobj has (3.10+)."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return []
    inner = getattr(sslobj, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c.public_bytes(2) for c in chain[:10]]      # 2: _ssl.ENCODING_DER
    leaf = sslobj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class TrustStore:
    """CA certificates for verifying peers after the handshake (cryptography's verifier)."""

    def __init__(self, ca_file: str | os.PathLike | None = None) -> None:
        from cryptography import x509
        from cryptography.x509.verification import Store
        pems: list[bytes] = []
        if ca_file:
            pems.append(Path(ca_file).read_bytes())
        else:
            paths = ssl.get_default_verify_paths()
            if paths.cafile and os.path.isfile(paths.cafile):
                pems.append(Path(paths.cafile).read_bytes())
            if paths.capath and os.path.isdir(paths.capath) and not pems:
                for entry in sorted(os.scandir(paths.capath), key=lambda e: e.name):
                    if entry.is_file() and entry.name.endswith((".pem", ".crt", ".0")):
                        try:
                            pems.append(Path(entry.path).read_bytes())
                        except OSError:
                            pass
        certs = []
        for pem in pems:
            try:
                certs += x509.load_pem_x509_certificates(pem)
            except ValueError:
                continue
        # duplicates (a directory and its hash links) would be rejected by the Store
        seen: set[bytes] = set()
        unique = []
        for c in certs:
            fp = c.fingerprint(_sha256())
            if fp not in seen:
                seen.add(fp)
                unique.append(c)
        self.count = len(unique)
        self.store = Store(unique) if unique else None

    def verify(self, chain: list[bytes], hostname: str) -> tuple[str, str] | None:
        """None if `chain` is valid for `hostname` now; else (result type, detail)."""
        return verify_chain(chain, hostname, self.store)


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes
    return hashes.SHA256()


def verify_chain(chain: list[bytes], hostname: str, store: Any) -> tuple[str, str] | None:
    from cryptography import x509
    from cryptography.x509.verification import DNSName, PolicyBuilder, VerificationError
    if not chain:
        return VALIDATION_FAILURE, "no certificate"
    hostname = hostname.lower().rstrip(".")
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError as exc:
        return VALIDATION_FAILURE, f"unparsable certificate: {exc}"
    leaf = certs[0]
    now = time.time()
    if leaf.not_valid_after_utc.timestamp() < now:
        return EXPIRED, f"certificate expired {leaf.not_valid_after_utc:%Y-%m-%d}"
    if not _name_matches(leaf, hostname):
        return HOST_MISMATCH, f"certificate does not name {hostname}"
    if store is None:
        return NOT_TRUSTED, "no trust anchors"
    try:
        PolicyBuilder().store(store).build_server_verifier(DNSName(hostname)).verify(
            leaf, certs[1:])
    except VerificationError as exc:
        return NOT_TRUSTED, str(exc)[:200]
    except ValueError as exc:
        return VALIDATION_FAILURE, str(exc)[:200]
    return None


def _name_matches(cert: Any, hostname: str) -> bool:
    """RFC 6125 DNS-ID match (SAN dNSName; one leftmost wildcard label)."""
    from cryptography import x509
    host = hostname.lower().rstrip(".")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host:
            head, _, rest = host.partition(".")
            if head and rest == name[2:]:
                return True
    return False


def dane_match(chain: list[bytes], tlsa: list[tuple[int, int, int, bytes]],
               hostname: str) -> tuple[str, str] | None:
    """None if the chain matches a usable TLSA record (RFC 7672 3.1); else (result, detail).

    DANE-EE(3): the leaf matches; no name or expiry checks (RFC 7672 3.1.1).
    DANE-TA(2): a certificate of the chain matches, the leaf chains to it and names
    the MX host (RFC 7672 3.1.2, 3.2.2). PKIX usages 0/1 are unusable (RFC 7672 3.1.3)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from cryptography.x509.verification import Store
    usable = [r for r in tlsa if r[0] in (2, 3) and r[1] in (0, 1) and r[2] in (0, 1, 2)]
    if not usable:
        return TLSA_INVALID, "no usable TLSA records"
    if not chain:
        return VALIDATION_FAILURE, "no certificate"
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError as exc:
        return VALIDATION_FAILURE, f"unparsable certificate: {exc}"

    def selected(i: int, selector: int) -> bytes:
        if selector == 0:
            return chain[i]
        return certs[i].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    def digest(data: bytes, mtype: int) -> bytes:
        if mtype == 1:
            return hashlib.sha256(data).digest()
        if mtype == 2:
            return hashlib.sha512(data).digest()
        return data

    for usage, selector, mtype, data in usable:
        if usage == 3 and digest(selected(0, selector), mtype) == data:
            return None
    for usage, selector, mtype, data in usable:
        if usage != 2:
            continue
        for i in range(1, len(certs)):
            if digest(selected(i, selector), mtype) != data:
                continue
            if not _name_matches(certs[0], hostname):
                return HOST_MISMATCH, f"certificate does not name {hostname}"
            err = verify_chain(chain[:i + 1], hostname, Store([certs[i]]))
            if err is None:
                return None
            return err
    return VALIDATION_FAILURE, "no TLSA record matches the certificate chain"


# -- MTA-STS parsing ----------------------------------------------------------------------

_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def parse_sts_txt(records: list[str]) -> str | None:
    """The policy id of the one v=STSv1 TXT record (RFC 8461 3.1); None: no valid record."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields[k.strip()] = v.strip()
    pid = fields.get("id", "")
    return pid if _STS_ID.match(pid) else None


def parse_sts_policy(text: str, pid: str, now: float) -> StsPolicy:
    """A policy body (RFC 8461 3.2); ValueError when it is not valid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        k, v = k.strip(), v.strip()
        if k == "mx":
            if len(mx) < STS_MAX_MX and v:
                mx.append(v.lower().rstrip("."))
        elif k not in fields:
            fields[k] = v
    if fields.get("version") != "STSv1":
        raise ValueError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise ValueError(f"bad mode {mode[:20]!r}")
    try:
        max_age = int(fields.get("max_age", ""))
    except ValueError:
        raise ValueError("bad max_age") from None
    if not 0 <= max_age <= STS_MAX_AGE:
        raise ValueError("max_age out of range")
    if mode != "none" and not mx:
        raise ValueError("no mx")
    return StsPolicy(pid, mode, tuple(mx), max_age, now + max_age)


# -- the policy service -------------------------------------------------------------------

class TlsPolicy:
    """Per-domain TLS policies (MTA-STS, DANE) for the dispatchers; one per daemon."""

    def __init__(self, dns: DnsClient | None, *, mta_sts: bool = True, dane: bool = True,
                 ca_file: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                 clock: Any = time.time) -> None:
        self.dns = dns
        self.mta_sts = mta_sts and dns is not None
        self.dane = dane and dns is not None
        self.ca_file = ca_file
        self.clock = clock
        self._trust: TrustStore | None = None
        self._cache: dict[str, DomainPolicy] = {}
        self._pending: dict[str, asyncio.Future[DomainPolicy]] = {}
        self._tlsa: dict[str, tuple[list[tuple[int, int, int, bytes]], float,
                                    Refusal | None]] = {}
        self._path = Path(state_dir) / "mta-sts.json" if state_dir else None
        self._http_ctx: ssl.SSLContext | None = None
        self.reports: TlsReports | None = None      # TLS-RPT counting (tlsrpt.py), if on
        self._load()

    @property
    def active(self) -> bool:
        return self.mta_sts or self.dane

    @property
    def trust(self) -> TrustStore:
        if self._trust is None:
            self._trust = TrustStore(self.ca_file)
        return self._trust

    # -- lookup --

    def cached(self, domain: str) -> DomainPolicy | None:
        p = self._cache.get(domain)
        if p is not None and self.clock() - p.checked < (
                DNS_ERROR_TTL if p.dnssec_error else NEGATIVE_TTL if p.sts is None
                else min(NEGATIVE_TTL, p.sts.expires - p.checked)):
            return p
        return None

    async def for_domain(self, domain: str) -> DomainPolicy:
        """The domain's policy: from the cache, else looked up (one lookup at a time per
        domain). Never raises for network trouble: a cached policy is kept, else none."""
        if not self.active:
            return NO_POLICY
        p = self.cached(domain)
        if p is not None:
            return p
        fut = self._pending.get(domain)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._pending[domain] = fut
        try:
            p = await self._lookup(domain)
        except Exception as exc:      # a bug must not stop delivery: no policy this time
            log.exception("TLS policy lookup for %s failed: %s", domain, exc)
            p = self._cache.get(domain) or DomainPolicy(domain, checked=self.clock())
        finally:
            del self._pending[domain]
        if len(self._cache) >= MAX_DOMAINS and domain not in self._cache:
            self._cache.pop(next(iter(self._cache)))
        self._cache[domain] = p
        fut.set_result(p)
        return p

    async def _lookup(self, domain: str) -> DomainPolicy:
        p = DomainPolicy(domain, checked=self.clock())
        if self.dane and self.mta_sts:     # the MX (DNSSEC) and TXT queries side by side
            await asyncio.gather(self._secure_mx(p), self._sts(p))
        elif self.dane:
            await self._secure_mx(p)
        elif self.mta_sts:
            await self._sts(p)
        return p

    async def _sts(self, p: DomainPolicy) -> None:
        """The domain's MTA-STS policy into `p` (a cached one kept on trouble, RFC 8461 5.1)."""
        domain, now = p.domain, p.checked
        old = self._cache.get(domain)
        assert self.dns is not None
        try:
            records, _ = await self.dns.txt(f"_mta-sts.{domain}")
        except QueryError as exc:
            # DNS trouble: keep a cached, unexpired policy (RFC 8461 5.1)
            if old is not None and old.sts is not None and old.sts.expires > now:
                p.sts = old.sts
            p.sts_error = f"TXT lookup: {exc.text}"
            return
        pid = parse_sts_txt(records)
        if pid is None:
            if old is not None and old.sts is not None and old.sts.expires > now:
                p.sts = old.sts          # RFC 8461 5.1: a removed record does not end a policy
            return
        if old is not None and old.sts is not None and old.sts.id == pid and old.sts.expires > now:
            p.sts = old.sts
            return
        try:
            p.sts = parse_sts_policy(await self._fetch(domain), pid, now)
            log.info("MTA-STS policy for %s: mode %s, mx %s, max_age %d", domain,
                     p.sts.mode, ",".join(p.sts.mx), p.sts.max_age)
            self._save(domain, p.sts)
        except (ValueError, OSError, asyncio.TimeoutError) as exc:
            p.sts_error = f"{STS_INVALID if isinstance(exc, ValueError) else STS_FETCH_ERROR}: {exc}"
            log.warning("MTA-STS policy of %s unusable: %s", domain, p.sts_error)
            if old is not None and old.sts is not None and old.sts.expires > now:
                p.sts = old.sts

    async def _secure_mx(self, p: DomainPolicy) -> None:
        """RFC 7672 2.2.1: DANE applies only to the MX hosts of a secure MX RRset. The site
        resolver's MX answer says nothing about DNSSEC, so the RRset is asked again with
        DO set (one query per domain per cache period)."""
        assert self.dns is not None
        try:
            hosts, secure = await self.dns.secure_mx(p.domain)
        except QueryError as exc:
            p.dnssec_error = f"{exc.text} (DNSSEC-validated MX lookup)"
            log.info("%s: %s: DANE cannot be decided, deferring", p.domain, p.dnssec_error)
            return
        if secure:
            # no MX records (securely denied): the domain is its own MX (RFC 7672 2.2.1)
            p.dane_mx = frozenset(h.rstrip(".").lower() for h in hosts[:64]) or frozenset(
                (p.domain,))

    async def _fetch(self, domain: str) -> str:
        import aiohttp
        if self._http_ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            self._http_ctx = ctx
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        timeout = aiohttp.ClientTimeout(total=STS_FETCH_TIMEOUT)
        connector = aiohttp.TCPConnector(resolver=DnsResolver(self.dns), use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                async with session.get(url, ssl=self._http_ctx, allow_redirects=False,
                                       headers={"Accept": "text/plain"}) as resp:
                    if resp.status != 200:
                        raise OSError(f"HTTP {resp.status} from {url}")
                    if resp.content_type != "text/plain":
                        raise ValueError(f"Content-Type {resp.content_type[:40]!r}")
                    body = await resp.content.read(STS_MAX_BODY + 1)
                    if len(body) > STS_MAX_BODY:
                        raise ValueError("policy larger than 64 KiB")
        except aiohttp.ClientError as exc:
            raise OSError(f"{url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        return body.decode("utf-8", "replace")

    async def dane_for(self, p: DomainPolicy, mx: str
                   ) -> tuple[list[tuple[int, int, int, bytes]], Refusal | None]:
        """(usable secure TLSA records of `mx`, None), or ([], refusal) when a DNSSEC lookup
        failed (defer: RFC 7672 2.2). [] when DANE does not apply: off, an MX outside the
        domain's secure MX RRset, insecure addresses of the MX host, no secure TLSA."""
        if not self.dane or not mx:
            return [], None
        if p.dnssec_error:
            return [], Refusal("dane", DNSSEC_INVALID, p.dnssec_error)
        if p.dane_mx is None or mx not in p.dane_mx:
            return [], None
        now = self.clock()
        hit = self._tlsa.get(mx)
        if hit is None or hit[1] <= now:
            hit = await self._host_tlsa(mx, now)
            if len(self._tlsa) >= MAX_DOMAINS and mx not in self._tlsa:
                self._tlsa.pop(next(iter(self._tlsa)))
            self._tlsa[mx] = hit
        return hit[0], hit[2]

    async def _host_tlsa(self, mx: str, now: float) -> tuple[
            list[tuple[int, int, int, bytes]], float, Refusal | None]:
        """(usable records, cache expiry, refusal) for one MX host of a secure MX RRset."""
        assert self.dns is not None
        try:
            # RFC 7672 2.2.2: the host's address records must be secure too
            addresses, secure = await self.dns.secure_addresses(mx, "A")
            if not addresses:
                addresses, secure = await self.dns.secure_addresses(mx, "AAAA")
            if not secure:
                log.info("%s: address records not DNSSEC-secure: no DANE", mx)
                return [], now + NEGATIVE_TTL, None
            records, ttl, secure = await self.dns.tlsa(f"_25._tcp.{mx}")
        except QueryError as exc:
            log.info("%s: %s: DANE cannot be decided, deferring", mx, exc.text)
            return [], now + DNS_ERROR_TTL, Refusal("dane", DNSSEC_INVALID, exc.text)
        # only DANE-TA(2)/DANE-EE(3) with known selector and matching type count; a set of
        # unusable records alone is treated as none (RFC 7672 2.2 would still ask for TLS)
        usable = [r for r in records[:MAX_TLSA]
                  if r[0] in (2, 3) and r[1] in (0, 1) and r[2] in (0, 1, 2)] if secure else []
        return usable, now + (max(MIN_TTL, min(ttl, NEGATIVE_TTL)) if usable
                              else NEGATIVE_TTL), None

    # -- decisions --

    def host_allowed(self, p: DomainPolicy, mx: str) -> Refusal | None:
        """An enforced MTA-STS policy names the MX hosts that may be used (RFC 8461 4.1)."""
        if p.sts is not None and p.sts.mode == "enforce" and not p.sts.matches(mx):
            return Refusal("mta-sts", VALIDATION_FAILURE, f"MX {mx} is not in the policy's mx list")
        return None

    def check(self, p: DomainPolicy, session: Any, tlsa: list[tuple[int, int, int, bytes]],
              *, verified: bool = False) -> Refusal | None:
        """Does the TLS session meet the domain's policy? None if so (or nothing required).

        `session` is an SmtpClient (tls, mx_name, chain()); DANE comes first (RFC 7672
        2.2: it takes precedence over MTA-STS), then MTA-STS enforce, then `verified`
        (the shaping tls = "verified", or REQUIRETLS)."""
        mx = session.mx_name
        if tlsa:
            if not session.tls:
                return Refusal("dane", STARTTLS_NOT_SUPPORTED, f"the session with {mx} is not TLS")
            err = session.verdict(("dane", mx), lambda: dane_match(session.chain(), tlsa, mx))
            return None if err is None else Refusal("dane", *err)
        if p.sts is not None and p.sts.mode != "none":
            ref = self.host_allowed(p, mx) if p.sts.mode == "enforce" else None
            if ref is None:
                if not session.tls:
                    ref = Refusal("mta-sts", STARTTLS_NOT_SUPPORTED, f"the session with {mx} is not TLS")
                else:
                    err = session.verdict(("pkix", mx), lambda: self.trust.verify(session.chain(), mx))
                    ref = None if err is None else Refusal("mta-sts", *err)
            if ref is not None and p.sts.mode == "testing":
                log.info("%s: MTA-STS testing mode, would refuse: %s", p.domain, ref.text())
                ref = None
            if ref is not None or not verified:
                return ref
            return None     # enforced and met: that is verified
        if verified:
            if not session.tls:
                return Refusal("verified", STARTTLS_NOT_SUPPORTED, f"the session with {mx} is not TLS")
            err = session.verdict(("pkix", mx), lambda: self.trust.verify(session.chain(), mx))
            return None if err is None else Refusal("verified", *err)
        return None

    def record(self, p: DomainPolicy, tlsa: list[tuple[int, int, int, bytes]],
               ref: Refusal | None, *, mx: str, ip: str = "", sending_ip: str = "") -> None:
        """Count one session for TLS-RPT (RFC 8460) when the domain has a policy."""
        reports = self.reports
        if reports is None:
            return
        if tlsa:
            policy: dict[str, Any] = {
                "policy-type": "tlsa", "mx-host": [mx],
                "policy-string": [f"{u} {s} {m} {d.hex()}" for u, s, m, d in tlsa]}
        elif p.sts is not None and p.sts.mode != "none":
            policy = {"policy-type": "sts", "mx-host": list(p.sts.mx), "policy-string": [
                "version: STSv1", f"mode: {p.sts.mode}", *(f"mx: {m}" for m in p.sts.mx),
                f"max_age: {p.sts.max_age}"]}
        elif p.sts_error:
            policy = {"policy-type": "no-policy-found"}
            ref = ref or Refusal("mta-sts", p.sts_error.split(":")[0], p.sts_error)
        else:
            return
        reports.session(p.domain, policy, None if ref is None else ref.result,
                        sending_ip=sending_ip, mx=mx, receiving_ip=ip)

    def requires_tls(self, p: DomainPolicy, tlsa: list[Any]) -> bool:
        """True when a session without TLS could not be used (no plaintext fallback)."""
        return bool(tlsa) or p.enforce

    # -- persistence --

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            data = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable, MTA-STS policies start empty: %s", self._path, exc)
            return
        now = self.clock()
        for domain, d in (data.items() if isinstance(data, dict) else ()):
            try:
                sts = StsPolicy(str(d["id"]), str(d["mode"]), tuple(map(str, d["mx"])),
                                int(d["max_age"]), float(d["expires"]))
            except (KeyError, TypeError, ValueError):
                continue
            if sts.expires > now and sts.mode in ("enforce", "testing", "none"):
                # checked = 0: the TXT record is looked at again before first use
                self._cache[domain] = DomainPolicy(domain, sts=sts, checked=0.0)

    def _save(self, domain: str, sts: StsPolicy) -> None:
        if self._path is None:
            return
        now = self.clock()
        out = {}
        for d, p in self._cache.items():
            if p.sts is not None and p.sts.expires > now:
                out[d] = _sts_dict(p.sts)
        out[domain] = _sts_dict(sts)
        try:
            write_atomic(self._path, json.dumps(out, sort_keys=True).encode())
        except OSError as exc:
            log.warning("cannot save MTA-STS policies to %s: %s", self._path, exc)


def _sts_dict(s: StsPolicy) -> dict[str, Any]:
    return {"id": s.id, "mode": s.mode, "mx": list(s.mx), "max_age": s.max_age,
            "expires": s.expires}
