"""Limits source: the shaping Limits in force for each (source, site), changeable live.

Where it sits: the delivery engine asks it for the Limits of a (source, site) when the
dispatcher of that path is created, and subscribes to changes; the shaping files
(mta/egress/shaping.py) give the static layer, and overrides set here at run time sit
on top of it: for a provider, a site, a source or one (source, site) pair, each with an
optional expiry. That is the seam for adaptive delivery (slow a path after a run of
deferrals), an operator's change without a restart, and cluster-wide throttles (a
node's share of a global rate). Resolution per key, least specific first, after the
shaping files: provider < site < source < pair, as the files rank a per-source table
above every other.

A change never touches the hot path: `set`, `clear` and expiry bump `generation` and
call the subscribers with the Scope that changed; the engine re-resolves the dispatchers
that scope covers and pushes the new Limits into them (their throttles keep their
tokens; a lower connection_limit closes idle connections above it, a higher one lets
waiting messages go at once).

A reload swaps the shaping files (`set_shaping`): subscribers are told with the scope
None (every path); overrides stay. Reads and writes nothing on disk: the operator's
overrides (POST /control/limits, `mta shaping set`) are kept across restarts by
mta/control/actions.py (the operator state file), which sets them again at start;
overrides set by other components live in RAM. Diagnostics: LimitsError (a ValueError naming the scope, the key and
what is allowed) for an override that cannot apply; nothing else raises.
Trust: values come from our own components or the authenticated admin API; every value
still goes through the key's checker from shaping.KEYS.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta.config.values import Invalid, check_value
from mta.egress.shaping import KEYS, Limits, Shaping
from mta.egress.throttle import Throttle
from mta.model.rate import Rate

# least specific first; "source_provider" is one source at one provider (every site of it:
# what adaptive delivery throttles), "pair" one source at one site
KINDS = ("provider", "site", "source", "source_provider", "pair")
# Keys an override may not change: `scope` decides whether counters live per path or per
# site; moving live counters between the two is a reload's job, not a run-time tweak.
_FIXED = ("scope",)
_SITE_WIDE = ("site_connection_limit", "site_max_message_rate")


class LimitsError(ValueError):
    """An override that cannot apply: the text names the scope, the key and the rule."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What an override covers: a provider, a site, a source, one (source, provider) or
    one (source, site)."""

    kind: str                 # one of KINDS
    name: str                 # provider, site or source name
    site: str = ""            # the site of a pair, the provider of a source_provider

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LimitsError(f"no scope kind {self.kind!r} (one of: {', '.join(KINDS)})")
        two = self.kind in ("pair", "source_provider")
        if not self.name or two != bool(self.site):
            raise LimitsError(f"{self.kind} scope needs " + (
                "a source and a site" if self.kind == "pair" else "a source and a provider"
                if two else "a name"))

    def __str__(self) -> str:
        if self.kind == "pair":
            return f"pair:{self.name}->{self.site}"
        if self.kind == "source_provider":
            return f"source_provider:{self.name}->{self.site}"
        return f"{self.kind}:{self.name}"

    def covers(self, path: LimitsPath) -> bool:
        kind = self.kind
        if kind == "site":
            return path.site == self.name
        if kind == "source":
            return path.source == self.name
        if kind == "pair":
            return path.source == self.name and path.site == self.site
        if kind == "source_provider":
            return path.source == self.name and path.provider == self.site
        return path.provider == self.name


@dataclass(frozen=True, slots=True)
class LimitsPath:
    """One (source, site) as shaping resolves it: the domain whose queue opened the path
    (its domain table applies) and the site's MX hosts (its provider)."""

    source: str
    site: str                       # mta.egress.sites.Site.name
    domain: str
    mx_hosts: tuple[str, ...]
    provider: str | None


@dataclass(slots=True)
class Override:
    scope: Scope
    values: dict[str, Any]          # checked values, by key
    expires: float | None           # wall time; None: until cleared
    reason: str                     # who set it and why, for operators

    def view(self) -> dict[str, Any]:
        return {"scope": str(self.scope), "kind": self.scope.kind, "name": self.scope.name,
                "site": self.scope.site or None, "reason": self.reason,
                "expires": self.expires,
                "values": {k: str(v) if v is not None and k.endswith("rate") else v
                           for k, v in self.values.items()}}


class LimitsSource:
    """The shaping files plus run-time overrides; tells subscribers what changed."""

    def __init__(self, shaping: Shaping, *, clock: Callable[[], float] = time.time) -> None:
        self.shaping = shaping
        self.clock = clock
        self.generation = 0                 # bumped on every change
        self._overrides: dict[Scope, Override] = {}
        self._subscribers: list[Callable[[Scope | None], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- reading ------------------------------------------------------------------------

    def path(self, source: str, site: str, domain: str, mx_hosts: Sequence[str]) -> LimitsPath:
        hosts = tuple(mx_hosts)
        return LimitsPath(source, site, domain, hosts, self.shaping.provider_for(hosts))

    def limits(self, path: LimitsPath) -> Limits:
        """The Limits in force for `path` now: the shaping files, then the overrides."""
        base = self.shaping.limits(path.source, path.domain, path.mx_hosts,
                                   site=path.site if path.site.startswith("[") else None)
        if not self._overrides:
            return base
        values: dict[str, Any] = {}
        labels: list[str] = []
        for o in sorted((o for o in self._overrides.values() if o.scope.covers(path)),
                        key=lambda o: KINDS.index(o.scope.kind)):
            values.update(o.values)
            labels.append(f"override:{o.scope}")
        if not labels:
            return base
        return dataclasses.replace(base, **values, matched=base.matched + tuple(labels))

    def overrides(self) -> list[dict[str, Any]]:
        """Overrides in force, JSON-able (`mta shaping show`, the admin API)."""
        return [o.view() for o in self._overrides.values()]

    # -- changing -------------------------------------------------------------------------

    def subscribe(self, fn: Callable[[Scope | None], None]) -> None:
        """`fn(scope)` after every change of the overrides of `scope`; `fn(None)` after
        the shaping files changed (every path)."""
        self._subscribers.append(fn)

    def set_shaping(self, shaping: Shaping) -> None:
        """New shaping files (a reload, checked by the caller); the overrides stay on top."""
        self.shaping = shaping
        self.generation += 1
        for fn in self._subscribers:
            fn(None)

    def set(self, scope: Scope, values: Mapping[str, object], *, ttl: float | None = None,
            reason: str = "") -> Override:
        """Override `values` (shaping keys, as in a shaping file) for `scope`, merged into
        what is already overridden there; for `ttl` seconds, or until cleared."""
        if ttl is not None and not ttl > 0:
            raise LimitsError(f"{scope}: ttl {ttl} must be above 0 seconds")
        checked = {k: self._check(scope, k, v) for k, v in values.items()}
        if not checked:
            raise LimitsError(f"{scope}: no keys to override")
        o = self._overrides.get(scope)
        expires = None if ttl is None else self.clock() + ttl
        if o is None:
            o = self._overrides[scope] = Override(scope, checked, expires, reason)
        else:
            o.values.update(checked)
            o.expires, o.reason = expires, reason or o.reason
        self._changed(scope)
        return o

    def clear(self, scope: Scope, keys: Sequence[str] = ()) -> bool:
        """Drop `keys` (all when empty) from the override of `scope`; False if none was set."""
        o = self._overrides.get(scope)
        if o is None or (keys and not any(k in o.values for k in keys)):
            return False
        for k in keys:
            o.values.pop(k, None)
        if not keys or not o.values:
            del self._overrides[scope]
        self._changed(scope)
        return True

    def expire(self) -> int:
        """Drop the overrides whose time is up; returns how many (the timer calls it)."""
        now = self.clock()
        gone = [s for s, o in self._overrides.items() if o.expires is not None and o.expires <= now]
        for scope in gone:
            del self._overrides[scope]
            self._changed(scope)
        if not gone:
            self._arm()
        return len(gone)

    def next_expiry(self) -> float | None:
        return min((o.expires for o in self._overrides.values() if o.expires is not None),
                   default=None)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- internals --------------------------------------------------------------------------

    def _check(self, scope: Scope, key: str, raw: object) -> Any:
        k = KEYS.get(key)
        allowed = [n for n in KEYS if n not in _FIXED
                   and (scope.kind in ("provider", "site") or n not in _SITE_WIDE)]
        if k is None or key not in allowed:
            why = ("is decided by the shaping files (reload to change it)" if key in _FIXED
                   else "applies to a whole site (override a site or provider)"
                   if key in _SITE_WIDE else "is not a shaping key")
            raise LimitsError(f"{scope}: {key} {why} (allowed: {', '.join(allowed)})")
        try:
            return check_value(k, raw, Path())
        except Invalid as e:
            raise LimitsError(f"{scope}: {key}: {e}") from None

    def _changed(self, scope: Scope) -> None:
        self.generation += 1
        for fn in self._subscribers:
            fn(scope)
        self._arm()

    def _arm(self) -> None:
        """One timer, at the earliest expiry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.next_expiry()
        if self._loop is None or when is None:
            return
        self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.expire()


def retune(throttle: Throttle | None, rate: Rate | None, now: float) -> Throttle | None:
    """The throttle for `rate` after a change: the same bucket, its tokens kept, when
    there was one; None for no limit."""
    if rate is None:
        return None
    if throttle is None:
        return Throttle(rate)
    if throttle.rate != rate:
        throttle.set_rate(rate, now)
    return throttle
