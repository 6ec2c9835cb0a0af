"""Operator controls on the running delivery engine: suspend, resume, rebind.

What can be suspended, for a duration (default one hour):
- a scheduled queue: its due messages wait in the queue (`Scheduler.hold_back`),
  including those already handed to a ready queue, which go back when popped; a
  queue with no mail yet can be suspended too (it exists from then on);
- a site: every source's dispatcher for it stops opening connections and
  closes its connections after the message in hand; messages stay ready;
- a source: pools skip it for new messages; messages already waiting for it
  are routed again (to the pool's other sources), its connections wind down;
- a (source, site) pair: like a site, for one dispatcher.
Resume undoes it at once; a timer resumes at the end of the duration.
Rebind moves a scheduled queue to another pool: its waiting messages leave
their old ready queues and are routed again at once.

Used by the admin API (POST /control/...); every action returns a JSON-able
summary or raises ControlError naming what was not found.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mta.model.queue_name import parse_name
from mta.model.queued import InsertReason

if TYPE_CHECKING:
    from mta.delivery.dispatcher import Dispatcher
    from mta.delivery.engine import DeliveryEngine
    from mta.queues.scheduled import ScheduledQueue

KINDS = ("queue", "site", "source", "pair")
DEFAULT_DURATION = 3600.0


class ControlError(ValueError):
    """An action on something that does not exist (the text names it)."""


class Controls:
    def __init__(self, engine: DeliveryEngine):
        self.engine = engine

    # -- lookups ------------------------------------------------------------------------

    def _queue(self, name: str) -> ScheduledQueue:
        q = self.engine.scheduler.queues.get(name)
        if q is None:
            raise ControlError(f"no scheduled queue named {name!r} (see `mta queue summary`)")
        return q

    def _queue_to_suspend(self, name: str) -> ScheduledQueue:
        """An existing queue, or the queue `name` will be once mail arrives (operators
        suspend a campaign before it starts); the suspension keeps it alive."""
        q = self.engine.scheduler.queues.get(name)
        if q is not None:
            return q
        try:
            parts = parse_name(name)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        if parts.pool and parts.pool not in self.engine.egress.pools:
            raise ControlError(f"queue {name!r}: no pool named {parts.pool!r}")
        if parts.klass and parts.klass not in self.engine.egress.classes:
            raise ControlError(f"queue {name!r}: no queue class named {parts.klass!r}")
        q = self.engine.scheduler.queue_for(parts.campaign, parts.tenant, parts.domain,
                                            parts.klass, parts.pool)
        if q.name != name:
            self.engine.scheduler.queues.pop(q.name, None)
            raise ControlError(f"{name!r} is not a queue name as the daemon writes it "
                               f"(did you mean {q.name!r}?)")
        return q

    def _site_dispatchers(self, site: str) -> list[Dispatcher]:
        state = self.engine.sites.get(site)
        if state is None:
            raise ControlError(f"no site named {site!r} has been used yet "
                               "(see `mta shaping show`)")
        return state.dispatchers

    def _pair(self, source: str, site: str) -> Dispatcher:
        d = self.engine.dispatchers.get((source, site))
        if d is None:
            raise ControlError(f"no traffic from source {source!r} to site {site!r} yet")
        return d

    def _source(self, name: str):
        src = self.engine.egress.sources.get(name)
        if src is None:
            raise ControlError(f"no source named {name!r} (known: "
                               f"{', '.join(sorted(self.engine.egress.sources)[:20])}...)")
        return src

    # -- actions ------------------------------------------------------------------------

    def suspend(self, kind: str, name: str, site: str = "",
                duration: float = DEFAULT_DURATION) -> dict:
        if duration <= 0:
            raise ControlError("the duration must be above 0 seconds")
        until = time.time() + duration
        if kind == "queue":
            self.engine.scheduler.suspend(self._queue_to_suspend(name), duration)
        elif kind == "site":
            dispatchers = self._site_dispatchers(name)
            self.engine.sites[name].suspended_until = until
            self._pause(dispatchers, duration)
        elif kind == "source":
            src = self._source(name)
            src.suspended_until = until
            mine = [d for d in self.engine.dispatchers.values() if d.source is src]
            self._pause(mine, duration)
            for d in mine:               # what waits for it goes to the pool's other sources
                for msg in d.ready.drain():
                    self.engine.scheduler.make_ready(msg, InsertReason.SUSPENDED)
        elif kind == "pair":
            d = self._pair(name, site)
            d.suspended_until = until
            self._pause([d], duration)
        else:
            raise ControlError(f"cannot suspend a {kind!r} (one of: {', '.join(KINDS)})")
        return {"suspended": kind, "name": name, "site": site or None, "until": until}

    def resume(self, kind: str, name: str, site: str = "") -> dict:
        if kind == "queue":
            self.engine.scheduler.resume(self._queue(name))
            return {"resumed": kind, "name": name}
        if kind == "site":
            dispatchers = self._site_dispatchers(name)
            self.engine.sites[name].suspended_until = 0.0
        elif kind == "source":
            src = self._source(name)
            src.suspended_until = 0.0
            dispatchers = [d for d in self.engine.dispatchers.values() if d.source is src]
        elif kind == "pair":
            d = self._pair(name, site)
            d.suspended_until = 0.0
            dispatchers = [d]
        else:
            raise ControlError(f"cannot resume a {kind!r} (one of: {', '.join(KINDS)})")
        for d in dispatchers:
            d.wake()
        return {"resumed": kind, "name": name, "site": site or None}

    def rebind(self, queue: str, pool: str) -> dict:
        q = self._queue(queue)
        if pool not in self.engine.egress.pools:
            raise ControlError(f"no pool named {pool!r} (known: "
                               f"{', '.join(sorted(self.engine.egress.pools))})")
        q.pool = pool
        moved = []
        for d in self.engine.dispatchers.values():
            moved.extend(d.ready.drain(q))
        moved.extend(q.backlog)
        q.backlog.clear()
        for msg in moved:
            self.engine.scheduler.make_ready(msg, InsertReason.RECEIVED if msg.attempts == 0
                                             else InsertReason.TRANSIENT_FAILURE)
        return {"queue": queue, "pool": pool, "moved": len(moved)}

    @staticmethod
    def _pause(dispatchers: list[Dispatcher], duration: float) -> None:
        # Idle connections close now; busy ones after the message in hand (worker loop).
        for d in dispatchers:
            d.release_idle()
            d.wake_at(duration)
