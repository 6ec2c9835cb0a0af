"""Operator controls on the running delivery engine: suspend, resume, rebind, holds,
queue surgery (flush, hold, release, delete, bounce) and shaping overrides.

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

Queue surgery takes one Selector (mta/queues/select.py: queue, site, domain,
tenant, campaign, id, or all):
- flush: deferred messages it matches are due now (holds and suspensions still
  apply);
- hold / release: matching messages stay queued and never go out until the
  hold is released (those in ready queues are taken back; one in flight
  finishes its attempt);
- delete: matching messages leave the queue without a DSN; an AdminDelete log
  record per entry, and the spool tombstones them (RCPTS_DONE when only some
  of a message's domains were selected);
- bounce: as delete, plus a DSN ("failed", 5.0.0, the operator's reason) to
  the sender through the DSN builder and local submission, and an AdminBounce
  record per recipient. NOTIFY is honoured; never a DSN to the null sender.
Messages in flight are not touched by delete/bounce (their attempt settles
them); the reply counts what was done.
Shaping overrides (`limits`): the LimitsSource's run-time overrides for a
provider, site, source or (source, site), with an optional duration.

Persistence: suspensions (with their end), rebinds, holds and shaping overrides
live in a small JSON file in the spool directory (STATE_NAME), written
atomically on every change (temp file, fsync, rename, fsync of the directory)
and loaded by `restore()` at start, before recovered messages are queued. A
suspension of a site or a (source, site) pair that is restored before the site
has been used waits until the first dispatcher for it appears. A state file
that cannot be read is renamed to *.bad, logged, and the daemon starts without
it (operator state is never worth refusing to deliver mail).

Used by the admin API (POST /control/...); every action returns a JSON-able
summary or raises ControlError naming what was not found.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import orjson

from mta.egress.limits import LimitsError, Scope
from mta.feedback.dsn_builder import RecipientStatus, build_dsn, should_notify
from mta.files import write_atomic
from mta.model.ids import id_text
from mta.model.log_records import RecordType
from mta.model.queue_name import parse_name
from mta.model.queued import InsertReason
from mta.queues.select import Selector, SelectorError

if TYPE_CHECKING:
    from mta.delivery.dispatcher import Dispatcher
    from mta.delivery.engine import DeliveryEngine
    from mta.model.queued import QueuedMessage
    from mta.queues.scheduled import ScheduledQueue

log = logging.getLogger("mta.control")

KINDS = ("queue", "site", "source", "pair")
DEFAULT_DURATION = 3600.0
STATE_NAME = "controls.json"    # in the spool directory
_STATE_VERSION = 1
_MAX_REASON = 500


class ControlError(ValueError):
    """An action on something that does not exist (the text names it)."""


class Controls:
    def __init__(self, engine: DeliveryEngine, state_dir: str | os.PathLike | None = None):
        self.engine = engine
        # the state file (None: nothing persisted: embedded uses, unit tests)
        self.state_path = None if state_dir is None else os.path.join(state_dir, STATE_NAME)
        # what the state file holds, as the operator asked for it
        self._suspensions: dict[tuple[str, str, str], float] = {}   # (kind, name, site) -> until
        self._rebinds: dict[str, str] = {}                          # queue -> pool
        self._limits: dict[tuple[str, str, str], dict[str, Any]] = {}  # scope -> raw override
        # site and pair suspensions restored before their site was used: applied when
        # the first dispatcher for it appears (see _outlet_for)
        self._pending: dict[tuple[str, str, str], float] = {}
        self._outlet_for: Callable | None = None

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
        until = self.engine.clock() + duration
        if kind == "queue":
            self.engine.scheduler.suspend(self._queue_to_suspend(name), duration)
        elif kind == "site":
            dispatchers = self._site_dispatchers(name)
            self.engine.sites[name].suspended_until = until
            self._pause(dispatchers, duration)
        elif kind == "source":
            # its connections wind down; what waits for it goes to the pool's other sources
            self.engine.suspend_source(self._source(name), until)
        elif kind == "pair":
            d = self._pair(name, site)
            d.suspended_until = until
            self._pause([d], duration)
        else:
            raise ControlError(f"cannot suspend a {kind!r} (one of: {', '.join(KINDS)})")
        self._suspensions[(kind, name, site if kind == "pair" else "")] = until
        self._save()
        return {"suspended": kind, "name": name, "site": site or None, "until": until}

    def resume(self, kind: str, name: str, site: str = "") -> dict:
        key = (kind, name, site if kind == "pair" else "")
        if self._pending.pop(key, None) is not None or key in self._suspensions:
            self._suspensions.pop(key, None)
            self._save()
            if kind in ("site", "pair") and not self._known(kind, name, site):
                return {"resumed": kind, "name": name, "site": site or None}
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

    def _known(self, kind: str, name: str, site: str) -> bool:
        if kind == "site":
            return name in self.engine.sites
        return (name, site) in self.engine.dispatchers

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
        self._rebinds[queue] = pool
        self._save()
        return {"queue": queue, "pool": pool, "moved": len(moved)}

    @staticmethod
    def _pause(dispatchers: list[Dispatcher], duration: float) -> None:
        # Idle connections close now; busy ones after the message in hand (worker loop).
        for d in dispatchers:
            d.release_idle()
            d.wake_at(duration)

    # -- queue surgery ---------------------------------------------------------------------

    def _ready_take(self, sel: Selector) -> list[QueuedMessage]:
        """Matching messages out of every ready queue (the others go back in)."""
        taken = []
        queues = [q for q in self.engine.scheduler.queues.values() if sel.matches_queue(q)]
        if not queues:
            return taken
        for d in self.engine.dispatchers.values():
            for q in queues:
                for msg in d.ready.drain(q):
                    if sel.matches(msg):
                        taken.append(msg)
                    elif d.ready.offer(msg):
                        d.wake()
        return taken

    def flush(self, sel: Selector) -> dict:
        """Deferred messages `sel` matches go out now (holds and suspensions still apply)."""
        return {"flushed": self.engine.scheduler.flush(sel), "selector": sel.to_json()}

    def hold(self, sel: Selector) -> dict:
        """Matching messages stay queued, never delivered until released (kept on restart)."""
        sched = self.engine.scheduler
        sched.add_hold(sel)
        for msg in self._ready_take(sel):
            sched.hold_back(msg)
        self._save()
        held = sum(1 for msg, where in sched.waiting() if where == "held" and sel.matches(msg))
        return {"holding": sel.to_json(), "held": held,
                "holds": [h.to_json() for h in sched.holds]}

    def release(self, sel: Selector) -> dict:
        sched = self.engine.scheduler
        if sel not in sched.holds:
            raise ControlError(f"no hold on {sel} (holds: "
                               f"{'; '.join(str(h) for h in sched.holds) or 'none'})")
        released = sched.release(sel)
        self._save()
        return {"released": released, "selector": sel.to_json(),
                "holds": [h.to_json() for h in sched.holds]}

    def _remove(self, sel: Selector) -> list[QueuedMessage]:
        """Take what `sel` matches out of the queues (wheel, deques, ready queues)."""
        return self.engine.scheduler.take(sel) + self._ready_take(sel)

    def _entry_done(self, msg: QueuedMessage) -> None:
        """`msg` left its scheduled queue for good: tombstone when it was its message's last
        entry, else mark its recipients done (as Outcomes does for a finished entry)."""
        eng = self.engine
        eng.scheduler.finished(msg)
        open_entries = eng.outcomes.open_entries
        left = open_entries.get(msg.id)
        if left is None or left <= 1:
            open_entries.pop(msg.id, None)
            eng.spool.finish(msg.id)
        else:
            open_entries[msg.id] = left - 1
            eng.spool.finish_recipients(msg.id, list(msg.rcpts))

    def delete(self, sel: Selector, reason: str = "") -> dict:
        """Matching messages leave the queue: no delivery, no DSN; a record each."""
        reason = _reason(reason)
        logs = self.engine.outcomes.logs
        removed = self._remove(sel)
        for msg in removed:
            env = self._envelope(msg)
            if logs is not None:
                logs.log(RecordType.ADMIN_DELETE, id=msg.id_text, queue=msg.queue.name,
                         recipients=[env.recipients[i].address for i in msg.rcpts]
                         if env is not None else None,
                         sender=env.sender if env is not None else None,
                         tenant=msg.queue.tenant or None, campaign=msg.queue.campaign or None,
                         reason=reason, selector=sel.to_json())
            self._entry_done(msg)
        return {"deleted": len(removed), "messages": len({m.id for m in removed}),
                **self._in_flight(sel, removed), "selector": sel.to_json()}

    def _in_flight(self, sel: Selector, removed: list) -> dict:
        """One message asked for by id, not found waiting but still queued: an attempt
        at it is running (it settles itself; ask again if it is deferred)."""
        if sel.id and not removed and sel.id in self.engine.spool:
            return {"in_flight": 1}
        return {}

    def bounce(self, sel: Selector, reason: str = "") -> dict:
        """As delete, with a DSN (failed, 5.0.0) to each message's sender."""
        reason = _reason(reason) or "removed by the operator"
        out = self.engine.outcomes
        removed = self._remove(sel)
        dsns = 0
        now = self.engine.clock()
        for msg in removed:
            env = self._envelope(msg)
            if env is None:
                self._entry_done(msg)
                continue
            diag = f"550 5.0.0 {reason}"
            report = [RecipientStatus(env.recipients[i].address, env.recipients[i].orcpt,
                                      "failed", "5.0.0", diag, None, now, None)
                      for i in msg.rcpts if should_notify("failed", env.recipients[i].notify)]
            sent = bool(env.sender and report)
            if sent:
                try:
                    _, content = self.engine.spool.read(msg.id)
                    dsn = build_dsn(reporting_mta=out.hostname,
                                    original_envelope_id=env.envid, sender=env.sender,
                                    recipients=report, original_content=bytes(content),
                                    ret=env.ret, arrival_date=msg.received,
                                    queue_id=id_text(msg.id))
                    out.inject("", [env.sender], dsn)
                    dsns += 1
                except (KeyError, ValueError) as exc:
                    log.warning("admin bounce of %s: no DSN: %s", msg.id_text, exc)
                    sent = False
            if out.logs is not None:
                for i in msg.rcpts:
                    out.logs.log(RecordType.ADMIN_BOUNCE, id=msg.id_text, queue=msg.queue.name,
                                 recipient=env.recipients[i].address, sender=env.sender,
                                 tenant=msg.queue.tenant or None,
                                 campaign=msg.queue.campaign or None, status="5.0.0",
                                 reason=reason, selector=sel.to_json(), dsn=sent)
            self._entry_done(msg)
        return {"bounced": len(removed), "messages": len({m.id for m in removed}),
                "dsns": dsns, **self._in_flight(sel, removed), "selector": sel.to_json()}

    def _envelope(self, msg: QueuedMessage):
        try:
            return self.engine.spool.read(msg.id)[0]
        except (KeyError, OSError, ValueError):
            return None

    def surgery(self, verb: str, args: dict) -> dict:
        """POST /control/{flush,hold,release,delete,bounce}: {"selector": {...}, "reason"}."""
        try:
            sel = Selector.from_json(args.get("selector"))
        except SelectorError as exc:
            raise ControlError(str(exc)) from None
        if verb in ("delete", "bounce"):
            return getattr(self, verb)(sel, str(args.get("reason") or ""))
        return getattr(self, verb)(sel)

    # -- shaping overrides ---------------------------------------------------------------

    def limits(self, args: dict) -> dict:
        """POST /control/limits: {"kind", "name", "site", "values": {key: value},
        "ttl": seconds or null, "reason"}; with "clear": true, {"keys": [...]} (all when
        empty) are dropped instead."""
        try:
            scope = Scope(str(args.get("kind")), str(args.get("name") or ""),
                          str(args.get("site") or ""))
        except LimitsError as exc:
            raise ControlError(str(exc)) from None
        key = (scope.kind, scope.name, scope.site)
        source = self.engine.limits
        if args.get("clear"):
            keys = [str(k) for k in args.get("keys") or ()]
            if not source.clear(scope, keys):
                raise ControlError(f"no override of {scope}"
                                   + (f" with {', '.join(keys)}" if keys else ""))
            raw = self._limits.get(key)
            if raw is not None:
                for k in keys or list(raw["values"]):
                    raw["values"].pop(k, None)
                if not raw["values"]:
                    del self._limits[key]
            self._save()
            return {"cleared": str(scope), "keys": keys or None,
                    "overrides": source.overrides()}
        values = args.get("values")
        if not isinstance(values, dict) or not values:
            raise ControlError("values: a JSON object of shaping keys to override")
        ttl = args.get("ttl")
        if ttl is not None and not isinstance(ttl, (int, float)):
            raise ControlError("ttl: seconds, or null for no end")
        reason = _reason(str(args.get("reason") or ""))
        try:
            o = source.set(scope, values, ttl=ttl, reason=reason)
        except LimitsError as exc:
            raise ControlError(str(exc)) from None
        raw = self._limits.setdefault(key, {"values": {}, "expires": None, "reason": ""})
        raw["values"].update(values)
        raw["expires"], raw["reason"] = o.expires, o.reason
        self._save()
        return {"override": o.view()}

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> dict:
        """What the state file holds (expired suspensions and overrides left out)."""
        now = self.engine.clock()
        live = {o["scope"] for o in self.engine.limits.overrides()}
        return {
            "version": _STATE_VERSION,
            "suspensions": [{"kind": k, "name": n, "site": s or None, "until": u}
                            for (k, n, s), u in self._suspensions.items() if u > now],
            "rebinds": dict(self._rebinds),
            "holds": [h.to_json() for h in self.engine.scheduler.holds],
            "limits": [{"kind": k, "name": n, "site": s or None, **raw}
                       for (k, n, s), raw in self._limits.items()
                       if (raw["expires"] is None or raw["expires"] > now)
                       and str(Scope(k, n, s)) in live]}

    def _save(self) -> None:
        if self.state_path is None:
            return
        path = self.state_path
        try:
            write_atomic(path, orjson.dumps(self.state(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            # the change is in force; only its survival across a restart is at risk
            log.error("operator state %s not saved: %s (the change holds until a restart)",
                      path, exc.strerror or exc)

    def restore(self) -> dict:
        """Load the state file and apply what has not expired (before recovery queues the
        recovered messages, so holds and suspensions apply to them). Returns counts."""
        done = {"suspensions": 0, "rebinds": 0, "holds": 0, "limits": 0}
        if self.state_path is None or not os.path.exists(self.state_path):
            return done
        try:
            with open(self.state_path, "rb") as f:
                state = orjson.loads(f.read(1 << 22))
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"not a version {_STATE_VERSION} state file")
        except (OSError, ValueError) as exc:
            bad = self.state_path + ".bad"
            log.error("operator state %s unreadable (%s): moved to %s; starting without it",
                      self.state_path, exc, bad)
            try:
                os.replace(self.state_path, bad)
            except OSError:
                pass
            return done
        now = self.engine.clock()
        sched = self.engine.scheduler
        for item in _list(state.get("holds")):
            try:
                sel = Selector.from_json(item)
            except SelectorError as exc:
                log.warning("operator state: hold %r dropped: %s", item, exc)
                continue
            if sel not in sched.holds:
                sched.holds.append(sel)
                done["holds"] += 1
        for item in _list(state.get("suspensions")):
            try:
                kind, name = str(item["kind"]), str(item["name"])
                site, until = str(item.get("site") or ""), float(item["until"])
            except (KeyError, TypeError, ValueError):
                log.warning("operator state: suspension %r dropped: malformed", item)
                continue
            if until <= now:
                continue
            try:
                self._restore_suspension(kind, name, site, until, now)
            except ControlError as exc:
                log.warning("operator state: suspension of %s %s dropped: %s", kind, name, exc)
                continue
            self._suspensions[(kind, name, site)] = until
            done["suspensions"] += 1
        rebinds = state.get("rebinds")
        for queue, pool in (rebinds.items() if isinstance(rebinds, dict) else ()):
            if str(pool) not in self.engine.egress.pools:
                log.warning("operator state: rebind of %s dropped: no pool %r", queue, pool)
                continue
            try:
                self._queue_to_suspend(str(queue)).pool = str(pool)
            except ControlError as exc:
                log.warning("operator state: rebind of %s dropped: %s", queue, exc)
                continue
            self._rebinds[str(queue)] = str(pool)
            done["rebinds"] += 1
        for item in _list(state.get("limits")):
            try:
                scope = Scope(str(item["kind"]), str(item["name"]), str(item.get("site") or ""))
                expires = item.get("expires")
                if expires is not None and float(expires) <= now:
                    continue
                values = dict(item["values"])
                o = self.engine.limits.set(scope, values, reason=str(item.get("reason") or ""),
                                           ttl=None if expires is None else float(expires) - now)
            except (KeyError, TypeError, ValueError) as exc:   # LimitsError is a ValueError
                log.warning("operator state: shaping override %r dropped: %s", item, exc)
                continue
            self._limits[(scope.kind, scope.name, scope.site)] = {
                "values": values, "expires": o.expires, "reason": o.reason}
            done["limits"] += 1
        if any(done.values()):
            log.info("operator state restored from %s: %s", self.state_path, done)
        return done

    def _restore_suspension(self, kind: str, name: str, site: str, until: float,
                            now: float) -> None:
        if kind == "queue":
            self.engine.scheduler.suspend(self._queue_to_suspend(name), until - now)
        elif kind == "source":
            self._source(name).suspended_until = until
        elif kind in ("site", "pair"):
            if kind == "pair" and not site:
                raise ControlError("a pair needs a site")
            self._pending[(kind, name, site)] = until
            if self._outlet_for is None:   # watch for the first dispatcher of the site
                sched = self.engine.scheduler
                self._outlet_for = sched.outlet_for
                sched.outlet_for = self._outlet_with_pending
        else:
            raise ControlError(f"unknown kind {kind!r}")

    def _outlet_with_pending(self, queue, site):
        """Scheduler.outlet_for while restored site/pair suspensions wait for their site."""
        assert self._outlet_for is not None
        d = self._outlet_for(queue, site)
        if not hasattr(d, "site_state"):   # not a dispatcher: the message waits (warm-up caps)
            return d
        now = self.engine.clock()
        for key in [k for k in self._pending
                    if (k[0] == "site" and k[1] == site.name)
                    or (k[0] == "pair" and k[2] == site.name and k[1] == d.source.name)]:
            until = self._pending.pop(key)
            if until > now:
                if key[0] == "site":
                    d.site_state.suspended_until = until
                else:
                    d.suspended_until = until
                self._pause([d], until - now)
        if not self._pending:
            self.engine.scheduler.outlet_for = self._outlet_for
            self._outlet_for = None
        return d

    def actions(self) -> dict[str, Callable[[dict], Any]]:
        """The admin API's POST routes for these controls."""
        return {
            "/control/suspend": lambda a: self.suspend(
                str(a.get("kind")), str(a.get("name")), str(a.get("site") or ""),
                float(a.get("duration") or DEFAULT_DURATION)),
            "/control/resume": lambda a: self.resume(
                str(a.get("kind")), str(a.get("name")), str(a.get("site") or "")),
            "/control/rebind": lambda a: self.rebind(str(a.get("queue")), str(a.get("pool"))),
            **{f"/control/{verb}": (lambda a, verb=verb: self.surgery(verb, a))
               for verb in ("flush", "hold", "release", "delete", "bounce")},
            "/control/limits": self.limits,
        }


def _reason(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:_MAX_REASON]


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
