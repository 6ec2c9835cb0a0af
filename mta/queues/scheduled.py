"""Scheduled queues (one per `campaign:tenant@domain`) and the Scheduler that owns them.

Where it sits: Reception hands each durable message to `submit()`, which
splits it by recipient domain into QueuedMessages; the Scheduler moves them
to the ready queue of their (egress source, site) when due, and takes them
back with `retry()` after a temporary failure. All scheduled queues share one
TimerWheel. Every insertion carries an InsertReason (kept on the log record).
Site resolution (DNS) happens per scheduled queue, not per message: the
queue caches its site until the DNS TTL runs out, and messages that arrive
while a lookup is in flight wait on it.
Restarts (issue 13): while recovery submits what the spool found, `saved` holds
the spool's SCHEDULE states (id -> {domain -> (state, location)}); an entry with a
state gets its attempts and flags back and waits in the wheel until its due time
instead of going out at once.
Holds (issue 13): `holds` is a list of Selectors (mta/queues/select.py) set by
the operator; a message that comes due while a hold matches it waits in its
queue's `held` deque (as during a suspension) until `release()`. Operator scans
(`waiting()`, `flush()`, `take()`) walk the timer wheel and the queues' deques:
O(queued), admin requests only, never on the delivery path.
Diagnostics: DNS failures become per-message outcomes (bounce or retry) via
the `on_route_failure` callback; nothing here raises to its callers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from mta.model.envelope import Envelope
from mta.model.queue_name import format_name
from mta.model.queued import InsertReason, QueuedMessage
from mta.queues.select import Selector
from mta.queues.timerwheel import TimerWheel

if TYPE_CHECKING:
    from mta.egress.sites import Site
    from mta.queues.ready import ReadyQueue

log = logging.getLogger("mta.scheduler")


_NAME_CACHE = 100_000   # queue names remembered by their parts (cleared when full)
_SINGLE = (0,)   # the recipient tuple of most messages, shared (RAM per queued message)


class ScheduledQueue:
    __slots__ = ("name", "domain", "tenant", "campaign", "klass", "pool", "count", "site",
                 "site_expires", "resolving", "suspended_until", "backlog", "held", "resume")

    def __init__(self, name: str, domain: str, tenant: str, campaign: str,
                 klass: str = "bulk", pool: str = "default"):
        self.name = name                  # [class/]campaign:tenant@domain[#pool]
        self.domain = domain              # recipient domain (lower case)
        self.tenant = tenant
        self.campaign = campaign
        self.klass = klass                # queue class (its lane at every ready queue)
        self.pool = pool                  # egress pool name (the operator may rebind it)
        self.count = 0                    # messages of this queue anywhere (waiting, ready, in flight)
        self.site: Site | None = None     # cached route: the site
        self.site_expires = 0.0           # monotonic time the cached route goes stale
        self.resolving: list[QueuedMessage] | None = None  # messages waiting on a lookup
        self.suspended_until = 0.0        # wall time; 0 = running
        self.backlog: deque[QueuedMessage] = deque()  # due, but the ready queue is full
        self.held: deque[QueuedMessage] | None = None  # due while suspended by the operator
        self.resume: asyncio.TimerHandle | None = None  # ends the suspension


# (queue) -> site; raises the resolver's ResolveError
RouteFn = Callable[[ScheduledQueue], Awaitable["Site"]]


class Outlet(Protocol):
    """Where due messages go: one ready queue and the one who serves it (delivery's
    Dispatcher implements it). The scheduler only offers messages and says so."""

    @property
    def ready(self) -> ReadyQueue: ...   # the (source, site) ready queue
    def wake(self) -> None: ...          # messages arrived: use or open a connection


# (queue, site) -> its outlet now (the delivery side picks the egress source)
OutletFn = Callable[[ScheduledQueue, "Site"], Outlet]
# envelope -> (queue class, pool name)
SelectFn = Callable[[Envelope], tuple[str, str]]


def _no_selection(envelope: Envelope) -> tuple[str, str]:
    return "bulk", "default"


class Scheduler:
    def __init__(self, *, route: RouteFn, outlet_for: OutletFn,
                 on_route_failure: Callable[[QueuedMessage, Exception], None],
                 select: SelectFn = _no_selection, defaults: tuple[str, str] = ("bulk", "default"),
                 tick: float = 1.0, hold: bool = False,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.hold = hold                  # delivery.hold: queue everything, route nothing
        self.clock = clock                # wall time: due times, suspensions
        self.monotonic = monotonic        # the loop's clock: how long a route stays cached
        self.route = route
        self.select = select              # egress rules: class and pool of a message
        self.defaults = defaults          # (class, pool) left out of queue names
        self.outlet_for = outlet_for
        self.on_route_failure = on_route_failure
        self.queues: dict[str, ScheduledQueue] = {}
        self._names: dict[tuple, str] = {}   # (campaign, tenant, domain, class, pool) -> name
        # insertions by reason since start (operator view: why mail is waiting)
        self.inserts: dict[InsertReason, int] = dict.fromkeys(InsertReason, 0)
        self.wheel = TimerWheel(clock(), tick=tick)
        self.tick = tick
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # recovery only: id -> {domain -> (schedule state, its location)} (see the docstring)
        self.saved: dict[bytes, dict[str, tuple]] | None = None
        self.holds: list[Selector] = []   # operator holds: matching messages never go out

    # -- life cycle -----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self.tick, self._on_tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        self.wheel.advance(self.clock(), self._on_due)
        assert self._loop is not None
        self._timer = self._loop.call_later(self.tick, self._on_tick)

    # -- insertion ----------------------------------------------------------------------

    def queue_for(self, campaign: str | None, tenant: str | None, domain: str,
                  klass: str | None = None, pool: str | None = None) -> ScheduledQueue:
        klass, pool = klass or self.defaults[0], pool or self.defaults[1]
        key = (campaign, tenant, domain, klass, pool)
        name = self._names.get(key)
        if name is None:     # formatting cleans tenant/campaign char by char: once per key
            if len(self._names) >= _NAME_CACHE:
                self._names.clear()
            name = self._names[key] = format_name(
                campaign, tenant, domain, "" if klass == self.defaults[0] else klass,
                "" if pool == self.defaults[1] else pool)
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = ScheduledQueue(name, domain.lower(), tenant or "",
                                                   campaign or "", klass, pool)
        return q

    def submit(self, msg_id: bytes, envelope: Envelope, done: set[int] | frozenset = frozenset(),
               reason: InsertReason = InsertReason.RECEIVED) -> list[QueuedMessage]:
        """Queue a durable message: one QueuedMessage per recipient domain."""
        by_domain: dict[str, list[int]] = {}
        for i, rcpt in enumerate(envelope.recipients):
            if i not in done:
                by_domain.setdefault(rcpt.domain or "localhost", []).append(i)
        out = []
        klass, pool = self.select(envelope)
        saved = self.saved.get(msg_id) if self.saved else None
        for domain, idxs in by_domain.items():
            q = self.queue_for(envelope.campaign, envelope.tenant, domain, klass, pool)
            msg = QueuedMessage(msg_id, q, _SINGLE if idxs == [0] else tuple(idxs))
            q.count += 1
            out.append(msg)
            state = saved.get(q.domain) if saved else None
            if state is not None:
                state = state[0]
                msg.attempts = state.attempts
                msg.flags = state.flags
                if state.due > self.clock():   # not before its time, as before the restart
                    self.schedule(msg, state.due, reason)
                    continue
            self.make_ready(msg, reason)
        return out

    def schedule(self, msg: QueuedMessage, due: float, reason: InsertReason) -> None:
        self.inserts[reason] += 1
        msg.due = due
        self.wheel.insert(due, msg)

    def finished(self, msg: QueuedMessage) -> None:
        """The entry left the queue for good (delivered, bounced, expired)."""
        msg.queue.count -= 1
        q = msg.queue
        if q.count <= 0 and q.resolving is None and not q.backlog and not q.held \
                and q.resume is None:
            self.queues.pop(q.name, None)

    # -- due -> ready ---------------------------------------------------------------------

    def _on_due(self, msg: QueuedMessage) -> None:
        if msg.due == 0.0 or msg.due > self.clock() + self.tick:
            return  # stale wheel entry: the message was moved since (lazy cancel)
        self.make_ready(msg, InsertReason.TRANSIENT_FAILURE)

    def make_ready(self, msg: QueuedMessage, reason: InsertReason) -> None:
        self.inserts[reason] += 1
        q = msg.queue
        if self.hold:      # no DNS, no connections: the message waits in its queue
            msg.due = 0.0
            q.backlog.append(msg)
            return
        if (q.suspended_until and q.suspended_until > self.clock()) or \
                (self.holds and self.is_held(msg)):
            self.hold_back(msg)
            return
        msg.due = 0.0
        if q.site is not None and q.site_expires > self.monotonic():
            self._to_ready(msg, q.site)
            return
        if q.resolving is not None:
            q.resolving.append(msg)
            return
        q.resolving = [msg]
        assert self._loop is not None
        self._loop.create_task(self._resolve(q))

    async def _resolve(self, q: ScheduledQueue) -> None:
        try:
            site = await self.route(q)
        except Exception as exc:  # ResolveError, or a bug in a routing hook
            waiting, q.resolving = q.resolving or [], None
            if not isinstance(exc, LookupError) and not hasattr(exc, "permanent"):
                log.exception("routing %s failed", q.name)
            for msg in waiting:
                self.on_route_failure(msg, exc)
            return
        q.site = site
        # Site.expires is loop time; the cache check uses monotonic time
        ttl = site.expires - asyncio.get_running_loop().time() if site.expires else 60.0
        q.site_expires = self.monotonic() + max(1.0, ttl)
        waiting, q.resolving = q.resolving or [], None
        for msg in waiting:
            if self.holds and self.is_held(msg):   # a hold by site matches only now
                self.hold_back(msg)
            else:
                self._to_ready(msg, site)

    def _to_ready(self, msg: QueuedMessage, site: Site) -> None:
        outlet = self.outlet_for(msg.queue, site)
        if outlet.ready.offer(msg):
            outlet.wake()
        else:   # parked in the queue's backlog; the ready queue pulls it (ReadyQueue.offer)
            self.inserts[InsertReason.READY_FULL] += 1

    # -- operator controls -----------------------------------------------------------------

    def hold_back(self, msg: QueuedMessage) -> None:
        """A due message of a suspended queue: it waits in the queue until resume."""
        self.inserts[InsertReason.SUSPENDED] += 1
        msg.due = 0.0
        q = msg.queue
        if q.held is None:
            q.held = deque()
        q.held.append(msg)

    def suspend(self, q: ScheduledQueue, seconds: float) -> None:
        """Stop handing out `q`'s messages for `seconds` (resume() ends it early)."""
        q.suspended_until = self.clock() + seconds
        if q.resume is not None:
            q.resume.cancel()
        assert self._loop is not None
        q.resume = self._loop.call_later(seconds, self.resume, q)

    def is_held(self, msg: QueuedMessage) -> bool:
        """Whether an operator hold matches `msg`."""
        return any(sel.matches(msg) for sel in self.holds)

    def add_hold(self, sel: Selector) -> None:
        """Hold what `sel` matches from now on (those in ready queues: see control)."""
        if sel not in self.holds:
            self.holds.append(sel)
        for q in self.queues.values():   # due and waiting for room: held in place
            if q.backlog and sel.matches_queue(q):
                keep = deque()
                for msg in q.backlog:
                    if sel.matches(msg):
                        self.hold_back(msg)
                    else:
                        keep.append(msg)
                q.backlog = keep

    def release(self, sel: Selector) -> int:
        """Drop the hold `sel` (an equal selector); what no other hold or suspension keeps
        goes out. Returns how many messages were released."""
        if sel not in self.holds:
            return 0
        self.holds.remove(sel)
        now = self.clock()
        released = 0
        for q in list(self.queues.values()):
            if not q.held or (q.suspended_until and q.suspended_until > now):
                continue
            held, q.held = q.held, None
            for msg in held:
                if not self.is_held(msg):
                    released += 1
                self.make_ready(msg, InsertReason.RECEIVED if msg.attempts == 0
                                else InsertReason.TRANSIENT_FAILURE)
        return released

    def waiting(self):
        """(entry, where) for every entry the scheduler holds: "scheduled" (in the timer
        wheel), "backlog", "held", "resolving". Not those in ready queues or in flight."""
        seen = set()
        for msg in self.wheel.items():
            if msg.due > 0.0 and id(msg) not in seen:   # due 0: a stale wheel entry
                seen.add(id(msg))
                yield msg, "scheduled"
        for q in list(self.queues.values()):
            for msg in q.backlog:
                yield msg, "backlog"
            for msg in q.held or ():
                yield msg, "held"
            for msg in q.resolving or ():
                yield msg, "resolving"

    def flush(self, sel: Selector) -> int:
        """Deferred entries `sel` matches are due now (holds and suspensions still apply);
        returns how many."""
        due = [msg for msg, where in self.waiting() if where == "scheduled" and sel.matches(msg)]
        for msg in due:
            self.make_ready(msg, InsertReason.TRANSIENT_FAILURE)
        return len(due)

    def take(self, sel: Selector) -> list[QueuedMessage]:
        """Remove the entries `sel` matches from the wheel and the queues' deques (for a
        delete or a bounce); the caller finishes them (`finished`). In ready queues and
        in flight they are not seen here."""
        taken = []
        seen = set()
        for msg in self.wheel.items():
            if msg.due > 0.0 and id(msg) not in seen and sel.matches(msg):
                seen.add(id(msg))
                msg.due = 0.0          # its wheel entry is stale from now on
                taken.append(msg)
        for q in list(self.queues.values()):
            if not sel.matches_queue(q):
                continue
            for attr in ("backlog", "held", "resolving"):
                entries = getattr(q, attr)
                if not entries:
                    continue
                keep = [m for m in entries if not sel.matches(m)]
                taken.extend(m for m in entries if sel.matches(m))
                if len(keep) != len(entries):
                    if attr == "resolving":
                        q.resolving = keep
                    elif attr == "held":
                        q.held = deque(keep) or None
                    else:
                        q.backlog = deque(keep)
        return taken

    def resume(self, q: ScheduledQueue) -> None:
        q.suspended_until = 0.0
        if q.resume is not None:
            q.resume.cancel()
            q.resume = None
        held, q.held = q.held, None
        for msg in held or ():
            self.make_ready(msg, InsertReason.RECEIVED if msg.attempts == 0
                            else InsertReason.TRANSIENT_FAILURE)
