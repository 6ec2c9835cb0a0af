"""Out-of-band intake: returned mail addressed to the bounce domain, processed locally.

Where it sits: Server hands every durable message (new or recovered) whose
recipients include addresses at `[bounces] domain` here (`submit()`) instead of
to delivery; the message was spooled like any other before its 250, so nothing
accepted is lost. The intake queues it and `process()` parses it in a child
process (mta/feedback/bounce/worker.py: time, size and memory budget), writes one OOB
record per failed recipient or one Feedback record for an ARF report,
suppresses the hard bounces and complaints the report proves, waits until those
suppression entries are committed (the store's writer thread, off the loop:
mta/feedback/suppression/writer.py), logs the records, and then hands
the message back (`on_done`): Server finishes those recipients in the spool and
only then gives the message's other recipients, if any, to delivery, so the
tombstone is never written while the intake still owes its verdict. A crash
before that leaves the message live, recovery brings it back and it is
processed again (at-least-once: a record may repeat, a suppression is
idempotent); recovery only queues it, so the listeners open at once. So a
suppression a returned message proves survives kill -9 at any point after its
250: the message stays in the spool (and is replayed) until the entry is on disk.

Over budget: a parse that overruns [bounces] parse_timeout or parse_memory, or
whose child dies, is "unparsed": an OOB record with kind "unparsed" and the
reason, the message copied (0600) to unparsed/ under the spool directory for
the operator, and finished like any other (if the copy fails, it stays in the
spool instead, for the next start). Each parse is counted first in
intake/ under the spool directory; a message whose parses were cut short
parse_attempts times by daemon crashes is finished unparsed ("attempts")
without parsing again, so a crash-restart loop cannot re-parse it forever.

Queue: waiting messages are kept as ids (their content stays on disk); content
is read from the spool only when a parser process is free, so at most
parse_workers messages are held in memory. Nothing accepted is ever dropped:
at parse_backlog messages waiting (for a parser, or for their
suppression entries to be committed), or while the suppression writer's queue is
half full, new mail to the bounce domain is refused at
RCPT with 451 4.3.2 (mta/feedback/rcpt_policy.py) and waits at its sender.

Trust: everything here comes from the Internet. A hard bounce or complaint
suppresses (and counts) only a recipient the report proves we sent to: a VERP
return path minted for that recipient, or a complaint from a trusted FBL source
(mta/feedback/trust.py); the others say in `ignored` why they did not act.
Auto-replies and delay notices are logged, never suppress.

Sealed recipients (`[privacy] keyring`, mta/model/sealed.py): the remote server got the
clear address at RCPT TO, so its report names that. With a keyring, a record names a
recipient in clear only when a VERP return path proves we sent to it in clear; when one
proves it was a sealed recipient the record names the sealed form (trust.py finds it);
otherwise (no proof, a trusted FBL source, a recipient the report only claims) the
record carries `recipient_hash` (the suppression list's "hmac-sha256:" form) and no
`recipient`. The suppression takes the clear address in memory and stores its hash.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from mta.egress.pools import DEFAULT_SOURCE
from mta.feedback.bounce.report import Report
from mta.feedback.bounce.worker import Parsed, ParserPool
from mta.feedback.trust import Evidence, Verdict
from mta.model.envelope import Envelope
from mta.model.log_records import RecordType

if TYPE_CHECKING:
    from mta.config import Config
    from mta.feedback.state import Feedback
    from mta.logs.writer import LogWriter
    from mta.spool import Spool

log = logging.getLogger("mta.feedback.intake")


class BounceIntake:
    def __init__(self, config: Config, feedback: Feedback, spool: Spool, logs: LogWriter | None):
        self.feedback = feedback
        self.spool = spool
        self.logs = logs
        self.tenant_header = config.reception.tenant_header
        # complaint reports name the sending IP; operators think in [[source]] names
        self.sources = {s.address: s.name for s in config.source}
        self.processed = 0
        b = config.bounces
        self.parser = ParserPool(b.rules, workers=b.parse_workers, timeout=b.parse_timeout,
                                 max_size=b.parse_max_size, memory=b.parse_memory, policy_hard=b.policy_hard)
        self.workers = b.parse_workers
        self.max_attempts = b.parse_attempts
        self.max_backlog = b.parse_backlog
        self.attempts = AttemptLedger(os.path.join(str(config.spool.directory), "intake"))
        self.quarantine = os.path.join(str(config.spool.directory), "unparsed")
        # (id, envelope, indexes, after) -> None: the message's bounce-domain recipients
        # are done; `after` is what submit() was given
        self.on_done: Callable[[bytes, dict, list[int], Any], None] | None = None
        self._waiting: deque[tuple[bytes, list[int], Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._committing: set[asyncio.Task] = set()   # parsed, waiting for their suppressions
        self.unparsed = 0

    # -- queue ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.attempts.prune(lambda msg_id: msg_id in self.spool)
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.workers)]

    def submit(self, msg_id: bytes, idxs: list[int], after: Any = None) -> None:
        """Queue a durable message for its bounce-domain recipients `idxs` (returns at once)."""
        self._waiting.append((msg_id, idxs, after))
        if self._wake is not None:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._waiting) + len(self._committing)

    def full(self) -> bool:
        """New returned mail waits at its sender (RCPT 451) while this holds."""
        return self.backlog >= self.max_backlog or self.feedback.write_busy()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            msg_id, idxs, after = self._waiting.popleft()
            try:
                await self.process(msg_id, idxs, after)
            except asyncio.CancelledError:
                raise
            except Exception:   # the message stays live: the next start processes it again
                log.exception("returned message %s not processed", msg_id.hex())

    async def stop(self) -> None:
        """Stop taking messages; one being parsed stays live (and uncounted) for the next start."""
        for t in (*self._tasks, *self._committing):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._committing, return_exceptions=True)
        self._tasks = []
        self._committing.clear()
        await self.parser.close()

    def bounce_indexes(self, env: Envelope) -> list[int]:
        dom = self.feedback.bounce_domain
        if not dom:
            return []
        return [i for i, r in enumerate(env.recipients) if r.domain == dom]

    async def process(self, msg_id: bytes, idxs: list[int], after: Any = None) -> None:
        """Parse the message off the loop, act on the report, finish `idxs` (on_done)
        once its suppression entries are committed (that wait runs in its own task, so
        the next message is parsed meanwhile)."""
        try:
            env, content = self.spool.read(msg_id)
        except KeyError:
            return                  # finished meanwhile
        tries = self.attempts.begin(msg_id)
        try:
            if tries > self.max_attempts:
                parsed = Parsed(None, "attempts")
            else:
                try:
                    parsed = await self.parser.parse(bytes(content))
                except OSError as exc:   # no parser process (fork or pipe failure)
                    log.error("bounce parser process unavailable: %s", exc)
                    parsed = Parsed(None, "crash")
        except BaseException:
            self.attempts.undo(msg_id, tries)    # cut short by shutdown: not the message's fault
            raise
        if parsed.truncated:
            log.info("returned message %s longer than parse_max_size: parsed on its head only",
                     env.id)
        records: list[tuple[RecordType, dict]] = []
        if parsed.report is None:
            if not await self._unparsed(msg_id, env, content, parsed.unparsed or "crash", tries):
                return              # not kept elsewhere: it stays in the spool for the next start
        else:
            try:
                self._apply(env, idxs, parsed.report, records)
            except Exception:   # a bug acting on the report must not keep the message stuck
                log.exception("cannot act on returned message %s", env.id)
                records.append((RecordType.OOB, dict(id=None, bounce_id=env.id, kind="error")))
        wait = self.feedback.committed()
        if wait is None:
            self._finish(msg_id, env, idxs, after, records)
            return
        task = asyncio.get_running_loop().create_task(
            self._finish_after(wait, msg_id, env, idxs, after, records))
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)

    async def _finish_after(self, wait: asyncio.Future, msg_id: bytes, env: Envelope,
                            idxs: list[int], after: Any, records: list) -> None:
        await wait          # cancelled at shutdown: the message stays live, replayed next start
        self._finish(msg_id, env, idxs, after, records)

    def _finish(self, msg_id: bytes, env: Envelope, idxs: list[int], after: Any,
                records: list[tuple[RecordType, dict]]) -> None:
        for rtype, fields in records:
            self._log(rtype, **fields)
        self.processed += 1
        if self.on_done is not None:
            self.on_done(msg_id, env, idxs, after)
        self.attempts.end(msg_id)

    async def _unparsed(self, msg_id: bytes, env: Envelope, content, reason: str, tries: int) -> bool:
        """Over budget: keep the message for the operator and log why; True when it
        was kept (then it can be finished)."""
        name = f"{env.id or msg_id.hex()}.eml"
        try:
            saved = await asyncio.to_thread(_keep, self.quarantine, name, bytes(content))
        except OSError as exc:
            log.error("returned message %s unparsed (%s) and not copied, left in the spool: %s",
                      env.id, reason, exc)
            return False
        self.unparsed += 1
        log.warning("returned message %s unparsed (%s), kept as %s", env.id, reason, saved)
        self._log(RecordType.OOB, id=None, bounce_id=env.id, kind="unparsed", reason=reason,
                  attempts=tries, saved_as=saved, recipient=None, suppressed=None)
        return True

    def _apply(self, env: Envelope, idxs: list[int], report: Report,
               records: list[tuple[RecordType, dict]]) -> None:
        """Act on a parsed report: suppress and count only what it proves
        (mta/feedback/trust.py: a VERP return path of ours for that recipient, or a
        complaint from a trusted FBL source); its log records go to `records` (logged
        once the suppressions are committed)."""
        def _log(rtype: RecordType, **fields) -> None:
            records.append((rtype, fields))
        fb = self.feedback
        evidence = Evidence(fb, env, idxs, report)
        tenant = None
        if report.original_headers is not None and self.tenant_header:
            tenant = report.original_headers.get(self.tenant_header)
            tenant = str(tenant).strip() or None if tenant is not None else None
        base = {"bounce_id": env.id, "kind": report.kind, "family": report.family,
                "reporting_mta": report.reporting_mta}
        if report.kind == "feedback" and report.feedback is not None:
            f = report.feedback
            rcpt, verdict = evidence.first_proven(
                [f.original_rcpt_to, *(r.recipient for r in report.recipients)])
            source = self.sources.get(f.source_ip or "", "")
            scope = None
            if verdict.proof is not None:
                # without [[source]] tables everything leaves from the default source
                counted = source or ("" if self.sources else DEFAULT_SOURCE)
                scope = fb.complaint(rcpt, tenant, counted, fb.site_for(rcpt))
            _log(RecordType.FEEDBACK, **base, **verdict.fields(report.message_id),
                      feedback_type=f.feedback_type, **self._named(rcpt, verdict),
                      source_ip=f.source_ip,
                      source=source or None, tenant=tenant, suppressed=scope)
            return
        if not report.recipients:
            # auto-replies and unrecognised mail: logged as such, nobody suppressed
            nothing = Verdict(None, None, None).fields(report.message_id)
            _log(RecordType.OOB, **base, **nothing, recipient=None, suppressed=None)
            return
        for r in report.recipients:
            verdict = evidence.prove(r.recipient)
            acts = report.kind == "bounce" and r.hard
            suppressed = None
            # a DSN does not say which source sent the original
            if acts and verdict.proof is not None and fb.hard_bounce(
                    r.recipient, "", fb.site_for(r.recipient), f"oob {r.status or ''} {r.category}"):
                suppressed = "global"
            fields = verdict.fields(report.message_id)
            if not acts:
                fields["ignored"] = None     # nothing to act on, nothing ignored
            _log(RecordType.OOB, **base, **fields, **self._named(r.recipient, verdict),
                      status=r.status,
                      code=r.reply_code, category=r.category, hard=r.hard, action=r.action,
                      remote_mta=r.remote_mta, suppressed=suppressed)

    def _named(self, rcpt: str | None, verdict: Verdict) -> dict:
        """How a record names the recipient a report is about (see the module text)."""
        fb = self.feedback
        if fb.sealed is None or not rcpt:
            return {"recipient": rcpt}
        if verdict.sealed is not None:
            return {"recipient": verdict.sealed}
        if verdict.token is not None or fb.sealed.key_id(rcpt) is not None:
            return {"recipient": rcpt}      # proven sent in clear, or named in sealed form
        try:
            return {"recipient": None, "recipient_hash": fb.hash_address(rcpt)}
        except ValueError:                  # not an address: nothing to join on
            return {"recipient": None, "recipient_hash": "unparsable"}

    def _log(self, rtype: RecordType, **fields) -> None:
        if self.logs is not None:
            self.logs.log(rtype, **fields)


def _keep(directory: str, name: str, content: bytes) -> str:
    """Write `content` to directory/name, readable by the daemon's user only."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # (an older copy may have other modes)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return path


class AttemptLedger:
    """Parses begun per returned message, in one small file each (directory/<hex id>).

    Written before a parse and removed once the message is finished, so after a
    crash the count says how many parses of it were cut short. (Plain writes, no
    fsync: the ledger guards against crash-restart loops of the process, which
    leave the page cache intact.)"""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, msg_id: bytes) -> str:
        return os.path.join(self.directory, msg_id.hex())

    def begin(self, msg_id: bytes) -> int:
        """Count one more parse of `msg_id`; returns the count including this one."""
        try:
            with open(self._path(msg_id), "rb") as f:
                tries = int(f.read(20) or b"0") + 1
        except (OSError, ValueError):
            tries = 1
        self._write(msg_id, tries)
        return tries

    def undo(self, msg_id: bytes, tries: int) -> None:
        if tries > 1:
            self._write(msg_id, tries - 1)
        else:
            self.end(msg_id)

    def end(self, msg_id: bytes) -> None:
        try:
            os.unlink(self._path(msg_id))
        except FileNotFoundError:
            pass

    def prune(self, live: Callable[[bytes], bool]) -> None:
        """Forget counts of messages no longer in the spool (finished just before a crash)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            try:
                gone = not live(bytes.fromhex(name))
            except ValueError:
                continue
            if gone:
                self.end(bytes.fromhex(name))

    def _write(self, msg_id: bytes, tries: int) -> None:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self._path(msg_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, str(tries).encode())
            finally:
                os.close(fd)
        except OSError as exc:   # the parse still happens; only the crash-loop guard is lost
            log.error("cannot count parse attempts in %s: %s", self.directory, exc)
