"""SMTP TLS Reporting (RFC 8460): session counts per policy domain, sent once a period.

Where it sits: the dispatcher tells `TlsReports.session()` the outcome of every TLS
policy check of a new connection to a domain with a policy (MTA-STS or DANE; domains
without one cost nothing). Counts are kept per (policy domain, policy): successful
sessions, and failed sessions by (result type, sending IP, receiving MX, receiving IP).
Every `interval` (default a day) the window closes: for each domain the rua addresses of
its TXT _smtp._tls record (v=TLSRPTv1) get the RFC 8460 4.4 JSON report, gzipped:
mailto: as a multipart/report (report-type="tlsrpt") with an application/tlsrpt+gzip
part, submitted through our own queue (`inject`, like DSNs, null sender); https: by
POST with Content-Type application/tlsrpt+gzip (aiohttp, bounded time, the trust store
of [delivery] tls_ca_file or the system's).

Reads/writes: tlsrpt.json in the spool directory (the open window; written at most
every SAVE_INTERVAL while counting, and at stop), so a restart keeps the counts.
Diagnostics: log lines for reports sent and for delivery failures of reports (a report
that cannot be sent is dropped; the next window starts empty).
Trust: TXT records are network data: at most MAX_RUA addresses, mailto/https only,
lengths bounded; report contents are our own counts. Domains and failure rows bounded
(MAX_DOMAINS, MAX_ROWS).
"""
from __future__ import annotations

import asyncio
import datetime
import email.utils
import gzip
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mta.egress.dnsclient import QueryError
from mta.files import write_atomic

if TYPE_CHECKING:
    from mta.egress.dnsclient import DnsClient

log = logging.getLogger("mta.tlsrpt")

SAVE_INTERVAL = 60.0        # seconds between saves of a changed window
MAX_DOMAINS = 10_000        # policy domains counted per window
MAX_ROWS = 100              # failure-detail rows per domain
MAX_RUA = 5                 # report addresses used per domain
POST_TIMEOUT = 60.0
_ADDR = re.compile(r"^[^\s@<>\",;]{1,64}@[A-Za-z0-9.-]{1,253}$")


class DnsResolver:
    """aiohttp resolver (AbstractResolver protocol) asking our DnsClient: policy and report hosts
    are looked up through the configured nameservers, like the MX hosts."""

    def __init__(self, dns: DnsClient | None) -> None:
        self.dns = dns

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        import socket
        if self.dns is None:
            raise OSError(f"no resolver for {host}")
        try:
            addrs, _ = await self.dns.addresses(host, "A")
        except QueryError as exc:
            raise OSError(exc.text) from None
        if not addrs:
            raise OSError(f"{host}: no address")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addrs[:4]]

    async def close(self) -> None:
        pass


def parse_rua(records: list[str]) -> list[str]:
    """rua URIs of the one v=TLSRPTv1 record (RFC 8460 3); [] when there is none."""
    found = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []
    out = []
    for part in found[0].split(";"):
        k, _, v = part.strip().partition("=")
        if k.strip() != "rua":
            continue
        for uri in v.split(","):
            uri = uri.strip()
            if uri.startswith("mailto:") and _ADDR.match(uri[7:].split("?")[0]):
                out.append("mailto:" + uri[7:].split("?")[0])
            elif uri.startswith("https://") and len(uri) <= 512 and " " not in uri:
                out.append(uri)
    return out[:MAX_RUA]


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TlsReports:
    """The counting window and the periodic sending."""

    def __init__(self, dns: DnsClient | None, *, organization: str, interval: float,
                 state_dir: str | os.PathLike | None, ca_file: str | os.PathLike | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dns = dns
        self.organization = organization
        self.interval = interval
        self.ca_file = ca_file
        self.clock = clock
        self.inject: Callable[[str, list[str], bytes], Any] | None = None   # set by the engine
        self._path = Path(state_dir) / "tlsrpt.json" if state_dir else None
        self.start = clock()
        # domain -> {"policy": {...}, "ok": n, "fail": {"result|sip|mx|rip": n}}
        self.domains: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._save_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self.sent: list[tuple[str, str]] = []     # (domain, rua) of reports sent (tests, logs)
        self._load()

    # -- counting (the dispatcher) --

    def session(self, domain: str, policy: dict[str, Any], result: str | None, *,
                sending_ip: str = "", mx: str = "", receiving_ip: str = "") -> None:
        """One session to `domain` under `policy` (policy-type, policy-string, mx-host):
        result None = success, else an RFC 8460 result type."""
        d = self.domains.get(domain)
        if d is None:
            if len(self.domains) >= MAX_DOMAINS:
                return
            d = self.domains[domain] = {"policy": policy, "ok": 0, "fail": {}}
        else:
            d["policy"] = policy
        if result is None:
            d["ok"] += 1
        else:
            key = f"{result}|{sending_ip}|{mx}|{receiving_ip}"
            if key in d["fail"] or len(d["fail"]) < MAX_ROWS:
                d["fail"][key] = d["fail"].get(key, 0) + 1
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        if self._save_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._save_timer = loop.call_later(SAVE_INTERVAL, self._timed_save)

    def _timed_save(self) -> None:
        self._save_timer = None
        self.save()

    # -- the window --

    def start_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        due = max(1.0, self.start + self.interval - self.clock())
        self._send_timer = loop.call_later(due, self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self.send_all())
        self._send_timer = loop.call_later(self.interval, self._due, loop)

    async def stop(self) -> None:
        for t in (self._save_timer, self._send_timer):
            if t is not None:
                t.cancel()
        self._save_timer = self._send_timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.save()

    def report(self, domain: str, end: float, report_id: str) -> dict[str, Any]:
        """The RFC 8460 4.4 JSON object for `domain` over the current window."""
        d = self.domains[domain]
        details = []
        for key, n in d["fail"].items():
            result, sip, mx, rip = key.split("|")
            row: dict[str, Any] = {"result-type": result, "failed-session-count": n}
            if sip:
                row["sending-mta-ip"] = sip
            if mx:
                row["receiving-mx-hostname"] = mx
            if rip:
                row["receiving-ip"] = rip
            details.append(row)
        return {
            "organization-name": self.organization,
            "date-range": {"start-datetime": _iso(self.start), "end-datetime": _iso(end)},
            "contact-info": f"postmaster@{self.organization}",
            "report-id": report_id,
            "policies": [{
                "policy": {"policy-domain": domain, **d["policy"]},
                "summary": {"total-successful-session-count": d["ok"],
                            "total-failure-session-count": sum(d["fail"].values())},
                "failure-details": details,
            }],
        }

    async def send_all(self) -> int:
        """Close the window: send each domain's report to its rua; returns reports sent."""
        end = self.clock()
        domains, self.domains = self.domains, {}
        start, self.start = self.start, end
        self.save()
        sent = 0
        for domain in list(domains):
            try:
                rua = await self._rua(domain)
            except QueryError as exc:
                log.info("TLS report for %s not sent: %s", domain, exc.text)
                continue
            if not rua:
                continue
            saved = self.domains, self.start
            self.domains, self.start = domains, start
            try:
                report_id = f"{_iso(start)}_{domain}_{secrets.token_hex(6)}"
                body = gzip.compress(json.dumps(self.report(domain, end, report_id)).encode())
            finally:
                self.domains, self.start = saved
            for uri in rua:
                try:
                    if uri.startswith("mailto:"):
                        self._mail(uri[7:], domain, report_id, start, end, body)
                    else:
                        await self._post(uri, body)
                    self.sent.append((domain, uri))
                    sent += 1
                    log.info("TLS report for %s (%s) sent to %s", domain, report_id, uri)
                except Exception as exc:    # one bad receiver must not stop the others
                    log.warning("TLS report for %s to %s failed: %s", domain, uri, exc)
        return sent

    async def _rua(self, domain: str) -> list[str]:
        if self.dns is None:
            return []
        records, _ = await self.dns.txt(f"_smtp._tls.{domain}")
        return parse_rua(records)

    def _mail(self, to: str, domain: str, report_id: str, start: float, end: float,
              body: bytes) -> None:
        """RFC 8460 5.3: multipart/report; report-type="tlsrpt", the gzip as
        application/tlsrpt+gzip, TLS-Report-Domain / TLS-Report-Submitter fields."""
        import base64
        if self.inject is None:
            raise RuntimeError("no local submission")
        org = self.organization
        boundary = "tlsrpt-" + secrets.token_hex(8)
        fname = f"{org}!{domain}!{int(start)}!{int(end)}.json.gz"
        b64 = base64.encodebytes(body).replace(b"\n", b"\r\n")
        msg = (f"From: TLS reporting <noreply-tlsrpt@{org}>\r\n"
               f"To: <{to}>\r\n"
               f"Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>\r\n"
               f"Date: {email.utils.formatdate(end)}\r\n"
               f"Message-ID: <{secrets.token_hex(12)}@{org}>\r\n"
               f"TLS-Report-Domain: {domain}\r\n"
               f"TLS-Report-Submitter: {org}\r\n"
               "MIME-Version: 1.0\r\n"
               f'Content-Type: multipart/report; report-type="tlsrpt";\r\n boundary="{boundary}"\r\n'
               "\r\n"
               f"--{boundary}\r\n"
               "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
               f"This is an aggregate TLS report from {org} for {domain}.\r\n\r\n"
               f"--{boundary}\r\n"
               "Content-Type: application/tlsrpt+gzip\r\n"
               "Content-Transfer-Encoding: base64\r\n"
               f'Content-Disposition: attachment;\r\n filename="{fname}"\r\n\r\n').encode()
        msg += b64 + f"\r\n--{boundary}--\r\n".encode()
        self.inject("", [to], msg)

    async def _post(self, uri: str, body: bytes) -> None:
        import ssl

        import aiohttp
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT)
        connector = aiohttp.TCPConnector(resolver=DnsResolver(self.dns), use_dns_cache=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            async with session.post(uri, data=body, ssl=ctx, allow_redirects=False,
                                    headers={"Content-Type": "application/tlsrpt+gzip"}) as r:
                if r.status // 100 != 2:
                    raise OSError(f"HTTP {r.status}")

    # -- persistence --

    def save(self) -> None:
        if self._path is None or not (self._dirty or self._path.exists()):
            return
        self._dirty = False
        try:
            write_atomic(self._path, json.dumps({"start": self.start, "domains": self.domains},
                                                sort_keys=True).encode())
        except OSError as exc:
            log.warning("cannot save TLS report counts to %s: %s", self._path, exc)

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            data = json.loads(self._path.read_bytes())
            start = float(data["start"])
            domains = data["domains"]
            if not isinstance(domains, dict):
                raise ValueError("domains")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable, TLS report counts start empty: %s", self._path, exc)
            return
        self.start = start
        self.domains = {str(k): v for k, v in list(domains.items())[:MAX_DOMAINS]
                        if isinstance(v, dict) and isinstance(v.get("fail"), dict)}
