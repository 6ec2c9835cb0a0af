"""Shared limits through a redis-server: the cluster's throttles and connection leases.

KumoMTA's scheme, in two Lua scripts run with EVALSHA (redis-py's Script object), each one
atomic on the server and timed by the server's clock (TIME), so node clocks may differ:
- GCRA per rate key: the key holds the theoretical arrival time (TAT); a call takes up to
  n tokens at once (n = [cluster] rate_batch's worth), as many as the rate and its burst
  (one second's worth) allow now; when none is due it reserves n from the time the first
  is, and says when (base.gcra, the same step in Python for the host table).
- Leases per connection key: a sorted set whose members are connections ("node/wN/run.seq")
  scored by their expiry; acquiring drops expired members (ZREMRANGEBYSCORE), counts
  (ZCARD) and adds (ZADD) on every key of the lease or on none. A renewal task re-adds
  every live lease with a fresh expiry each lease_ttl/3, so a live connection is always
  counted (also one taken while Redis was away) and a dead node's leases expire within
  lease_ttl.
- Warm-up counts: one script adds a batch of allowance to `warm:KEY:dDAY` and
  `warm:KEY:hHOUR` only within both caps (keys expire two warm-up days / hours later).
- Adaptive actions: a sorted set `adaptive` of the published JSON scored by its end on
  the server's clock (at most 256 kept); every process polls it each second.
- Record streams (`stream(name)`, e.g. the suppression entries every node applies,
  mta/feedback/suppression/shared.py): XADD with an approximate MAXLEN; reads through
  one script that returns at most `count` records and READ_MAX bytes, a record over
  RECORD_MAX bytes or with a non-ASCII byte as its id alone, plus the oldest id held,
  the newest added and what tells a reader it missed records: its last id no longer
  held while older than the oldest (trimmed past it), or, for a first read, more records
  ever added than held (XINFO entries-added, Redis 7).
Redis unreachable (connection refused, timeout, an error reply): one warning, and until a
probe succeeds (one a second at most) each process holds every limit alone at
[cluster] fallback_fraction: leases against its own count of the key (in the outage's
first lease_ttl/3 + timeout + SETTLE seconds, no more than it held when it saw it: the
others' leases stand until their renewal fails and they close what is above their share),
rates through a local token bucket, warm-up caps through its own counters; adaptive
actions taken meanwhile are kept (the newest ACTIONS_MAX) and published when Redis answers
again, for the time they have left. Every call has a timeout ([cluster] timeout); the loop never waits longer.
When Redis answers again: one info line; the renewal re-registers the leases taken alone.
Trust: the redis-server is the operator's; its replies are still checked for shape.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mta.egress.shared.base import (
    ACTION_POLL,
    ACTIONS_MAX,
    ALONE,
    GRANTED,
    READ_MAX,
    RECORD_MAX,
    WAIT,
    Lease,
    SharedCount,
    SharedLimits,
    SharedRate,
    StreamRead,
    count_batch,
    fallback_limit,
    stream_id,
)

log = logging.getLogger("mta.cluster")

PROBE_EVERY = 1.0        # seconds between attempts while Redis is away
# after the other processes have seen an outage (their next renewal), the time their
# connections above their share need to finish the message in hand and close
SETTLE = 1.0
KEPT_MIN_LEFT = 1.0      # an action kept through an outage with less left is not shared
RENEW_CHUNK = 500        # leases renewed per script call

GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local k = math.floor((now + tau - tat) / interval) + 1
if k > want then k = want end
local after = 0
if k < 1 then
  k = want
  after = tat - tau - now
end
tat = tat + k * interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX',
           math.ceil((tat - now + tau) * 1000) + 1000)
return {k, string.format('%.6f', after)}
"""

ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
end
return 1
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
end
return #KEYS
"""

# warm-up counts: KEYS the day's and the hour's counter; ARGV day cap, hour cap, wanted,
# refund (given back to the day first), day and hour expiries (ms). Adds k to both, the
# most that keeps both within their caps: {k, the day's count after}.
WARM = """
local d = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local h = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local refund = tonumber(ARGV[4])
if refund > 0 then
  d = d - refund
  if d < 0 then d = 0 end
end
local k = tonumber(ARGV[3])
if tonumber(ARGV[1]) - d < k then k = tonumber(ARGV[1]) - d end
if tonumber(ARGV[2]) - h < k then k = tonumber(ARGV[2]) - h end
if k < 0 then k = 0 end
if k > 0 or refund > 0 then
  redis.call('SET', KEYS[1], d + k, 'PX', ARGV[5])
end
if k > 0 then
  redis.call('SET', KEYS[2], h + k, 'PX', ARGV[6])
end
return {k, d + k}
"""

# a warm-up day's counts: KEYS the day's hash; ARGV tried, bounced, deferred, complaints to
# add, expiry (ms); the day's totals
STATS = """
local f = {'t', 'b', 'd', 'c'}
for i = 1, 4 do
  local n = tonumber(ARGV[i])
  if n ~= 0 then redis.call('HINCRBY', KEYS[1], f[i], n) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return redis.call('HMGET', KEYS[1], 't', 'b', 'd', 'c')
"""

# adaptive actions: one sorted set, members the published JSON, scored by their end on the
# server's clock; at most ACTIONS_MAX kept (those ending last)
SHARE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
return 1
"""

POLL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local items = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES', 'LIMIT', 0,
                         tonumber(ARGV[1]))
return {string.format('%.6f', now), items}
"""

# a bounded read of a stream: KEYS the stream; ARGV the id read last (exclusive), count,
# bytes per record, bytes in all. {oldest id, newest added, that last id still held (0/1),
# records ever removed (-1: unknown), records}; a record too large or not ASCII comes as
# its id with no fields (the reader skips it)
STREAM_READ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', '', 0, -1, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, added, length = '', -1, 0
for i = 1, #info - 1, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'entries-added' then added = tonumber(info[i + 1]) end
  if info[i] == 'length' then length = tonumber(info[i + 1]) end
end
local removed = -1
if added >= 0 then removed = added - length end
local first = ''
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head > 0 then first = head[1][1] end
local held = #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local out, total = {}, 0
local one, all = tonumber(ARGV[3]), tonumber(ARGV[4])
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT',
                              tonumber(ARGV[2]))) do
  local size, plain = 0, true
  for _, f in ipairs(e[2]) do
    size = size + #f
    if string.find(f, '[\\128-\\255]') then plain = false end
  end
  if size > one or not plain then
    out[#out + 1] = {e[1], {}}
  elseif total + size > all then
    break
  else
    out[#out + 1] = e
    total = total + size
  end
end
return {first, last, held, removed, out}
"""


def parse_stream_read(reply: Any, after: str, count: int) -> StreamRead:
    """STREAM_READ's reply checked: ValueError when its shape is wrong or its ids do not
    increase past `after`; a record whose fields are not a flat map of strings within
    RECORD_MAX gets fields None."""
    if not isinstance(reply, list) or len(reply) != 5 or not isinstance(reply[4], list) \
            or len(reply[4]) > count or not all(isinstance(x, int) for x in reply[2:4]):
        raise ValueError("stream read: a reply of the wrong shape")
    first, last = (x if stream_id(x) else "" for x in reply[:2])
    held, removed = reply[2], reply[3]
    prev = stream_id(after)
    oldest = stream_id(first)
    if prev == (0, 0):        # a first read: was anything ever removed?
        gap = removed > 0
    else:                     # our last record gone, and the oldest left is newer
        gap = not held and oldest is not None and prev is not None and oldest > prev
    records: list[tuple[str, dict[str, str] | None]] = []
    for item in reply[4]:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("stream read: a record of the wrong shape")
        rid = stream_id(item[0])
        if rid is None or (prev is not None and rid <= prev):
            raise ValueError("stream read: record ids out of order")
        prev = rid
        records.append((item[0], _record_fields(item[1])))
    return StreamRead(records, first, last, gap)


def _record_fields(raw: Any) -> dict[str, str] | None:
    if not isinstance(raw, list) or len(raw) % 2 or not raw \
            or not all(isinstance(x, str) for x in raw) or sum(map(len, raw)) > RECORD_MAX:
        return None
    fields = dict(zip(raw[::2], raw[1::2]))
    return fields if len(fields) * 2 == len(raw) else None


class RedisStream:
    """A Redis stream every node reads (base.RecordStream), over RedisLimits' client and
    its reachability: a failure is the limits' failure (one warning, probes once a
    second) and nothing is sent or read while Redis is away."""

    def __init__(self, limits: RedisLimits, key: str, max_length: int) -> None:
        self.limits = limits
        self.key = key
        self.max_length = max_length
        self._read = limits.client.register_script(STREAM_READ)

    async def add(self, records: list[dict[str, str]]) -> bool | None:
        lim = self.limits
        if not lim._usable():
            return None
        pipe = lim.client.pipeline(transaction=False)
        for r in records:
            pipe.xadd(self.key, r, maxlen=self.max_length, approximate=True)
        try:
            await asyncio.wait_for(pipe.execute(), lim.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            lim._failed(exc)
            return None
        lim._ok()
        return True

    async def read(self, after: str, count: int) -> StreamRead | None:
        lim = self.limits
        if not lim._usable():
            return None
        try:
            reply = await lim._call(self._read, [self.key], [after, count, RECORD_MAX, READ_MAX])
            got = parse_stream_read(reply, after, count)
        except (TimeoutError, RedisError, OSError, ValueError, TypeError) as exc:
            lim._failed(exc)
            return None
        lim._ok()
        return got


class RedisLimits(SharedLimits):
    name = "redis"

    def __init__(self, url: str, *, prefix: str, lease_ttl: float, timeout: float,
                 member: str, fallback_fraction: float = 0.5, rate_batch: float = 0.05,
                 clock=time.monotonic) -> None:
        super().__init__(member=member, fallback_fraction=fallback_fraction,
                         rate_batch=rate_batch)
        self.url = url
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.clock = clock
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=0, decode_responses=True)
        self._gcra = self.client.register_script(GCRA)
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self._warm = self.client.register_script(WARM)
        self._share = self.client.register_script(SHARE)
        self._stats = self.client.register_script(STATS)
        self._poll = self.client.register_script(POLL)
        self._poller: asyncio.Task | None = None
        self.leases: dict[str, Lease] = {}     # member -> live lease of this process
        self.held: dict[str, int] = {}         # key -> live leases of this process on it
        self.down = False                      # Redis unreachable: limits held locally
        self.resync = False                    # back: register the leases before a new one
        self.probe_at = 0.0                    # clock time of the next attempt while down
        # the first seconds of an outage: the others' leases still stand, so no more
        # than this process held then (see _alone_limit)
        self.settled_at = 0.0
        self.held_at_outage: dict[str, int] = {}
        self.failures = 0
        self._tasks: set[asyncio.Task] = set()
        # adaptive actions taken while Redis was away: (payload, end on self.clock)
        self._unshared: list[tuple[str, float]] = []
        self._renewer: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- health ------------------------------------------------------------------------

    def _usable(self) -> bool:
        return not self.down or self.clock() >= self.probe_at

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.probe_at = self.clock() + PROBE_EVERY
        if not self.down:
            self.down = True
            self.held_at_outage = dict(self.held)
            self.settled_at = self.clock() + self.lease_ttl / 3 + self.timeout + SETTLE
            # drop every pooled connection: those made before a server restart would
            # each fail once more after it answers again
            self._spawn(self._disconnect())
            log.warning("cluster: redis %s unreachable (%s: %s); limits held by this "
                        "process alone at %g of each until it answers again", self.url,
                        type(exc).__name__, exc, self.fallback_fraction)
            self._notify(True)

    def _ok(self) -> None:
        if self.down:
            self.down = False
            self.resync = bool(self.leases)
            log.warning("cluster: redis %s answers again; shared limits back", self.url)
            if self._unshared and self.loop is not None:
                self._share_kept()
            # every node registers what it took alone within a renewal period and a
            # probe; until then the delivery side keeps its lowered limits
            if self.loop is not None:
                self.loop.call_later(self.lease_ttl / 3 + PROBE_EVERY, self._back)
            else:
                self._notify(False)

    def _back(self) -> None:
        if not self.down:
            self._notify(False)

    async def _call(self, script, keys: list[str], args: list[Any]) -> Any:
        return await asyncio.wait_for(script(keys=keys, args=args), self.timeout)

    # -- leases ------------------------------------------------------------------------

    async def acquire(self, keys: list[tuple[str, int]]) -> Lease | None:
        names = tuple(self.prefix + k for k, _ in keys)
        if any(limit <= 0 for _, limit in keys):
            return None
        granted = None
        if self._usable():
            try:
                if (self.down or self.resync) and self.leases:
                    # back after an outage (a restarted server may hold nothing): count
                    # what this process holds before it takes more
                    await self._renew_all()
                self.resync = False
                member = self._member()
                reply = await self._call(self._acquire, list(names),
                                         [self.lease_ttl, member, *(lim for _, lim in keys)])
                self._ok()
                granted = Lease(self, names, member) if int(reply) == 1 else False
            except (TimeoutError, RedisError, OSError, ValueError) as exc:
                self._failed(exc)
        if granted is None:     # alone: this process's own count against the fraction
            if any(self.held.get(n, 0) >= self._alone_limit(n, lim)
                   for n, (_, lim) in zip(names, keys)):
                return None
            granted = Lease(self, names, self._member())
        if not granted:
            return None
        self.leases[granted.member] = granted
        for n in names:
            self.held[n] = self.held.get(n, 0) + 1
        return granted

    def _alone_limit(self, name: str, limit: int) -> int:
        """This process's share of a key while Redis is away. Until every other process
        has seen the outage (each renews its leases every lease_ttl/3, and a failed
        renewal lowers its limits) and closed what it held above its own share, their
        leases still stand: only as many as this process held when it saw the outage,
        so a connection that closes may be replaced but none added."""
        share = fallback_limit(limit, self.fallback_fraction)
        if self.clock() < self.settled_at:
            return min(share, self.held_at_outage.get(name, 0))
        return share

    def _release(self, lease: Lease) -> None:
        self.leases.pop(lease.member, None)
        for n in lease.keys:
            left = self.held.get(n, 0) - 1
            if left > 0:
                self.held[n] = left
            else:
                self.held.pop(n, None)
        if self.down and not self._usable():
            return      # it expires within lease_ttl
        pipe = self.client.pipeline(transaction=False)
        for n in lease.keys:
            pipe.zrem(n, lease.member)
        self._spawn(self._send(pipe))

    async def _disconnect(self) -> None:
        try:
            await asyncio.wait_for(self.client.connection_pool.disconnect(), self.timeout)
        except (TimeoutError, RedisError, OSError):
            pass

    async def _send(self, pipe) -> None:
        try:
            await asyncio.wait_for(pipe.execute(), self.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)

    def _spawn(self, coro) -> None:
        loop = self.loop or asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def renew(self) -> None:
        """Every live lease again with a fresh expiry; a failure counts as one."""
        try:
            await self._renew_all()
            self._ok()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)

    async def _renew_all(self) -> None:
        pairs = [(n, lease.member) for lease in list(self.leases.values()) for n in lease.keys]
        for i in range(0, len(pairs), RENEW_CHUNK):     # one script call per chunk
            chunk = pairs[i:i + RENEW_CHUNK]
            await self._call(self._renew, [n for n, _ in chunk],
                             [self.lease_ttl, *(m for _, m in chunk)])

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if self.leases and self._usable():
                    await self.renew()
                elif not self.leases and self.down and self._usable():
                    try:   # nothing to renew: a probe, so the recovery is seen and logged
                        await asyncio.wait_for(self.client.ping(), self.timeout)
                        self._ok()
                    except (TimeoutError, RedisError, OSError) as exc:
                        self._failed(exc)
            except Exception:      # never end the renewals: leases would expire under load
                log.exception("cluster: lease renewal")

    # -- rates -------------------------------------------------------------------------

    def _refill(self, r: SharedRate, now: float) -> float:
        if not self._usable():
            return r.local(now)
        if not r.pending:
            r.pending = True
            self._spawn(self._take(r))
        return min(0.005, r.interval)

    async def _take(self, r: SharedRate) -> None:
        try:
            reply = await self._call(self._gcra, [self.prefix + r.key],
                                     [repr(r.interval), repr(r.tau), r.batch])
            got, wait = int(reply[0]), float(reply[1])
            self._ok()
            now = asyncio.get_running_loop().time()
            if got > 0:       # due now, or reserved from `wait` seconds on
                r.grant(got, now, min(max(wait, 0.0), 60.0))
                r.next_try = 0.0
            else:
                r.next_try = now + 0.01
        except (TimeoutError, RedisError, OSError, ValueError, TypeError, IndexError) as exc:
            self._failed(exc)
        finally:
            r.pending = False

    # -- warm-up counts -----------------------------------------------------------------

    def _count(self, c: SharedCount, day_cap: int, hour_cap: int, refund: int, *,
               prefetch: bool) -> int:
        if not self._usable():
            return GRANTED if prefetch else ALONE
        if not c.pending:
            c.pending = True
            self._spawn(self._warm_take(c, c.day, c.hour, day_cap, hour_cap, refund))
        return GRANTED if prefetch else WAIT

    async def _warm_take(self, c: SharedCount, day: int, hour: int, day_cap: int,
                         hour_cap: int, refund: int) -> None:
        base = f"{self.prefix}warm:{c.key}"
        # a day's key lives two warm-up days, an hour's two hours (then they are gone)
        day_ms = math.ceil(c.hour_length * 48 * 1000) + 1000
        hour_ms = math.ceil(c.hour_length * 2 * 1000) + 1000
        try:
            reply = await self._call(self._warm, [f"{base}:d{day}", f"{base}:h{hour}"],
                                     [day_cap, hour_cap, count_batch(hour_cap), refund,
                                      day_ms, hour_ms])
            k, day_count = int(reply[0]), int(reply[1])
            if not 0 <= k <= count_batch(hour_cap) or day_count < 0:
                raise ValueError(f"warm-up count reply {reply!r}")
            self._ok()
            if (c.day, c.hour) == (day, hour):     # else the hour it was for has passed
                c.answer(k, day_count, day_cap, hour_cap)
        except (TimeoutError, RedisError, OSError, ValueError, TypeError, IndexError) as exc:
            self._failed(exc)
        finally:
            c.pending = False

    def add_stats(self, key: str, day: int, delta: list[int],
                  done: Callable[[list[int]], None], hour_length: float = 3600.0) -> None:
        if not self._usable() or self.loop is None:
            return          # counted by this process alone meanwhile
        self._spawn(self._add_stats(key, day, delta, done, hour_length))

    async def _add_stats(self, key: str, day: int, delta: list[int],
                         done: Callable[[list[int]], None], hour_length: float) -> None:
        try:
            reply = await self._call(self._stats, [f"{self.prefix}warmstat:{key}:d{day}"],
                                     [*delta[:4], math.ceil(hour_length * 72 * 1000)])
            totals = [int(x or 0) for x in reply]
            if len(totals) != 4 or min(totals) < 0:
                raise ValueError(f"warm-up day counts reply {reply!r}")
            self._ok()
        except (TimeoutError, RedisError, OSError, ValueError, TypeError) as exc:
            self._failed(exc)
            return
        done(totals)

    # -- adaptive actions ---------------------------------------------------------------

    def share_action(self, action: dict, left: float) -> None:
        payload = self._action_payload(action, left)
        if payload is None:
            return
        if not self._usable() or self.loop is None:
            self._keep(payload, left)       # Redis away: published once it answers
            return
        self._spawn(self._share_one(payload, left))

    def _keep(self, payload: str, left: float) -> None:
        """An action Redis did not take: kept (the newest ACTIONS_MAX) until it answers."""
        if len(self._unshared) >= ACTIONS_MAX:
            self._unshared.pop(0)
        self._unshared.append((payload, self.clock() + left))

    def _share_kept(self) -> None:
        """Redis answers again: the actions taken meanwhile, for the time they have left."""
        kept, self._unshared = self._unshared, []
        now = self.clock()
        for payload, end in kept:
            if end - now > KEPT_MIN_LEFT:
                self._spawn(self._share_one(payload, end - now))

    async def _share_one(self, payload: str, left: float) -> None:
        try:
            await self._call(self._share, [self.prefix + "adaptive"],
                             [payload, repr(left), ACTIONS_MAX])
            self._ok()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            self._keep(payload, left)

    async def poll_actions(self) -> None:
        """Read the actions in force and hand the new ones on (one call)."""
        reply = await self._call(self._poll, [self.prefix + "adaptive"], [ACTIONS_MAX])
        now = float(reply[0])
        items = reply[1]
        if not isinstance(items, list) or len(items) > 2 * ACTIONS_MAX:
            raise ValueError("adaptive actions: a reply of the wrong shape")
        mine = self.clock()
        for i in range(0, len(items) - 1, 2):
            try:
                left = float(items[i + 1]) - now
            except (TypeError, ValueError):
                continue
            self._received(items[i], left, mine)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(ACTION_POLL)
            if self.on_action is None or not self._usable():
                continue
            try:
                await self.poll_actions()
                self._ok()
            except (TimeoutError, RedisError, OSError, ValueError, TypeError,
                    IndexError) as exc:
                self._failed(exc)
            except Exception:      # never end the polling
                log.exception("cluster: polling shared adaptive actions")

    def stream(self, name: str, max_length: int) -> RedisStream:
        return RedisStream(self, self.prefix + name, max_length)

    # -- life ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._renewer = loop.create_task(self._renew_loop())
        self._poller = loop.create_task(self._poll_loop())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._poller is not None:
            self._poller.cancel()
        for lease in list(self.leases.values()):
            lease.release()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        try:
            await asyncio.wait_for(self.client.aclose(), self.timeout)
        except (TimeoutError, RedisError, OSError):
            pass
