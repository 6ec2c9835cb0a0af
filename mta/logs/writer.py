"""Buffered JSONL log writer that never stands between a message and its reply.

Records are serialised with orjson into a buffer and handed to one writer thread
at most every `flush_interval` seconds or when the buffer passes 256 KiB, so
logging costs one write() per batch, and a slow log disk (dirty-page throttling
can hold a write() for seconds) stalls that thread, never the event loop.
Logs are not the durability record (the spool is), so they are not fsync'd per
batch (close() fsyncs) and a failing write (ENOSPC, EIO, EROFS, EDQUOT) never
delays a 250: the records stay in the buffer and the write is retried every
`retry_interval`. The buffer is bounded by `max_buffer`; past it the oldest
records are dropped and counted, and once writing works again a LogLoss record
says how many were lost. Trouble is reported on stderr through logging (the
first failure, then at most once a minute, and the recovery) and in stats().
File: <log directory>/<name>.jsonl, appended, with mode `mode` whatever the umask.
`reopen()` (the daemon calls it on SIGUSR1 and on a reload) opens the path again, so
after logrotate renamed the file the records go to a new one: the open runs in the
writer thread, and the old file is closed there after the write in flight, so no record
is lost or split between the two files.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time

import orjson

from mta.logs.privacy import Privacy
from mta.model.log_records import RecordType

log = logging.getLogger("mta.logs")

_FLUSH_AT = 256 << 10
_REPORT_EVERY = 60.0   # seconds between reports while writes keep failing


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write `data`; the bytes written and the error that stopped it, if any."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, view[done:])
    except OSError as exc:
        return done, exc
    return done, None


def _open_log(path: str, mode: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)   # the umask (0o077 in the daemon) must not decide it
    except OSError as exc:    # e.g. a file left by another user
        os.close(fd)
        raise OSError(exc.errno, f"cannot set mode {mode:04o} on {path}: "
                                 f"{exc.strerror}") from None
    return fd


def _try_open(path: str, mode: int) -> int | OSError:
    try:
        return _open_log(path, mode)
    except OSError as exc:
        return exc


def _hand_back(loop: asyncio.AbstractEventLoop, swap, opened: int | OSError) -> None:
    """From the writer thread: the opened file to the loop, or closed when the loop is
    gone (the daemon stopped meanwhile)."""
    try:
        loop.call_soon_threadsafe(swap, opened)
    except RuntimeError:
        if isinstance(opened, int):
            os.close(opened)


def _close_quietly(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass
    os.close(fd)


class LogWriter:
    def __init__(self, directory: str, name: str = "mta", flush_interval: float = 0.2, *,
                 max_buffer: int = 64 << 20, mode: int = 0o640, retry_interval: float = 1.0,
                 host: str = "", privacy: Privacy | None = None):
        os.makedirs(directory, exist_ok=True)
        self.host = host             # every record's "host": which daemon wrote it
        self.privacy = privacy       # address fields hashed or cut to the domain; None: clear
        self._ts_second = -1
        self._ts_prefix = ""
        self.path = os.path.join(directory, f"{name}.jsonl")
        self.mode = mode
        self._fd = _open_log(self.path, mode)
        self._reopening = False      # an open of the path is on its way in the writer thread
        self.reopened = 0            # reopens done (tests, stats)
        self._buf = bytearray()
        self._interval = flush_interval
        self._retry = retry_interval
        self._max = max(max_buffer, _FLUSH_AT)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._writing: concurrent.futures.Future | None = None   # the write in flight
        self._failing_since: float | None = None   # time.time() of the first failed write
        self._reported = 0.0         # time.monotonic() of the last report on stderr
        self._head_partial = False   # the buffer starts inside a half-written record
        self._torn = False           # the file ends inside a record whose rest was dropped
        self._lost = 0               # records dropped and not yet told in a LogLoss record
        self._in_flight = b""        # the bytes of the write in flight
        # counters for metrics
        self.written_bytes = 0
        self.write_errors = 0
        self.dropped_records = 0
        self.last_error = ""

    def log(self, rtype: RecordType, **fields: object) -> None:
        fields["type"] = rtype.value
        t = fields.setdefault("time", time.time())
        fields["ts"] = self._iso(t)   # type: ignore[arg-type]
        if self.host:
            fields["host"] = self.host
        if self.privacy is not None:
            self.privacy.apply(fields)
        self._buf += orjson.dumps(fields)
        self._buf += b"\n"
        if len(self._buf) >= _FLUSH_AT:
            if len(self._buf) > self._max:
                self._drop_oldest()
            if self._failing_since is None:
                self.flush()   # while failing, only the retry timer writes
        elif self._timer is None and self._writing is None:
            if self._running_loop() is None:
                self.flush()
            else:
                self._arm(self._interval)

    def _iso(self, t: float) -> str:
        """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
        second = int(t)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((t - second) * 1000):03d}Z"

    def flush(self) -> None:
        """Start writing the buffer (in the writer thread when a loop runs)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        owed = self._lost and self._failing_since is None   # a LogLoss record to write
        if not (self._buf or owed) or self._writing is not None or self._fd < 0:
            return
        data = self._take()
        if self._running_loop() is None:   # no loop (tools, tests): write here
            self._account(data, *_write_all(self._fd, data))
            return
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mta-log")
        fut = self._thread.submit(_write_all, self._fd, data)
        self._writing = fut
        loop = self._loop
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._written, f, data))

    def reopen(self, *, mode: int | None = None, max_buffer: int | None = None) -> None:
        """Open the path again (logrotate moved the file away), with `mode` and `max_buffer`
        when given (a reload). Records logged meanwhile go to the old file or the new one,
        whole; a failed open is logged and the old file kept."""
        if mode is not None:
            self.mode = mode
        if max_buffer is not None:
            self._max = max(max_buffer, _FLUSH_AT)
        if self._fd < 0 or self._reopening:
            return
        if self._running_loop() is None:   # no loop (tools, tests): here and now
            self._swap(_try_open(self.path, self.mode))
            return
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mta-log")
        self._reopening = True
        # the one writer thread runs jobs in order: the open comes after the write in flight
        fut = self._thread.submit(_try_open, self.path, self.mode)
        loop = self._loop
        fut.add_done_callback(lambda f: _hand_back(loop, self._swap, f.result()))

    def stats(self) -> dict[str, object]:
        """Counters for metrics and health checks."""
        return {"buffered_bytes": len(self._buf), "written_bytes": self.written_bytes,
                "write_errors": self.write_errors, "dropped_records": self.dropped_records,
                "failing": self._failing_since is not None, "last_error": self.last_error}

    def close(self) -> None:
        """Write what is buffered (waiting for a write in flight), fsync, close."""
        if self._fd < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            done, exc = self._writing.result()
            self._writing = None
            self._account(self._in_flight, done, exc)
        if self._buf or self._lost:
            data = self._take()
            self._account(data, *_write_all(self._fd, data))
        if self._buf:
            log.error("closing %s with %d bytes of log records unwritten (%s)",
                      self.path, len(self._buf), self.last_error)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            log.error("cannot fsync %s: %s", self.path, exc.strerror)
        os.close(self._fd)
        self._fd = -1
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    # -- internals ---------------------------------------------------------------------

    def _swap(self, opened: int | OSError) -> None:
        """The new file is open (or could not be): writes go to it from now on; the old
        one is closed after the write in flight, in the writer thread."""
        self._reopening = False
        if isinstance(opened, OSError):
            log.error("cannot reopen %s, still writing to the file open before: %s",
                      self.path, opened.strerror)
            return
        if self._fd < 0:                  # closed meanwhile
            os.close(opened)
            return
        old, self._fd = self._fd, opened
        self.reopened += 1
        if self._writing is not None and self._thread is not None:
            self._thread.submit(_close_quietly, old)   # runs after the write in flight
        else:
            _close_quietly(old)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        # get_running_loop() checks getpid() on every call: look it up once
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
        return self._loop

    def _arm(self, delay: float) -> None:
        if self._timer is None and self._fd >= 0 and self._running_loop() is not None:
            self._timer = self._loop.call_later(delay, self.flush)

    def _take(self) -> bytes:
        """The buffer's bytes to write next (emptying it), after a LogLoss record
        when records were dropped and writing works again."""
        data = bytes(self._buf)   # a copy, so the bytearray stays resizable
        self._buf.clear()
        if self._lost and self._failing_since is None:
            notice = orjson.dumps({"type": RecordType.LOG_LOSS.value, "lost": self._lost,
                                   "time": time.time()}) + b"\n"
            data = (b"\n" if self._torn else b"") + notice + data
            self._lost = 0
            self._torn = False
        self._in_flight = data
        return data

    def _written(self, fut: concurrent.futures.Future, data: bytes) -> None:
        if fut is not self._writing:   # close() has accounted for it already
            return
        self._writing = None
        self._account(data, *fut.result())
        if (self._buf or self._lost) and self._failing_since is None:
            if len(self._buf) >= _FLUSH_AT or self._lost:
                self.flush()
            else:
                self._arm(self._interval)

    def _account(self, data: bytes, done: int, exc: OSError | None) -> None:
        self.written_bytes += done
        if done:
            self._head_partial = False
        if exc is None:
            if self._failing_since is not None:
                log.warning("log writes to %s work again after %.0f s; %d records were dropped "
                            "meanwhile", self.path, time.time() - self._failing_since, self._lost)
                self._failing_since = None
            return
        self._buf[0:0] = data[done:]   # oldest first; only on the error path
        if done and data[done - 1] != 0x0A:
            self._head_partial = True
        self.write_errors += 1
        self.last_error = f"{exc.strerror} (errno {exc.errno})"
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = time.time()
            self._reported = now
            log.warning("cannot write log records to %s: %s; keeping up to %d bytes of them "
                        "in memory and retrying every %g s", self.path, self.last_error,
                        self._max, self._retry)
        elif now - self._reported >= _REPORT_EVERY:
            self._reported = now
            log.warning("log writes to %s still failing: %s; %d bytes buffered, %d records "
                        "dropped so far", self.path, self.last_error, len(self._buf),
                        self.dropped_records)
        if len(self._buf) > self._max:
            self._drop_oldest()
        self._arm(self._retry)

    def _drop_oldest(self) -> None:
        """Cut the buffer to 3/4 of its bound at a record boundary (rarely: trims are O(n))."""
        excess = len(self._buf) - (self._max * 3) // 4
        cut = self._buf.find(b"\n", excess - 1) + 1 or len(self._buf)
        lost = self._buf.count(b"\n", 0, cut)
        del self._buf[:cut]
        if self._head_partial:   # the file ends inside the record just dropped
            self._head_partial = False
            self._torn = True
        self._lost += lost
        self.dropped_records += lost
