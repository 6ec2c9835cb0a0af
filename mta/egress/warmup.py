"""IP warm-up: how much a new egress source may send each provider, day by day.

A [[source]] with `warmup_start` is warming: on warm-up day 1, 2, ... it sends each
provider at most its class's cap for that day ([warmup] major, small, default: issue
12's figures, about 10,000 messages a day to each major provider and 1,000 to a small
one from a fresh IP, never more than doubling a day), and at most the day's cap /
`hour_divisor` in any one hour. A provider's class is its shaping table's
`warmup_class` (mta/egress/shaping.py; the shipped file makes Gmail, Yahoo/AOL and
Outlook.com "major"); a site no provider matches is counted on its own with the
"default" schedule. Days and hours are counted from the source's start in units of
`day_length` (an hour is 1/24 of it), so a test or the ISP simulator runs a day in a
minute.

A class's cap moves to the schedule's next day only if the day before stayed under the
thresholds: 5xx replies, complaints and 4.7.x deferrals ("slow down", reputation) per
recipient tried from that source at that class; a day with fewer than `min_volume`
recipients tried is not judged. Otherwise the cap holds (or steps back a day,
`on_breach`). Idle days grow the cap as good ones do: providers' allowances follow the
IP's age. After the last day of a schedule there is no cap at that class.

Where it acts: the delivery engine asks `pick()` for every message it routes. The pool's
next source goes unless it is warming and at its cap for the message's provider; then
the pool's other sources are tried (warm ones always take it), and when every source
of the pool is at its cap the message waits on the timer wheel until the earliest cap
frees (`resume_at`). Per message that is one dict lookup for a warm source, a few for
a warming one; only a capped one scans its pool, and a pool found all capped is
remembered until a cap frees. Messages are counted when handed to the source's ready
queue (a retry counts again): the caps bound what a source is given, so what it sends
in a day never exceeds them, except that a message given late in one hour may leave
early in the next.

Several workers or nodes ([cluster] backend host or redis, mta/egress/shared): the day and
hour counts live in the shared store (`SharedCount`: a batch of allowance per store call,
within both caps for every process together; redis: the first message of an hour, or one
arriving while a batch is on its way, waits about a second on the timer wheel), and the
day's judgement inputs are sent to it each second, so every process judges the day on
everyone's counts (host exactly; redis on the totals last seen, at most a second old, plus
its own). While the store is away (or the host table is full) a process counts alone at
[cluster] fallback_fraction of each cap, on its own day's counts. The store's keys name the
source and its configured warmup_start: workers must share the same start ("now" resolves
per worker a moment apart: hours then begin a moment apart too). What each worker shows
in `view()` (and saves in warmup.json) is still its own share.

Inputs besides routing: every attempt result (`observe`, an Outcomes observer) and
every complaint (`complaint`, a Feedback complaint observer), counted per (source,
class) for the current warm-up day.
State: the start ("now" resolves to the first start that sees it), day, the schedule
position per class, today's counters and judgement inputs survive a restart in
`warmup.json` in the spool directory (mta/files write_atomic: temp file, fsync,
rename), written every warm-up hour (at most every 60 s) and at stop; a crash loses at
most that much counting. A file that cannot be read is renamed to *.bad and logged.
Log records: one WarmupDay per source and class at each new warm-up day (grown, held
or stepped back, and why). Imports model, config and egress only (rank 3).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mta.egress.shared.base import ALONE, DAY, GRANTED, HOUR, fallback_limit
from mta.files import write_atomic
from mta.model.attempt import AttemptResult
from mta.model.log_records import RecordType

if TYPE_CHECKING:
    from mta.config import Config
    from mta.config.schema import WarmupConfig
    from mta.egress.pools import Pool, Source
    from mta.egress.shaping import Shaping
    from mta.egress.shared.base import SharedCount, SharedLimits
    from mta.egress.sites import Site

log = logging.getLogger("mta.egress.warmup")

CLASSES = ("major", "small", "default")
STATE_NAME = "warmup.json"
_STATE_VERSION = 1
_MAX_STATE = 1 << 24        # bytes of state file read at most
_MAX_TARGETS = 100_000    # sites remembered with their provider and class (then cleared)
_SHARED_WAIT = 0.01        # seconds before a message waiting on the shared store tries again
_STATS_EVERY = 1.0          # seconds between sends of the day's counts to the shared store
_SAVE_EVERY = 60.0          # seconds between saves at most (a warm-up hour when shorter)


class Logs(Protocol):
    def log(self, rtype: RecordType, **fields: object) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where a site's mail counts: its provider (or the site itself) and the class."""

    key: str        # provider name, or "site:" + site name when no provider matches
    klass: str      # major, small or default


class Usage:
    """Messages given to a source for one target in the current day and hour."""

    __slots__ = ("day", "hour", "day_count", "hour_count")

    def __init__(self, day: int = 0, hour: int = -1, day_count: int = 0,
                 hour_count: int = 0) -> None:
        self.day = day
        self.hour = hour
        self.day_count = day_count
        self.hour_count = hour_count


class DayStats:
    """What one warm-up day of a source at one class came to: the judgement's inputs."""

    __slots__ = ("tried", "bounced", "deferred", "complaints")

    def __init__(self, tried: int = 0, bounced: int = 0, deferred: int = 0,
                 complaints: int = 0) -> None:
        self.tried = tried            # recipients with a reply from the provider
        self.bounced = bounced        # of those, 5xx
        self.deferred = deferred      # of those, 4xx with a 4.7.x status (about the sender)
        self.complaints = complaints  # complaints received this day (any earlier message)

    def to_list(self) -> list[int]:
        return [self.tried, self.bounced, self.deferred, self.complaints]


class Warming:
    """One warming source: its start, current day, schedule position and today's use."""

    __slots__ = ("name", "configured", "start", "day", "steps", "stats", "usage", "notes")

    def __init__(self, name: str, configured: str, start: float) -> None:
        self.name = name
        self.configured = configured                 # warmup_start as configured
        self.start = start                           # wall time day 1 began
        self.day = 1                                 # the warm-up day counted last
        self.steps = dict.fromkeys(CLASSES, 0)       # class -> index into its schedule
        self.stats = {c: DayStats() for c in CLASSES}  # today's, per class
        self.usage: dict[str, Usage] = {}            # target key -> today's use
        self.notes = dict.fromkeys(CLASSES, "")      # class -> the last day's judgement


def start_time(configured: str, now: float) -> float:
    """Wall time of a configured warmup_start ("now": `now`)."""
    if configured == "now":
        return now
    return datetime.datetime.fromisoformat(configured).timestamp()


class Warmup:
    """The warming sources, their caps and counters; see the module docstring."""

    def __init__(self, config: Config, shaping: Shaping, *, state_path: Path | None,
                 logs: Logs | None = None, clock: Callable[[], float],
                 shared: SharedLimits | None = None) -> None:
        self.clock = clock
        # [cluster] host or redis: the caps count what every worker and node gave a source
        # (mta/egress/shared, SharedCount); None: this process's own counters
        self.shared = shared
        self._counts: dict[tuple[str, str, str], SharedCount] = {}
        # the day's judgement inputs summed in the store: (source, class, day) -> counts
        # not sent yet, and the totals of every process last seen
        self._stat_delta: dict[tuple[str, str, int], list[int]] = {}
        self._stat_seen: dict[tuple[str, str, int], list[int]] = {}
        self._stats_timer: asyncio.TimerHandle | None = None
        self.logs = logs
        self.state_path = state_path
        self.day_length = config.warmup.day_length       # restart-only
        self.hour_length = self.day_length / 24
        self.sources: dict[str, Warming] = {}            # only warming sources
        self._targets: dict[str, Target] = {}            # site name -> target
        self._blocked: dict[tuple[str, str], float] = {}  # (pool, target) -> all capped until
        self.resume_at = 0.0     # after pick() found no source: when the earliest cap frees
        # how far past resume_at the waiting message is spread (a tenth of an hour, so a
        # freed hour does not start with a burst; none when it waits on the shared store)
        self.spread = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self._apply(config, shaping)
        self._load()
        self._sync_sources(config)

    # -- configuration --------------------------------------------------------------------

    def _apply(self, config: Config, shaping: Shaping) -> None:
        w: WarmupConfig = config.warmup
        self.cfg = w
        self.shaping = shaping
        self.schedules: dict[str, Sequence[int]] = {
            "major": w.major, "small": w.small, "default": w.default}
        self._targets.clear()
        self._blocked.clear()

    def _sync_sources(self, config: Config) -> None:
        """Warming sources as configured: one kept by name with the same warmup_start keeps
        its state; a new or changed one starts at its day of the schedules (a start date in
        the past: as if every day since had been good); one without warmup_start is warm."""
        now = self.clock()
        wanted = {s.name: s.warmup_start for s in config.source if s.warmup_start}
        for name in list(self.sources):
            if name not in wanted or wanted[name] != self.sources[name].configured:
                del self.sources[name]
        for name, configured in wanted.items():
            if name not in self.sources:
                w = self.sources[name] = Warming(name, configured, start_time(configured, now))
                w.day = self._day(w, now)
                w.steps = dict.fromkeys(CLASSES, w.day - 1)
                self._dirty = True

    def reconfigure(self, config: Config, shaping: Shaping) -> None:
        """A reload: new schedules and thresholds, sources and provider classes
        (day_length is restart-only)."""
        self._apply(config, shaping)
        self._sync_sources(config)
        self._save()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()
        if self.shared is not None:
            self._stats_timer = loop.call_later(_STATS_EVERY, self._flush_stats)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
            pending, self._stat_delta = self._stat_delta, {}
            for k, delta in pending.items():     # host: written now; redis: if it can
                self._send_stats(k, delta)
        self._loop = None
        self._save()

    # -- the hot path ------------------------------------------------------------------------

    def target(self, site: Site) -> Target:
        """The provider (else the site) and class a site's mail counts at; cached."""
        t = self._targets.get(site.name)
        if t is None:
            t = self._new_target(site.name, [h.name for h in site.hosts])
        return t

    def _target_named(self, site_name: str) -> Target:
        """As target() from a site's name alone (a site is named by its MX host names
        joined by ","; a complaint may name a domain instead: a site of its own)."""
        t = self._targets.get(site_name)
        if t is None:
            t = self._new_target(site_name, site_name.split(","))
        return t

    def _new_target(self, name: str, mx_hosts: Sequence[str]) -> Target:
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        provider = self.shaping.provider_for(mx_hosts)
        t = self._targets[name] = Target(provider or f"site:{name}",
                                         self.shaping.warmup_class(provider))
        return t

    def pick(self, pool: Pool, source: Source, site: Site) -> Source | None:
        """`source` (the pool's next) if it may take one more message to the site now,
        else another source of the pool that may; None when every one is at its cap
        (then `resume_at` says when the earliest frees). Counts the message."""
        w = self.sources.get(source.name)
        if w is None:
            return source
        now = self.clock()
        t = self.target(site)
        free = self._take(w, t, now)
        if free == 0.0:
            return source
        key = (pool.name, t.key)
        until = self._blocked.get(key)
        if until is not None:
            if until > now:
                self.resume_at = until
                self.spread = self.hour_length / 10
                return None
            del self._blocked[key]
        earliest = free
        tried = {source.name}
        for _ in range(min(len(pool.sequence), 2 * len(pool.members))):
            src = pool.next()
            if src.name in tried:
                continue
            tried.add(src.name)
            got = self._offer(src, t, now)
            if got == 0.0:
                return src
            earliest = min(earliest, got)
        for src, _ in pool.members:            # a heavy capped member can hide light ones
            if src.name not in tried and not src.suspended(now):
                got = self._offer(src, t, now)
                if got == 0.0:
                    return src
                earliest = min(earliest, got)
        self.spread = 0.0 if earliest - now <= _SHARED_WAIT else self.hour_length / 10
        if self.spread:
            self._blocked[key] = earliest
        self.resume_at = earliest
        return None

    def _offer(self, src: Source, t: Target, now: float) -> float:
        w = self.sources.get(src.name)
        return 0.0 if w is None else self._take(w, t, now)

    def _take(self, w: Warming, t: Target, now: float) -> float:
        """Count one message from `w` to `t` if its caps allow: 0.0; else the wall time
        the cap that stops it frees."""
        hour = self._hour(w, now)
        day = hour // 24 + 1
        if day != w.day:
            self._roll(w, day)
        u = w.usage.get(t.key)
        if u is None:
            u = w.usage[t.key] = Usage(day, hour)
        if u.day != day:
            u.day, u.day_count = day, 0
        if u.hour != hour:
            u.hour, u.hour_count = hour, 0
        cap = self._cap(w, t.klass)
        if cap is not None:
            day_cap, hour_cap = cap
            if self.shared is not None:
                got = self._shared_take(w, t, day, hour, day_cap, hour_cap)
                if got == GRANTED:
                    u.day_count += 1
                    u.hour_count += 1
                    self._dirty = True
                    return 0.0
                if got == DAY:
                    return w.start + (day * 24) * self.hour_length
                if got == HOUR:
                    return w.start + (hour + 1) * self.hour_length
                if got != ALONE:            # WAIT: the store was asked; again in a moment
                    return now + _SHARED_WAIT
                # the store is away: this process's own counts at the fallback fraction
                fraction = self.shared.fallback_fraction
                day_cap = fallback_limit(day_cap, fraction)
                hour_cap = fallback_limit(hour_cap, fraction)
            if u.day_count >= day_cap:
                return w.start + (day * 24) * self.hour_length
            if u.hour_count >= hour_cap:
                return w.start + (hour + 1) * self.hour_length
        u.day_count += 1
        u.hour_count += 1
        self._dirty = True
        return 0.0

    def _shared_take(self, w: Warming, t: Target, day: int, hour: int, day_cap: int,
                     hour_cap: int) -> int:
        assert self.shared is not None
        c = self._counts.get((w.name, w.configured, t.key))
        if c is None:
            if len(self._counts) >= _MAX_TARGETS:
                self._counts.clear()
            # named by the configured start too: a source warming again from another start
            # counts afresh (hours since the start begin at 0 again)
            c = self._counts[(w.name, w.configured, t.key)] = self.shared.count(
                f"{w.name}@{w.configured}|{t.key}", self.hour_length)
        return c.take(day, hour, day_cap, hour_cap)

    def _cap(self, w: Warming, klass: str) -> tuple[int, int] | None:
        """(day cap, hour cap) of `w` at `klass` now; None: no cap (schedule done)."""
        schedule = self.schedules[klass]
        step = w.steps[klass]
        if step >= len(schedule):
            return None
        day_cap = schedule[step]
        return day_cap, -(-day_cap // self.cfg.hour_divisor)

    def _hour(self, w: Warming, now: float) -> int:
        """Warm-up hours since the start (0 before it)."""
        return int((now - w.start) // self.hour_length) if now > w.start else 0

    def _day(self, w: Warming, now: float) -> int:
        return self._hour(w, now) // 24 + 1

    # -- what came back ------------------------------------------------------------------------

    def observe(self, result: AttemptResult) -> None:
        """An Outcomes observer: count the provider's replies to a warming source."""
        at = result.at
        w = self.sources.get(at.source)
        if w is None or not at.mx:          # not warming, or no server answered
            return
        klass = self._target_named(at.site).klass
        now = self.clock()
        day = self._day(w, now)
        if day != w.day:
            self._roll(w, day)
        s = w.stats[klass]
        before = s.to_list()
        for _, reply in result.replies:
            s.tried += 1
            if reply.code >= 500:
                s.bounced += 1
            elif reply.code >= 400 and reply.status.startswith("4.7."):
                s.deferred += 1
        if self.shared is not None:
            self._count_stats(w, klass, [a - b for a, b in zip(s.to_list(), before)])
        self._dirty = True

    def complaint(self, source: str, site: str) -> None:
        """A Feedback complaint observer: count it for the source's current day."""
        w = self.sources.get(source)
        if w is None:
            return
        klass = self._target_named(site).klass
        now = self.clock()
        day = self._day(w, now)
        if day != w.day:
            self._roll(w, day)
        w.stats[klass].complaints += 1
        if self.shared is not None:
            self._count_stats(w, klass, [0, 0, 0, 1])
        self._dirty = True

    # -- the day's counts summed over every worker and node ([cluster] host, redis) --------

    def _count_stats(self, w: Warming, klass: str, delta: list[int]) -> None:
        k = (w.name, klass, w.day)
        have = self._stat_delta.get(k)
        if have is None:
            self._stat_delta[k] = delta
        else:
            for i, n in enumerate(delta):
                have[i] += n

    def _send_stats(self, k: tuple[str, str, int], delta: list[int]) -> None:
        name, klass, day = k
        w = self.sources.get(name)
        if w is None or self.shared is None:
            return

        def done(totals: list[int], k: tuple[str, str, int] = k) -> None:
            if len(self._stat_seen) >= _MAX_TARGETS:
                self._stat_seen.clear()
            self._stat_seen[k] = totals

        self.shared.add_stats(f"{name}@{w.configured}|{klass}", day, delta, done,
                              self.hour_length)

    def _flush_stats(self) -> None:
        """Each second: this process's new counts to the store (one call per source and
        class that had any)."""
        self._stats_timer = None
        pending, self._stat_delta = self._stat_delta, {}
        for k in self._stat_seen:     # others' counts of today, even when this one has none
            w = self.sources.get(k[0])
            if w is not None and k[2] == w.day and k not in pending:
                pending[k] = [0, 0, 0, 0]
        for k, delta in pending.items():
            self._send_stats(k, delta)
        if self._loop is not None:
            self._stats_timer = self._loop.call_later(_STATS_EVERY, self._flush_stats)

    def _day_totals(self, w: Warming, klass: str, day: int, mine: DayStats) -> DayStats:
        """What the day came to for every process (the store's totals; host: exact,
        redis: as of the last reply plus what this process has not sent); this process's
        own counts when the store knows nothing."""
        k = (w.name, klass, day)
        delta = self._stat_delta.pop(k, None)
        seen = self._stat_seen.get(k)
        if delta is not None or seen is not None:
            self._send_stats(k, delta or [0, 0, 0, 0])
            if self._stat_seen.get(k) is not seen:     # answered at once (host)
                delta = None
                seen = self._stat_seen[k]
        if seen is None:
            return mine
        total = [a + (delta[i] if delta else 0) for i, a in enumerate(seen)]
        total = [max(a, b) for a, b in zip(total, mine.to_list())]
        for key in [x for x in self._stat_seen if x[0] == w.name and x[2] < day]:
            del self._stat_seen[key]
        return DayStats(*total)

    # -- day by day --------------------------------------------------------------------------

    def judge(self, s: DayStats) -> str:
        """"" when a day with these counts lets the cap grow, else why not."""
        c = self.cfg
        if s.tried < c.min_volume:
            return ""
        for what, n, limit in (("bounce", s.bounced, c.max_bounce_rate),
                               ("complaint", s.complaints, c.max_complaint_rate),
                               ("deferral", s.deferred, c.max_deferral_rate)):
            rate = 100.0 * n / s.tried
            if rate > limit:
                return (f"{what} rate {rate:.2f} % > {limit:g} % "
                        f"({n} of {s.tried} recipients tried)")
        return ""

    def _roll(self, w: Warming, day: int) -> None:
        """Close warm-up days w.day .. day-1: judge each class, move its step, log."""
        if day <= w.day:
            return
        for d in range(w.day, min(day, w.day + 400)):    # a long stop: idle days grow
            for klass in CLASSES:
                s = w.stats[klass]
                if self.shared is not None and d == w.day:
                    s = self._day_totals(w, klass, d, s)
                why = self.judge(s)
                schedule = self.schedules[klass]
                before = w.steps[klass]
                if before >= len(schedule):
                    w.stats[klass] = DayStats()
                    continue                              # warm at this class: nothing to log
                if not why:
                    w.steps[klass] = before + 1
                    verdict = "grown"
                    note = (f"day {d}: {s.tried} recipients tried, not judged (min_volume "
                            f"{self.cfg.min_volume})" if s.tried < self.cfg.min_volume
                            else f"day {d}: under the thresholds")
                elif self.cfg.on_breach == "step_back" and before > 0:
                    w.steps[klass] = before - 1
                    verdict, note = "stepped_back", f"day {d}: {why}"
                else:
                    verdict, note = "held", f"day {d}: {why}"
                w.notes[klass] = f"{verdict}: {note}"
                cap = self._cap(w, klass)
                if self.logs is not None:
                    self.logs.log(RecordType.WARMUP_DAY, source=w.name, **{"class": klass},
                                  day=d + 1, cap=cap[0] if cap else None,
                                  hour_cap=cap[1] if cap else None, previous_cap=schedule[before],
                                  action=verdict, reason=note, tried=s.tried,
                                  bounced=s.bounced, deferred=s.deferred,
                                  complaints=s.complaints)
                log.info("warm-up %s %s day %d: %s", w.name, klass, d + 1, w.notes[klass])
                w.stats[klass] = DayStats()
        w.day = day
        self._dirty = True

    # -- operators -----------------------------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """Each warming source as `mta warmup show` lists it (JSON-able; control wraps it
        in typed rows: mta/control/views.py WarmupRow)."""
        now = self.clock()
        out = []
        for w in self.sources.values():
            day = self._day(w, now)
            if day != w.day:
                self._roll(w, day)
            hour = self._hour(w, now)
            classes = []
            for klass in CLASSES:
                cap = self._cap(w, klass)
                s = w.stats[klass]
                why = self.judge(s) if cap is not None else ""
                classes.append({
                    "class": klass, "step": w.steps[klass] + 1,
                    "day_cap": cap[0] if cap else None, "hour_cap": cap[1] if cap else None,
                    "tried": s.tried, "bounced": s.bounced, "deferred": s.deferred,
                    "complaints": s.complaints,
                    "may_grow": cap is not None and not why, "why_not": why or None,
                    "last": w.notes[klass] or None})
            use = [{"target": key, "class": self._class_of(key),
                    "day": u.day_count if u.day == w.day else 0,
                    "hour": u.hour_count if u.hour == hour else 0}
                   for key, u in sorted(w.usage.items())]
            out.append({"source": w.name, "start": w.start, "day": w.day,
                        "classes": classes, "use": use})
        return out

    def _class_of(self, key: str) -> str:
        return "default" if key.startswith("site:") else self.shaping.warmup_class(key)

    # -- state file ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "sources": {
            w.name: {"configured": w.configured, "start": w.start, "day": w.day,
                     "steps": dict(w.steps), "notes": dict(w.notes),
                     "stats": {c: s.to_list() for c, s in w.stats.items()},
                     "usage": {k: [u.day, u.hour, u.day_count, u.hour_count]
                               for k, u in w.usage.items()}}
            for w in self.sources.values()}}

    def _save(self) -> None:
        if self.state_path is None or not self._dirty:
            return
        self._dirty = False
        try:
            write_atomic(self.state_path, json.dumps(self.state(), indent=1).encode())
        except OSError as exc:
            self._dirty = True
            log.error("warm-up state %s not saved: %s (counting goes on in memory)",
                      self.state_path, exc.strerror or exc)

    def _load(self) -> None:
        """Warming sources from the state file (those still configured alike are kept by
        _sync_sources)."""
        path = self.state_path
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                state = json.loads(f.read(_MAX_STATE))
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"not a version {_STATE_VERSION} warm-up state file")
            for name, e in state["sources"].items():
                w = Warming(str(name), str(e["configured"]), float(e["start"]))
                w.day = max(1, int(e["day"]))
                for c in CLASSES:
                    w.steps[c] = max(0, int(e["steps"].get(c, 0)))
                    w.notes[c] = str(e["notes"].get(c, ""))
                    w.stats[c] = DayStats(*(int(n) for n in e["stats"].get(c, [0, 0, 0, 0])[:4]))
                for key, (d, h, dc, hc) in e["usage"].items():
                    w.usage[str(key)] = Usage(int(d), int(h), int(dc), int(hc))
                self.sources[w.name] = w
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.sources.clear()
            bad = f"{path}.bad"
            log.error("warm-up state %s unreadable (%s); renamed to %s, warming sources "
                      "start again at day 1", path, exc, bad)
            try:
                os.replace(path, bad)
            except OSError:
                pass

    def _arm(self) -> None:
        if self._loop is None:
            return
        every = min(max(self.hour_length, 1.0), _SAVE_EVERY)
        self._timer = self._loop.call_later(every, self._tick)

    def _tick(self) -> None:
        """Each warm-up hour: start new days of idle sources too (their records), save."""
        now = self.clock()
        for w in self.sources.values():
            day = self._day(w, now)
            if day != w.day:
                self._roll(w, day)
        self._save()
        self._arm()
