"""Adaptive delivery: automation rules on replies, rate rules per (source, provider).

Where it sits: the delivery engine registers `observe` as an Outcomes observer (every
attempt result, after it is applied) and `complaint` as a Feedback complaint observer,
and implements the `Actuator` below (what only delivery can do: pause dispatchers,
hold scheduled queues, bounce queued mail). Shaping limits change through the
LimitsSource overrides (mta/egress/limits.py), so a live (source, site) takes them
without reconnecting: its throttles keep their tokens, a lowered connection_limit
closes idle connections only.

"Provider" is the shaping provider the site's MX hosts match (Limits.matched), else the
site itself; actions on a (source, provider) use the LimitsSource scope
"source_provider" (or "pair" for a site that is its own provider).

Automation rules (shaping files, `[[TABLE.automation]]`, parsed by mta/egress/shaping.py
into `Limits.automation`): each distinct non-2xx reply of an attempt is tried against the
rules of its path (a rule reads at most 512 characters of the reply: Python `re` on the
operator's own patterns, compiled once per shaping load). A site failure (no MX host took
a connection) defers everything waiting for the site with one reply: that is one event,
for the rules and for the rates. A rule with `after = N` acts on
the Nth match within `within` (per rule and (source, provider): a deque of at most N
times). Actions, each for `duration`:
- suspend: the (source, provider) pair (its dispatchers stop opening connections and
  close after the message in hand; messages wait in their ready queues);
- suspend_source: the source everywhere (pools skip it, its waiting mail is routed again);
- suspend_tenant / suspend_campaign: the message's tenant or campaign at that provider:
  its scheduled queues for that provider's sites are held;
- bounce: what the message's tenant and campaign have queued for that provider is bounced
  (one-off: DSNs and Bounce records through Outcomes);
- set: shaping keys overridden for the (source, provider); after the duration they come
  back in `steps` steps, each halving what is left of the cut (a rate with no configured
  limit doubles instead), every `step_for` or every `recover_after` good deliveries,
  whichever comes first; a new match puts the full cut back.

Rate rules: per (source, provider) a ring of per-minute buckets ([adaptive] window) counts
recipients tried, delivered, hard bounces, sender-related deferrals and complaints: O(1)
per event (a bucket is cleared when the clock passes into it), bounded memory
([adaptive] max_pairs windows, least recently used dropped). Once the window holds
min_volume recipients (min_complaint_volume deliveries for complaints), a rate over a
suspend threshold suspends the pair for suspend_for; over a throttle threshold its
max_message_rate is cut to throttle_to percent of what it sent in the window (or of its
limit, if lower) for throttle_for, then steps back as above. The window starts again
after either. Hard bounce: a 5xx the engine's classifier grades hard. Deferral: a 4xx
with a 4.7.x status or code 421 (policy, rate, reputation), greylisting excluded.

Persistence: `state()` lists every active action (its end, step, values and the values
it came down from); the engine writes it to the spool directory on each change and hands
it to `restore()` at start. Counters and windows are not kept (they refill).
Log records: AdaptiveAction for each action taken (or put back to full strength),
AdaptiveRestore for each step back and the final undo.
Trust: the rules are the operator's; the replies are the network's (only their first 512
characters are read, and only by the operator's patterns).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from mta.config.values import Invalid, check_value
from mta.egress.limits import LimitsError, LimitsSource, Scope
from mta.egress.shaping import KEYS, RULE_TEXT_LIMIT, Limits, Rule
from mta.model.log_records import RecordType
from mta.model.rate import Rate

if TYPE_CHECKING:
    from mta.config.schema import AdaptiveConfig
    from mta.model.attempt import RemoteReply

log = logging.getLogger("mta.adaptive")

SUSPENDS = ("suspend", "suspend_source", "suspend_tenant", "suspend_campaign")
STATE_VERSION = 1
_BY_HIGHER = ("retry_initial", "retry_max")     # a larger value is the tighter one
# window counters
_TRIED, _DELIVERED, _HARD, _DEFERRED, _COMPLAINTS = range(5)


class Actuator(Protocol):
    """What adaptive delivery asks of the delivery engine."""

    def pause_pair(self, source: str, provider: str, site: bool, until: float,
                   reply: RemoteReply | None) -> None: ...
    def lift_pair(self, source: str, provider: str, site: bool, until: float) -> None: ...
    def pause_source(self, source: str, until: float) -> None: ...
    def lift_source(self, source: str, until: float) -> None: ...
    def hold(self, provider: str, site: bool, kind: str, target: str, until: float) -> None: ...
    def bounce(self, source: str, provider: str, site: bool, tenant: str, campaign: str,
               reason: str) -> int: ...
    def log(self, rtype: RecordType, **fields: Any) -> None: ...
    def changed(self) -> None: ...          # the state() changed: write it


@dataclass(slots=True)
class Active:
    """One action in force."""

    rule: str
    action: str              # one of SUSPENDS, or "set"
    source: str
    provider: str
    site: bool               # `provider` is a site name (no shaping provider matched)
    target: str              # the tenant or campaign of suspend_tenant/_campaign, else ""
    until: float             # end of the full-strength phase, then of the current step
    reason: str
    started: float
    values: dict[str, Any] = field(default_factory=dict)   # set: in force now
    base: dict[str, Any] = field(default_factory=dict)     # set: what they came down from
    step: int = 0
    steps: int = 0
    step_for: float = 0.0
    recover_after: int = 0
    good: int = 0

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.rule, self.action, self.source, self.provider, self.target)

    def value(self) -> Any:
        if self.action == "set":
            return {k: _text(v) for k, v in self.values.items()}
        return self.target or None

    def view(self, now: float) -> dict[str, Any]:
        return {"rule": self.rule, "action": self.action, "source": self.source,
                "provider": self.provider, "target": self.target or None,
                "value": self.value(), "until": self.until,
                "left": max(0.0, round(self.until - now, 1)),
                "step": self.step, "steps": self.steps, "reason": self.reason}


class Window:
    """Per-minute buckets over the last `minutes` minutes: O(1) per event."""

    __slots__ = ("minutes", "buckets", "totals", "last", "first")

    def __init__(self, minutes: int, now: float) -> None:
        self.minutes = minutes
        self.buckets = [[0, 0, 0, 0, 0] for _ in range(minutes)]
        self.totals = [0, 0, 0, 0, 0]
        self.last = int(now // 60)        # the minute the newest bucket is for
        self.first = self.last            # when counting started (a partly filled window)

    def _advance(self, now: float) -> list[int]:
        minute = int(now // 60)
        gap = minute - self.last
        if gap > 0:
            for m in range(self.last + 1, self.last + 1 + min(gap, self.minutes)):
                b = self.buckets[m % self.minutes]
                for i in range(5):
                    self.totals[i] -= b[i]
                    b[i] = 0
            self.last = minute
        return self.buckets[self.last % self.minutes]

    def add(self, now: float, counts: tuple[int, int, int, int, int]) -> None:
        b = self._advance(now)
        for i, n in enumerate(counts):
            if n:
                b[i] += n
                self.totals[i] += n

    def read(self, now: float) -> list[int]:
        self._advance(now)
        return self.totals

    def span(self) -> int:
        """Minutes the counts cover (fewer than the window while it fills)."""
        return max(1, min(self.minutes, self.last - self.first + 1))


class Adaptive:
    """The rules' counters and the actions in force, with their way back."""

    def __init__(self, limits: LimitsSource, actuator: Actuator, config: AdaptiveConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.actuator = actuator
        self.clock = clock
        self.active: dict[tuple[str, str, str, str, str], Active] = {}
        # (source, provider) -> until, for dispatchers made while it is suspended
        self.paused: dict[tuple[str, str], float] = {}
        # (provider, "tenant"|"campaign", name) -> until
        self.holds: dict[tuple[str, str, str], float] = {}
        self._matches: OrderedDict[tuple[str, str, str, str], deque[float]] = OrderedDict()
        self._windows: OrderedDict[tuple[str, str], Window] = OrderedDict()
        self._pushed: dict[Scope, set[str]] = {}   # keys we override per scope
        self._last: RemoteReply | None = None      # the first reply of the last result
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.counters = {"taken": 0, "restored": 0, "shared": 0, "received": 0}
        # [cluster] host or redis: publishes each action this process takes (the action
        # as remote() reads it, seconds it has left) to the other workers and nodes
        self.share: Callable[[dict[str, Any], float], None] | None = None
        self._remote = False      # applying another process's action: not shared again
        self.configure(config)

    def configure(self, config: AdaptiveConfig) -> None:
        """[adaptive] values (at start and on reload); a new window size starts the
        windows again."""
        old = getattr(self, "config", None)
        self.config = config
        self.minutes = max(1, int(config.window // 60))
        if old is not None and int(old.window // 60) != self.minutes:
            self._windows.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- inputs ------------------------------------------------------------------------------

    def observe(self, source: str, provider: str, site: bool, limits: Limits | None,
                replies: list[tuple[int, RemoteReply]], tenant: str, campaign: str,
                hard: Callable[[RemoteReply], bool]) -> None:
        """One attempt's deciding replies at (source, provider); `limits` those in force."""
        if not self.config.enabled or not source or not replies:
            return
        first = replies[0][1]
        if first is self._last:
            # the same reply object again: a site failure (no MX host took a connection)
            # defers every message waiting for the site with one reply; it is one event
            return
        self._last = first
        now = self.clock()
        tried = delivered = hard_n = deferred = 0
        seen: list[RemoteReply] = []
        rules = limits.automation if limits is not None else ()
        for _, r in replies:
            code = r.code
            tried += 1
            if code < 300:
                delivered += 1
                continue
            if code >= 500:
                if hard(r):
                    hard_n += 1
            elif (code == 421 or r.status.startswith("4.7.")) \
                    and "greylist" not in r.text[:RULE_TEXT_LIMIT].lower():
                deferred += 1
            if rules and not any(r is s for s in seen):
                seen.append(r)   # one match per distinct reply: an attempt, not its recipients
                for rule in rules:
                    if rule.matches(code, r.status, r.text):
                        self._matched(rule, source, provider, site, r, tenant, campaign,
                                      limits, now)
        if delivered and self.active:
            self._good(source, provider, delivered, now)
        w = self._window(source, provider, now)
        w.add(now, (tried, delivered, hard_n, deferred, 0))
        # A rate can only cross a threshold when failures were added or a minimum volume
        # was just reached: most results are plain deliveries, checked for nothing.
        t, c = w.totals, self.config
        if (hard_n or deferred or t[0] - tried < c.min_volume <= t[0]
                or (t[4] and t[1] - delivered < c.min_complaint_volume <= t[1])):
            self._check_rates(source, provider, site, w, limits, now)

    def complaint(self, source: str, provider: str, site: bool) -> None:
        """A complaint (ARF) about mail from `source` to `provider`."""
        if not self.config.enabled or not source:
            return
        now = self.clock()
        w = self._window(source, provider, now)
        w.add(now, (0, 0, 0, 0, 1))
        self._check_rates(source, provider, site, w, None, now)

    # -- rules ------------------------------------------------------------------------------

    def _matched(self, rule: Rule, source: str, provider: str, site: bool,
                 reply: RemoteReply, tenant: str, campaign: str, limits: Limits | None,
                 now: float) -> None:
        if rule.after > 1:
            key = (rule.table, rule.name, source, provider)
            times = self._matches.get(key)
            if times is None or times.maxlen != rule.after:
                times = self._matches[key] = deque(maxlen=rule.after)
                if len(self._matches) > self.config.max_pairs:
                    self._matches.popitem(last=False)
            else:
                self._matches.move_to_end(key)
            times.append(now)
            if len(times) < rule.after or now - times[0] > rule.within:
                return
            times.clear()
        reason = _reason(reply)
        until = now + rule.duration
        for action in rule.actions:
            if action == "suspend":
                self._suspend(rule.name, action, source, provider, site, "", until, reason,
                              reply)
            elif action == "suspend_source":
                self._suspend(rule.name, action, source, provider, site, "", until, reason,
                              reply)
            elif action == "suspend_tenant":
                if tenant:
                    self._suspend(rule.name, action, source, provider, site, tenant, until,
                                  reason, reply)
            elif action == "suspend_campaign":
                if campaign:
                    self._suspend(rule.name, action, source, provider, site, campaign,
                                  until, reason, reply)
            elif action == "bounce":
                n = self.actuator.bounce(source, provider, site, tenant, campaign,
                                         f"rule {rule.name}: {reason}")
                self.counters["taken"] += 1
                self.actuator.log(RecordType.ADAPTIVE_ACTION, source=source,
                                  provider=provider, rule=rule.name, action="bounce",
                                  value=n, until=None, reason=reason)
        if rule.set:
            self._set(rule.name, source, provider, site, dict(rule.set), limits, until,
                      rule.steps, rule.step_for, rule.recover_after, reason)

    def _suspend(self, rule: str, action: str, source: str, provider: str, site: bool,
                 target: str, until: float, reason: str, reply: RemoteReply | None) -> None:
        key = (rule, action, source, provider, target)
        a = self.active.get(key)
        if a is not None and a.until >= until - 1.0:
            return                 # in force already (replies of attempts in flight)
        fresh = a is None
        if fresh:
            a = self.active[key] = Active(rule, action, source, provider, site, target,
                                          until, reason, self.clock())
        a.until = until
        self._apply_suspend(a, reply)
        if fresh:
            self.counters["taken"] += 1
            self.actuator.log(RecordType.ADAPTIVE_ACTION, source=source, provider=provider,
                              rule=rule, action=action, value=a.value(), until=until,
                              reason=reason)
        self._share(a)
        self._changed()

    def _apply_suspend(self, a: Active, reply: RemoteReply | None) -> None:
        if a.action == "suspend":
            pair = (a.source, a.provider)
            self.paused[pair] = max(self.paused.get(pair, 0.0), a.until)
            self.actuator.pause_pair(a.source, a.provider, a.site, a.until, reply)
        elif a.action == "suspend_source":
            self.actuator.pause_source(a.source, a.until)
        else:
            kind = "tenant" if a.action == "suspend_tenant" else "campaign"
            hk = (a.provider, kind, a.target)
            self.holds[hk] = max(self.holds.get(hk, 0.0), a.until)
            self.actuator.hold(a.provider, a.site, kind, a.target, a.until)

    def _set(self, rule: str, source: str, provider: str, site: bool,
             values: dict[str, Any], limits: Limits | None, until: float, steps: int,
             step_for: float, recover_after: int, reason: str,
             base_from: dict[str, Any] | None = None) -> None:
        key = (rule, "set", source, provider, "")
        a = self.active.get(key)
        if a is not None and a.step == 0 and a.values == values and a.until >= until - 1.0:
            return
        fresh = a is None
        if fresh:
            base = {}
            for k in values:
                # what the pair had before any of our overrides of k
                mine = next((o.base[k] for o in self.active.values() if o.action == "set"
                             and o.source == source and o.provider == provider
                             and k in o.base), _MISSING)
                if mine is _MISSING and base_from is not None and k in base_from:
                    mine = base_from[k]        # another node's: what it came down from
                base[k] = mine if mine is not _MISSING else (
                    getattr(limits, k) if limits is not None else None)
            a = self.active[key] = Active(rule, "set", source, provider, site, "", until,
                                          reason, self.clock(), dict(values), base,
                                          steps=steps, step_for=step_for,
                                          recover_after=recover_after)
        else:
            # a new match: the full cut again, for the whole duration (logged only when it
            # had begun to step back: a run of deferrals at full strength is one action)
            again = a.step > 0 or a.values != values
            a.values, a.until, a.step, a.good, a.reason = dict(values), until, 0, 0, reason
            if not again:
                self._push(a)
                self._share(a)
                self._changed()
                return
        self._push(a)
        self._share(a)
        self.counters["taken"] += 1
        self.actuator.log(RecordType.ADAPTIVE_ACTION, source=source, provider=provider,
                          rule=rule, action="set", value=a.value(), until=until,
                          reason=reason)
        self._changed()

    # -- shared with other workers and nodes ([cluster]) -------------------------------------

    def _share(self, a: Active) -> None:
        """Publish an action this process just took or renewed (at full strength)."""
        if self.share is None or self._remote:
            return
        item: dict[str, Any] = {"rule": a.rule, "action": a.action, "source": a.source,
                                "provider": a.provider, "site": a.site, "target": a.target,
                                "reason": a.reason[:500]}
        if a.action == "set":
            item.update(values={k: _raw(k, v) for k, v in a.values.items()},
                        base={k: _raw(k, v) for k, v in a.base.items()}, steps=a.steps,
                        step_for=a.step_for, recover_after=a.recover_after)
        try:
            self.share(item, a.until - self.clock())
            self.counters["shared"] += 1
        except Exception:        # the store's trouble must not stop the action here
            log.exception("adaptive: sharing %s %s", a.action, a.rule)

    def remote(self, item: object, left: float) -> bool:
        """Apply an action another worker or node took (mta/egress/shared on_action), for
        the `left` seconds it has there; its way back is then this process's own. The
        item is checked as a restored state is (another node's data is input): unknown
        actions, keys or bad values drop it (logged). True if applied."""
        if not self.config.enabled:
            return False
        try:
            if not isinstance(item, dict):
                raise TypeError("not an object")
            action = str(item["action"])
            if action not in (*SUSPENDS, "set"):
                raise ValueError(f"unknown action {action!r}")
            rule, source, provider, target = (_name(item[k]) for k in
                                              ("rule", "source", "provider", "target"))
            site = item["site"]
            if not isinstance(site, bool) or not source or not provider:
                raise ValueError("source, provider, site")
            reason = "shared: " + str(item.get("reason", ""))[:500]
            left = float(left)
            if not 0 < left <= 7 * 86400:
                raise ValueError(f"{left} s left")
            if action == "set":
                values = {k: _parse(k, v) for k, v in _small(item["values"]).items()}
                base = {k: _parse(k, v) for k, v in _small(item["base"]).items()}
                steps, recover_after = int(item["steps"]), int(item["recover_after"])
                step_for = float(item["step_for"])
                if not values or not 0 <= steps <= 100 or not 0 <= step_for <= 7 * 86400 \
                        or not 0 <= recover_after <= 10**9:
                    raise ValueError("values, steps, step_for, recover_after")
        except (KeyError, TypeError, ValueError, Invalid) as exc:
            log.warning("adaptive: a shared action dropped: %s", str(exc)[:200])
            return False
        now = self.clock()
        self._remote = True
        try:
            self.counters["received"] += 1
            if action == "set":
                self._set(rule, source, provider, site, values, None, now + left, steps,
                          step_for, recover_after, reason, base_from=base)
            else:
                self._suspend(rule, action, source, provider, site, target, now + left,
                              reason, None)
        finally:
            self._remote = False
        return True

    # -- the way back --------------------------------------------------------------------------

    def _good(self, source: str, provider: str, n: int, now: float) -> None:
        stepped = False
        for a in list(self.active.values()):
            if a.action == "set" and a.recover_after and a.source == source \
                    and a.provider == provider:
                a.good += n
                if a.good >= a.recover_after:
                    self._step(a, now, f"{a.good} good deliveries")
                    stepped = True
        if stepped:
            self._changed()

    def _step(self, a: Active, now: float, why: str) -> None:
        """One step back for `a` (the end, for a suspension or the last step)."""
        if a.action in SUSPENDS or a.step >= a.steps:
            self._undo(a, why)
            return
        a.step += 1
        a.good = 0
        a.values = {k: _halfway(k, a.base.get(k), v) for k, v in a.values.items()}
        if all(v == a.base.get(k) for k, v in a.values.items()):
            self._undo(a, why)
            return
        a.until = now + a.step_for
        self._push(a)
        self.actuator.log(RecordType.ADAPTIVE_RESTORE, source=a.source, provider=a.provider,
                          rule=a.rule, action=a.action, value=a.value(), until=a.until,
                          reason=f"step {a.step} of {a.steps + 1}: {why}")

    def _undo(self, a: Active, why: str) -> None:
        self.active.pop(a.key, None)
        if a.action == "suspend":
            pair = (a.source, a.provider)
            rest = [o.until for o in self.active.values()
                    if o.action == "suspend" and (o.source, o.provider) == pair]
            if rest:
                self.paused[pair] = max(rest)
            else:
                self.paused.pop(pair, None)
                self.actuator.lift_pair(a.source, a.provider, a.site, a.until)
        elif a.action == "suspend_source":
            if not any(o.action == "suspend_source" and o.source == a.source
                       for o in self.active.values()):
                self.actuator.lift_source(a.source, a.until)
        elif a.action in SUSPENDS:
            kind = "tenant" if a.action == "suspend_tenant" else "campaign"
            hk = (a.provider, kind, a.target)
            rest = [o.until for o in self.active.values()
                    if o.action == a.action and (o.provider, o.target) == hk[::2]]
            if rest:
                self.holds[hk] = max(rest)
            else:
                self.holds.pop(hk, None)
            # the held queues resume by their own timer (Scheduler.suspend)
        else:
            self._push(a, gone=True)
        self.counters["restored"] += 1
        value = {k: _text(v) for k, v in a.base.items()} if a.action == "set" else None
        self.actuator.log(RecordType.ADAPTIVE_RESTORE, source=a.source, provider=a.provider,
                          rule=a.rule, action=a.action, value=value, until=None,
                          reason=f"done: {why}")

    def _push(self, a: Active, gone: bool = False) -> None:
        """The LimitsSource override of a's (source, provider): the tightest value of
        every set action in force there, and none of the keys no action sets any more."""
        scope = _scope(a.source, a.provider, a.site)
        merged: dict[str, Any] = {}
        latest = 0.0
        for o in self.active.values():
            if o.action != "set" or o.source != a.source or o.provider != a.provider:
                continue
            latest = max(latest, o.until + o.step_for * (o.steps - o.step + 1))
            for k, v in o.values.items():
                merged[k] = _tighter(k, merged[k], v) if k in merged else v
        before = self._pushed.get(scope, set())
        try:
            stale = [k for k in before if k not in merged]
            if stale:
                self.limits.clear(scope, stale)
            if merged:
                # a safety net only: the steps above normally change it long before
                ttl = max(60.0, latest - self.clock() + 300.0)
                self.limits.set(scope, {k: _raw(k, v) for k, v in merged.items()}, ttl=ttl,
                                reason="adaptive: " + ", ".join(sorted(
                                    {o.rule for o in self.active.values()
                                     if o.action == "set" and o.source == a.source
                                     and o.provider == a.provider})))
                self._pushed[scope] = set(merged)
            else:
                self._pushed.pop(scope, None)
        except LimitsError as exc:
            log.error("adaptive: cannot override %s: %s", scope, exc)

    # -- rates -----------------------------------------------------------------------------

    def _window(self, source: str, provider: str, now: float) -> Window:
        key = (source, provider)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = Window(self.minutes, now)
            if len(self._windows) > self.config.max_pairs:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return w

    def _check_rates(self, source: str, provider: str, site: bool, w: Window,
                     limits: Limits | None, now: float) -> None:
        c = self.config
        tried, delivered, hard_n, deferred, complaints = w.read(now)
        suspend: list[str] = []
        throttle: list[str] = []
        if tried >= c.min_volume:
            for name, n, lo, hi in (("bounce", hard_n, c.bounce_throttle, c.bounce_suspend),
                                    ("deferral", deferred, c.deferral_throttle,
                                     c.deferral_suspend)):
                pct = 100.0 * n / tried
                what = f"{name} rate {pct:.2f} % of {tried} recipients"
                if pct >= hi:
                    suspend.append(what)
                elif pct >= lo:
                    throttle.append(what)
        if delivered >= c.min_complaint_volume and complaints:
            pct = 100.0 * complaints / delivered
            what = f"complaint rate {pct:.3f} % of {delivered} delivered"
            if pct >= c.complaint_suspend:
                suspend.append(what)
            elif pct >= c.complaint_throttle:
                throttle.append(what)
        if not suspend and not throttle:
            return
        span = w.span()
        self._windows.pop((source, provider), None)      # counting starts again
        if suspend:
            rule = "rate:" + suspend[0].split()[0]
            self._suspend(rule, "suspend", source, provider, site, "",
                          now + c.suspend_for, "; ".join(suspend), None)
            return
        per_minute = tried / span * c.throttle_to / 100.0
        current = limits.max_message_rate if limits is not None else None
        if current is not None:
            per_minute = min(per_minute, current.per_second * 60.0 * c.throttle_to / 100.0)
        rate = Rate(round(max(1.0, per_minute), 3), 60.0)
        self._set("rate:" + throttle[0].split()[0], source, provider, site,
                  {"max_message_rate": rate}, limits, now + c.throttle_for, c.steps,
                  c.throttle_for, 0, "; ".join(throttle))

    # -- views and state ---------------------------------------------------------------------

    def pair_until(self, source: str, provider: str) -> float:
        return self.paused.get((source, provider), 0.0)

    def hold_until(self, provider: str, tenant: str, campaign: str) -> float:
        h = self.holds
        return max(h.get((provider, "tenant", tenant), 0.0) if tenant else 0.0,
                   h.get((provider, "campaign", campaign), 0.0) if campaign else 0.0)

    def view(self) -> list[dict[str, Any]]:
        """Actions in force, soonest end first (`mta shaping show`, the admin API)."""
        now = self.clock()
        return [a.view(now) for a in sorted(self.active.values(), key=lambda a: a.until)]

    def state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "actions": [
            {"rule": a.rule, "action": a.action, "source": a.source, "provider": a.provider,
             "site": a.site, "target": a.target, "until": a.until, "reason": a.reason,
             "started": a.started, "values": {k: _raw(k, v) for k, v in a.values.items()},
             "base": {k: _raw(k, v) for k, v in a.base.items()}, "step": a.step,
             "steps": a.steps, "step_for": a.step_for, "recover_after": a.recover_after}
            for a in self.active.values()]}

    def restore(self, state: object) -> int:
        """Put back the actions of a state() saved before a restart; returns how many.
        A suspension whose end has passed is dropped; a `set` whose step is due steps on
        at the first timer."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} adaptive state")
        now = self.clock()
        n = 0
        for item in state.get("actions") or ():
            try:
                a = Active(str(item["rule"]), str(item["action"]), str(item["source"]),
                           str(item["provider"]), bool(item["site"]), str(item["target"]),
                           float(item["until"]), str(item["reason"])[:500],
                           float(item["started"]),
                           {k: _parse(k, v) for k, v in dict(item["values"]).items()},
                           {k: _parse(k, v) for k, v in dict(item["base"]).items()},
                           int(item["step"]), int(item["steps"]), float(item["step_for"]),
                           int(item["recover_after"]))
                if a.action not in (*SUSPENDS, "set"):
                    raise ValueError(f"unknown action {a.action!r}")
            except (KeyError, TypeError, ValueError, Invalid) as exc:
                log.warning("adaptive state: action %r dropped: %s", item, exc)
                continue
            if a.action in SUSPENDS and a.until <= now:
                continue
            self.active[a.key] = a
            if a.action == "set":
                self._push(a)
            else:
                self._apply_suspend(a, None)
            n += 1
        self._arm()
        return n

    def _changed(self) -> None:
        self._arm()
        self.actuator.changed()

    # -- timer -----------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is None or not self.active:
            return
        when = min(a.until for a in self.active.values())
        self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock()
        due = [a for a in self.active.values() if a.until <= now]
        for a in due:
            if a.key in self.active:
                self._step(a, now, "time")
        if due:
            self.actuator.changed()
        self._arm()


# --- values ---------------------------------------------------------------------------------

_MISSING = object()


def _scope(source: str, provider: str, site: bool) -> Scope:
    return Scope("pair" if site else "source_provider", source, provider)


def _reason(reply: RemoteReply) -> str:
    return f"{reply.code} {reply.status + ' ' if reply.status else ''}{reply.text[:200]}"


def _text(v: Any) -> Any:
    return str(v) if isinstance(v, Rate) else v


def _raw(key: str, v: Any) -> Any:
    """A checked value as a shaping file writes it (LimitsSource checks it again)."""
    if v is None:
        return "unlimited"
    return str(v) if isinstance(v, Rate) else v


def _parse(key: str, raw: Any) -> Any:
    if raw is None or raw == "unlimited" and key.endswith("rate"):
        return None
    k = KEYS.get(key)
    if k is None:
        raise ValueError(f"{key}: not a shaping key")
    return check_value(k, raw, Path())


def _name(v: object) -> str:
    """A rule, source, provider or target name from another node: a short string."""
    if not isinstance(v, str) or len(v) > 255 or any(c in v for c in "\r\n\0"):
        raise ValueError(f"bad name {str(v)[:60]!r}")
    return v


def _small(v: object) -> dict[str, Any]:
    """A dict of shaping keys from another node: at most as many keys as there are."""
    if not isinstance(v, dict) or len(v) > len(KEYS):
        raise ValueError("not a dict of shaping keys")
    return v


def _tighter(key: str, a: Any, b: Any) -> Any:
    if isinstance(a, Rate) or isinstance(b, Rate) or a is None or b is None:
        if a is None:
            return b
        if b is None:
            return a
        return a if a.per_second <= b.per_second else b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return max(a, b) if key in _BY_HIGHER else min(a, b)
    return b


def _halfway(key: str, base: Any, v: Any) -> Any:
    """Half of what is left of the cut from `base` to `v` (never all at once)."""
    if isinstance(v, Rate):
        if base is None:                   # no configured limit: double
            return Rate(round(v.count * 2, 3), v.per)
        ps = base.per_second - (base.per_second - v.per_second) / 2.0
        return Rate(round(ps * v.per, 3), v.per)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or base is None:
        return base
    if isinstance(v, int) and isinstance(base, int):
        left = (base - v) / 2             # what stays cut, rounded away from the base
        new = base - int(math.copysign(math.ceil(abs(left)), left))
        return base if new == v else new
    return base - (base - v) / 2.0
