"""Limits that must hold across worker processes and nodes: connection leases, rates,
warm-up caps, and the adaptive actions each process takes.

One interface, three places to hold the counts ([cluster] backend; the default, auto, is
host when [server] workers is above 1, else local):
- local: nothing is shared; the dispatchers' own counters and token buckets are the limits
  (one worker, one node). The delivery engine then builds no shared objects at all, so the
  single-process hot path costs exactly what it did.
- host: the workers of one host share a table in a file mapped in memory under the spool
  root (host_table.py), no service needed.
- redis: the whole cluster shares a redis-server (redis_store.py): a GCRA rate per key in a
  Lua script, connection leases as a sorted set of expiring members (KumoMTA's scheme).

A key names what a limit counts: a (source, site) path, a site (every source), later a
provider. `acquire` takes a lease on several keys at once, all or none (a connection counts
against its path and its site), `Lease.release` gives it back; a holder that dies frees its
leases (redis: within lease_ttl; host: when its worker index starts again). `rate(key, Rate)`
returns a `SharedRate`, the drop-in for a `Throttle` (`delay(now)`, `rate`, `set_rate`):
it takes a small batch of tokens per round trip ([cluster] rate_batch), so a busy path asks
the store a few times a second, not once per message; the store's GCRA keeps the total.
`count(key, hour_length)` returns a `SharedCount`: a warm-up (source, provider)'s messages
of the current warm-up day and hour counted by the store against a day cap and an hour cap,
a batch of allowance per call (mta/egress/warmup.py); `add_stats` sums a warm-up day's
judgement inputs over every process. `share_action(action, left)`
publishes an adaptive action this process took; `on_action(action, left)` is called with
each one another process published, once (redis: a sorted set polled each second; host:
a file of lines beside the table, read each second; local: nothing).
`stream(name, max_length)` is a record stream every node appends to and reads (redis: a
Redis stream; host and local: None, one host's processes share their files already):
the suppression entries every node applies travel there (mta/feedback/suppression/shared.py).
Reads and writes only what its backend says; raises nothing to the dispatcher (a store that
fails falls back to local limits at [cluster] fallback_fraction, see the backends).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mta.egress.shared.base import Lease, SharedLimits, SharedRate, fallback_limit

if TYPE_CHECKING:
    from mta.config.schema import ClusterConfig
    from mta.model.node import WorkerSlot

__all__ = ["Lease", "SharedLimits", "SharedRate", "fallback_limit", "open_shared"]


def open_shared(cfg: ClusterConfig, worker: WorkerSlot, spool_root: Path) -> SharedLimits | None:
    """The store [cluster] names; None for local (the engine then shares nothing)."""
    member = worker.name
    backend = cfg.backend
    if backend == "auto":   # the configured limits hold for the host, however many workers
        backend = "host" if worker.count > 1 else "local"
    if backend == "redis":
        from mta.egress.shared.redis_store import RedisLimits
        try:
            return RedisLimits(cfg.redis_url, prefix=cfg.key_prefix, lease_ttl=cfg.lease_ttl,
                               timeout=cfg.timeout, member=member,
                               fallback_fraction=cfg.fallback_fraction,
                               rate_batch=cfg.rate_batch)
        except ValueError as exc:          # the URL: redis-py's words, our key
            raise ValueError(f"[cluster] redis_url: {exc}") from None
    if backend == "host":
        from mta.egress.shared.host_table import HostLimits
        return HostLimits(spool_root / "shared-limits", worker=worker, member=member,
                          fallback_fraction=cfg.fallback_fraction, rate_batch=cfg.rate_batch)
    return None
