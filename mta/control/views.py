"""Operator views: the queue summary, one queued message and the shaping rows, as typed values.

Where it sits: the control stage. The admin API (admin.py, routes wired in
mta/server.py) serves `to_json()` of these values; `mta queue summary|count|
inspect` and `mta shaping show` (mta/cli.py) parse the response with
`from_json()` and format from attributes, so the wire format is written and
read in one module. The JSON is the one the admin API served before these
types existed (keys, order, None for "none"); scripts and tests read it.

Reads: the delivery engine's live state (scheduler queues, dispatchers, ready
queues, outcome and feedback counters, the spool for one message). The views
are built here rather than by the engine because they are the operator's
shape of that state, and delivery (rank 5) may not import control (rank 6):
the engine keeps its state, control decides how an operator sees it.
Writes nothing.

Diagnostics: `from_json()` raises KeyError/TypeError/ValueError on a response
that is not such a view (a daemon of another version); the CLI lets it show.
`message_view()` raises ValueError for text that is not a spool id (the admin
API answers 400).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import logging
import time
import urllib.parse

import orjson

from mta.model.envelope import Envelope
from mta.model.ids import id_from_text
from mta.model.queued import InsertReason
from mta.spool import records as rec

if TYPE_CHECKING:
    from mta.delivery.engine import DeliveryEngine

_HEAD_LIMIT = 4096   # header bytes shown when the message has no blank line ending its header


@dataclass(slots=True)
class ScheduledRow:
    """One scheduled queue (campaign:tenant@domain) as `mta queue summary` lists it."""
    count: int                       # messages queued in it
    site: str | None                 # its site's name; None while the route is not resolved
    klass: str                       # queue class (JSON key "class")
    pool: str                        # egress pool it draws sources from
    backlog: int                     # messages waiting because their ready queue was full
    held: int                        # messages held while the queue is suspended
    suspended: bool                  # suspended by the operator right now
    suspended_until: float | None    # wall-clock end of the suspension; None when running

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "site": self.site, "class": self.klass, "pool": self.pool,
                "backlog": self.backlog, "held": self.held, "suspended": self.suspended,
                "suspended_until": self.suspended_until}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScheduledRow:
        return cls(d["count"], d["site"], d["class"], d["pool"], d["backlog"], d["held"],
                   d["suspended"], d["suspended_until"])


@dataclass(slots=True)
class ReadyRow:
    """One ready queue (egress source -> site) with its dispatcher's counters."""
    count: int                       # messages waiting for a connection
    connections: int                 # connections open now
    sent: int                        # messages sent since start, whatever the reply
    queues: dict[str, int]           # scheduled queue name -> its messages in this ready queue

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "connections": self.connections, "sent": self.sent,
                "queues": self.queues}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReadyRow:
        return cls(d["count"], d["connections"], d["sent"], dict(d["queues"]))


@dataclass(slots=True)
class OutcomeCounts:
    """Recipients by outcome since start (mta/delivery/outcome.py's counters)."""
    delivered: int                   # accepted by the remote MX
    bounced: int                     # permanently failed (a DSN goes to the return path)
    deferred: int                    # temporarily failed, queued for a retry
    expired: int                     # past max age

    def to_json(self) -> dict[str, int]:
        return {"delivered": self.delivered, "bounced": self.bounced,
                "deferred": self.deferred, "expired": self.expired}

    @classmethod
    def from_json(cls, d: dict[str, int]) -> OutcomeCounts:
        # by name: a counter this view does not know is a TypeError, not dropped in silence
        return cls(**d)


@dataclass(slots=True)
class FeedbackCounts:
    """Signals counted against one (source, site) from returned mail and complaints."""
    hard_bounces: int                # hard bounces (in-band and out-of-band)
    complaints: int                  # feedback-loop complaints (ARF)

    def to_json(self) -> dict[str, int]:
        return {"hard_bounces": self.hard_bounces, "complaints": self.complaints}

    @classmethod
    def from_json(cls, d: dict[str, int]) -> FeedbackCounts:
        return cls(**d)


@dataclass(slots=True)
class QueueSummary:
    """GET /queue/summary: every queue with its counts, and the engine's counters."""
    scheduled: dict[str, ScheduledRow]     # scheduled queue name -> row
    ready: dict[str, ReadyRow]             # ready queue name ("source->site") -> row
    connections: int                       # outbound connections open, all dispatchers
    wheel: int                             # messages waiting in the timer wheel
    inserts: dict[InsertReason, int]       # scheduled-queue insertions since start, by reason
    outcomes: OutcomeCounts                # recipients by outcome since start
    # hard bounces and complaints per "source|site" (the recipient's domain when its site is
    # not in the DNS cache; source "" for out-of-band bounces)
    feedback: dict[str, FeedbackCounts]

    @property
    def queued(self) -> int:
        """Messages in all scheduled queues (`mta queue count`)."""
        return sum(row.count for row in self.scheduled.values())

    def to_json(self) -> dict[str, Any]:
        return {"scheduled": {n: r.to_json() for n, r in self.scheduled.items()},
                "ready": {n: r.to_json() for n, r in self.ready.items()},
                "connections": self.connections, "wheel": self.wheel,
                "inserts": {r.value: n for r, n in self.inserts.items()},
                "outcomes": self.outcomes.to_json(),
                "feedback": {k: c.to_json() for k, c in self.feedback.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QueueSummary:
        return cls({n: ScheduledRow.from_json(r) for n, r in d["scheduled"].items()},
                   {n: ReadyRow.from_json(r) for n, r in d["ready"].items()},
                   d["connections"], d["wheel"],
                   {InsertReason(r): n for r, n in d["inserts"].items()},
                   OutcomeCounts.from_json(d["outcomes"]),
                   {k: FeedbackCounts.from_json(c) for k, c in d["feedback"].items()})


@dataclass(slots=True)
class RecipientRow:
    """One recipient of a queued message, as `mta queue inspect` shows it."""
    index: int                       # position in the envelope
    address: str
    # pending (waiting: see `where`), in_flight (an attempt is running), delivered,
    # bounced, done (finished; the outcome is in the logs)
    state: str
    where: str | None                # pending: scheduled, ready, backlog, held, resolving
    queue: str | None                # its scheduled queue (pending only)
    attempts: int | None             # attempts that failed temporarily (pending only)
    next_retry: float | None         # Unix time of the next attempt; None: due now
    last_reply: str | None           # the last reply of a deferred attempt, when known

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "address": self.address, "state": self.state,
                "where": self.where, "queue": self.queue, "attempts": self.attempts,
                "next_retry": self.next_retry, "last_reply": self.last_reply}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecipientRow:
        return cls(d["index"], d["address"], d["state"], d["where"], d["queue"],
                   d["attempts"], d["next_retry"], d["last_reply"])


@dataclass(slots=True)
class MessageView:
    """GET /queue/messages/<id>: one queued message's envelope, header and recipients."""
    id: str                          # spool id, text form
    envelope: Envelope               # as stored
    size: int                        # bytes stored (our Received header plus the content)
    headers: str                     # the header block (or its first 4 KiB), decoded leniently
    recipients: list[RecipientRow]   # every recipient's state (issue 13)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "envelope": self.envelope.view(), "size": self.size,
                "headers": self.headers, "recipients": [r.to_json() for r in self.recipients]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MessageView:
        return cls(d["id"], Envelope.from_json(orjson.dumps(d["envelope"])), d["size"],
                   d["headers"], [RecipientRow.from_json(r) for r in d["recipients"]])


AGE_BUCKETS = (5, 10, 20, 40, 80, 160)   # minutes: 0-5m, 5-10m, ... 80-160m, 160m+


def age_labels() -> list[str]:
    edges = (0,) + AGE_BUCKETS
    return [f"{a}-{b}m" for a, b in zip(edges, edges[1:])] + [f"{AGE_BUCKETS[-1]}m+"]


@dataclass(slots=True)
class AgeTable:
    """GET /queue/ages/<by>: queued entries by age, like Postfix's qshape, per scheduled
    queue or per recipient domain. Age: since the message was received."""
    by: str                          # "queue" or "domain"
    buckets: list[str]               # column labels (age_labels())
    rows: dict[str, list[int]]       # name -> count per bucket
    total: list[int]                 # per bucket, all rows

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "buckets": self.buckets, "rows": self.rows, "total": self.total}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgeTable:
        return cls(d["by"], list(d["buckets"]), {k: list(v) for k, v in d["rows"].items()},
                   list(d["total"]))


@dataclass(slots=True)
class ListedMessage:
    """One row of `mta queue ls`."""
    id: str
    where: str                       # scheduled, ready, backlog, held, resolving
    rcpts: int                       # recipients of this entry still pending
    attempts: int
    next_retry: float | None         # Unix time; None: due now
    age: float                       # seconds since it was received

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "where": self.where, "rcpts": self.rcpts,
                "attempts": self.attempts, "next_retry": self.next_retry, "age": self.age}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ListedMessage:
        return cls(d["id"], d["where"], d["rcpts"], d["attempts"], d["next_retry"], d["age"])


@dataclass(slots=True)
class QueueListing:
    """GET /queue/list/<queue>?limit=N&after=ID: a page of a scheduled queue's messages,
    in id (arrival) order; `next` is the cursor for the following page (None: last)."""
    queue: str
    messages: list[ListedMessage]
    next: str | None

    def to_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "messages": [m.to_json() for m in self.messages],
                "next": self.next}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QueueListing:
        return cls(d["queue"], [ListedMessage.from_json(m) for m in d["messages"]], d["next"])


@dataclass(slots=True)
class ShapingRow:
    """GET /shaping: one (egress source, site) with the limits in force and its live state."""
    source: str                      # egress source name
    site: str                        # site name (the destination's MX set)
    matched: list[str]               # shaping rules that matched, in the order applied
    connections: int                 # connections open now
    peak_connections: int            # most connections open at once since start
    connection_limit: int            # connections allowed for this (source, site)
    site_connections: int            # connections open to the site from every source
    site_connection_limit: int | None   # the site's own limit across sources; None: none
    max_message_rate: str | None     # e.g. "100/s"; None: unlimited
    max_connection_rate: str | None  # e.g. "10/s"; None: unlimited
    max_deliveries_per_connection: int   # messages per connection before it closes
    tls: str                         # TLS policy in force
    ready: int                       # messages in its ready queue
    sent: int                        # messages sent since start, whatever the reply
    backoffs: int                    # times it backed off after a site-scoped failure
    hard_bounces: int                # hard bounces counted against it
    complaints: int                  # complaints counted against it
    paused_until: float | None       # wall time its pause ends; None: not paused

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "site": self.site, "matched": self.matched,
                "connections": self.connections, "peak_connections": self.peak_connections,
                "connection_limit": self.connection_limit,
                "site_connections": self.site_connections,
                "site_connection_limit": self.site_connection_limit,
                "max_message_rate": self.max_message_rate,
                "max_connection_rate": self.max_connection_rate,
                "max_deliveries_per_connection": self.max_deliveries_per_connection,
                "tls": self.tls, "ready": self.ready, "sent": self.sent,
                "backoffs": self.backoffs, "hard_bounces": self.hard_bounces,
                "complaints": self.complaints, "paused_until": self.paused_until}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShapingRow:
        return cls(d["source"], d["site"], list(d["matched"]), d["connections"],
                   d["peak_connections"], d["connection_limit"], d["site_connections"],
                   d["site_connection_limit"], d["max_message_rate"], d["max_connection_rate"],
                   d["max_deliveries_per_connection"], d["tls"], d["ready"], d["sent"],
                   d["backoffs"], d["hard_bounces"], d["complaints"], d["paused_until"])


@dataclass(slots=True)
class AdaptiveRow:
    """GET /adaptive: one adaptive delivery action in force (mta/egress/adaptive.py)."""

    rule: str                        # automation rule name, or "rate:bounce" & co.
    action: str                      # suspend, suspend_source, suspend_tenant, ..., set
    source: str
    provider: str                    # shaping provider, or the site (no provider matched)
    target: str | None               # the tenant or campaign held
    value: Any                       # set: the shaping values in force; else the target
    until: float                     # wall time it ends (set: its next step back)
    left: float                      # seconds until then
    step: int                        # set: steps back taken so far
    steps: int                       # set: steps back before the configured values
    reason: str                      # the reply or the rate that triggered it

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "action": self.action, "source": self.source,
                "provider": self.provider, "target": self.target, "value": self.value,
                "until": self.until, "left": self.left, "step": self.step,
                "steps": self.steps, "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AdaptiveRow:
        return cls(d["rule"], d["action"], d["source"], d["provider"], d["target"],
                   d["value"], d["until"], d["left"], d["step"], d["steps"], d["reason"])


def adaptive_rows(engine: DeliveryEngine) -> list[AdaptiveRow]:
    """Adaptive actions in force, soonest end first."""
    return [AdaptiveRow.from_json(v) for v in engine.adaptive.adaptive.view()]


def queue_summary(engine: DeliveryEngine) -> QueueSummary:
    """The summary of the engine's queues as they are now."""
    now = engine.scheduler.clock()
    scheduled = {}
    for q in engine.scheduler.queues.values():
        suspended = q.suspended_until > now
        scheduled[q.name] = ScheduledRow(
            q.count, q.site.name if q.site else None, q.klass, q.pool, len(q.backlog),
            len(q.held or ()), suspended, q.suspended_until if suspended else None)
    counts = engine.feedback.counts if engine.feedback is not None else {}
    return QueueSummary(
        scheduled,
        {d.ready.name: ReadyRow(len(d.ready), d.active, d.sent, d.ready.per_queue())
         for d in engine.dispatchers.values()},
        engine.budget.used, engine.scheduler.wheel.count, dict(engine.scheduler.inserts),
        OutcomeCounts(**engine.outcomes.counters),
        {f"{src}|{site}": FeedbackCounts(**c) for (src, site), c in counts.items()})


@dataclass(slots=True)
class WarmupClassRow:
    """A warming source at one provider class: its caps now and today's judgement."""
    klass: str                   # major, small or default ("class" in JSON)
    step: int                    # the schedule's day the cap is at (1: the first)
    day_cap: int | None          # messages a day to each provider of the class; None: no cap
    hour_cap: int | None         # ... in any one warm-up hour
    tried: int                   # today: recipients with a reply from the class's providers
    bounced: int                 # ... of those 5xx
    deferred: int                # ... of those 4xx with a 4.7.x status (about the sender)
    complaints: int              # ... complaints received today
    may_grow: bool               # the cap grows tomorrow if today ended now
    why_not: str | None          # why it would not (None: it grows, or no cap left)
    last: str | None             # the last day's judgement ("grown: ...", "held: ...")

    def to_json(self) -> dict[str, Any]:
        return {"class": self.klass, "step": self.step, "day_cap": self.day_cap,
                "hour_cap": self.hour_cap, "tried": self.tried, "bounced": self.bounced,
                "deferred": self.deferred, "complaints": self.complaints,
                "may_grow": self.may_grow, "why_not": self.why_not, "last": self.last}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WarmupClassRow:
        return cls(d["class"], d["step"], d["day_cap"], d["hour_cap"], d["tried"],
                   d["bounced"], d["deferred"], d["complaints"], d["may_grow"], d["why_not"],
                   d["last"])


@dataclass(slots=True)
class WarmupUse:
    """What a warming source was given today for one provider (or a site of its own)."""
    target: str                  # provider name, or "site:" + site name
    klass: str                   # its class ("class" in JSON)
    day: int                     # messages today
    hour: int                    # messages this warm-up hour

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "class": self.klass, "day": self.day, "hour": self.hour}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WarmupUse:
        return cls(d["target"], d["class"], d["day"], d["hour"])


@dataclass(slots=True)
class WarmupRow:
    """GET /warmup: one warming source (mta/egress/warmup.py)."""
    source: str                  # egress source name
    start: float                 # wall time its warm-up day 1 began
    day: int                     # its warm-up day now
    classes: list[WarmupClassRow]
    use: list[WarmupUse]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "start": self.start, "day": self.day,
                "classes": [c.to_json() for c in self.classes],
                "use": [u.to_json() for u in self.use]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WarmupRow:
        return cls(d["source"], d["start"], d["day"],
                   [WarmupClassRow.from_json(c) for c in d["classes"]],
                   [WarmupUse.from_json(u) for u in d["use"]])


def warmup_rows(engine: DeliveryEngine) -> list[WarmupRow]:
    """Each warming source: day, caps per class, today's use and judgement."""
    return [WarmupRow.from_json(v) for v in engine.warmup.view()]


def shaping_rows(engine: DeliveryEngine) -> list[ShapingRow]:
    """Live state per (source, site): limits in force, connections, throughput, pauses."""
    now = engine.clock()
    counts = engine.feedback.counts if engine.feedback is not None else {}
    rows = []
    for (source, site), d in engine.dispatchers.items():
        lim = d.limits
        fb = counts.get((source, site)) or {}
        rows.append(ShapingRow(
            source, site, list(lim.matched), d.active, d.peak, lim.connection_limit,
            d.site_state.active, d.site_state.connection_limit,
            str(lim.max_message_rate) if lim.max_message_rate else None,
            str(lim.max_connection_rate) if lim.max_connection_rate else None,
            lim.max_deliveries_per_connection, lim.tls, len(d.ready), d.sent, d.backoffs,
            fb.get("hard_bounces", 0), fb.get("complaints", 0), d.paused_until(now) or None))
    return rows


def entries(engine: DeliveryEngine):
    """(entry, where) for every queued entry the operator can reach: the scheduler's
    (scheduled, backlog, held, resolving) and the ready queues' ("ready"); not those in
    flight. O(queued): admin requests only."""
    yield from engine.scheduler.waiting()
    for d in engine.dispatchers.values():
        for msg in d.ready.entries():
            yield msg, "ready"


def message_view(engine: DeliveryEngine, text_id: str) -> MessageView | None:
    """One queued message as stored; None when the spool does not hold it."""
    msg_id = id_from_text(text_id)
    if msg_id not in engine.spool:
        return None
    env, content = engine.spool.read(msg_id)
    end = content.find(b"\r\n\r\n")
    head = content[:end + 2 if end >= 0 else _HEAD_LIMIT]
    return MessageView(text_id, env, len(content), bytes(head).decode("utf-8", "replace"),
                       _recipient_rows(engine, msg_id, env))


def _recipient_rows(engine: DeliveryEngine, msg_id: bytes, env: Envelope) -> list[RecipientRow]:
    found = [(m, where) for m, where in entries(engine) if m.id == msg_id]
    states = {s.domain: s for s in engine.spool.schedules(msg_id)}
    finished: dict[int, int] = {}
    for s in states.values():
        finished.update(s.finished)
    pending = {}
    for m, where in found:
        for i in m.rcpts:
            pending[i] = (m, where)
    rows = []
    for i, r in enumerate(env.recipients):
        if i in pending:
            m, where = pending[i]
            st = states.get(m.queue.domain)
            rows.append(RecipientRow(i, r.address, "pending", where, m.queue.name, m.attempts,
                                     m.due or None, st.reply if st is not None else None))
            continue
        if i in finished:
            state = {rec.DELIVERED: "delivered", rec.BOUNCED: "bounced"}.get(finished[i], "done")
        else:
            state = "done" if found else "in_flight"
        st = states.get(r.domain)
        rows.append(RecipientRow(i, r.address, state, None, None,
                                 st.attempts if st is not None else None, None,
                                 st.reply if st is not None else None))
    return rows


def age_table(engine: DeliveryEngine, by: str = "queue") -> AgeTable:
    """Queued entries per scheduled queue (or recipient domain) and age bucket."""
    if by not in ("queue", "domain"):
        raise ValueError(f"ages by {by!r}: by queue or by domain")
    now = engine.scheduler.clock()
    edges = [m * 60 for m in AGE_BUCKETS]
    rows: dict[str, list[int]] = {}
    total = [0] * (len(edges) + 1)
    for m, _ in entries(engine):
        age = now - m.received
        k = next((n for n, e in enumerate(edges) if age < e), len(edges))
        name = m.queue.name if by == "queue" else m.queue.domain
        row = rows.get(name)
        if row is None:
            row = rows[name] = [0] * (len(edges) + 1)
        row[k] += 1
        total[k] += 1
    return AgeTable(by, age_labels(), rows, total)


_MAX_PAGE = 10_000


def queue_listing(engine: DeliveryEngine, name: str, limit: int = 100,
                  after: str = "") -> QueueListing | None:
    """A page of scheduled queue `name`'s entries by id; None when there is no such queue."""
    if name not in engine.scheduler.queues:
        return None
    if not 0 < limit <= _MAX_PAGE:
        raise ValueError(f"limit must be 1..{_MAX_PAGE}")
    cursor = id_from_text(after) if after else b""
    now = engine.scheduler.clock()
    found = sorted(((m.id, m, where) for m, where in entries(engine)
                    if m.queue.name == name and m.id > cursor), key=lambda t: t[0])
    page = found[:limit]
    out = [ListedMessage(m.id_text, where, len(m.rcpts), m.attempts, m.due or None,
                         round(now - m.received, 3)) for _, m, where in page]
    more = len(found) > limit
    return QueueListing(name, out, page[-1][1].id_text if more and page else None)


def view_routes(engine: DeliveryEngine) -> dict[str, Callable[[str], Any]]:
    """The admin API's GET routes (AdminServer's path prefix -> handler of the rest).
    Starts watching the engine's outcomes for GET /live (LiveStats)."""
    stats = LiveStats(engine) if engine is not None else None   # None: listing the prefixes
    def message(text_id: str) -> dict[str, Any] | None:
        view = message_view(engine, text_id)
        return view.to_json() if view is not None else None

    def listing(rest: str) -> dict[str, Any] | None:
        path, _, query = rest.partition("?")
        args = urllib.parse.parse_qs(query)
        try:
            limit = int(args.get("limit", ["100"])[0])
        except ValueError:
            raise ValueError("limit must be a number") from None
        view = queue_listing(engine, urllib.parse.unquote(path), limit,
                             args.get("after", [""])[0])
        return view.to_json() if view is not None else None

    return {"/queue/summary": lambda _: queue_summary(engine).to_json(),
            "/queue/messages": message,
            "/queue/ages": lambda by: age_table(engine, by or "queue").to_json(),
            "/queue/list": listing,
            "/queue/holds": lambda _: [h.to_json() for h in engine.scheduler.holds],
            "/adaptive": lambda _: [row.to_json() for row in adaptive_rows(engine)],
            "/shaping": lambda _: [row.to_json() for row in shaping_rows(engine)],
            "/warmup": lambda _: [row.to_json() for row in warmup_rows(engine)],
            "/live": lambda _: live_view(engine, stats).to_json()}  # type: ignore[arg-type]


# --- the live view: `mta top` and the dashboard (GET /live) ----------------------------

LIVE_ERRORS = 50      # recent TransientFailure/Bounce replies kept for GET /live


@dataclass(slots=True)
class LiveRow:
    """One (source, site) pair: outcome counters since start and its state now."""
    source: str
    site: str
    provider: str          # the shaping provider that matched, else the site's name
    delivered: int         # recipients delivered since start (counters: rates come from
    deferred: int          # the difference of two snapshots)
    bounced: int
    connections: int       # open now
    ready: int             # messages in its ready queue
    scheduled: int         # messages in scheduled queues routed to the site (the site's, so
                           # the same number on every source's row of one site)
    paused_until: float | None   # the pair, its source or its site is suspended till then

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "site": self.site, "provider": self.provider,
                "delivered": self.delivered, "deferred": self.deferred,
                "bounced": self.bounced, "connections": self.connections,
                "ready": self.ready, "scheduled": self.scheduled,
                "paused_until": self.paused_until}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LiveRow:
        return cls(d["source"], d["site"], d["provider"], d["delivered"], d["deferred"],
                   d["bounced"], d["connections"], d["ready"], d["scheduled"],
                   d["paused_until"])


@dataclass(slots=True)
class LiveHold:
    """A suspension or throttle in force: an operator's (queue, site, source, pair) or an
    adaptive delivery action ("adaptive:<action>")."""
    kind: str
    name: str              # queue, site or source name (adaptive: the source)
    site: str | None       # pair: the site; adaptive: the provider
    until: float           # wall time it ends
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "site": self.site, "until": self.until,
                "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LiveHold:
        return cls(d["kind"], d["name"], d["site"], d["until"], d["reason"])


@dataclass(slots=True)
class LiveError:
    """One recent deferral or bounce (the last reply of an attempt that got one)."""
    at: float              # wall time
    kind: str              # "deferred" or "bounced"
    source: str
    site: str
    code: int
    text: str              # status and text, at most 200 characters

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "source": self.source, "site": self.site,
                "code": self.code, "text": self.text}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LiveError:
        return cls(d["at"], d["kind"], d["source"], d["site"], d["code"], d["text"])


@dataclass(slots=True)
class LiveView:
    """GET /live: one compact snapshot for `mta top` and the dashboard, which poll it and
    turn successive counters into rates."""
    at: float                    # wall time of the snapshot
    outcomes: OutcomeCounts      # totals since start
    received: int                # queue entries from reception since start
    scheduled: int               # messages in scheduled queues (incl. the timer wheel)
    ready: int                   # messages in ready queues
    in_flight: int               # the global budget in use
    connections: int             # open now
    rows: list[LiveRow]
    holds: list[LiveHold]
    errors: list[LiveError]      # newest last, at most LIVE_ERRORS

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "outcomes": self.outcomes.to_json(), "received": self.received,
                "scheduled": self.scheduled, "ready": self.ready,
                "in_flight": self.in_flight, "connections": self.connections,
                "rows": [r.to_json() for r in self.rows],
                "holds": [h.to_json() for h in self.holds],
                "errors": [e.to_json() for e in self.errors]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LiveView:
        return cls(d["at"], OutcomeCounts.from_json(d["outcomes"]), d["received"],
                   d["scheduled"], d["ready"], d["in_flight"], d["connections"],
                   [LiveRow.from_json(r) for r in d["rows"]],
                   [LiveHold.from_json(h) for h in d["holds"]],
                   [LiveError.from_json(e) for e in d["errors"]])


class LiveStats:
    """The ring of recent deferral and bounce replies for GET /live, kept by watching the
    engine's outcomes (an observer: one pass over the result's replies). The counters per
    (source, site) are the engine's own (`Outcomes.by_pair`, also behind /metrics)."""

    def __init__(self, engine: DeliveryEngine, errors: int = LIVE_ERRORS):
        import collections
        self.engine = engine
        self.errors: collections.deque[LiveError] = collections.deque(maxlen=errors)
        engine.outcomes.observers.append(self.observe)

    def observe(self, result: Any) -> None:
        last = None
        for _, reply in result.replies:
            if reply.code >= 300:
                last = reply
        if last is not None:
            at = result.at
            text = f"{last.status} {last.text}" if last.status else last.text
            self.errors.append(LiveError(round(time.time(), 3),
                                         "bounced" if last.code >= 500 else "deferred",
                                         at.source, at.site, last.code, text[:200]))


def pair_counts(engine: DeliveryEngine, source: str, site: str) -> tuple[int, int, int]:
    """(delivered, deferred, bounced) of one (source, site) since start, summed over its
    queue classes and pools (`Outcomes.by_pair` rows are [delivered, bounced, deferred])."""
    delivered = bounced = deferred = 0
    for pools in engine.outcomes.by_pair.get(source, {}).get(site, {}).values():
        for row in pools.values():
            delivered += row[0]
            bounced += row[1]
            deferred += row[2]
    return delivered, deferred, bounced


def live_view(engine: DeliveryEngine, stats: LiveStats) -> LiveView:
    now = engine.clock()
    per_site: dict[str, int] = {}
    holds = []
    for q in engine.scheduler.queues.values():
        if q.site is not None:
            per_site[q.site.name] = per_site.get(q.site.name, 0) + q.count
        if q.suspended_until > now:
            holds.append(LiveHold("queue", q.name, None, q.suspended_until, "suspended"))
    for name, st in engine.sites.items():
        if st.suspended_until > now:
            holds.append(LiveHold("site", name, None, st.suspended_until, "suspended"))
    rows, sources, ready, conns = [], {}, 0, 0
    for (source, site), d in engine.dispatchers.items():
        sources[source] = d.source
        if d.suspended_until > now:
            holds.append(LiveHold("pair", source, site, d.suspended_until, "suspended"))
        provider = next((m[9:] for m in d.limits.matched if m.startswith("provider:")
                         and "/" not in m), site)
        c = pair_counts(engine, source, site)
        n = len(d.ready)
        ready += n
        conns += d.active
        rows.append(LiveRow(source, site, provider, c[0], c[1], c[2], d.active, n,
                            per_site.get(site, 0), d.paused_until(now) or None))
    for name, src in sources.items():
        if src.suspended_until > now:
            holds.append(LiveHold("source", name, None, src.suspended_until, "suspended"))
    for a in adaptive_rows(engine):
        holds.append(LiveHold("adaptive:" + a.action, a.source, a.provider, a.until,
                              f"{a.rule}: {a.reason}"[:200]))
    return LiveView(round(time.time(), 3), OutcomeCounts(**engine.outcomes.counters),
                    engine.scheduler.inserts[InsertReason.RECEIVED],
                    sum(q.count for q in engine.scheduler.queues.values()), ready,
                    engine.budget.used, conns, rows, holds, list(stats.errors))


DRAIN_ERRORS_KEPT = 20   # errors a drain's progress keeps


@dataclass
class DrainProgress:
    """What a drain did so far (GET /drain, and the CLI's summary)."""
    state: str = "idle"          # idle, stopping, moving, done, failed
    target: str = ""
    total: int = 0               # messages to move
    stored: int = 0              # the target stored them
    duplicate: int = 0           # the target had them already (an earlier run)
    left: int = 0                # not moved: still queued here (or in the dead spool)
    in_flight: int = 0           # live drain: deliveries that did not end in the grace
    started: float = 0.0
    finished: float = 0.0
    errors: list[str] = field(default_factory=list)
    moved: int = field(default=0, init=False)   # stored + duplicate

    def __post_init__(self) -> None:
        self.moved = self.stored + self.duplicate

    def to_json(self) -> dict:
        return asdict(self)

    def error(self, text: str) -> None:
        logging.getLogger("mta.drain").warning("drain: %s", text)
        self.errors.append(text)
        del self.errors[:-DRAIN_ERRORS_KEPT]
