"""What a delivery attempt means for each recipient, and what follows from it.

(reply or error) -> per recipient: delivered (2xx), bounced (5xx), or deferred
(4xx, connection and protocol trouble, temporary DNS failure). Then: the log
record (Delivery, Bounce, TransientFailure, Expiration), the spool update
(tombstone when a message is finished, RCPTS_DONE when only some of its
recipients are, so a restart never delivers them twice), the retry schedule
with backoff, and DSNs (RFC 3464) to the return path for bounces, expiries
and (optionally) delays, honouring NOTIFY and RET; never to the null sender.
Scope of an error (Postfix smtp_trouble.c): a recipient reply touches that
recipient; a session error or a DNS failure touches every recipient of the
entry (and the dispatcher defers the rest of the site's ready queue).
Every Bounce and TransientFailure record carries the classifier's `category` and
`hard` (mta/feedback/bounce/classify.py); a hard bounce suppresses the recipient (global
scope) and counts against its (source, site) in Feedback.counts.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from mta.feedback.dsn_builder import RecipientStatus, build_dsn, should_notify
from mta.model.attempt import Attempt, RemoteReply
from mta.model.envelope import Envelope
from mta.model.ids import id_text
from mta.model.log_records import RecordType
from mta.model.queued import DELAY_DSN_SENT, InsertReason, QueuedMessage

if TYPE_CHECKING:
    from mta.feedback.state import Feedback
    from mta.logs.writer import LogWriter
    from mta.queues.retry import RetryPolicy
    from mta.spool import Spool

log = logging.getLogger("mta.outcome")

# inject(sender, rcpts, content) -> None: queue a locally generated message (a DSN)
InjectFn = Callable[[str, list[str], bytes], Any]
# schedule(entry, due wall time, reason): the queues' Scheduler.schedule
ScheduleFn = Callable[[QueuedMessage, float, InsertReason], None]
# finished(entry): the queues' Scheduler.finished
FinishedFn = Callable[[QueuedMessage], None]


class Outcomes:
    def __init__(self, *, spool: Spool, schedule: ScheduleFn, finished: FinishedFn,
                 logs: LogWriter | None, retry: RetryPolicy, inject: InjectFn, hostname: str,
                 delay_dsn_after: float, feedback: Feedback | None = None,
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.clock = clock            # wall time: retry due times, queued_s, DSN dates
        self.schedule = schedule      # a deferred entry goes back to its scheduled queue
        self.finished = finished      # an entry left its scheduled queue for good
        self.logs = logs
        self.retry = retry
        self.inject = inject
        self.hostname = hostname
        self.delay_dsn_after = delay_dsn_after
        self.feedback = feedback
        self.open_entries: dict[bytes, int] = {}   # id -> entries still queued, when > 1
        self.counters = {"delivered": 0, "bounced": 0, "deferred": 0, "expired": 0}

    # -- entry bookkeeping ---------------------------------------------------------------

    def track(self, entries: list[QueuedMessage]) -> None:
        if len(entries) > 1:
            self.open_entries[entries[0].id] = len(entries)

    def _entry_done(self, msg: QueuedMessage, done: list[int]) -> None:
        self.finished(msg)
        left = self.open_entries.get(msg.id)
        if left is None or left <= 1:
            self.open_entries.pop(msg.id, None)
            self.spool.finish(msg.id)
        else:
            self.open_entries[msg.id] = left - 1
            if done:
                self.spool.finish_recipients(msg.id, done)

    # -- results ---------------------------------------------------------------------------

    def transaction(self, msg: QueuedMessage, env: Envelope, idxs: list[int], replies: list,
                    data_reply: Any, at: Attempt) -> list[int]:
        """Apply one transaction's replies; returns the indexes that must be retried."""
        retry_idx, bounced = [], []
        for idx, rcpt_reply in zip(idxs, replies):
            if rcpt_reply.code >= 300:
                final = rcpt_reply
            else:  # accepted at RCPT: the data reply decides (none: never sent, retry)
                final = data_reply or RemoteReply(451, "4.3.0", "no reply to the message data")
            if 200 <= final.code < 300:
                self._log(RecordType.DELIVERY, msg, env, idx, final, at)
                self.counters["delivered"] += 1
            elif final.code >= 500:
                self._log(RecordType.BOUNCE, msg, env, idx, final, at)
                self.counters["bounced"] += 1
                bounced.append((idx, final))
            else:
                self._log(RecordType.TRANSIENT_FAILURE, msg, env, idx, final, at)
                self.counters["deferred"] += 1
                retry_idx.append(idx)
        if bounced:
            self._dsn(env, msg, "failed", [(i, r.status or _default_status(r.code), _diag(r), at.mx)
                                           for i, r in bounced])
        return retry_idx

    def defer(self, msg: QueuedMessage, env: Envelope | None, idxs: list[int], code: int,
              status: str, text: str, at: Attempt) -> None:
        """A session/site/DNS trouble: every recipient in `idxs` is retried later."""
        reply = RemoteReply(code, status, text)
        for idx in idxs:
            self._log(RecordType.TRANSIENT_FAILURE, msg, env, idx, reply, at)
        self.counters["deferred"] += len(idxs)

    def bounce_all(self, msg: QueuedMessage, env: Envelope, code: int, status: str, text: str,
                   at: Attempt) -> None:
        reply = RemoteReply(code, status, text)
        for idx in msg.rcpts:
            self._log(RecordType.BOUNCE, msg, env, idx, reply, at)
        self.counters["bounced"] += len(msg.rcpts)
        self._dsn(env, msg, "failed", [(i, status, f"{code} {status} {text}", None) for i in msg.rcpts])
        self._entry_done(msg, list(msg.rcpts))

    def settle(self, msg: QueuedMessage, env: Envelope | None, retry_idx: list[int],
               retry: RetryPolicy | None = None) -> None:
        """After all transactions of an attempt: finish the entry or schedule its retry
        (with `retry`, the destination's shaped policy, else the [delivery] one)."""
        done = [i for i in msg.rcpts if i not in retry_idx]
        if not retry_idx:
            self._entry_done(msg, done)
            return
        msg.rcpts = tuple(retry_idx)
        msg.attempts += 1
        now = self.clock()
        due = (retry or self.retry).next_due(msg.attempts, msg.received, now)
        if due is None:
            self._expire(msg, env)
            self._entry_done(msg, done + retry_idx)
            return
        if done:
            self.spool.finish_recipients(msg.id, done)
        if (self.delay_dsn_after and not msg.flags & DELAY_DSN_SENT and env is not None
                and now - msg.received >= self.delay_dsn_after):
            msg.flags |= DELAY_DSN_SENT
            self._dsn(env, msg, "delayed", [(i, "4.4.7", None, None) for i in retry_idx], until=
                      msg.received + self.retry.max_age)
        self.schedule(msg, due, InsertReason.TRANSIENT_FAILURE)

    def _expire(self, msg: QueuedMessage, env: Envelope | None) -> None:
        reply = RemoteReply(550, "4.4.7", "message expired: delivery time limit exceeded")
        for idx in msg.rcpts:
            self._log(RecordType.EXPIRATION, msg, env, idx, reply, None)
        self.counters["expired"] += len(msg.rcpts)
        if env is not None:
            self._dsn(env, msg, "failed", [(i, "4.4.7", None, None) for i in msg.rcpts])

    # -- logs and DSNs -------------------------------------------------------------------------

    def _log(self, rtype: RecordType, msg: QueuedMessage, env: Envelope | None, idx: int,
             reply: Any, at: Attempt | None) -> None:
        rcpt = env.recipients[idx].address if env is not None else None
        extra = {}
        fb = self.feedback
        if fb is not None and (rtype is RecordType.BOUNCE
                               or rtype is RecordType.TRANSIENT_FAILURE):
            verdict = fb.classifier.classify(reply.code, reply.status or None, reply.text)
            extra = {"category": verdict.category, "hard": verdict.hard}
            if verdict.hard and rtype is RecordType.BOUNCE and rcpt:
                fb.hard_bounce(rcpt, at.source if at else "", at.site if at else "",
                               f"{reply.code} {reply.status} {verdict.category}")
        if self.logs is None:
            return
        now = self.clock()
        self.logs.log(rtype, **extra, id=msg.id_text, queue=msg.queue.name, recipient=rcpt,
                      sender=env.sender if env is not None else None,
                      source=at.source if at else None, site=at.site if at else None,
                      mx=at.mx if at else None, ip=at.ip if at else None,
                      code=reply.code, status=reply.status, text=reply.text[:500],
                      attempt=msg.attempts + 1, queued_s=round(now - msg.received, 3),
                      attempt_s=round(now - at.started, 4) if at else None)

    def _dsn(self, env: Envelope, msg: QueuedMessage, kind: str, items: list,
             until: float | None = None) -> None:
        sender = env.sender
        if not sender:
            return  # never a DSN to the null sender (RFC 3461 6.2)
        rcpts = []
        for idx, status, diag, mx in items:
            r = env.recipients[idx]
            if should_notify(kind, r.notify):
                rcpts.append(RecipientStatus(r.address, r.orcpt, kind, status, diag, mx, self.clock(),
                                             until))
        if not rcpts:
            return
        try:
            _, content = self.spool.read(msg.id)
        except KeyError:
            content = b""
        try:
            dsn = build_dsn(reporting_mta=self.hostname, original_envelope_id=env.envid,
                            sender=sender, recipients=rcpts, original_content=bytes(content),
                            ret=env.ret, arrival_date=msg.received, queue_id=id_text(msg.id))
        except ValueError as exc:
            log.warning("no DSN for %s: %s", msg.id_text, exc)
            return
        self.inject("", [sender], dsn)


def _default_status(code: int) -> str:
    return "5.0.0" if code >= 500 else "4.0.0"


def _diag(reply: Any) -> str:
    return f"{reply.code} {reply.status + ' ' if reply.status else ''}{reply.text}"
