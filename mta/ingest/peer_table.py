"""Per-client-IP counts the worker processes of one host share: connections and AUTH failures.

With `[server] workers = N` the kernel spreads one client's connections over the workers
(SO_REUSEPORT hashes the 4-tuple), so limits each worker held alone would let a client N
times `max_connections_per_ip` connections and N times `auth_max_failures` password guesses
per lockout window. This table holds them for the node.

A file under the spool root (`shared-peers`), mapped by every worker. Each worker owns one
column and is the only writer of it (no locks; aligned 32-bit stores); a reader sums the
columns. A column is a count-min sketch: two rows of BUCKETS counters, a key (listener and
client IP) hashed to one counter per row with BLAKE2b keyed by a random secret in the
file's header (an outsider cannot aim many addresses at one counter), the estimate being
the smaller row's sum. Collisions only ever overestimate, so a limit is never exceeded;
an unlucky address may be refused a little early. Bounded whatever the clients: the file's
size is fixed by the worker count.

AUTH failures: a counter and the end of its lockout window (CLOCK_MONOTONIC seconds, one
clock for the host) per cell; a failure past the window starts a new count, each failure
extends the window (as the single-process Authenticator does).

A worker clears its column when it opens the table: a dead worker's connections died with
it. A table of another boot or worker count is made anew. One process alone counts in
`LocalPeerCounts` (plain dicts) through the same calls.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import time
from pathlib import Path

from mta.files import boot_id
from mta.model.node import WorkerSlot

MAGIC = b"MTAPEER1"
HEADER = 128                     # magic (8), boot id (36), workers (4), secret (16), padding
BUCKETS = 1 << 16                # counters per row
ROWS = 2
_CONNS, _FAILS, _ENDS = 0, ROWS * BUCKETS, 2 * ROWS * BUCKETS    # word offsets in a column
COLUMN_WORDS = 3 * ROWS * BUCKETS                               # 1.5 MiB per worker
_MAX = 0xFFFFFFFF


class PeerTable:
    """The node's per-IP counts; `view(listener)` gives one listener's."""

    def __init__(self, path: Path, worker: WorkerSlot, clock=time.monotonic) -> None:
        self.path = path
        self.worker = worker
        self.clock = clock
        self.fd = -1
        self.mm: mmap.mmap | None = None
        self.words: memoryview | None = None
        self.secret = b""

    def start(self) -> None:
        """Open (or make) the file and clear this worker's column."""
        if self.fd >= 0:
            return
        n = self.worker.count
        size = HEADER + n * COLUMN_WORDS * 4
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER, 0)
        try:
            head = os.pread(self.fd, HEADER, 0)
            boot = boot_id()
            if (head[:8] != MAGIC or head[8:44] != boot or int.from_bytes(head[44:48], "little") != n
                    or os.fstat(self.fd).st_size != size):
                os.ftruncate(self.fd, 0)            # new, another boot's or worker count's
                os.ftruncate(self.fd, size)
                os.pwrite(self.fd, MAGIC + boot + n.to_bytes(4, "little") + os.urandom(16), 0)
            self.mm = mmap.mmap(self.fd, size)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER, 0)
        self.secret = bytes(self.mm[48:64])
        self.words = memoryview(self.mm)[HEADER:].cast("I")
        own = self.worker.index * COLUMN_WORDS
        self.words[own:own + COLUMN_WORDS] = memoryview(bytes(COLUMN_WORDS * 4)).cast("I")

    def close(self) -> None:
        if self.words is not None:
            self.words.release()
            self.words = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def view(self, listener: str) -> PeerCounts:
        return PeerCounts(self, listener)

    # -- the sketch ----------------------------------------------------------------------

    def cells(self, key: str) -> tuple[int, int]:
        """The key's counter in each row (word offsets within a column's section)."""
        h = hashlib.blake2b(key.encode(), digest_size=8, key=self.secret).digest()
        return (int.from_bytes(h[:4], "little") % BUCKETS,
                BUCKETS + int.from_bytes(h[4:], "little") % BUCKETS)

    def total(self, cells: tuple[int, int], section: int) -> int:
        """The estimate: the smaller of the rows' sums over every worker's column."""
        w = self.words
        assert w is not None
        cols = range(0, self.worker.count * COLUMN_WORDS, COLUMN_WORDS)
        return min(sum(w[c + section + i] for c in cols) for i in cells)

    def live_failures(self, cells: tuple[int, int], now: float) -> int:
        """AUTH failures whose lockout window is still open, over every worker."""
        w = self.words
        assert w is not None
        t = int(now)
        cols = range(0, self.worker.count * COLUMN_WORDS, COLUMN_WORDS)
        return min(sum(w[c + _FAILS + i] for c in cols if w[c + _ENDS + i] > t) for i in cells)

    def add(self, cells: tuple[int, int], section: int, delta: int) -> None:
        w = self.words
        assert w is not None
        own = self.worker.index * COLUMN_WORDS + section
        for i in cells:
            w[own + i] = min(max(0, w[own + i] + delta), _MAX)


class PeerCounts:
    """One listener's view: connections per client IP and AUTH failures per client IP,
    node-wide. The listener and its Authenticator call it instead of their own dicts."""

    def __init__(self, table: PeerTable, listener: str) -> None:
        self.table = table
        self.prefix = listener + "|"

    def connect(self, ip: str, limit: int) -> bool:
        """Count a connection from `ip`; False (and not counted) when that would make more
        than `limit` on the node. Counted first, then judged: two workers admitting the
        last place at once may both refuse, never both admit."""
        t = self.table
        cells = t.cells(self.prefix + ip)
        t.add(cells, _CONNS, 1)
        if t.total(cells, _CONNS) > limit:
            t.add(cells, _CONNS, -1)
            return False
        return True

    def disconnect(self, ip: str) -> None:
        t = self.table
        t.add(t.cells(self.prefix + ip), _CONNS, -1)

    def connections(self, ip: str) -> int:
        t = self.table
        return t.total(t.cells(self.prefix + ip), _CONNS)

    def live(self, ip: str, now: float) -> int:
        """AUTH failures of `ip` in open lockout windows, node-wide."""
        t = self.table
        return t.live_failures(t.cells(self.prefix + ip), now)

    def locked(self, ip: str, now: float, max_failures: int) -> bool:
        return self.live(ip, now) >= max_failures

    def failed(self, ip: str, now: float, lockout: float) -> None:
        """One more failure from `ip` in this worker's column; its window (re)starts."""
        t = self.table
        w = t.words
        assert w is not None
        own = t.worker.index * COLUMN_WORDS
        end = int(now + lockout) + 1
        for i in t.cells(self.prefix + ip):
            n = 1 if w[own + _ENDS + i] <= int(now) else w[own + _FAILS + i] + 1
            w[own + _FAILS + i] = min(n, _MAX)
            w[own + _ENDS + i] = end

    def succeeded(self, ip: str) -> None:
        """A good password: this worker's failures of `ip` are forgotten."""
        t = self.table
        w = t.words
        assert w is not None
        own = t.worker.index * COLUMN_WORDS
        for i in t.cells(self.prefix + ip):
            w[own + _FAILS + i] = 0


class LocalPeerCounts:
    """The same counts for one process alone (one worker): dicts, the listener's and its
    Authenticator's whatever the worker count, so neither asks which it has."""

    MAX_FAILING = 100_000       # addresses with failures kept; past it the oldest 10 % go

    def __init__(self) -> None:
        self._conns: dict[str, int] = {}
        self._failures: dict[str, list[float]] = {}   # ip -> [count, window end]

    def connect(self, ip: str, limit: int) -> bool:
        n = self._conns.get(ip, 0)
        if n >= limit:
            return False
        self._conns[ip] = n + 1
        return True

    def disconnect(self, ip: str) -> None:
        n = self._conns.get(ip, 1) - 1
        if n:
            self._conns[ip] = n
        else:
            self._conns.pop(ip, None)

    def connections(self, ip: str) -> int:
        return self._conns.get(ip, 0)

    def live(self, ip: str, now: float) -> int:
        entry = self._failures.get(ip)
        if entry is None:
            return 0
        if now >= entry[1]:
            del self._failures[ip]
            return 0
        return int(entry[0])

    def locked(self, ip: str, now: float, max_failures: int) -> bool:
        return self.live(ip, now) >= max_failures

    def failed(self, ip: str, now: float, lockout: float) -> None:
        entry = self._failures.get(ip)
        if entry is None or now >= entry[1]:
            if len(self._failures) >= self.MAX_FAILING:   # bounded: forget the oldest
                for old in list(self._failures)[:self.MAX_FAILING // 10]:
                    del self._failures[old]
            self._failures[ip] = [1, now + lockout]
        else:
            entry[0] += 1
            entry[1] = now + lockout   # each failure extends the window

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)
