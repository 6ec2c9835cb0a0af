"""Scheduled queues (one per `campaign:tenant@domain`) and the Scheduler that owns them.

Where it sits: Reception hands each durable message to `submit()`, which
splits it by recipient domain into QueuedMessages; the Scheduler moves them
to the ready queue of their (egress source, site) when due, and takes them
back with `retry()` after a temporary failure. All scheduled queues share one
TimerWheel. Every insertion carries an InsertReason (kept on the log record).
Site resolution (DNS) happens per scheduled queue, not per message: the
queue caches its site until the DNS TTL runs out, and messages that arrive
while a lookup is in flight wait on it.
Diagnostics: DNS failures become per-message outcomes (bounce or retry) via
the `on_route_failure` callback; nothing here raises to its callers.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Awaitable, Callable

from mta.message import QueuedMessage
from mta.queue_name import format_name
from mta.queues.timerwheel import TimerWheel

if TYPE_CHECKING:
    from mta.delivery.dispatcher import Dispatcher
    from mta.egress.sites import Site

log = logging.getLogger("mta.scheduler")


_SINGLE = (0,)   # the recipient tuple of most messages, shared (RAM per queued message)


class InsertReason(str, enum.Enum):
    RECEIVED = "received"               # new message from reception
    RECOVERED = "recovered"             # found in the spool at start
    TRANSIENT_FAILURE = "transient"     # a 4xx or a connection problem; backing off
    READY_FULL = "ready_full"           # its ready queue was full: waits in the queue's backlog
    SUSPENDED = "suspended"             # its queue is suspended by the operator


class ScheduledQueue:
    __slots__ = ("name", "domain", "tenant", "campaign", "count", "source", "site",
                 "site_expires", "resolving", "suspended_until", "backlog")

    def __init__(self, name: str, domain: str, tenant: str, campaign: str):
        self.name = name                  # campaign:tenant@domain
        self.domain = domain              # recipient domain (lower case)
        self.tenant = tenant
        self.campaign = campaign
        self.count = 0                    # messages of this queue anywhere (waiting, ready, in flight)
        self.source = ""                  # cached route: egress source name ...
        self.site: Site | None = None     # ... and site
        self.site_expires = 0.0           # monotonic time the cached route goes stale
        self.resolving: list[QueuedMessage] | None = None  # messages waiting on a lookup
        self.suspended_until = 0.0        # wall time; 0 = running
        self.backlog: deque[QueuedMessage] = deque()  # due, but the ready queue is full


# (queue) -> (egress source name, site); raises the resolver's ResolveError
RouteFn = Callable[[ScheduledQueue], Awaitable[tuple[str, "Site"]]]


class Scheduler:
    def __init__(self, *, route: RouteFn, dispatcher_for: Callable[[str, "Site"], "Dispatcher"],
                 on_route_failure: Callable[[QueuedMessage, Exception], None],
                 tick: float = 1.0, hold: bool = False):
        self.hold = hold                  # delivery.hold: queue everything, route nothing
        self.route = route
        self.dispatcher_for = dispatcher_for
        self.on_route_failure = on_route_failure
        self.queues: dict[str, ScheduledQueue] = {}
        # insertions by reason since start (operator view: why mail is waiting)
        self.inserts: dict[InsertReason, int] = dict.fromkeys(InsertReason, 0)
        self.wheel = TimerWheel(time.time(), tick=tick)
        self.tick = tick
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle -----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self.tick, self._on_tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        self.wheel.advance(time.time(), self._on_due)
        assert self._loop is not None
        self._timer = self._loop.call_later(self.tick, self._on_tick)

    # -- insertion ----------------------------------------------------------------------

    def queue_for(self, campaign: str | None, tenant: str | None, domain: str) -> ScheduledQueue:
        name = format_name(campaign, tenant, domain)
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = ScheduledQueue(name, domain.lower(), tenant or "", campaign or "")
        return q

    def submit(self, msg_id: bytes, envelope: dict, done: set[int] | frozenset = frozenset(),
               reason: InsertReason = InsertReason.RECEIVED) -> list[QueuedMessage]:
        """Queue a durable message: one QueuedMessage per recipient domain."""
        by_domain: dict[str, list[int]] = {}
        for i, rcpt in enumerate(envelope["rcpts"]):
            if i not in done:
                addr = rcpt[0]
                domain = addr.rpartition("@")[2].lower() or "localhost"
                by_domain.setdefault(domain, []).append(i)
        out = []
        for domain, idxs in by_domain.items():
            q = self.queue_for(envelope.get("campaign"), envelope.get("tenant"), domain)
            msg = QueuedMessage(msg_id, q, _SINGLE if idxs == [0] else tuple(idxs))
            q.count += 1
            out.append(msg)
            self.make_ready(msg, reason)
        return out

    def schedule(self, msg: QueuedMessage, due: float, reason: InsertReason) -> None:
        self.inserts[reason] += 1
        msg.due = due
        self.wheel.insert(due, msg)

    def finished(self, msg: QueuedMessage) -> None:
        """The entry left the queue for good (delivered, bounced, expired)."""
        msg.queue.count -= 1
        if msg.queue.count <= 0 and msg.queue.resolving is None and not msg.queue.backlog:
            self.queues.pop(msg.queue.name, None)

    # -- due -> ready ---------------------------------------------------------------------

    def _on_due(self, msg: QueuedMessage) -> None:
        if msg.due == 0.0 or msg.due > time.time() + self.tick:
            return  # stale wheel entry: the message was moved since (lazy cancel)
        self.make_ready(msg, InsertReason.TRANSIENT_FAILURE)

    def make_ready(self, msg: QueuedMessage, reason: InsertReason) -> None:
        self.inserts[reason] += 1
        q = msg.queue
        if self.hold:      # no DNS, no connections: the message waits in its queue
            msg.due = 0.0
            q.backlog.append(msg)
            return
        now = time.time()
        if q.suspended_until > now:
            self.schedule(msg, q.suspended_until, InsertReason.SUSPENDED)
            return
        msg.due = 0.0
        if q.site is not None and q.site_expires > time.monotonic():
            self._to_ready(msg, q.source, q.site)
            return
        if q.resolving is not None:
            q.resolving.append(msg)
            return
        q.resolving = [msg]
        assert self._loop is not None
        self._loop.create_task(self._resolve(q))

    async def _resolve(self, q: ScheduledQueue) -> None:
        try:
            source, site = await self.route(q)
        except Exception as exc:  # ResolveError, or a bug in a routing hook
            waiting, q.resolving = q.resolving or [], None
            if not isinstance(exc, LookupError) and not hasattr(exc, "permanent"):
                log.exception("routing %s failed", q.name)
            for msg in waiting:
                self.on_route_failure(msg, exc)
            return
        q.source, q.site = source, site
        # Site.expires is loop time; the cache check uses monotonic time
        ttl = site.expires - asyncio.get_running_loop().time() if site.expires else 60.0
        q.site_expires = time.monotonic() + max(1.0, ttl)
        waiting, q.resolving = q.resolving or [], None
        for msg in waiting:
            self._to_ready(msg, source, site)

    def _to_ready(self, msg: QueuedMessage, source: str, site: Site) -> None:
        d = self.dispatcher_for(source, site)
        if d.ready.push(msg):
            d.wake()
        else:
            # Backpressure without polling: the ready queue pulls from the backlog as
            # connections take messages (ReadyQueue.pop refills).
            self.inserts[InsertReason.READY_FULL] += 1
            msg.queue.backlog.append(msg)
            d.ready.block(msg.queue)

    # -- operator view ----------------------------------------------------------------------

    def summary(self) -> dict[str, dict]:
        return {q.name: {"count": q.count, "site": q.site.name if q.site else None,
                         "backlog": len(q.backlog), "suspended": q.suspended_until > time.time()}
                for q in self.queues.values()}
