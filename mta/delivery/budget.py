"""Limits shared by dispatchers: the process-wide connection budget and per-site state.

ConnectionBudget caps outbound connections of the whole process
(egress.max_connections, itself bounded by RLIMIT_NOFILE): a dispatcher that
wants a connection when none is left registers and is woken, in order, when
one closes. SiteState is what all sources' dispatchers of one site share: the
site-wide connection count and message throttle (shaping's
site_connection_limit / site_max_message_rate) and an operator suspension.
No I/O.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable


class ConnectionBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiting: OrderedDict[Any, Callable[[], None]] = OrderedDict()

    def available(self) -> bool:
        return self.used < self.limit

    @property
    def contended(self) -> bool:
        """Someone waits for a connection: idle ones should close, not linger."""
        return bool(self._waiting)

    def wait(self, key: Any, wake: Callable[[], None]) -> None:
        """Call `wake` once a connection closes (each key waits at most once)."""
        self._waiting.setdefault(key, wake)

    def take(self) -> None:
        self.used += 1

    def give_back(self) -> None:
        self.used -= 1
        if self._waiting:
            _, wake = self._waiting.popitem(last=False)
            wake()


class SiteState:
    __slots__ = ("name", "active", "throttle", "connection_limit", "suspended_until",
                 "dispatchers", "blocked")

    def __init__(self, name: str):
        self.name = name
        self.dispatchers: list[Any] = []   # one per source sending to the site
        self.blocked: dict[Any, None] = {}  # dispatchers waiting for a site-wide slot, in order
        self.active = 0                    # connections to this site from every source
        self.throttle: Any = None          # site_max_message_rate across sources, or None
        self.connection_limit: int | None = None   # site_connection_limit, or None
        self.suspended_until = 0.0         # wall time

    def suspended(self, now: float | None = None) -> bool:
        return self.suspended_until > (time.time() if now is None else now)

    def reshape(self, connection_limit: int | None) -> None:
        """A new site-wide connection limit (a live shaping change): idle connections
        above a lower one close now (busy ones after their message); a higher one wakes
        the dispatchers waiting for a slot."""
        old, self.connection_limit = self.connection_limit, connection_limit
        if connection_limit is not None and self.active > connection_limit:
            excess = self.active - connection_limit
            for d in self.dispatchers:
                excess -= d.close_idle(excess)
                if excess <= 0:
                    break
        if old is not None and (connection_limit is None or connection_limit > old):
            waiting, self.blocked = list(self.blocked), {}
            for d in waiting:
                d.wake()
