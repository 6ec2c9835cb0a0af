"""Shared limits between the worker processes of one host, with no service to run.

A file under the spool root (`shared-limits`), mapped in memory by every worker: a header
and a fixed table of slots, one per key (found by a 16-byte BLAKE2b digest of the key,
open addressing, never freed). A slot holds the key's GCRA theoretical arrival time
(CLOCK_MONOTONIC seconds, the same clock in every process of the host) and one connection
count per worker index. Each operation locks the slot's bytes with a POSIX record lock
(fcntl), reads and writes the mapping, and unlocks; a lease on several keys locks their
slots in slot order, so two workers never wait on each other in a circle.

Why record locks and not a C table updated by compare-and-swap: a lease on a path and its
site must be taken on both or neither, which is one lock or a retry loop of CAS over two
words; the kernel drops the locks of a process that dies, so a killed worker never leaves
a slot locked; and the cost (two fcntl calls, a few microseconds) is paid per connection
and per batch of rate tokens ([cluster] rate_batch), not per message.

A warm-up key's slot holds, where a rate's TAT would be, its day and hour numbers and
their counts: a call moves them to a later day or hour (zero), then adds a batch of
allowance within both caps. Adaptive actions go to `shared-limits.actions` beside the
table: one line per action (its end on CLOCK_MONOTONIC, a tab, the JSON), appended under
flock; every worker reads what was added once a second. Past 1 MiB a writer replaces the
file with the actions still in force (a new header line: readers start it again).

A dead worker's connection counts stay until its index starts again: a worker clears its
own column when it opens the table (the supervisor restarts a dead worker at once). A
table made before the last boot (its boot id differs) is cleared. A full table (more keys
than slots) leaves the keys that found no slot counted by each worker alone at
[cluster] fallback_fraction, with one warning.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from mta.egress.shared.base import (
    ACTION_MAX,
    ACTION_POLL,
    ACTIONS_MAX,
    ALONE,
    GRANTED,
    HOUR,
    Lease,
    SharedCount,
    SharedLimits,
    SharedRate,
    count_batch,
    fallback_limit,
    gcra,
)
from mta.files import boot_id
from mta.model.node import WorkerSlot

log = logging.getLogger("mta.cluster")

MAGIC = b"MTASHL01"
SLOTS = 8192
COLUMNS = 64                 # worker indexes 0..63
HEADER = 64                  # magic (8) + boot id (36) + padding
SLOT_SIZE = 32 + 4 * COLUMNS  # digest (16), TAT (double), padding (8), counts (int32 each)
PROBES = 64                  # slots looked at per key before the table counts as full
_TAT = struct.Struct("<d")
_WARM = struct.Struct("<iiii")   # a warm-up key's slot, where a rate's TAT would be: day, hour,
                                 # the day's count, the hour's count
_COUNTS = struct.Struct(f"<{COLUMNS}i")
_COUNT = struct.Struct("<i")
_EMPTY = bytes(16)
ACTIONS_FILE_MAX = 1 << 20   # bytes of shared-actions before a writer compacts it
_HEADER_LEN = 18             # "#" + 16 hex digits (this file's generation) + newline


def _actions_header() -> bytes:
    return b"#" + os.urandom(8).hex().encode() + b"\n"


class HostLimits(SharedLimits):
    name = "host"

    def __init__(self, path: Path, *, worker: WorkerSlot, member: str,
                 fallback_fraction: float = 0.5, rate_batch: float = 0.05,
                 clock=time.monotonic) -> None:
        super().__init__(member=member, fallback_fraction=fallback_fraction,
                         rate_batch=rate_batch)
        if not 0 <= worker.index < COLUMNS:
            raise ValueError(f"[cluster] backend = \"host\" holds up to {COLUMNS} workers, "
                             f"not worker {worker.index}")
        self.col = worker.index
        self.clock = clock
        self.path = path
        self.slots: dict[str, int | None] = {}   # key -> slot index (None: table full)
        self.held: dict[str, int] = {}            # keys counted alone (no slot)
        self._full_logged = False
        self.fd = -1
        # adaptive actions: lines "<end, CLOCK_MONOTONIC>\t<JSON>" appended to a file
        # beside the table; every worker reads what was added once a second
        self.actions_path = path.with_name(path.name + ".actions")
        self._actions_at = (b"", 0)       # (the file's header, offset) read up to
        self._poll_timer = None
        self.loop = None

    def start(self, loop=None) -> None:
        """Open (or make) the table and clear this worker's column: at the engine's start,
        not at construction, so `mta check-config` touches nothing."""
        if self.fd >= 0:
            return
        path = self.path
        size = HEADER + SLOTS * SLOT_SIZE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER, 0)
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
            boot = boot_id()
            if self.mm[:8] != MAGIC or self.mm[8:44] != boot:
                self.mm[:] = bytes(size)          # new, or made before this boot
                self.mm[:8] = MAGIC
                self.mm[8:44] = boot
                # the actions' ends are on the last boot's CLOCK_MONOTONIC: meaningless now
                try:
                    os.unlink(self.actions_path)
                except FileNotFoundError:
                    pass
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER, 0)
        self._clear_column()
        if loop is not None:     # what was shared before this start is read at the first poll
            self.loop = loop
            self._poll_timer = loop.call_later(ACTION_POLL, self._poll_actions)

    # -- slots ---------------------------------------------------------------------------

    def _lock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT_SIZE, HEADER + i * SLOT_SIZE)

    def _unlock(self, i: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT_SIZE, HEADER + i * SLOT_SIZE)

    def _clear_column(self) -> None:
        """This worker index starts (again): what a predecessor held is free."""
        for i in range(SLOTS):
            off = HEADER + i * SLOT_SIZE + 32 + 4 * self.col
            if self.mm[off:off + 4] != b"\0\0\0\0":
                self._lock(i)
                _COUNT.pack_into(self.mm, off, 0)
                self._unlock(i)

    def _slot(self, key: str) -> int | None:
        i = self.slots.get(key, -1)
        if i != -1:
            return i
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        start = int.from_bytes(digest[:4], "little") % SLOTS
        found = None
        for p in range(PROBES):
            j = (start + p) % SLOTS
            off = HEADER + j * SLOT_SIZE
            self._lock(j)
            try:
                held = self.mm[off:off + 16]
                if held == digest:
                    found = j
                elif held == _EMPTY:
                    self.mm[off:off + 16] = digest
                    found = j
            finally:
                self._unlock(j)
            if found is not None:
                break
        if found is None and not self._full_logged:
            self._full_logged = True
            log.warning("cluster: the host table %s is full; new keys are counted by each "
                        "worker alone at %g of their limit", self.path, self.fallback_fraction)
        self.slots[key] = found
        return found

    def connections(self, key: str) -> int:
        """Connections all workers hold on `key` (tests, the admin view)."""
        i = self._slot(key)
        if i is None:
            return self.held.get(key, 0)
        return sum(_COUNTS.unpack_from(self.mm, HEADER + i * SLOT_SIZE + 32))

    # -- leases --------------------------------------------------------------------------

    def take(self, keys: list[tuple[str, int]]) -> Lease | None:
        """The synchronous acquire: a lease on every key or on none."""
        if any(limit <= 0 for _, limit in keys):
            return None
        names = tuple(k for k, _ in keys)
        placed = [(self._slot(k), k, lim) for k, lim in keys]
        alone = [(k, lim) for i, k, lim in placed if i is None]
        if any(self.held.get(k, 0) >= fallback_limit(lim, self.fallback_fraction)
               for k, lim in alone):
            return None
        slots = sorted({i for i, _, _ in placed if i is not None})
        for i in slots:
            self._lock(i)
        try:
            for i, _, lim in placed:
                if i is not None and sum(_COUNTS.unpack_from(
                        self.mm, HEADER + i * SLOT_SIZE + 32)) >= lim:
                    return None
            for i in slots:
                off = HEADER + i * SLOT_SIZE + 32 + 4 * self.col
                _COUNT.pack_into(self.mm, off, _COUNT.unpack_from(self.mm, off)[0] + 1)
        finally:
            for i in reversed(slots):
                self._unlock(i)
        for k, _ in alone:
            self.held[k] = self.held.get(k, 0) + 1
        return Lease(self, names, self._member())

    async def acquire(self, keys: list[tuple[str, int]]) -> Lease | None:
        return self.take(keys)

    def _release(self, lease: Lease) -> None:
        for k in lease.keys:
            i = self.slots.get(k)
            if i is None:
                left = self.held.get(k, 0) - 1
                if left > 0:
                    self.held[k] = left
                else:
                    self.held.pop(k, None)
                continue
            off = HEADER + i * SLOT_SIZE + 32 + 4 * self.col
            self._lock(i)
            try:
                _COUNT.pack_into(self.mm, off, max(0, _COUNT.unpack_from(self.mm, off)[0] - 1))
            finally:
                self._unlock(i)

    # -- rates ---------------------------------------------------------------------------

    def _refill(self, r: SharedRate, now: float) -> float:
        i = self._slot(r.key)
        if i is None:
            return r.local(now)
        off = HEADER + i * SLOT_SIZE + 16
        self._lock(i)
        try:
            tat, k, after = gcra(_TAT.unpack_from(self.mm, off)[0], self.clock(), r.interval,
                                 r.tau, r.batch)
            _TAT.pack_into(self.mm, off, tat)
        finally:
            self._unlock(i)
        if after > 0:
            r.grant(k, now, after)
            return after
        r.grant(k - 1, now)
        return 0.0

    # -- warm-up counts ---------------------------------------------------------------------

    def _count(self, c: SharedCount, day_cap: int, hour_cap: int, refund: int, *,
               prefetch: bool) -> int:
        if prefetch:          # a local call: taken when the allowance runs out
            return GRANTED
        i = self._slot("warm:" + c.key)
        if i is None:
            return ALONE
        off = HEADER + i * SLOT_SIZE + 16
        want = count_batch(hour_cap)
        self._lock(i)
        try:
            day, hour, dc, hc = _WARM.unpack_from(self.mm, off)
            # a new day or hour starts from zero; a worker whose clock says an earlier one
            # (warm-up starts a moment apart) counts against the later one
            if c.day > day:
                day, dc = c.day, 0
            elif refund and c.day == day:
                dc = max(0, dc - refund)
            if c.hour > hour:
                hour, hc = c.hour, 0
            k = max(0, min(want, day_cap - dc, hour_cap - hc))
            _WARM.pack_into(self.mm, off, day, hour, dc + k, hc + k)
        finally:
            self._unlock(i)
        c.answer(k, dc + k, day_cap, hour_cap)
        if k == 0:
            return c.capped or HOUR
        c.tokens -= 1
        return GRANTED

    def add_stats(self, key: str, day: int, delta: list[int],
                  done: Callable[[list[int]], None], hour_length: float = 3600.0) -> None:
        # two slots per day parity (a day's counts live until the day after next starts):
        # (day, tried, bounced, deferred) and (day, complaints, 0, 0)
        totals: list[int] = []
        for half, vals in (("a", delta[:3]), ("b", [delta[3], 0, 0])):
            i = self._slot(f"warmstat:{key}:p{day % 2}{half}")
            if i is None:
                return          # a full table: each worker judges its own counts
            off = HEADER + i * SLOT_SIZE + 16
            self._lock(i)
            try:
                d, x, y, z = _WARM.unpack_from(self.mm, off)
                if day > d:
                    d, x, y, z = day, 0, 0, 0
                if day != d:
                    return      # a day long gone: its slot holds a later one
                x, y, z = x + vals[0], y + vals[1], z + vals[2]
                _WARM.pack_into(self.mm, off, d, x, y, z)
            finally:
                self._unlock(i)
            totals += (x, y, z)
        done(totals[:4])

    # -- adaptive actions ---------------------------------------------------------------------

    def share_action(self, action: dict, left: float) -> None:
        payload = self._action_payload(action, left)
        if payload is None or self.fd < 0:
            return
        line = f"{self.clock() + left:.3f}\t{payload}\n".encode()
        try:
            fd = os.open(self.actions_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size > ACTIONS_FILE_MAX:
                    self._compact(fd)
                elif size == 0:
                    os.write(fd, _actions_header())
                os.write(fd, line)
            finally:
                os.close(fd)     # the lock goes with it
        except OSError as exc:
            log.error("cluster: adaptive action not shared (%s): %s", self.actions_path,
                      exc.strerror or exc)

    def _compact(self, fd: int) -> None:
        """The file past ACTIONS_FILE_MAX: a new one with the actions still in force."""
        now = self.clock()
        keep = []
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            for line in f.read(ACTIONS_FILE_MAX * 2).splitlines():
                end, _, _ = line.partition(b"\t")
                try:
                    if float(end) > now:
                        keep.append(line)
                except ValueError:
                    continue
        tmp = self.actions_path.with_name(self.actions_path.name + ".tmp")
        tmp.write_bytes(_actions_header() + b"".join(x + b"\n" for x in keep[-ACTIONS_MAX:]))
        os.replace(tmp, self.actions_path)     # readers see a new inode and read it all
        # the caller's fd is the old file: write the new line to the new one
        new = os.open(self.actions_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.dup2(new, fd)
        os.close(new)

    def _poll_actions(self) -> None:
        self._poll_timer = None
        try:
            if self.on_action is not None:
                self.poll_actions()
        except Exception:        # never stop polling
            log.exception("cluster: reading shared adaptive actions")
        if self.loop is not None and self.fd >= 0:
            self._poll_timer = self.loop.call_later(ACTION_POLL, self._poll_actions)

    def poll_actions(self) -> None:
        """Hand on the actions appended since the last look (each line bounded)."""
        try:
            with open(self.actions_path, "rb") as f:
                # a compacted file is a new one with a new header (inode numbers recur)
                header = f.read(_HEADER_LEN)
                seen, offset = self._actions_at
                if header != seen or len(header) < _HEADER_LEN:
                    offset = _HEADER_LEN
                f.seek(offset)
                data = f.read(ACTIONS_FILE_MAX * 2)
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1          # a line being written is read next time
        self._actions_at = (header, offset + end)
        now = self.clock()
        for line in data[:end].splitlines():
            if len(line) > ACTION_MAX + 32:
                continue
            stamp, _, payload = line.partition(b"\t")
            try:
                left = float(stamp) - now
            except ValueError:
                continue
            self._received(payload.decode("utf-8", "replace"), left, now)

    async def close(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if self.fd < 0:
            return
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
            self.fd = -1
