"""The suppression store's writer thread: SQLite commits off the event loop (issue 15).

Where it sits: the daemon's `Feedback` (mta/feedback/state.py) hands every entry that
hard bounces, complaints and bounce reports add to `submit()` (on the loop thread,
returns at once); one thread per store takes what has queued, writes it in ONE
transaction (one fsync: `SuppressionList.add_many`, synchronous=FULL) and reports the
commit back to the loop (`on_commit`, via call_soon_threadsafe), which makes the
entries visible to the loop's own read connection (`SuppressionList.learn`) and wakes
whoever waits for them (`Feedback.committed`). The loop never waits on SQLite: not on
an fsync, and not on another process's write lock (`mta suppress import` holding it for
seconds: busy_timeout is spent in this thread).

Bounded: at most `max_pending` entries wait. `submit` refuses more (returns None): the
caller logs and counts the loss. The bounce intake never gets there: it counts the
messages whose entries are not yet committed in its backlog, so returned mail gets
451 at RCPT long before (mta/feedback/intake.py). A batch is at most `batch` entries;
commits start at least `interval` apart (a burst: few large batches; a lone entry: at once).

Failures: a batch that cannot be written (sqlite3.Error: locked past busy_timeout,
disk full) is logged and tried again `retry` seconds later, with what queued meanwhile;
nothing is dropped while the queue has room (its waiters keep waiting, so a returned
message stays in the spool until its entries are committed). `close()` writes what is
queued and stops the thread; entries it could not write are logged by count.

Other work on the store that must stay off the loop (sharing entries with other nodes,
mta/feedback/suppression/shared.py) is handed over with `call(fn)`: `fn(store)` runs in
the thread between batches, its result or exception comes back as a future.

Reads/writes: the store file (its own connection, opened in the thread).
"""
from __future__ import annotations

import array
import concurrent.futures
import logging
import sqlite3
import time
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .store import SuppressionList

log = logging.getLogger("mta.feedback.suppression")

SNAPSHOT_AT = 4096     # others' new entries from which the loop gets a whole filter

Item = tuple[str, str, str, "int | None", str]    # (address, scope, reason, expires, note)


class SuppressionWriter:
    def __init__(self, path: str | Path, key: bytes, *,
                 on_commit: Callable[[int, int, list[bytes]], None],
                 on_filter: Callable[[array.array, int, bool], None] | None = None,
                 max_pending: int = 100_000, batch: int = 5000, retry: float = 1.0,
                 refresh_interval: float = 1.0, interval: float = 0.05):
        """`on_commit(ticket, seq, hashes)` is called from the writer thread after each
        commit: every entry submitted with a ticket <= `ticket` is written (or was
        invalid and skipped). `on_filter(prefixes, seq, whole)`, when other processes
        added entries (looked for every `refresh_interval`): the new prefixes when they
        are few, else (whole=True) the whole prefix filter, built here, for the loop's
        read connection to adopt. Both must only hand over to the
        loop (call_soon_threadsafe)."""
        self.path, self._key = Path(path), key
        self.on_commit = on_commit
        self.on_filter = on_filter
        self.refresh_interval = refresh_interval
        # least time between two commits' starts: a burst goes in few large batches (few
        # fsyncs, few wake-ups of the loop) while a lone entry is written at once
        self.interval = interval
        self.max_pending = max_pending
        self.batch = batch
        self.retry = retry
        self._cv = threading.Condition()
        self._queue: deque[Item] = deque()
        self._jobs: deque[tuple[Callable[[SuppressionList], Any], concurrent.futures.Future]] = deque()
        self._submitted = 0      # tickets handed out (entries submitted)
        self._closing = False
        self.written = 0
        self.failures = 0
        self._foreign = 0              # store.foreign when the loop last got a filter
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="suppression-writer", daemon=True)

    def start(self) -> None:
        """Start the thread and open its connection (raises what opening raised)."""
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, item: Item) -> int | None:
        """Queue one entry; its ticket (see on_commit), or None when the queue is full."""
        with self._cv:
            if len(self._queue) >= self.max_pending or self._closing:
                return None
            self._queue.append(item)
            self._submitted += 1
            if len(self._queue) == 1:
                self._cv.notify()      # (it waits only on an empty queue, or for `interval`)
            return self._submitted

    def call(self, fn: Callable[[SuppressionList], Any]) -> concurrent.futures.Future:
        """Run `fn(store)` in the thread with its connection (callers keep one or two in
        flight: this queue has no bound of its own)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closing:
                fut.set_exception(RuntimeError("the suppression writer is closed"))
                return fut
            self._jobs.append((fn, fut))
            self._cv.notify()
        return fut

    def _run_jobs(self, store: SuppressionList) -> None:
        while True:
            with self._cv:
                if not self._jobs:
                    return
                fn, fut = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(store))
            except BaseException as exc:     # noqa: BLE001 - the caller's to handle
                fut.set_exception(exc)

    def close(self, timeout: float = 30.0) -> int:
        """Write what is queued, stop the thread; returns how many entries were left unwritten."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        for _, fut in self._jobs:
            fut.cancel()
        left = len(self._queue)
        if left:
            log.error("suppression writer stopped with %d entries unwritten (returned mail "
                      "they came from stays in the spool and is processed again)", left)
        return left

    # -- the thread

    def _run(self) -> None:
        try:
            # the daemon's read connection is open (and made the file private): opening
            # and closing a descriptor of the file here would drop its POSIX locks
            store = SuppressionList(self.path, self._key, private=False)
        except BaseException as exc:     # noqa: BLE001 - handed to start()
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            self._loop(store)
        finally:
            store.close()

    def _refresh(self, store: SuppressionList, force: bool) -> None:
        """Other processes' entries (`mta suppress import`, another worker): read and
        merged here (also by add_many when it sees another writer's generation), handed
        to the loop as a whole filter."""
        try:
            if force:
                store.refresh()
            if store.foreign != self._foreign and self.on_filter is not None:
                self._foreign = store.foreign
                new, store.last_foreign = store.last_foreign, set()
                if len(new) < SNAPSHOT_AT:     # a few (another worker's bounces): just those
                    self.on_filter(array.array("Q", new), store._seq, False)
                else:                          # an import: the whole filter, merged here
                    self.on_filter(store.snapshot(), store._seq, True)
        except sqlite3.Error as exc:
            log.warning("cannot read the suppression store for others' entries: %s", exc)
        except RuntimeError:           # the loop is closed (shutdown)
            pass

    def _loop(self, store: SuppressionList) -> None:
        done = 0                       # tickets written so far
        next_refresh = time.monotonic() + self.refresh_interval
        last_commit = float("-inf")
        while True:
            with self._cv:
                while not self._queue and not self._jobs and not self._closing:
                    wait = next_refresh - time.monotonic()
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                if not self._queue and self._closing:
                    return             # closing and nothing left
            due = time.monotonic() >= next_refresh
            if due:
                next_refresh = time.monotonic() + self.refresh_interval
            self._refresh(store, due)
            self._run_jobs(store)
            with self._cv:
                if not self._queue:
                    continue
                linger = last_commit + self.interval - time.monotonic()
                if linger > 0 and len(self._queue) < self.batch and not self._closing:
                    self._cv.wait(linger)
                items = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
            last_commit = time.monotonic()
            try:
                store.add_many(items)
            except sqlite3.Error as exc:
                self.failures += 1
                log.error("cannot write %d suppression entries (trying again in %gs): %s",
                          len(items), self.retry, exc)
                with self._cv:
                    if self._closing:
                        return         # close() reports what is left
                    self._cv.wait(self.retry)
                continue
            except Exception:          # a bug: these entries are lost, the thread goes on
                log.exception("suppression batch of %d entries dropped", len(items))
                store.last_batch = (0, [])
            with self._cv:
                for _ in items:
                    self._queue.popleft()
            done += len(items)
            self.written += len(items)
            seq, hashes = store.last_batch
            store.last_batch = (0, [])
            try:
                self.on_commit(done, seq, hashes)
            except RuntimeError:       # the loop is closed (shutdown): nobody waits any more
                pass
