"""Egress content scanning at reception: each message goes to a scanner (SpamAssassin's
spamd, ClamAV's clamd) before the 250, and the tenant's `[[scan]]` policy acts on the
verdict.

Where the verdict acts, and why here. Reception is the only place that can *refuse* a
message (550 5.7.1 to the injecting client, which then knows; after the 250 the only
ways out are a DSN or silence), and it is before DKIM signing in both signing stages
(signing.stage = "reception" signs right after the scan; "delivery" signs what the spool
holds, which already carries the X-Spam-* headers a "tag" added). Every other action is
cheaper here too: "drop" stores nothing (no spool write, no tombstone; a Scanned record
says what happened), "tag" prepends headers before the one spool write, "hold" adds a
hold on the message's id through the queues' operator holds (the Scheduler's Selector
holds, saved with the operator state, listed by `mta queue holds`, released by `mta
queue release --id ID`) before the message is stored, so it can never go out first. The
cost is reception latency: the SMTP session waits for the verdict asynchronously (as it
waits for the spool sync), with a bounded number of scans in flight per `[[scan]]` table
(`concurrency`) and one `timeout` per message covering the wait for a slot and the scan.
A queue-side stage (scan after the 250, between spool and queues) is not built: it would
only trade refusals for DSNs.

Policy, per tenant (the tenant header's value): the `[[scan]]` tables with that `tenant`,
else the tables with tenant = "" (everyone else), else no scanning. Verdicts:
- spam (score >= `threshold`): `action` = reject (550 5.7.1 + Rejection and Scanned
  records) | hold | tag | drop | accept (scan and log only);
- clean: accepted unchanged (with action = "tag": X-Spam-Status: No ... is added too);
- scanner down, timed out or answering garbage: `fail` = "open" accepts (unscanned,
  logged), "closed" answers 451 4.7.1 (the client retries later);
- bigger than `max_size`: `oversize` = accept | hold | reject, unscanned.
Scanning off (no `[[scan]]` table, or no table for the tenant): Reception.accept pays one
attribute check (plus one dict lookup with tables configured).

The spamd client: SPAMC/1.5 on asyncio streams, written here (~60 lines: one SYMBOLS
request with Content-length, one bounded reply). `aiospamc` 1.2.0, the async spamd client
on PyPI, was not taken: it requires loguru, typer and certifi (a CLI's dependencies) in
the daemon for a protocol this small. Here the reply is cut at 64 KiB, the score and
symbols are checked values, and the whole exchange sits under one timeout.
Trust: spamd is an operator-configured peer but its reply is still parsed as hostile
(bounded size, numbers checked, symbol names filtered to [A-Za-z0-9_], at most 64 of them).

The second scanner: ClamAV's clamd, INSTREAM on asyncio streams (4-byte length-prefixed
chunks, a zero chunk, one NUL-terminated reply of at most 4 KiB: "stream: OK" or
"stream: <name> FOUND"); a FOUND is the table's verdict (threshold does not apply), "tag"
adds X-Virus-Status: Infected (<name>) / Clean. A tenant may have several tables (one
per scanner): they scan concurrently and the strictest decision wins (reject > tempfail
> drop > hold > tag > accept); tag headers of every table that tags are added.

The other doors. `judge()` is the verdict every door acts on, so HTTP injection and local
submission follow the same tables, actions and fail policy as SMTP without a copy of this
logic: POST /inject (mta/control/inject.py) scans each message of a request (per
recipient when templated) before DKIM signing and reports each one's fate in its answer
(stored, held, dropped, or refused with the SMTP reply: 550 5.7.1 / 451 4.7.1);
`Server.inject()` (mta/ingest/local.py) raises ContentRefused for a reject or tempfail
and returns the id for a hold (held) or a drop (nothing stored). DSNs are not scanned:
they are ours, and a DSN refused would be news lost.

Not covered: no milter client; no queue-stage (after the 250) scanning.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import struct
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple

from mta.model.ids import id_text, new_id
from mta.model.log_records import RecordType
from mta.model.replies import reply

if TYPE_CHECKING:
    from mta.config.schema import ScanConfig
    from mta.logs.writer import LogWriter
    from mta.model.envelope import Envelope

log = logging.getLogger("mta.scan")

_MAX_REPLY = 64 << 10          # bytes of a spamd reply we read at most
_MAX_SYMBOLS = 64
_SYMBOL = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_SPAM_HEADER = re.compile(rb"(?im)^Spam:[ \t]*(True|False|Yes|No)[ \t]*;[ \t]*"
                          rb"(-?[0-9]{1,7}(?:\.[0-9]{1,6})?)[ \t]*/[ \t]*"
                          rb"(-?[0-9]{1,7}(?:\.[0-9]{1,6})?)[ \t]*$")

REJECT = b"550 5.7.1 Message content rejected as spam\r\n"
REJECT_VIRUS = b"550 5.7.1 Message content rejected: malware found\r\n"
REJECT_SIZE = b"550 5.7.1 Message too big to be scanned\r\n"
_SEVERITY = {"accept": 0, "tag": 1, "hold": 2, "drop": 3, "tempfail": 4, "reject": 5}
_CLAMD_MAX_REPLY = 4096
_CLAMD_CHUNK = 64 << 10
_VIRUS = re.compile(r"^stream: ([\w.:/+-]{1,200}) FOUND$")
DEFAULT_PORTS = {"spamd": 783, "clamd": 3310}
TEMPFAIL = b"451 4.7.1 Content scanner unavailable, try again later\r\n"


class ScanError(Exception):
    """The scanner could not give a verdict (down, timed out, an error reply, garbage)."""


class ScanResult(NamedTuple):
    spam: bool                 # the scanner's own verdict (spamd: its required score;
                               # clamd: malware found)
    score: float | None        # spamd's score; None from clamd
    required: float | None
    symbols: tuple[str, ...]   # names of the rules that hit (clamd: the malware's name)


SpamdResult = ScanResult


def parse_spamd_reply(data: bytes) -> SpamdResult:
    """A SYMBOLS reply: "SPAMD/1.x 0 EX_OK", a Spam: header, then the rule names."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    first = head.split(b"\n", 1)[0].strip()
    parts = first.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"SPAMD/"):
        raise ScanError(f"not a spamd reply: {first[:80]!r}")
    if parts[1] != b"0":
        raise ScanError(f"spamd error: {first[:80].decode('ascii', 'replace')}")
    m = _SPAM_HEADER.search(head)
    if m is None:
        raise ScanError("spamd reply without a Spam: header")
    score, required = float(m.group(2)), float(m.group(3))
    if not (math.isfinite(score) and math.isfinite(required)):
        raise ScanError("spamd score is not a number")
    names = re.split(r"[,\s]+", body.decode("ascii", "replace"))
    symbols = tuple(s for s in names if _SYMBOL.match(s))[:_MAX_SYMBOLS]
    return SpamdResult(m.group(1).lower() in (b"true", b"yes"), score, required, symbols)


async def spamd_check(host: str, port: int, content: bytes, user: str = "") -> SpamdResult:
    """One SPAMC/1.5 SYMBOLS exchange; the caller bounds it with a timeout."""
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=_MAX_REPLY)
    except OSError as exc:
        raise ScanError(f"cannot connect to spamd at {host}:{port}: {exc.strerror or exc}") from None
    try:
        head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(content)}\r\n"
        if user:
            head += f"User: {user}\r\n"
        writer.write(head.encode("ascii") + b"\r\n")
        writer.write(content)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        data = b""
        while True:
            chunk = await reader.read(_MAX_REPLY + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > _MAX_REPLY:
                raise ScanError("spamd reply too long")
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise ScanError(f"spamd at {host}:{port}: {exc}") from None
    finally:
        writer.close()
    return parse_spamd_reply(data)


def parse_clamd_reply(data: bytes) -> ScanResult:
    """"stream: OK" or "stream: <name> FOUND" (NUL or newline terminated)."""
    text = data.rstrip(b"\0\r\n").decode("ascii", "replace")
    if text == "stream: OK":
        return ScanResult(False, None, None, ())
    m = _VIRUS.match(text)
    if m is None:
        raise ScanError(f"clamd: {text[:120]!r}")
    return ScanResult(True, None, None, (m.group(1),))


async def clamd_check(host: str, port: int, content: bytes) -> ScanResult:
    """One clamd INSTREAM exchange; the caller bounds it with a timeout."""
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=_CLAMD_MAX_REPLY)
    except OSError as exc:
        raise ScanError(f"cannot connect to clamd at {host}:{port}: {exc.strerror or exc}") from None
    try:
        writer.write(b"zINSTREAM\0")
        view = memoryview(content)
        for i in range(0, len(view), _CLAMD_CHUNK):
            chunk = view[i:i + _CLAMD_CHUNK]
            writer.write(struct.pack(">I", len(chunk)))
            writer.write(chunk)
            await writer.drain()
        writer.write(struct.pack(">I", 0))
        await writer.drain()
        data = b""
        while b"\0" not in data:
            chunk = await reader.read(_CLAMD_MAX_REPLY + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > _CLAMD_MAX_REPLY:
                raise ScanError("clamd reply too long")
    except OSError as exc:
        raise ScanError(f"clamd at {host}:{port}: {exc}") from None
    finally:
        writer.close()
    return parse_clamd_reply(data.split(b"\0", 1)[0])


class Decision(NamedTuple):
    action: str                # accept, tag, hold, drop, reject, tempfail
    spam: bool | None          # None: not scanned (scanner failure, oversize)
    score: float | None
    symbols: tuple[str, ...]
    reason: str                # "spam", "malware", "clean", "oversize", or the failure


class Verdict(NamedTuple):
    """What a door does with a scanned message (Scanning.judge)."""
    action: str                # the strictest decision: accept, tag, hold, drop, reject, tempfail
    reason: str                # the deciding table's reason ("spam", "clean", a failure...)
    refusal: bytes | None      # reject and tempfail: the SMTP reply line (550/451); else None
    content: bytes             # the message to store: the tag headers of every tagging table
                               # prepended (DKIM signs after this)


class ContentRefused(Exception):
    """Local submission (`Server.inject()`): the scan refused the message. `reply` is the
    SMTP reply line reception would have sent; `permanent` is False for 451 4.7.1 (the
    scanner is down and `fail = "closed"`: try again later)."""

    def __init__(self, verdict: Verdict):
        assert verdict.refusal is not None
        self.reply = verdict.refusal.decode("ascii").strip()
        self.permanent = verdict.action == "reject"
        self.reason = verdict.reason
        super().__init__(self.reply)


class ScanPolicy:
    """One [[scan]] table, with its bound on scans in flight."""

    def __init__(self, cfg: ScanConfig):
        self.cfg = cfg
        self.tenant = cfg.tenant
        self.host, self.port = cfg.address or ("127.0.0.1", DEFAULT_PORTS[cfg.scanner])
        self._slots: asyncio.Semaphore | None = None   # made on the loop, on first use
        self.scanned = 0
        self.failed = 0

    def decide(self, result: ScanResult | None, error: str = "", oversize: bool = False) -> Decision:
        """What to do with a message given the scan's outcome (pure: unit-tested)."""
        cfg = self.cfg
        if oversize:
            return Decision(cfg.oversize, None, None, (), "oversize")
        if result is None:
            return Decision("accept" if cfg.fail == "open" else "tempfail", None, None, (),
                            error or "scanner failed")
        if cfg.scanner == "spamd":
            flagged = result.score is not None and result.score >= cfg.threshold
        else:
            flagged = result.spam
        if flagged:
            return Decision(cfg.action, True, result.score, result.symbols,
                            "spam" if cfg.scanner == "spamd" else "malware")
        return Decision("tag" if cfg.action == "tag" else "accept", False, result.score,
                        result.symbols, "clean")

    async def scan(self, content: bytes) -> Decision:
        """Scan under the table's concurrency bound and timeout; never raises ScanError."""
        if len(content) > self.cfg.max_size:
            return self.decide(None, oversize=True)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.concurrency)
        try:
            result = await asyncio.wait_for(self._scan(content), self.cfg.timeout)
        except ScanError as exc:
            self.failed += 1
            return self.decide(None, str(exc))
        except asyncio.TimeoutError:
            self.failed += 1
            return self.decide(None, f"no verdict within {self.cfg.timeout:g}s")
        self.scanned += 1
        return self.decide(result)

    async def _scan(self, content: bytes) -> ScanResult:
        assert self._slots is not None
        async with self._slots:
            if self.cfg.scanner == "clamd":
                return await clamd_check(self.host, self.port, content)
            return await spamd_check(self.host, self.port, content, self.cfg.user)

    def tag_headers(self, d: Decision) -> bytes:
        """The header lines a "tag" prepends (SpamAssassin's names; clamav-milter's)."""
        if self.cfg.scanner == "clamd":
            status = f"Infected ({d.symbols[0] if d.symbols else 'unknown'})" if d.spam else "Clean"
            return f"X-Virus-Status: {status}\r\n".encode("ascii", "replace")
        tests = ",".join(d.symbols) or "none"
        status = "Yes" if d.spam else "No"
        lines = f"X-Spam-Status: {status}, score={d.score or 0.0:.1f} " \
                f"required={self.cfg.threshold:.1f} tests={tests}\r\n"
        if d.spam:
            lines = "X-Spam-Flag: YES\r\n" + lines
        return lines.encode("ascii", "replace")


class Scanning:
    """The [[scan]] tables by tenant; `check()` is Reception's hook."""

    def __init__(self, tables: tuple[ScanConfig, ...], logs: LogWriter | None):
        self.policies: dict[str, tuple[ScanPolicy, ...]] = {}
        for t in tables:
            self.policies[t.tenant] = self.policies.get(t.tenant, ()) + (ScanPolicy(t),)
        self.logs = logs
        # set by the composition root: put an operator hold on one message id (raw bytes),
        # and take it off again when the held message could not be stored after all
        self.hold: Callable[[bytes], Any] | None = None
        self.unhold: Callable[[bytes], Any] | None = None

    def policy_for(self, tenant: str | None) -> tuple[ScanPolicy, ...] | None:
        """The tables that scan `tenant`'s mail (its own, else the tenant = "" ones)."""
        p = self.policies.get(tenant or "")
        return p if p is not None else self.policies.get("")

    def check(self, policies: tuple[ScanPolicy, ...], content, raw_id: bytes,
              envelope: Envelope, store: Callable[[Any], Awaitable[bytes]]) -> asyncio.Future:
        """The reply to send for a message: scanned, then stored through `store(content)`
        (or not, if refused or dropped). The returned future never fails."""
        return asyncio.ensure_future(self._check(policies, bytes(content), raw_id, envelope,
                                                 store))

    async def _scan_one(self, policy: ScanPolicy, content: bytes) -> Decision:
        try:
            return await policy.scan(content)
        except Exception as exc:   # a bug must not leave the client without a reply
            log.exception("scan failed unexpectedly")
            return policy.decide(None, f"internal error: {type(exc).__name__}")

    async def judge(self, policies: tuple[ScanPolicy, ...], content: bytes,
                    envelope: Envelope) -> Verdict:
        """Scan `content` with every table, record each decision, and return the strictest
        one with the content to store (tag headers prepended). Every door that takes mail
        in (SMTP reception, HTTP /inject, local submission) acts on this one verdict."""
        if len(policies) == 1:
            decisions = [await self._scan_one(policies[0], content)]
        else:
            decisions = list(await asyncio.gather(*(self._scan_one(p, content)
                                                    for p in policies)))
        worst = 0
        for i, (policy, d) in enumerate(zip(policies, decisions)):
            if d.spam is None:
                log.warning("message %s not scanned by %s (%s): %s", envelope.id,
                            policy.cfg.scanner, d.reason, d.action)
            self._record(policy, d, envelope)
            if _SEVERITY[d.action] > _SEVERITY[decisions[worst].action]:
                worst = i
        d, policy = decisions[worst], policies[worst]
        if d.action == "reject":
            self._rejection(envelope, 550, "5.7.1", d.reason)
            return Verdict("reject", d.reason, REJECT_SIZE if d.reason == "oversize" else
                           REJECT if policy.cfg.scanner == "spamd" else REJECT_VIRUS, content)
        if d.action == "tempfail":
            self._rejection(envelope, 451, "4.7.1", "scanner_unavailable")
            return Verdict("tempfail", d.reason, TEMPFAIL, content)
        tags = b"".join(p.tag_headers(x) for p, x in zip(policies, decisions)
                        if p.cfg.action == "tag" and x.spam is not None)
        if d.action == "hold" and self.hold is None:
            # no queues to hold in (not wired): never send unreviewed
            return Verdict("tempfail", "no queues to hold in", TEMPFAIL, content)
        return Verdict(d.action, d.reason, None, tags + content if tags else content)

    def place_hold(self, raw_id: bytes) -> None:
        """A "hold" verdict: the operator hold on the id, put before the spool write so
        the message can never go out first."""
        assert self.hold is not None   # judge() answers tempfail when it is not wired
        self.hold(raw_id)

    def lift_hold(self, raw_id: bytes) -> None:
        """The held message was not stored after all (spool error, DKIM defer): no stale hold."""
        if self.unhold is not None:
            self.unhold(raw_id)

    async def _check(self, policies: tuple[ScanPolicy, ...], content: bytes, raw_id: bytes,
                     envelope: Envelope, store: Callable[[Any], Awaitable[bytes]]) -> bytes:
        v = await self.judge(policies, content, envelope)
        if v.refusal is not None:
            return v.refusal
        if v.action == "drop":   # the client sees an acceptance; nothing is stored
            return reply("QUEUED", id_text(new_id()))
        if v.action == "hold":
            self.place_hold(raw_id)
            answer = await store(v.content)
            if not answer.startswith(b"250"):
                self.lift_hold(raw_id)
            return answer
        return await store(v.content)

    def _record(self, policy: ScanPolicy, d: Decision, env: Envelope) -> None:
        if self.logs is None:
            return
        self.logs.log(RecordType.SCANNED, id=env.id, sender=env.sender,
                      recipients=[r.address for r in env.recipients], tenant=env.tenant,
                      scanner=policy.cfg.scanner, action=d.action, spam=d.spam, score=d.score,
                      threshold=policy.cfg.threshold, symbols=list(d.symbols), reason=d.reason,
                      client_ip=env.client_ip, listener=env.listener)

    def _rejection(self, env: Envelope, code: int, status: str, reason: str) -> None:
        if self.logs is None:
            return
        self.logs.log(RecordType.REJECTION, sender=env.sender,
                      recipients=[r.address for r in env.recipients], client_ip=env.client_ip,
                      listener=env.listener, code=code, status=status, reason=reason)
