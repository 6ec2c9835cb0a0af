"""The delivery engine: scheduler + routing + dispatchers + outcomes, wired once.

Server creates one at start. Reception calls `submit()` for every durable
message; recovery calls it for every live message found in the spool (minus
recipients already finished). `route()` is the single place where a queue's
egress path (source, site) is decided: today one default source and the
site from DNS, static routes or the smarthost (mta/egress/sites.py).
Operators see it through `summary()` and `inspect()` (the admin API).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

from mta.delivery.dispatcher import Dispatcher
from mta.delivery.outcome import Attempt, Outcomes
from mta.egress.sites import ResolveError, Site, SiteResolver
from mta.ids import id_from_text
from mta.message import QueuedMessage
from mta.queues.ready import ReadyQueue
from mta.queues.retry import RetryPolicy
from mta.queues.scheduled import InsertReason, ScheduledQueue, Scheduler

if TYPE_CHECKING:
    from mta.config import Config
    from mta.dkim.domains import DkimStage
    from mta.logs.writer import LogWriter
    from mta.spool import Spool

log = logging.getLogger("mta.delivery")

DEFAULT_SOURCE = "default"


class DeliveryEngine:
    def __init__(self, config: Config, spool: Spool, logs: LogWriter | None,
                 inject: Callable[[str, list[str], bytes], Any], dkim: DkimStage | None = None):
        d = config.delivery
        self.dkim = dkim
        self.config = config
        self.spool = spool
        self.resolver = SiteResolver(
            nameservers=list(config.dns.nameservers) or None, timeout=config.dns.timeout,
            ipv6=config.dns.ipv6, static_routes={k: [v] for k, v in d.routes.items()},
            smarthost=d.smarthost, port=d.port)
        self.scheduler = Scheduler(route=self.route, dispatcher_for=self.dispatcher_for,
                                   on_route_failure=self._route_failure, hold=d.hold)
        self.retry = RetryPolicy(d.retry_initial, d.retry_max, d.max_age)
        self.outcomes = Outcomes(spool=spool, scheduler=self.scheduler, logs=logs, retry=self.retry,
                                 inject=inject, hostname=config.server.hostname,
                                 delay_dsn_after=d.delay_dsn_after)
        self.dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.scheduler.start(loop)

    async def stop(self) -> None:
        self.scheduler.stop()
        await asyncio.gather(*(d.close() for d in self.dispatchers.values()))

    # -- input ----------------------------------------------------------------------------

    def submit(self, msg_id: bytes, envelope: dict, done: set[int] | None = None,
               reason: InsertReason = InsertReason.RECEIVED) -> None:
        entries = self.scheduler.submit(msg_id, envelope, done or frozenset(), reason)
        if not entries:          # every recipient already finished: only the tombstone is missing
            self.spool.finish(msg_id)
            return
        self.outcomes.track(entries)

    # -- routing ----------------------------------------------------------------------------

    async def route(self, queue: ScheduledQueue) -> tuple[str, Site]:
        site = await self.resolver.resolve(queue.domain)
        return DEFAULT_SOURCE, site

    def dispatcher_for(self, source: str, site: Site) -> Dispatcher:
        key = (source, site.name)
        d = self.dispatchers.get(key)
        if d is None:
            assert self.loop is not None
            ready = ReadyQueue(source, site, self.config.delivery.ready_queue_size)
            d = self.dispatchers[key] = Dispatcher(ready, source_ip=None, cfg=self.config.delivery,
                                                   spool=self.spool, outcomes=self.outcomes,
                                                   loop=self.loop, dkim=self.dkim)
        else:
            d.ready.site = site  # DNS may have changed the addresses, not the MX names
        return d

    def _route_failure(self, msg: QueuedMessage, exc: Exception) -> None:
        at = Attempt(DEFAULT_SOURCE, "")
        try:
            env, _ = self.spool.read(msg.id)
        except KeyError:
            return
        if isinstance(exc, ResolveError):
            status, text, permanent = exc.status, exc.reason, exc.permanent
        else:
            status, text, permanent = "4.3.0", "internal routing error", False
        if permanent:
            self.outcomes.bounce_all(msg, env, 550, status, text, at)
        else:
            self.outcomes.defer(msg, env, list(msg.rcpts), 451, status, text, at)
            self.outcomes.settle(msg, env, list(msg.rcpts))

    # -- operator view ---------------------------------------------------------------------

    def summary(self) -> dict:
        return {
            "scheduled": self.scheduler.summary(),
            "ready": {d.ready.name: {"count": len(d.ready), "connections": d.active,
                                     "sent": d.sent, "queues": d.ready.per_queue()}
                      for d in self.dispatchers.values()},
            "wheel": self.scheduler.wheel.count,
            "inserts": {r.value: n for r, n in self.scheduler.inserts.items()},
            "outcomes": dict(self.outcomes.counters),
        }

    def inspect(self, text_id: str) -> dict | None:
        msg_id = id_from_text(text_id)
        if msg_id not in self.spool:
            return None
        env, content = self.spool.read(msg_id)
        return {"id": text_id, "envelope": env, "size": len(content),
                "headers": bytes(content[:content.find(b"\r\n\r\n") + 2 if b"\r\n\r\n" in content
                                         else 4096]).decode("utf-8", "replace")}
