"""What a delivery attempt means for each recipient, and what follows from it.

Dispatchers and the router hand over one AttemptResult per attempt at a queue
entry (mta/model/attempt.py); Outcomes.apply is the one place that acts on it:
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
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.envelope import Envelope
from mta.model.ids import id_text
from mta.model.log_records import RecordType
from mta.model.queued import DELAY_DSN_SENT, InsertReason, QueuedMessage
from mta.spool.records import BOUNCED, DELIVERED

if TYPE_CHECKING:
    from mta.feedback.state import Feedback
    from mta.logs.writer import LogWriter
    from mta.queues.retry import RetryPolicy
    from mta.spool import Spool

log = logging.getLogger("mta.outcome")

# Outcomes.by_pair keeps at most this many sites per source; later ones count under
# OTHER_SITES (/metrics shows sites beyond its top N as "other" anyway)
MAX_SITES = 5000
OTHER_SITES = "other"
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
                 no_dsn_tenants: frozenset[str] = frozenset(),
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
        self.no_dsn_tenants = no_dsn_tenants   # their senders read bounces from the logs
        # called with every AttemptResult after it is applied: what adapts to replies
        # (automation rules, rate rules, warm-up counters) watches here
        self.observers: list[Callable[[AttemptResult], None]] = []
        self.open_entries: dict[bytes, int] = {}   # id -> entries still queued, when > 1
        self.counters = {"delivered": 0, "bounced": 0, "deferred": 0, "expired": 0}
        # source -> site -> queue class -> pool -> [delivered, bounced, deferred] recipients,
        # for /metrics (mta/control/metrics.py folds sites into providers when scraped);
        # nested dicts of the strings at hand: no key tuple is built per attempt
        self.by_pair: dict[str, dict[str, dict[str, dict[str, list[int]]]]] = {}

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

    def apply(self, result: AttemptResult, retry: RetryPolicy | None = None) -> None:
        """What one attempt means: a record per recipient, DSNs for bounces, then the
        entry is finished or scheduled again (with `retry`, the destination's shaped
        policy, else the [delivery] one)."""
        msg, env, at = result.msg, result.env, result.at
        retry_idx, bounced = [], []
        counters = self.counters
        row = self._row(at.source, at.site, msg.queue.klass, msg.queue.pool)
        for idx, reply in result.replies:
            if 200 <= reply.code < 300:
                self._log(RecordType.DELIVERY, msg, env, idx, reply, at)
                counters["delivered"] += 1
                row[0] += 1
            elif reply.code >= 500:
                self._log(RecordType.BOUNCE, msg, env, idx, reply, at)
                counters["bounced"] += 1
                row[1] += 1
                bounced.append((idx, reply))
            else:
                self._log(RecordType.TRANSIENT_FAILURE, msg, env, idx, reply, at)
                counters["deferred"] += 1
                row[2] += 1
                retry_idx.append(idx)
        if bounced and env is not None:
            self._dsn(env, msg, "failed", [(i, r.status or _default_status(r.code), _diag(r),
                                            at.mx or None) for i, r in bounced])
        self._settle(msg, env, retry_idx, retry, result)
        for observe in self.observers:
            observe(result)

    def _row(self, source: str, site: str, klass: str, pool: str) -> list[int]:
        """The outcome counters of (source, site, class, pool), made on first use."""
        sites = self.by_pair.get(source)
        if sites is None:
            sites = self.by_pair[source] = {}
        classes = sites.get(site)
        if classes is None:
            if len(sites) >= MAX_SITES:   # a bound on RAM: later sites count together
                site = OTHER_SITES
                classes = sites.get(site)
            if classes is None:
                classes = sites[site] = {}
        pools = classes.get(klass)
        if pools is None:
            pools = classes[klass] = {}
        row = pools.get(pool)
        if row is None:
            row = pools[pool] = [0, 0, 0]
        return row

    def paused(self, source: str, site: str, reply: RemoteReply, until: float) -> None:
        """A (source, site) pauses after a "slow down" reply (shaping's backoff_on)."""
        if self.logs is not None:
            self.logs.log(RecordType.BACKOFF, source=source, site=site, code=reply.code,
                          status=reply.status, text=reply.text[:500], until=until)

    def _settle(self, msg: QueuedMessage, env: Envelope | None, retry_idx: list[int],
                retry: RetryPolicy | None, result: AttemptResult) -> None:
        """Finish the entry or schedule its retry."""
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
        # its attempts, due time and last reply survive a restart (a SCHEDULE record)
        self.spool.note_schedule(
            msg.id, msg.queue.domain, msg.attempts, due, flags=msg.flags, pending=msg.rcpts,
            reply=next((_diag(r) for i, r in reversed(result.replies) if i in retry_idx), ""),
            finished={i: DELIVERED if r.code < 300 else BOUNCED
                      for i, r in result.replies if i in done})
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
            # Null-sender mail (our DSNs, relayed bounces) goes to senders: a hard bounce
            # of it must not put a sender, often our own customer, on the suppression list.
            if verdict.hard and rtype is RecordType.BOUNCE and rcpt and env.sender:
                fb.hard_bounce(rcpt, at.source if at else "", at.site if at else "",
                               f"{reply.code} {reply.status} {verdict.category}")
        if self.logs is None:
            return
        now = self.clock()
        self.logs.log(rtype, **extra, id=msg.id_text, queue=msg.queue.name,
                      tenant=env.tenant or None if env is not None else None,
                      campaign=env.campaign or None if env is not None else None,
                      recipient=rcpt, sender=env.sender if env is not None else None,
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
        if env.tenant in self.no_dsn_tenants:
            return  # this tenant processes bounces from the logs ([delivery] no_dsn_tenants)
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
