"""The delivery engine: scheduler + routing + egress + dispatchers + outcomes, wired once.

Server creates one at start. Reception calls `submit()` for every durable
message; recovery calls it for every live message found in the spool (minus
recipients already finished). The egress rules (mta/egress/pools.py) give each
message its queue class and pool; `route()` finds a queue's site (DNS, static
routes or the smarthost, mta/egress/sites.py); `dispatcher_for()` takes the
next source of the queue's pool and returns the dispatcher of that (source,
site), created with the shaping Limits that hold for it. Those come from
`limits` (mta/egress/limits.py: the shaping files plus run-time overrides);
when an override changes, the engine pushes the new Limits into the live
dispatchers it covers and into their site's shared state. A reload
(`reconfigure()`) swaps the shaping files, sources, pools, rules and classes the same
way. `drain()` (SIGTERM) stops starting deliveries and lets those in flight reach
their end-of-data reply and be recorded (`in_flight` counts them). Operators see it
through the views control builds from its state (mta/control/views.py) and act
through mta/control/actions.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable

from mta.delivery.adapt import EngineActuator
from mta.delivery.budget import ConnectionBudget, SiteState
from mta.delivery.cluster import ClusterLimits
from mta.delivery.dispatcher import Dispatcher
from mta.delivery.outcome import Outcomes
from mta.delivery.private_headers import PrivateHeaders
from mta.delivery.tls_policy import TlsPolicy
from mta.delivery.tlsrpt import TlsReports
from mta.egress.dnsclient import DnsClient
from mta.egress.limits import LimitsPath, LimitsSource, Scope, retune
from mta.egress.pools import Egress
from mta.egress.shaping import Limits, Shaping
from mta.egress.shared import fallback_limit, open_shared
from mta.egress.sites import ResolveError, Site, SiteResolver
from mta.egress.throttle import Throttle
from mta.egress.warmup import STATE_NAME as WARMUP_STATE
from mta.egress.warmup import Warmup
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.envelope import Envelope
from mta.model.node import WorkerSlot
from mta.model.queued import InsertReason, QueuedMessage
from mta.queues.ready import ReadyQueue
from mta.queues.retry import RetryPolicy
from mta.queues.scheduled import ScheduledQueue, Scheduler

if TYPE_CHECKING:
    from mta.config import Config
    from mta.dkim.domains import DkimStage
    from mta.feedback.state import Feedback
    from mta.logs.writer import LogWriter
    from mta.spool import Spool

log = logging.getLogger("mta.delivery")

REAP_INTERVAL = 60.0   # seconds between sweeps of idle (source, site) dispatchers
REAP_AFTER = 300.0     # a dispatcher with nothing to do for this long is dropped


class DeliveryEngine:
    def __init__(self, config: Config, spool: Spool, logs: LogWriter | None,
                 inject: Callable[[str, list[str], bytes], Any], dkim: DkimStage | None = None,
                 feedback: Feedback | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 worker: WorkerSlot | None = None):
        d = config.delivery
        self.clock = clock                # wall time (unit tests pass a virtual clock, and
        #                                   run the engine on a loop with the same time)
        self.feedback = feedback
        self.dkim = dkim
        self.config = config
        self.spool = spool
        self.resolver = SiteResolver(
            nameservers=list(config.dns.nameservers) or None, timeout=config.dns.timeout,
            ipv6=config.dns.ipv6, static_routes={k: [v] for k, v in d.routes.items()},
            smarthost=d.smarthost, port=d.port)
        # MTA-STS / DANE per recipient domain (tls_policy.py); its own resolver (TXT, TLSA)
        self.tls_policy = TlsPolicy(
            DnsClient(list(config.dns.nameservers) or None, config.dns.timeout, 2)
            if d.mta_sts or d.dane else None,
            mta_sts=d.mta_sts, dane=d.dane, ca_file=d.tls_ca_file,
            state_dir=config.spool.directory)
        if d.tls_reports and self.tls_policy.dns is not None:     # TLS-RPT (RFC 8460)
            self.tls_policy.reports = TlsReports(
                self.tls_policy.dns, organization=config.server.hostname,
                interval=d.tls_report_interval, state_dir=config.spool.directory,
                ca_file=d.tls_ca_file)
            self.tls_policy.reports.inject = inject
        self.egress = Egress(config)
        self.shaping = Shaping.load(config.egress.shaping, dataclasses.asdict(d))
        self.limits = LimitsSource(self.shaping, clock=clock)
        self.limits.subscribe(self._limits_changed)
        self.paths: dict[tuple[str, str], LimitsPath] = {}   # (source, site) -> its shaping path
        # (source, site) -> its ready queue's class lanes (weight, throttle), kept to retune
        self.lane_specs: dict[tuple[str, str], dict[str, tuple[int, Throttle | None]]] = {}
        self.budget = ConnectionBudget(config.egress.max_connections)
        self.sites: dict[str, SiteState] = {}
        # [cluster]: connection leases and rates shared with other workers and nodes
        # (mta/delivery/cluster.py); None for local (auto with one worker): nothing shared, no cost
        worker = worker or WorkerSlot()
        self.shared = open_shared(config.cluster, worker, worker.host_dir(config.spool.directory))
        self.cluster = ClusterLimits(self.shared) if self.shared is not None else None
        if self.shared is not None:
            self.shared.on_change = self._cluster_outage
        if self.shared is None and worker.count > 1 and worker.index == 0:
            log.warning("%d workers with [cluster] backend = \"local\": each worker holds "
                        "every connection limit and rate on its own (backend = \"host\" "
                        "shares them)", worker.count)
        assert self.egress.default_pool is not None
        self.scheduler = Scheduler(route=self.route, outlet_for=self.dispatcher_for,
                                   on_route_failure=self._route_failure, hold=d.hold,
                                   select=self.egress.select,
                                   defaults=(self.egress.default_class,
                                             self.egress.default_pool.name),
                                   clock=clock, monotonic=monotonic)
        self.retry = RetryPolicy(d.retry_initial, d.retry_max, d.max_age)
        self.outcomes = Outcomes(spool=spool, schedule=self.scheduler.schedule,
                                 finished=self.scheduler.finished, logs=logs, retry=self.retry,
                                 inject=inject, hostname=config.server.hostname,
                                 delay_dsn_after=d.delay_dsn_after, feedback=feedback,
                                 no_dsn_tenants=frozenset(d.no_dsn_tenants), clock=clock)
        # IP warm-up caps per (warming source, provider) (mta/egress/warmup.py)
        self.warmup = Warmup(config, self.shaping, logs=logs, clock=clock,
                             state_path=config.spool.directory / WARMUP_STATE,
                             shared=self.shared)
        self.outcomes.observers.append(self.warmup.observe)
        if feedback is not None:
            feedback.complaint_observers.append(self.warmup.complaint)
        self._warmup_wait = _WarmupWait(self)
        r = config.reception
        self.private_headers = (PrivateHeaders([r.tenant_header, r.campaign_header,
                                                r.class_header])
                                if d.strip_private_headers else None)
        self.dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self.draining = False     # drain(): no delivery starts any more
        # adaptive delivery (mta/egress/adaptive.py): automation rules and rate rules
        self.adaptive = EngineActuator(self)
        if self.shared is not None:   # actions taken here reach the other workers and nodes
            self.adaptive.adaptive.share = self.shared.share_action
            self.shared.on_action = self.adaptive.adaptive.remote

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.scheduler.start(loop)
        self.adaptive.adaptive.start(loop)
        self.limits.start(loop)
        self.warmup.start(loop)
        if self.shared is not None:
            self.shared.start(loop)
        if self.tls_policy.reports is not None:
            self.tls_policy.reports.start_timer(loop)
        self._reaper = loop.call_later(REAP_INTERVAL, self._reap)

    async def stop(self) -> None:
        self.scheduler.stop()
        self.limits.stop()
        self.adaptive.adaptive.stop()
        self.warmup.stop()
        if self.tls_policy.reports is not None:
            await self.tls_policy.reports.stop()
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(d.close() for d in self.dispatchers.values()))
        if self.shared is not None:   # after the connections: they gave their leases back
            await self.shared.close()

    # -- reload and drain -------------------------------------------------------------------

    def reconfigure(self, config: Config, shaping: Shaping, egress: Egress) -> None:
        """A reload: new shaping files (over the new [delivery] defaults), sources, pools,
        egress rules and classes, all checked by the caller. Live dispatchers take their
        new Limits at once; a source kept by name keeps its operator suspension, and its
        dispatchers bind the new address from their next connection. Queues keep their
        names; a queue whose pool is gone uses the default pool. A queue class's new weight
        or rate holds at a (source, site) from the next time its lane there is made (lanes
        live while they hold messages); a changed rate retunes a throttle a lane has at once. Restart-only keys
        (schema `restart=True`) must be unchanged in `config`."""
        for name, src in egress.sources.items():
            old = self.egress.sources.get(name)
            if old is not None:
                src.suspended_until = old.suspended_until
        for (source, _), d in self.dispatchers.items():
            new = egress.sources.get(source)
            if new is not None:
                d.source = new
        self.config = config
        self.egress = egress
        self.scheduler.select = egress.select
        self.adaptive.adaptive.configure(config.adaptive)
        now = self.loop.time() if self.loop is not None else 0.0
        for (source, site), lanes in self.lane_specs.items():   # a class lane made from now
            src = egress.sources.get(source)      # on (lanes come and go with traffic) takes
            for c in egress.classes.values():     # the new values; a throttle keeps its tokens
                old = lanes.get(c.name)
                lanes[c.name] = (c.weight, self._lane_throttle(src, site, c,
                                                               old[1] if old else None, now))
        self.shaping = shaping
        self.warmup.reconfigure(config, shaping)
        self.limits.set_shaping(shaping)   # -> _limits_changed(None): every dispatcher

    def _lane_throttle(self, source: Any, site: str, c: Any, old: Any, now: float) -> Any:
        """A queue class's rate at a (source, site): the store's with [cluster] sharing
        (all workers and nodes together), else this process's own bucket."""
        throttle = retune(old, c.max_message_rate, now)
        if self.cluster is not None and source is not None:
            throttle = self.cluster.lane(source, site, c.name, throttle)
        return throttle

    def suspend_source(self, source: Any, until: float) -> None:
        """Suspend an egress source until `until` (wall time): pools skip it, idle
        connections close now and busy ones after the message in hand, and what waits
        for it is routed again to its pool's other sources. Operator controls
        (mta/control/actions.py) and adaptive delivery (mta/delivery/adapt.py) use it."""
        source.suspended_until = until
        now = self.clock()
        for d in [d for d in self.dispatchers.values() if d.source is source]:
            d.release_idle()
            d.wake_at(until - now)
            for msg in d.ready.drain():
                self.scheduler.make_ready(msg, InsertReason.SUSPENDED)

    def drain(self) -> None:
        """Shutting down: start no delivery (scheduler stopped, routed mail waits in its
        queue, every dispatcher's connection limit 0: idle connections close, busy ones
        after the message in hand). Messages waiting in ready queues stay in the spool."""
        self.draining = True
        self.scheduler.stop()
        self.scheduler.hold = True
        for d in self.dispatchers.values():
            d.ready.drain()
            d.set_limits(dataclasses.replace(d.limits, connection_limit=0))

    @property
    def in_flight(self) -> int:
        """Connections open or opening; after drain(), those finishing a delivery."""
        return sum(d.active for d in self.dispatchers.values())

    def _reap(self) -> None:
        """Forget (source, site) dispatchers idle for a while: with thousands of sources
        and many sites the pairs would otherwise only ever accumulate."""
        now = self.clock()
        idle = [key for key, d in self.dispatchers.items() if d.idle_since(now) > REAP_AFTER]
        for key in idle:
            d = self.dispatchers.pop(key)
            del self.paths[key]
            self.lane_specs.pop(key, None)
            state = d.site_state
            state.dispatchers.remove(d)
            state.blocked.pop(d, None)
            if not state.dispatchers and not state.suspended(now):
                del self.sites[state.name]
        assert self.loop is not None
        self._reaper = self.loop.call_later(REAP_INTERVAL, self._reap)

    # -- input ----------------------------------------------------------------------------

    def submit(self, msg_id: bytes, envelope: Envelope, done: set[int] | None = None,
               reason: InsertReason = InsertReason.RECEIVED) -> None:
        entries = self.scheduler.submit(msg_id, envelope, done or frozenset(), reason)
        if not entries:          # every recipient already finished: only the tombstone is missing
            self.spool.finish(msg_id)
            return
        self.outcomes.track(entries)

    # -- routing ----------------------------------------------------------------------------

    async def route(self, queue: ScheduledQueue) -> Site:
        return await self.resolver.resolve(queue.domain)

    def dispatcher_for(self, queue: ScheduledQueue, site: Site) -> Dispatcher:
        pool = self.egress.pools.get(queue.pool) or self.egress.default_pool
        assert pool is not None
        source = pool.next()
        if self.adaptive.adaptive.paused:   # not a source adaptive delivery paused there
            source = self.adaptive.unpaused(pool, source, site)
        if self.warmup.sources:   # a warming source takes what its caps allow, others the rest
            picked = self.warmup.pick(pool, source, site)
            if picked is None:
                return self._warmup_wait
            source = picked
        key = (source.name, site.name)
        d = self.dispatchers.get(key)
        if d is None:
            d = self.dispatchers[key] = self._new_dispatcher(source, site, queue.domain)
        else:
            d.ready.site = site  # DNS may have changed the addresses, not the MX names
        return d

    def _new_dispatcher(self, source, site: Site, domain: str) -> Dispatcher:
        assert self.loop is not None
        path = self.limits.path(source.name, site.name, domain, [h.name for h in site.hosts])
        self.paths[(source.name, site.name)] = path
        limits = self.limits.limits(path)
        state = self.sites.get(site.name)
        if state is None:
            state = self.sites[site.name] = SiteState(site.name)
            self._shape_site(state, limits)
        now = self.loop.time()
        lanes = {c.name: (c.weight, self._lane_throttle(source, site.name, c, None, now))
                 for c in self.egress.classes.values()}
        self.lane_specs[(source.name, site.name)] = lanes
        ready = ReadyQueue(source.name, site, self.config.delivery.ready_queue_size, lanes,
                           clock=self.loop.time)
        d = Dispatcher(ready, source=source, limits=_path_limits(limits), site_state=state,
                       budget=self.budget,
                       cfg=self.config.delivery, spool=self.spool, outcomes=self.outcomes,
                       loop=self.loop, hold_back=self.scheduler.hold_back, dkim=self.dkim,
                       feedback=self.feedback, private_headers=self.private_headers,
                       adaptive_hold=self.adaptive.held, tls_policy=self.tls_policy,
                       clock=self.clock)
        self.adaptive.new_dispatcher(d)
        state.dispatchers.append(d)
        if self.cluster is not None:
            self.cluster.bind(d)
        return d

    # -- limits that change while traffic flows ---------------------------------------------

    def _limits_changed(self, scope: Scope | None) -> None:
        """An override of `scope` changed (None: the shaping files, at a reload): the
        dispatchers it covers take their new Limits now; a site's shared limits follow
        the site's first dispatcher, which set them (as at creation)."""
        if self.draining:
            return
        for key, d in self.dispatchers.items():
            path = self.paths[key]
            if scope is None:    # a provider's MX patterns may have changed too
                path = self.paths[key] = self.limits.path(path.source, path.site,
                                                          path.domain, path.mx_hosts)
            elif not scope.covers(path):
                continue
            limits = self.limits.limits(path)
            if d.site_state.dispatchers[0] is d:
                self._shape_site(d.site_state, limits)
            d.set_limits(_path_limits(limits))
            if self.cluster is not None:
                self.cluster.shape(d)

    def _cluster_outage(self, down: bool) -> None:
        """The shared store went away (down) or is back. Down: this process holds every
        connection limit alone at [cluster] fallback_fraction, the connections already
        open above it included (idle ones close now, busy ones after the message in
        hand, as at any lowered limit); back: the shaping limits again."""
        if self.draining:
            return
        ds = [d for d in self.dispatchers.values() if d.cluster is not None]
        if not down:
            for d in ds:
                d.cluster.uncapped = None
            self._limits_changed(None)
            return
        f = self.config.cluster.fallback_fraction
        for d in ds:
            if d.cluster.uncapped is None:
                d.cluster.uncapped = (d.limits.connection_limit, d.site_state.connection_limit)
        for st in {id(d.site_state): d.site_state for d in ds}.values():
            if st.connection_limit is not None:
                st.reshape(fallback_limit(st.connection_limit, f))
        for d in ds:
            d.set_limits(dataclasses.replace(
                d.limits, connection_limit=fallback_limit(d.limits.connection_limit, f)))

    def _shape_site(self, state: SiteState, limits: Limits) -> None:
        """What all sources' dispatchers of a site share: the site-wide connection limit and
        message throttle (a throttle keeps its tokens across a change)."""
        assert self.loop is not None
        connections, rate = None, None
        if limits.scope == "site":   # the per-path limits count for the whole site
            connections, rate = limits.connection_limit, limits.max_message_rate
        if limits.site_connection_limit is not None:
            connections = min(limits.site_connection_limit,
                              connections or limits.site_connection_limit)
        if rate is None:
            rate = limits.site_max_message_rate
        state.throttle = retune(state.throttle, rate, self.loop.time())
        state.reshape(connections)

    def _route_failure(self, msg: QueuedMessage, exc: Exception) -> None:
        at = Attempt("", "")
        try:
            env, _ = self.spool.read(msg.id)
        except KeyError:
            return
        if isinstance(exc, ResolveError):
            status, text, permanent = exc.status, exc.reason, exc.permanent
        else:
            status, text, permanent = "4.3.0", "internal routing error", False
        if permanent and not self.spool.writable:
            # a bounce now could not be tombstoned: decide when the spool takes writes again
            status, text, permanent = "4.3.0", f"{text} (bounce postponed: spool not writable)", False
        reply = RemoteReply(550 if permanent else 451, status, text)
        self.outcomes.apply(AttemptResult.all(msg, env, at, reply))


class _WarmupWait:
    """The outlet of a message that every source of its pool is at its warm-up cap for:
    it waits on the timer wheel until the earliest cap frees (spread over a tenth of a
    warm-up hour, so the freed hour does not start with one burst of routing)."""

    def __init__(self, engine: DeliveryEngine) -> None:
        self.engine = engine

    @property
    def ready(self) -> _WarmupWait:
        return self

    def offer(self, msg: QueuedMessage) -> bool:
        w = self.engine.warmup
        due = w.resume_at + random.uniform(0.0, w.spread)
        self.engine.scheduler.schedule(msg, due, InsertReason.WARMUP)
        return True

    def wake(self) -> None:
        pass


def _path_limits(limits: Limits) -> Limits:
    """The Limits a dispatcher enforces itself: with scope = "site" the message rate is
    the site's throttle, not one per source."""
    if limits.scope == "site" and limits.max_message_rate:
        return dataclasses.replace(limits, max_message_rate=None)
    return limits
