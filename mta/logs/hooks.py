"""Event webhooks: the JSONL log records shipped to HTTP endpoints, at least once, in order.

The log file (<log directory>/mta.jsonl, LogWriter) is already the durable stream of
records, so a hook TAILS it rather than taking records from the code that logs them:
mail never waits for a hook, and a slow or dead hook only makes its cursor lag.

Each [[webhook]] runs as one task on the daemon's loop. A step reads at most 1 MiB of the
file (in a worker thread: a slow disk never holds the loop), only whole lines (what the
writer has completed), keeps the records that match the hook's record types and tenants
and adds them to the batch being built. A batch is sent when it holds `batch_size`
records or `max_batch_bytes`, or `batch_interval` after its first record. Batches are sent
one at a time, in file order, so nothing is reordered within a message (its records are
in the file in the order they were logged); a batch never spans two files.

Wire format: one POST per batch, the body a JSON array of the records exactly as they are
in the log (Content-Type: application/json), with headers X-MTA-Hook (the hook's name),
X-MTA-Batch-Id (a hash of where the batch is in the log and what it holds: sent again,
after a failure or a restart, it has the same id, so a receiver dedupes by it) and
X-MTA-Batch-Records. Any 2xx acknowledges the batch; anything else (a status, a refused connection, a timeout, a TLS error) is retried
after a wait that doubles from 1 s up to `max_retry_interval`, with jitter (half to all of
it), forever: nothing is dropped for a failing hook. The first failure, then at most one
report a minute, and the recovery are logged. https URLs are verified (system trust store,
or `ca_file`); the Authorization header comes from a 0600 file, never the config. The HTTP
client is aiohttp's (the admin API's library too): one kept-alive connection per hook, no
redirects followed, no proxy taken from the environment, the reply's body read up to
64 KiB and dropped, the whole exchange within `timeout`.

Cursor: <spool directory>/webhooks/NAME.cursor, JSON {dev, ino, offset, batch}: the file's
identity, the offset up to which every record was acknowledged (or filtered out), and the
batch in flight ({id, end}), written with mta.files.write_atomic BEFORE the batch is sent
(one write per batch: an acknowledgement is written with the next batch, or within 5 s
when the log is quiet, and at stop). After a restart the batch the cursor names is built
again from exactly the same bytes and sent with the same id, so the only duplicates a
restart makes are of that one batch, and they carry the id the receiver already saw.

Rotation: logrotate renames the file and SIGUSR1 makes the writer open a new one. The
hook keeps its open descriptor on the old file and finishes it; it moves to the new file
only once that file holds bytes (the writer writes files one after the other, so by then
the old one is complete). Started after rotations happened, a cursor whose file is not at
the log path is looked for among the rotated siblings (mta.jsonl.*, not compressed ones)
and the newer siblings are read oldest first; a cursor whose file is gone is logged as an
error (the records between are not sent) and the hook starts at the beginning of the
current file; a file truncated under the cursor (copytruncate) is read again from 0.
Rotate by renaming (logrotate's default, with SIGUSR1 in postrotate): copytruncate loses
what is written between its copy and its truncate whoever reads the file, and a truncated
file that has grown past the cursor again before the hook looks is not noticed. Rotated
files are looked for in the log directory only (not logrotate's olddir). A hook with no
cursor starts at the beginning of the current file.

Backlog bound: a hook more than `max_lag` bytes of log behind (0: no bound) skips to the
end of the log; the skipped range and its size are logged as an error and counted in
stats(). Lines that are not JSON (a torn record after a failed write) are skipped and
counted.

Imports mta.files only (rank 2, tests/test_layering.py); takes its settings as any object
with the [[webhook]] keys (mta.config.schema.WebhookConfig). Stats for metrics:
Hook.stats() and Webhooks.stats() (Server.webhooks, None without [[webhook]] tables).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import ssl
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from mta.files import write_atomic

log = logging.getLogger("mta.hooks")

READ_CHUNK = 1 << 20          # bytes read per step
REPLY_LIMIT = 64 << 10        # bytes of a reply's body read (for the error message)
RETRY_INITIAL = 1.0           # seconds before the first retry of a batch
REPORT_EVERY = 60.0           # seconds between reports while a hook keeps failing
POLL = 0.2                    # seconds between looks at a quiet log file
SAVE_PROGRESS = 5.0           # seconds between cursor writes while only filtered lines pass
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".z", ".zip")


class HookSettings(Protocol):
    name: str
    url: str
    record_types: tuple[str, ...]
    tenants: tuple[str, ...]
    batch_size: int
    max_batch_bytes: int
    batch_interval: float
    timeout: float
    max_retry_interval: float
    max_lag: int
    authorization_file: Any
    ca_file: Any


class HookError(ValueError):
    """A [[webhook]] that cannot run: its authorization or CA file, a duplicate name."""


def read_authorization(path: str) -> str:
    """The Authorization header value from a file only its owner may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HookError(f"authorization_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise HookError(f"authorization_file {path}: mode {stat.S_IMODE(st.st_mode):04o} "
                            "lets others read it; chmod 600")
        data = os.read(fd, 8193)
    finally:
        os.close(fd)
    value = data.decode("ascii", "replace").strip()
    if not value or len(data) > 8192 or any(not (32 <= ord(c) < 127) for c in value):
        raise HookError(f"authorization_file {path}: want one line of printable ASCII "
                        "(the header value), at most 8 KiB")
    return value


def tls_context(settings: HookSettings) -> ssl.SSLContext | None:
    if urlsplit(settings.url).scheme != "https":
        return None
    ctx = ssl.create_default_context()
    if settings.ca_file:
        try:
            ctx = ssl.create_default_context(cafile=str(settings.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise HookError(f"ca_file {settings.ca_file}: {exc}") from None
    return ctx


# --- the HTTP client ------------------------------------------------------------------


class HttpError(Exception):
    """A POST that did not get a 2xx: the reason, for the hook's last_error."""


class Poster:
    """POSTs to one URL through aiohttp's client: one kept-alive connection, no redirects,
    no proxy from the environment, the reply's head bounded by aiohttp (8 KiB lines) and
    its body read up to 64 KiB (a longer one closes the connection), all within
    `timeout`."""

    def __init__(self, url: str, timeout: float, ssl_context: ssl.SSLContext | None,
                 headers: dict[str, str]):
        self.url = url
        self.timeout = timeout
        self.ssl = ssl_context
        self.headers = {"User-Agent": "mta-webhook/1", "Content-Type": "application/json",
                        **headers}
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        """The status of a 2xx reply; raises HttpError for anything else."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=1, ssl=self.ssl if self.ssl else True),
                auto_decompress=False, trust_env=False)
        try:
            try:
                return await self._post(body, headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # a kept-alive connection the server had closed: once more on a new one
                # (a batch is idempotent by its id)
                return await self._post(body, headers)
        except TimeoutError:
            raise HttpError(f"no reply within {self.timeout:g}s") from None
        except aiohttp.ClientSSLError as exc:
            raise HttpError(f"TLS: {exc}") from None
        except aiohttp.ClientError as exc:
            raise HttpError(f"{type(exc).__name__}: {exc}") from None

    async def _post(self, body: bytes, headers: dict[str, str]) -> int:
        async with self._session.post(self.url, data=body, allow_redirects=False,
                                      headers={**self.headers, **headers}) as reply:
            text = await reply.content.read(REPLY_LIMIT)
            if not 200 <= reply.status < 300:
                raise HttpError(f"HTTP {reply.status}" + (f": {_printable(text)}" if text else ""))
            return reply.status

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _printable(data: bytes) -> str:
    text = data[:200].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


# --- reading the log --------------------------------------------------------------------


@dataclass
class Batch:
    """Matching records between offsets `start` and `end` of one file."""

    start: int
    end: int
    records: list[bytes] = field(default_factory=list)
    size: int = 0
    first_at: float = 0.0     # time.monotonic() when its first record came
    id: str = ""


class Cursor:
    """Where a hook stands: the file (open descriptor and identity) and offsets in it."""

    def __init__(self, fd: int, ident: tuple[int, int], offset: int, name: str):
        self.fd = fd
        self.ident = ident
        self.offset = offset     # everything before it is acknowledged or filtered out
        self.name = name         # the file's name when it was opened (for messages)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _read_lines(fd: int, pos: int, end: int | None, types: frozenset[str],
                tenants: frozenset[str], room: int, room_bytes: int
                ) -> tuple[list[bytes], int, int, int]:
    """From `pos`, whole lines up to `end` (None: what the file holds): the matching ones
    (at most `room` of them and about `room_bytes`), the offset after the last line looked
    at, lines that are not JSON, bytes skipped of a line over READ_CHUNK."""
    limit = READ_CHUNK if end is None else min(READ_CHUNK, end - pos)
    data = os.pread(fd, limit, pos) if limit > 0 else b""
    last = data.rfind(b"\n")
    if last < 0:
        if len(data) == READ_CHUNK:                # one line longer than a read: skip it
            return [], pos + len(data), 0, len(data)
        return [], pos, 0, 0
    out: list[bytes] = []
    bad = used = 0
    at = 0
    # the writer's orjson output has `"type":"X"` verbatim: most lines of other types are
    # passed over without parsing (the parse below still decides)
    needles = tuple(b'"type":"%s"' % t.encode() for t in types)
    while at <= last:
        nl = data.index(b"\n", at)
        line = data[at:nl]
        at = nl + 1
        if not line.strip() or (needles and not any(n in line for n in needles)
                                and line[:1] == b"{" and line[-1:] == b"}"):
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        if types and rec.get("type") not in types:
            continue
        if tenants and rec.get("tenant") not in tenants:
            continue
        out.append(line)
        used += len(line) + 1
        if len(out) >= room or used >= room_bytes:
            break
    return out, pos + at, bad, 0


class Hook:
    """One [[webhook]]: tails the log, builds batches, sends them, keeps the cursor."""

    def __init__(self, settings: HookSettings, log_path: str, state_dir: str,
                 ssl_context: ssl.SSLContext | None = None, authorization: str = "",
                 host: str = ""):
        self.settings = settings
        self.name = settings.name
        self.log_path = log_path
        self.cursor_path = os.path.join(state_dir, f"{settings.name}.cursor")
        self.types = frozenset(settings.record_types)
        self.tenants = frozenset(settings.tenants)
        headers = {"X-MTA-Hook": settings.name}
        if authorization:
            headers["Authorization"] = authorization
        self.poster = Poster(settings.url, settings.timeout, ssl_context, headers)
        self.host = host
        self.cursor: Cursor | None = None
        self.batch: Batch | None = None
        self._visited: set[tuple[int, int]] = set()
        self._saved_offset = -1
        self._saved_at = 0.0
        self._task: asyncio.Task | None = None
        self._rebuild_to: int | None = None         # the end of a batch sent before a restart
        # stats
        self.sent_batches = 0
        self.sent_records = 0
        self.failed_attempts = 0
        self.skipped_bytes = 0
        self.bad_lines = 0
        self.last_error = ""
        self.last_success = 0.0
        self._failing_since: float | None = None
        self._reported = 0.0

    # -- life ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        os.makedirs(os.path.dirname(self.cursor_path), mode=0o700, exist_ok=True)
        self._task = loop.create_task(self._run(), name=f"webhook {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.poster.close()
        if self.cursor is not None:
            if self.batch is None or self.batch.id == "":
                self._save(force=True)   # progress over filtered lines; no batch in flight
            self.cursor.close()
            self.cursor = None

    def stats(self) -> dict[str, object]:
        """Counters for metrics: batches and records sent, failed tries, bytes of log not
        yet acknowledged (lag), bytes skipped (max_lag, a lost file), last error."""
        return {"sent_batches": self.sent_batches, "sent_records": self.sent_records,
                "failed_attempts": self.failed_attempts, "lag_bytes": self.lag(),
                "skipped_bytes": self.skipped_bytes, "bad_lines": self.bad_lines,
                "failing": self._failing_since is not None, "last_error": self.last_error,
                "last_success": self.last_success}

    def lag(self) -> int:
        c = self.cursor
        if c is None or c.fd < 0:
            return 0
        try:
            behind = max(0, os.fstat(c.fd).st_size - c.offset)
            st = os.stat(self.log_path)
        except OSError:
            return 0
        return behind + (st.st_size if _ident(st) != c.ident else 0)

    async def _run(self) -> None:
        try:
            while self.cursor is None:
                try:
                    await asyncio.to_thread(self._open_from_cursor)
                    while self.cursor is None:      # the writer makes the file at start
                        if not await asyncio.to_thread(self._open_current, 0):
                            await asyncio.sleep(POLL)
                except OSError as exc:   # the log directory unreadable: say so, try again
                    log.error("webhook %s: cannot open the log: %s", self.name, exc)
                    await asyncio.sleep(REPORT_EVERY)
            reported = 0.0
            while True:
                try:
                    await self._step()
                except OSError as exc:   # a file gone between two looks, EIO: a moment later
                    if time.monotonic() - reported >= REPORT_EVERY:
                        reported = time.monotonic()
                        log.error("webhook %s: %s; trying again", self.name, exc)
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise
        except Exception:   # a bug: say so loudly; the mail goes on
            log.exception("webhook %s stopped", self.name)

    # -- the cursor file ----------------------------------------------------------------

    def _open_from_cursor(self) -> None:
        try:
            with open(self.cursor_path, "rb") as f:
                saved = orjson.loads(f.read())
            ident = (int(saved["dev"]), int(saved["ino"]))
            offset = int(saved["offset"])
            pending = saved.get("batch")
            if pending is not None:
                pending = (str(pending["id"]), int(pending["end"]))
        except FileNotFoundError:
            log.info("webhook %s: no cursor yet, starting at the beginning of %s",
                     self.name, self.log_path)
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:   # JSONDecodeError too
            log.error("webhook %s: cannot read its cursor %s (%s): starting at the beginning "
                      "of %s", self.name, self.cursor_path, exc, self.log_path)
            return
        found = self._find(ident)
        if found is None:
            log.error("webhook %s: the log file of its cursor (device %d, inode %d, offset %d) "
                      "is gone (rotated away and removed?): its records after that offset "
                      "were not sent; starting at the beginning of %s", self.name, *ident,
                      offset, self.log_path)
            return
        fd, path = found
        self.cursor = Cursor(fd, ident, offset, path)
        self._visited.add(ident)
        if os.fstat(fd).st_size < offset:
            log.warning("webhook %s: %s is shorter than its cursor's offset %d (truncated): "
                        "reading it from the beginning", self.name, path, offset)
            self.cursor.offset = 0
        elif pending is not None:
            self.batch = Batch(offset, offset, id=pending[0])
            self._rebuild_to = pending[1]
        self._saved_offset = self.cursor.offset

    def _find(self, ident: tuple[int, int]) -> tuple[int, str] | None:
        """An open descriptor on the file with this identity: the log path or a rotated
        sibling (not a compressed one)."""
        directory, base = os.path.split(self.log_path)
        names = [base] + sorted(n for n in os.listdir(directory or ".")
                                if n.startswith(base + ".") and not n.lower().endswith(COMPRESSED))
        for name in names:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if _ident(os.fstat(fd)) == ident:
                return fd, path
            os.close(fd)
        return None

    def _open_current(self, offset: int) -> bool:
        """The file at the log path from `offset`; False while there is none."""
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        ident = _ident(os.fstat(fd))
        self.cursor = Cursor(fd, ident, offset, self.log_path)
        self._visited.add(ident)
        return True

    def _save(self, force: bool = False) -> None:
        c = self.cursor
        if c is None:
            return
        batch = ({"id": self.batch.id, "end": self.batch.end}
                 if self.batch is not None and self.batch.id else None)
        now = time.monotonic()
        if not force and batch is None and (c.offset == self._saved_offset
                                            or now - self._saved_at < SAVE_PROGRESS):
            return
        data = orjson.dumps({"dev": c.ident[0], "ino": c.ident[1], "offset": c.offset,
                             "batch": batch, "file": c.name, "time": time.time()})
        try:
            write_atomic(self.cursor_path, data + b"\n")
        except OSError as exc:
            log.error("webhook %s: cannot write its cursor %s: %s", self.name,
                      self.cursor_path, exc.strerror)
            return
        self._saved_offset = c.offset
        self._saved_at = now

    # -- one step ----------------------------------------------------------------------

    async def _step(self) -> None:
        c = self.cursor
        assert c is not None
        b = self.batch
        if b is not None and b.id:                 # sent before a restart: same bytes, same id
            if self._rebuild_to is not None:
                await self._fill(b, self._rebuild_to)
                self._rebuild_to = None
            await self._send(b)
            return
        if self.settings.max_lag and self.lag() > self.settings.max_lag:
            await asyncio.to_thread(self._skip_to_end)
            return
        if b is None:
            b = self.batch = Batch(c.offset, c.offset)
        added = await self._fill(b, None)
        s = self.settings
        full = len(b.records) >= s.batch_size or b.size >= s.max_batch_bytes
        if full or (b.records and time.monotonic() - b.first_at >= s.batch_interval):
            await self._send(b)
            return
        if added:                                   # more may be waiting: read on at once
            return
        if not b.records and b.end > c.offset:     # only filtered-out lines passed
            c.offset = b.end
            self.batch = None
        if (c.offset != self._saved_offset         # quiet: the progress made, now and then
                and time.monotonic() - self._saved_at >= SAVE_PROGRESS):
            await asyncio.to_thread(self._save)
        if await asyncio.to_thread(self._next_file_ready):
            if b.records:                           # a batch never spans two files
                await self._send(b)
            await asyncio.to_thread(self._move_on)
            return
        wait = POLL if not b.records else min(POLL, max(0.0, s.batch_interval
                                                        - (time.monotonic() - b.first_at)))
        await asyncio.sleep(wait)

    async def _fill(self, b: Batch, end: int | None) -> bool:
        """Add what the file holds after the batch (up to `end`); False when nothing was
        there to read."""
        c = self.cursor
        s = self.settings
        room = 1 << 30 if end is not None else s.batch_size - len(b.records)
        room_bytes = 1 << 62 if end is not None else s.max_batch_bytes - b.size
        got = False
        while True:
            recs, after, bad, skipped = await asyncio.to_thread(
                _read_lines, c.fd, b.end, end, self.types, self.tenants, room, room_bytes)
            if bad:
                self.bad_lines += bad
                log.warning("webhook %s: %d lines of %s that are not JSON skipped",
                            self.name, bad, c.name)
            if skipped:
                self.skipped_bytes += skipped
                log.error("webhook %s: a line over %d bytes in %s at offset %d skipped",
                          self.name, READ_CHUNK, c.name, b.end)
            if after == b.end:
                return got
            got = True
            if recs and not b.records:
                b.first_at = time.monotonic()
            b.records += recs
            b.size += sum(len(r) + 1 for r in recs)
            b.end = after
            room -= len(recs)
            if end is None or after >= end or room <= 0:
                return got

    async def _send(self, b: Batch) -> None:
        """Send `b` until the hook takes it (waiting between tries), then move the cursor."""
        c = self.cursor
        if not b.id:
            b.id = self._batch_id(b)
            await asyncio.to_thread(self._save)    # the batch in flight, before it leaves
        body = b"[" + b",".join(b.records) + b"]"
        headers = {"X-MTA-Batch-Id": b.id, "X-MTA-Batch-Records": str(len(b.records))}
        tries = 0
        while True:
            try:
                if b.records:
                    await self.poster.post(body, headers)
                break
            except HttpError as exc:
                tries += 1
                self.failed_attempts += 1
                self._failed(str(exc))
                wait = min(self.settings.max_retry_interval, RETRY_INITIAL * 2 ** min(tries - 1, 30))
                await asyncio.sleep(random.uniform(wait / 2, wait))
                if self.settings.max_lag and self.lag() > self.settings.max_lag:
                    await asyncio.to_thread(self._skip_to_end)   # gives this batch up, logged
                    return
        if self._failing_since is not None:
            log.warning("webhook %s works again after %.0f s (%d tries failed)", self.name,
                        time.time() - self._failing_since, self.failed_attempts)
            self._failing_since = None
        self.sent_batches += 1
        self.sent_records += len(b.records)
        self.last_success = time.time()
        # the new offset is written with the next batch (before it leaves) or, when the log
        # is quiet, within SAVE_PROGRESS: one cursor write per batch. A crash before then
        # sends this batch again, with its id.
        c.offset = b.end
        self.batch = None

    def _batch_id(self, b: Batch) -> str:
        """Where the batch is and what it holds: the same batch built again after a restart
        gets the same id; a file truncated and written again (copytruncate) does not."""
        c = self.cursor
        h = hashlib.sha256(f"{self.host}|{self.name}|{c.ident[0]}|{c.ident[1]}|{b.start}|"
                           f"{b.end}|".encode())
        for rec in b.records:
            h.update(rec)
            h.update(b"\n")
        return h.hexdigest()[:32]

    def _failed(self, why: str) -> None:
        self.last_error = why
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = time.time()
            self._reported = now
            log.warning("webhook %s (%s): %s; retrying with backoff up to %g s, the cursor "
                        "waits", self.name, self.settings.url, why,
                        self.settings.max_retry_interval)
        elif now - self._reported >= REPORT_EVERY:
            self._reported = now
            log.warning("webhook %s still failing: %s; %d bytes of log behind", self.name,
                        why, self.lag())

    # -- rotation, truncation, skipping --------------------------------------------------

    def _next_file_ready(self) -> bool:
        """Our file is complete and a newer one holds bytes (or ours was truncated)."""
        c = self.cursor
        if os.fstat(c.fd).st_size < c.offset:
            return True
        return self._next_file() is not None

    def _next_file(self) -> str | None:
        c = self.cursor
        mtime = os.fstat(c.fd).st_mtime_ns
        directory, base = os.path.split(self.log_path)
        older: list[tuple[int, str]] = []
        for name in os.listdir(directory or "."):
            if not name.startswith(base + ".") or name.lower().endswith(COMPRESSED):
                continue
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if _ident(st) not in self._visited and st.st_mtime_ns >= mtime and st.st_size:
                older.append((st.st_mtime_ns, path))
        if older:
            return min(older)[1]                    # rotated while we were away: oldest first
        try:
            st = os.stat(self.log_path)
        except OSError:
            return None
        if _ident(st) != c.ident and _ident(st) not in self._visited and st.st_size > 0:
            return self.log_path
        return None

    def _move_on(self) -> None:
        c = self.cursor
        size = os.fstat(c.fd).st_size
        if size < c.offset:
            log.warning("webhook %s: %s was truncated under the cursor (copytruncate?): "
                        "reading it from the beginning", self.name, c.name)
            c.offset = 0
            self.batch = None
            self._save(force=True)
            return
        if size > c.offset:   # written after we looked: finish it first
            return
        path = self._next_file()
        if path is None:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        c.close()
        self.cursor = Cursor(fd, _ident(os.fstat(fd)), 0, path)
        self._visited.add(self.cursor.ident)
        self.batch = None
        log.info("webhook %s: %s done, going on with %s", self.name, c.name, path)
        self._save(force=True)

    def _skip_to_end(self) -> None:
        c = self.cursor
        lag = self.lag()
        old = (c.name, c.offset)
        st = os.stat(self.log_path)
        if _ident(st) != c.ident:
            c.close()
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
            self.cursor = c = Cursor(fd, _ident(os.fstat(fd)), 0, self.log_path)
            self._visited.add(c.ident)
        size = os.fstat(c.fd).st_size
        end = size
        if size and os.pread(c.fd, 1, size - 1) != b"\n":   # a record being written: after it
            tail = os.pread(c.fd, min(size, READ_CHUNK), max(0, size - READ_CHUNK))
            end = size - len(tail) + tail.rfind(b"\n") + 1
        c.offset = max(end, 0)
        self.batch = None
        self.skipped_bytes += lag
        log.error("webhook %s: %d bytes of log behind, over max_lag %d: skipping from %s "
                  "offset %d to %s offset %d; the records between are NOT sent",
                  self.name, lag, self.settings.max_lag, old[0], old[1], c.name, c.offset)
        self._save(force=True)


class Webhooks:
    """Every [[webhook]] of the config, started and stopped together."""

    def __init__(self, hooks: list[Hook]):
        self.hooks = hooks

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for h in self.hooks:
            h.start(loop)

    async def stop(self) -> None:
        await asyncio.gather(*(h.stop() for h in self.hooks))

    def stats(self) -> dict[str, dict[str, object]]:
        """Per hook name: Hook.stats()."""
        return {h.name: h.stats() for h in self.hooks}


def build_webhooks(settings: list[HookSettings] | tuple[HookSettings, ...], log_path: str,
                   state_dir: str, host: str = "") -> Webhooks:
    """The hooks, their Authorization values and TLS contexts loaded; HookError names
    the hook and the problem."""
    hooks: list[Hook] = []
    seen: set[str] = set()
    for s in settings:
        if s.name in seen:
            raise HookError(f"webhook {s.name!r}: two [[webhook]] tables have that name")
        seen.add(s.name)
        try:
            auth = read_authorization(str(s.authorization_file)) if s.authorization_file else ""
            ctx = tls_context(s)
        except HookError as exc:
            raise HookError(f"webhook {s.name!r}: {exc}") from None
        hooks.append(Hook(s, log_path, state_dir, ctx, auth, host))
    return Webhooks(hooks)
