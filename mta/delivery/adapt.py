"""Adaptive delivery, wired to the engine: the Actuator of mta/egress/adaptive.py.

The rules, counters and the way back live in mta/egress/adaptive.py (rank 3: it cannot
reach dispatchers or queues). This module gives it hands on the delivery engine:
- inputs: an Outcomes observer (each AttemptResult: its (source, site), the site's
  provider, the Limits in force there, the message's tenant and campaign) and a Feedback
  complaint observer;
- pause / lift a (source, provider): the `suspended_until` of every dispatcher of that
  source at that provider's sites (an operator's `mta resume pair` lifts it early), one
  Backoff record per dispatcher; what waits in their ready queues is routed again, and
  while it holds the engine gives that provider's mail to the pool's other sources
  (`unpaused`; when every source of the pool is paused there, it waits); a dispatcher
  made while it holds starts paused;
- pause / lift a source: as `mta suspend source` (pools skip it; what waits for it is routed
  again to the pool's other sources);
- hold a tenant or campaign at a provider: its scheduled queues for that provider's sites
  are suspended (Scheduler.suspend); a queue that reaches such a site later is suspended
  when a dispatcher there pops its first message (Dispatcher.adaptive_hold);
- bounce: what a tenant's campaign has queued for a provider, through Outcomes (Bounce
  records, DSNs, tombstones), as a 554 5.7.1 naming the rule;
- the state file: adaptive.json in the spool directory (mta.files.write_atomic), written
  on every change once `persist()` is called (the daemon), read there at start.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import orjson

from mta.egress.adaptive import Adaptive
from mta.files import write_atomic
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.queued import InsertReason
from mta.queues.select import Selector

if TYPE_CHECKING:
    from mta.delivery.dispatcher import Dispatcher
    from mta.model.log_records import RecordType
    from mta.queues.scheduled import ScheduledQueue

log = logging.getLogger("mta.adaptive")

STATE_NAME = "adaptive.json"     # in the spool directory
_MAX_STATE = 1 << 24
_PROVIDER_CACHE = 100_000
OK_BATCH = 5.0          # seconds plain deliveries may wait before they reach the windows
_OK_PAIRS = 10_000      # (source, site) pairs counted at once; more: all handed over


class EngineActuator:
    """Adaptive delivery's hands on one DeliveryEngine (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        # the DeliveryEngine that makes it (not imported: it imports this module)
        self.engine = engine
        self.state_path: str | None = None
        self._providers: dict[str, tuple[str, bool]] = {}   # site -> (provider, is a site)
        self._bouncing = False
        self._ok: dict[tuple[str, str], list] = {}   # (source, site) -> [deliveries, since]
        self.adaptive = Adaptive(engine.limits, self, engine.config.adaptive,
                                 clock=engine.clock)
        engine.outcomes.observers.append(self.observe)
        if engine.feedback is not None:
            engine.feedback.complaint_observers.append(self.complaint)

    # -- inputs -------------------------------------------------------------------------------

    def provider_of(self, source: str, site: str) -> tuple[str, bool]:
        """The shaping provider of `site` (False), else the site itself (True)."""
        path = self.engine.paths.get((source, site))
        if path is not None:
            return (path.provider, False) if path.provider else (site, True)
        hit = self._providers.get(site)
        if hit is None:
            name = None if site.startswith("[") else \
                self.engine.limits.shaping.provider_for(site.split(","))
            hit = (name, False) if name else (site, True)
            if len(self._providers) >= _PROVIDER_CACHE:
                self._providers.clear()
            self._providers[site] = hit
        return hit

    def observe(self, result: AttemptResult) -> None:
        at = result.at
        if not at.source or self._bouncing:
            return
        adaptive = self.adaptive
        key = (at.source, at.site)
        # Plain deliveries while no action is in force only add to the rate windows: they
        # are counted here and handed over together (before the pair's next other result,
        # a complaint, or OK_BATCH seconds after the first), not one call per message.
        if not adaptive.active and all(r.code < 300 for _, r in result.replies):
            now = self.engine.clock()
            ok = self._ok.get(key)
            if ok is None:
                if len(self._ok) >= _OK_PAIRS:
                    self._flush_ok()
                self._ok[key] = [len(result.replies), now]
            else:
                ok[0] += len(result.replies)
                if now - ok[1] >= OK_BATCH:
                    self._flush_ok(key)
            return
        if self._ok:
            self._flush_ok(key)
        provider, is_site = self.provider_of(at.source, at.site)
        d = self.engine.dispatchers.get(key)
        q = result.msg.queue
        adaptive.observe(at.source, provider, is_site, d.limits if d else None,
                         result.replies, q.tenant or "", q.campaign or "", self._hard)

    def _flush_ok(self, key: tuple[str, str] | None = None) -> None:
        """Hand the counted plain deliveries of `key` (every pair: None) to the rules."""
        keys = [key] if key is not None else list(self._ok)
        for k in keys:
            ok = self._ok.pop(k, None)
            if not ok:
                continue
            provider, is_site = self.provider_of(*k)
            d = self.engine.dispatchers.get(k)
            done = RemoteReply(250, "2.0.0", "delivered")   # a new object: a new event
            self.adaptive.observe(k[0], provider, is_site, d.limits if d else None,
                                  [(0, done)] * ok[0], "", "", self._hard)

    def _hard(self, reply: RemoteReply) -> bool:
        fb = self.engine.feedback
        if fb is None:
            return reply.status.startswith("5.1.")
        return fb.classifier.classify(reply.code, reply.status or None, reply.text).hard

    def complaint(self, source: str, site: str) -> None:
        if self._ok:
            self._flush_ok()
        if source and site:
            provider, is_site = self.provider_of(source, site)
            self.adaptive.complaint(source, provider, is_site)

    # -- the Actuator -------------------------------------------------------------------------

    def _dispatchers(self, source: str, provider: str, is_site: bool) -> list[Dispatcher]:
        eng = self.engine
        out = []
        for (src, site), d in eng.dispatchers.items():
            if src != source:
                continue
            if (site == provider) if is_site else (self.provider_of(src, site) == (provider, False)):
                out.append(d)
        return out

    def pause_pair(self, source: str, provider: str, site: bool, until: float,
                   reply: RemoteReply | None) -> None:
        now = self.engine.clock()
        for d in self._dispatchers(source, provider, site):
            if until <= d.suspended_until:
                continue
            d.suspended_until = until
            d.backoffs += 1
            if reply is not None:
                self.engine.outcomes.paused(source, d.site.name, reply, until)
            d.release_idle()              # idle connections close; busy ones after the
            d.wake_at(until - now)        # message in hand
            for msg in d.ready.drain():   # what waits goes to the pool's other sources
                self.engine.scheduler.make_ready(msg, InsertReason.SUSPENDED)

    def unpaused(self, pool: Any, source: Any, site: Any) -> Any:
        """`source`, or the pool's next source whose (source, provider) at `site` is not
        suspended by adaptive delivery (all are: `source`, where the message waits)."""
        now = self.engine.clock()
        provider, _ = self.provider_of(source.name, site.name)
        first = source
        for _ in range(len(pool.members)):
            if self.adaptive.pair_until(source.name, provider) <= now:
                return source
            source = pool.next()
        return first

    def lift_pair(self, source: str, provider: str, site: bool, until: float) -> None:
        for d in self._dispatchers(source, provider, site):
            if 0 < d.suspended_until <= until + 0.001:   # not an operator's longer pause
                d.suspended_until = 0.0
                d.wake()

    def pause_source(self, source: str, until: float) -> None:
        eng = self.engine
        src = eng.egress.sources.get(source)
        if src is None or until <= src.suspended_until:
            return
        eng.suspend_source(src, until)       # as `mta suspend source`

    def lift_source(self, source: str, until: float) -> None:
        eng = self.engine
        src = eng.egress.sources.get(source)
        if src is None or not 0 < src.suspended_until <= until + 0.001:
            return
        src.suspended_until = 0.0
        for d in eng.dispatchers.values():
            if d.source is src:
                d.wake()

    def _queues_at(self, provider: str, is_site: bool, kind: str,
                   target: str) -> list[ScheduledQueue]:
        out = []
        for q in self.engine.scheduler.queues.values():
            if (getattr(q, kind) or "") != target or q.site is None:
                continue
            if (q.site.name == provider) if is_site else \
                    self.provider_of("", q.site.name) == (provider, False):
                out.append(q)
        return out

    def hold(self, provider: str, site: bool, kind: str, target: str, until: float) -> None:
        eng = self.engine
        now = eng.clock()
        for q in self._queues_at(provider, site, kind, target):
            if q.suspended_until < until:
                eng.scheduler.suspend(q, until - now)

    def held(self, queue: ScheduledQueue, d: Dispatcher) -> bool:
        """Dispatcher.adaptive_hold: whether `queue` is held at d's provider now (it is
        then suspended until the hold ends)."""
        a = self.adaptive
        if not a.holds:
            return False
        provider, _ = self.provider_of(d.source.name, d.site.name)
        until = a.hold_until(provider, queue.tenant or "", queue.campaign or "")
        now = self.engine.clock()
        if until <= now:
            return False
        self.engine.scheduler.suspend(queue, until - now)
        return True

    def bounce(self, source: str, provider: str, site: bool, tenant: str, campaign: str,
               reason: str) -> int:
        """Bounce what `tenant`'s `campaign` has queued for `provider` (nothing when the
        message had neither: that would be every untagged message)."""
        if not tenant and not campaign:
            return 0
        eng = self.engine
        queues = [q for q in self._queues_at(provider, site, "tenant", tenant)
                  if (q.campaign or "") == campaign]
        taken = []
        for q in queues:
            taken += eng.scheduler.take(Selector(queue=q.name))
            for d in eng.dispatchers.values():
                taken += d.ready.drain(q)
        reply = RemoteReply(554, "5.7.1", f"not sent: adaptive delivery {reason}"[:400])
        self._bouncing = True
        try:
            for msg in taken:
                try:
                    env = eng.spool.envelope(msg.id)
                except KeyError:
                    continue
                eng.outcomes.apply(AttemptResult.all(msg, env, Attempt("", ""), reply))
        finally:
            self._bouncing = False
        return len(taken)

    def log(self, rtype: RecordType, **fields: Any) -> None:
        logs = self.engine.outcomes.logs
        if logs is not None:
            logs.log(rtype, **fields)
        log.warning("%s %s", rtype.value, fields)

    def changed(self) -> None:
        if self.state_path is None:
            return
        try:
            write_atomic(self.state_path, orjson.dumps(self.adaptive.state(),
                                                       option=orjson.OPT_INDENT_2))
        except OSError as exc:
            log.error("adaptive state %s not saved: %s (actions hold until a restart)",
                      self.state_path, exc.strerror or exc)

    # -- persistence ----------------------------------------------------------------------------

    def persist(self, directory: str | os.PathLike) -> int:
        """Keep the state in `directory` from now on, after restoring what it holds;
        returns the actions restored. A file that cannot be read is set aside as *.bad."""
        path = self.state_path = os.path.join(directory, STATE_NAME)
        if not os.path.exists(path):
            return 0
        try:
            with open(path, "rb") as f:
                n = self.adaptive.restore(orjson.loads(f.read(_MAX_STATE)))
        except (OSError, ValueError) as exc:
            log.error("adaptive state %s unreadable (%s): moved to %s.bad", path, exc, path)
            try:
                os.replace(path, path + ".bad")
            except OSError:
                pass
            return 0
        if n:
            log.info("adaptive state restored from %s: %d actions", path, n)
        return n

    def new_dispatcher(self, d: Dispatcher) -> None:
        """A dispatcher made while its (source, provider) is suspended starts paused."""
        a = self.adaptive
        if not a.paused:
            return
        provider, _ = self.provider_of(d.source.name, d.site.name)
        until = a.pair_until(d.source.name, provider)
        if until > self.engine.clock():
            d.suspended_until = max(d.suspended_until, until)
