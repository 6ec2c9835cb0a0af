"""The delivery engine's side of shared limits ([cluster] backend host or redis).

`ClusterLimits.bind(d)` gives a dispatcher a `PathLeases` (its `cluster` attribute) and
swaps its throttles (max_message_rate, max_connection_rate) and its site's
(site_max_message_rate, or the per-path rate with scope = "site") for `SharedRate`s of
the store (mta/egress/shared), which the dispatcher paces on exactly as on a Throttle.
`shape(d)` does the swap again after a live limits change. With backend = "local" the
engine makes none of this: dispatchers keep `cluster = None` and their own throttles.

Keys: "conn:SOURCE|SITE" (connection_limit per path), "conn:site:SITE"
(site_connection_limit, or connection_limit with scope = "site"), "rate:SOURCE|SITE",
"crate:SOURCE|SITE", "rate:site:SITE", "lane:SOURCE|SITE|CLASS" (a queue class's
max_message_rate, `lane`). SOURCE is the source's IP address (what a
provider counts; source names may repeat across nodes for different IPs), or
"NODE/default" for a source without one (the host's own address choice); a site is
named by its MX hosts, the same on every node.

A connection takes one lease on its path and site keys before it connects; when the
store refuses (the cluster is at a limit), the dispatcher opens nothing for RETRY seconds
(jittered) and then looks again: Redis notifies nobody when a lease frees. A granted lease
with more messages waiting than connections wakes the dispatcher again (ramp-up).
When the store goes away, the engine (DeliveryEngine._cluster_outage) lowers every
connection limit of this process to [cluster] fallback_fraction, so connections above it
close too; `PathLeases.uncapped` keeps the limits the store's own fallback count uses.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from mta.egress.shared.base import Lease, SharedLimits, SharedRate
from mta.egress.throttle import Throttle

if TYPE_CHECKING:
    from mta.delivery.dispatcher import Dispatcher

RETRY = (0.1, 0.3)     # seconds before a refused path asks the store again


def path_key(store: SharedLimits, source: Any, site: str) -> str:
    """The (source, site) part of a path's keys."""
    return f"{source.address or store.node + '/' + source.name}|{site}"


def path_of(store: SharedLimits, d: Dispatcher) -> str:
    return path_key(store, d.source, d.site.name)


class PathLeases:
    """What one dispatcher asks the store for: a lease per connection."""

    __slots__ = ("d", "retry_at", "store", "uncapped")

    def __init__(self, store: SharedLimits, d: Dispatcher) -> None:
        self.store = store
        self.d = d
        self.retry_at = 0.0
        # (path, site) connection limits while the engine holds lowered ones during a
        # store outage: the store applies the fallback fraction to these itself
        self.uncapped: tuple[int, int | None] | None = None

    def held(self) -> bool:
        """The store refused a moment ago: open nothing until the retry timer (set again
        here if none is: a loop timer may fire a little before its time)."""
        if self.retry_at:
            left = self.retry_at - self.d.loop.time()
            if left > 0.002:
                self.d.wake_at(left)
                return True
            self.retry_at = 0.0
        return False

    async def acquire(self) -> Lease | None:
        d = self.d
        # named now: a reload may have given the source another address
        path_limit, site_limit = self.uncapped or (d.limits.connection_limit,
                                                   d.site_state.connection_limit)
        keys = [(f"conn:{path_of(self.store, d)}", path_limit)]
        if site_limit is not None:
            keys.append((f"conn:site:{d.site.name}", site_limit))
        lease = await self.store.acquire(keys)
        if lease is None:
            wait = random.uniform(*RETRY)
            self.retry_at = d.loop.time() + wait
            d.wake_at(wait)
        elif len(d.ready) > d.active:
            # a refusal spent the wake that would have opened this path's next
            # connection: ramp up again, one lease at a time, until the store refuses
            d.loop.call_soon(d.wake)
        return lease


class ClusterLimits:
    def __init__(self, store: SharedLimits) -> None:
        self.store = store

    def bind(self, d: Dispatcher) -> None:
        d.cluster = PathLeases(self.store, d)
        self.shape(d)

    def shape(self, d: Dispatcher) -> None:
        """Throttles made (or retuned) by the dispatcher and the engine become the store's."""
        path = path_of(self.store, d)
        d.msg_throttle = self._shared(d.msg_throttle, f"rate:{path}")
        d.conn_throttle = self._shared(d.conn_throttle, f"crate:{path}")
        st = d.site_state
        st.throttle = self._shared(st.throttle, f"rate:site:{d.site.name}")

    def lane(self, source: Any, site: str, klass: str,
             throttle: Throttle | SharedRate | None) -> Throttle | SharedRate | None:
        """A queue class's max_message_rate at a (source, site), the store's."""
        return self._shared(throttle, f"lane:{path_key(self.store, source, site)}|{klass}")

    def _shared(self, throttle: Throttle | SharedRate | None, key: str) -> SharedRate | None:
        if throttle is None or isinstance(throttle, SharedRate):
            return throttle
        return self.store.rate(key, throttle.rate)
