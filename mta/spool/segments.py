"""The spool: append-only segment files, an in-RAM index, tombstones.

Where it sits: the SMTP session calls `store()` at end of data and answers
250 only when the returned future resolves, i.e. when the native writer's
batch holding the record is durable (data fdatasync'd, and the directory
fsync'd when the batch created a segment). Delivery (later) calls
`remove()` for finished messages, which appends a TOMBSTONE record.

Reads and writes: NNNNNNNN.seg under the spool directory (format in
mta/spool/records.py), corrupt/ for quarantined records.
Reclamation: a segment is unlinked when none of its messages is live and
none of its tombstones still names a message in a segment that exists (else
deleting it would resurrect that message at the next start).
Schedules (issue 13): `note_schedule()` appends a SCHEDULE record (a deferred
entry's attempts, due time, last reply) in the next batch, no fsync of its own.
The spool remembers where the newest record of each live (id, domain) is; a
segment that is otherwise reclaimable but still holds such newest records has
them rewritten forward first (read back, appended to the current segment with
the same `written` time) and is unlinked once that batch is durable. So a
restart always finds the newest durable state, never an older one (falling
back would mean early retries and attempt counters going backwards for every
deferred message whose state happened to sit in a busy segment). A segment whose
last newest state is superseded (or whose message finished) is tried for reclamation
once the batch that superseded it is durable, so segments holding nothing but old
schedules (a quiet spool retrying greylisted mail) do not pile up until a restart.
Faults: a failed batch (ENOSPC, EIO, a failed fdatasync) resolves its
futures with SpoolError (the session answers 451 4.3.0, never 250), and the
spool stops being `writable`: admission() refuses new mail and delivery takes
no new message, since its tombstone could not be written. Tombstones and
RCPTS_DONE records that could not be written are owed, not dropped. Every
PROBE_INTERVAL the writer is resumed on a fresh segment (the failed one is
never trusted again) and the owed records (or an empty TOMBSTONE) are written;
the first such batch that succeeds makes the spool writable again. A MESSAGE
whose batch failed may still have reached the disk whole, so it is owed a
tombstone too. Before the disk is full, admission() answers 452/451 by the
free space and queue size limits.
A disk filled by the queue itself would deadlock (no tombstone, so no
delivery can finish, so nothing is freed): a reserve file (reserve_space
bytes, fallocate'd at open) is released at ENOSPC, so tombstones fit and
deliveries go on freeing segments; new mail is refused until it is back.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mta._native.spool import SegmentWriter
from mta.model.envelope import Envelope
from mta.spool import records as rec
from mta.spool.recovery import Location, Recovered, scan, segment_path

log = logging.getLogger("mta.spool")

# histogram bucket upper bounds (/metrics): records per completed batch, seconds
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROBE_INTERVAL = 0.5      # seconds between attempts to write again after a failed batch
RESERVE_NAME = "reserve"  # the reserve file in the spool directory (see _make_reserve)
FREE_SPACE_SAMPLE = 1.0   # admission() reads statvfs at most this often
_ENVELOPE_PEEK = 4096     # envelope(): bytes read first from a message record's head


def _pack(segment: int, offset: int, length: int) -> int:
    return (segment << 64) | (offset << 32) | length


def _unpack(packed: int) -> Location:
    return Location(packed >> 64, (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF)


def _hot_size(env: bytes, trace: bytes, content: Any) -> int:
    # the envelope's JSON length stands for the object's size; + the tuple, dict slot, objects
    return len(env) + len(trace) + len(content) + 400


class SpoolError(OSError):
    """The write path failed; the message was not accepted."""


class Spool:
    """Store, load, remove and enumerate messages; see the module docstring."""

    def __init__(self, directory: str, *, segment_size: int = 64 << 20, max_batch: int = 1024,
                 hot_cache: int = 256 << 20, min_free_space: int = 0, min_free_percent: int = 0,
                 max_queued_messages: int = 0, reserve_space: int = 0,
                 bookkeeping_delay: float = 0.0):
        self.directory = directory
        # how long tombstones, RCPTS_DONE and SCHEDULE records (nobody waits on them) may
        # wait to share the fdatasync of the next accepted message (0: synced at once)
        self.bookkeeping_delay = bookkeeping_delay
        self.segment_size = segment_size
        self.max_batch = max_batch
        self.min_free_space = min_free_space
        self.min_free_percent = min_free_percent
        self.max_queued_messages = max_queued_messages
        self.reserve_space = reserve_space
        self._reserve_path = os.path.join(directory, RESERVE_NAME)
        self._reserve_held = False                    # the reserve file is in place
        self._writer: SegmentWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nonce = b""                             # this run's record nonce (records.py)
        # ticket -> (future or None, message id | _Meta); buffers stay alive in the writer
        self._waiting: dict[int, tuple[asyncio.Future | None, Any]] = {}
        # live message id -> where it is, packed in one int (_pack): a Location object
        # per message would cost ~110 bytes more at ten million queued
        self._index: dict[bytes, int] = {}
        self._live: dict[int, int] = {}               # segment -> live messages in it
        self._refs: dict[int, set[int]] = {}          # segment -> segments its tombstones name
        # live id -> (domain, packed location, domain, packed location, ...): where the
        # newest SCHEDULE record of each deferred entry is (a flat tuple: RAM per message)
        self._sched: dict[bytes, tuple] = {}
        self._sched_segs: dict[int, int] = {}         # segment -> newest SCHEDULE records in it
        self._rewriting: set[int] = set()             # segments whose schedules go forward now
        # live id -> {recipient index -> DELIVERED/BOUNCED} for messages finished in part and
        # deferred: carried into every later SCHEDULE record (only such messages cost RAM)
        self._finished: dict[bytes, dict[int, int]] = {}
        # (ticket, segment): the segment's last newest state was superseded (or its message
        # finished) by what was appended up to that ticket; once that is durable the segment
        # may go (a segment of nothing but schedules is never emptied by a tombstone)
        self._sched_emptied: list[tuple[int, int]] = []
        self._last_ticket = 0                         # the newest ticket handed out
        self._fds: dict[int, int] = {}                # read fds of segments
        self.recovered: Recovered | None = None
        # Records owed to the disk: written with the next batch, and kept (never
        # dropped) while the spool cannot write, so a restart does not deliver again.
        self._owed = _Meta([], [], set(), set(), [])
        self._owed_futures: list[asyncio.Future] = []  # remove() callers waiting for them
        self._flush_scheduled = False
        # Recently stored messages, kept so a fast delivery needs no read or checksum:
        # id -> (envelope, trace, content, bytes counted). FIFO-evicted past hot_cache
        # bytes. The Envelope object itself: a prompt attempt decodes nothing.
        # (OrderedDict: popping the oldest of a plain dict rescans its deleted slots,
        # which made every insert O(evictions so far) once the cache was full.)
        self._hot: OrderedDict[bytes, tuple[Envelope, bytes, Any, int]] = OrderedDict()
        self._hot_bytes = 0
        self._hot_limit = hot_cache
        self.write_error = 0                          # errno of the last failed batch, 0 when writing
        self._probe: asyncio.TimerHandle | None = None  # next attempt to write again
        self._probe_ticket = 0                        # the batch that tells whether it works again
        self._space_checked = -FREE_SPACE_SAMPLE      # monotonic time of the last statvfs
        # /metrics: per completion (one eventfd wake: a batch, or a few): records completed
        # and seconds since the oldest record still waiting was appended (commit latency)
        self._first_wait = 0.0                        # perf_counter of that append; 0: none
        self.batch_hist = [0] * (len(BATCH_BOUNDS) + 1)
        self.latency_hist = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
        self.batch_sum = 0
        self._space_low = False

    # -- life cycle ------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> Recovered:
        """Scan what is on disk, then start the writer on a fresh segment.

        Raises OSError naming the directory when it cannot be created, read or
        written (a read-only mount, missing permission): start-up stops there.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _check_writable(self.directory)
        found = scan(self.directory)
        for msg_id, loc in found.messages.items():
            self._index[msg_id] = _pack(loc.segment, loc.offset, loc.length)
            self._live[loc.segment] = self._live.get(loc.segment, 0) + 1
        for seg in found.segments:
            self._live.setdefault(seg, 0)
        self._refs = {s: set(r) for s, r in found.tombstone_refs.items()}
        for msg_id, entries in found.schedules.items():
            for domain, (state, loc) in entries.items():
                self._set_sched(msg_id, domain, _pack(loc.segment, loc.offset, loc.length))
                if state.finished:
                    self._finished.setdefault(msg_id, {}).update(state.finished)
        first = (found.segments[-1] + 1) if found.segments else 1
        self._nonce = os.urandom(rec.NONCE_SIZE)
        self._writer = SegmentWriter(self.directory, first, self.segment_size, self.max_batch,
                                     rec.segment_header(self._nonce),
                                     lazy_delay=self.bookkeeping_delay)
        self._loop = loop
        loop.add_reader(self._writer.eventfd, self._on_completed)
        self.recovered = found
        for seg in list(self._live):
            self._maybe_reclaim(seg)
        if self.reserve_space and not self._make_reserve():
            log.warning("spool %s: no room for the %d-byte reserve yet; new mail is refused "
                        "until there is", self.directory, self.reserve_space)
        return found

    async def close(self) -> None:
        if self._writer is None:
            return
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self.write_error:              # one last try for what a restart must not miss
            self._writer.resume()
            self.write_error = 0
        self._flush_finished()           # pending tombstones go into the last batch
        writer, self._writer = self._writer, None
        assert self._loop is not None
        self._loop.remove_reader(writer.eventfd)
        await self._loop.run_in_executor(None, writer.flush)
        self._complete(writer.completed())
        writer.close()
        if self._owed.ids or self._owed.pairs:
            log.error("spool %s: %d finished messages and %d recipients could not be marked "
                      "done; they will be delivered again after the restart", self.directory,
                      len(self._owed.ids), len(self._owed.pairs))
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the write path -------------------------------------------------------

    def store(self, msg_id: bytes, envelope: Envelope, trace: bytes, content) -> asyncio.Future:
        """Append a MESSAGE record; the future resolves when it is durable."""
        assert self._loop is not None
        fut = self._loop.create_future()
        if self._writer is None:
            fut.set_exception(SpoolError("spool is closed"))
            return fut
        env = envelope.to_json()
        head = rec.message_head(msg_id, env, trace, len(content), self._nonce)
        try:
            ticket, segment, offset = self._writer.append(head, content, rec.CRC_OFFSET)
            self._last_ticket = ticket
        except OSError as exc:
            self._failed(exc.errno)
            fut.set_exception(SpoolError(exc.errno, f"spool write failed: {exc.strerror}"))
            return fut
        self._waiting[ticket] = (fut, msg_id)
        if not self._first_wait:
            self._first_wait = time.perf_counter()
        if self._hot_limit:
            cost = _hot_size(env, trace, content)
            self._hot[msg_id] = (envelope, trace, content, cost)
            self._hot_bytes += cost
        while self._hot_bytes > self._hot_limit:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= old[3]
        self._index[msg_id] = _pack(segment, offset, len(head) + len(content))
        self._live[segment] = self._live.get(segment, 0) + 1
        return fut

    def remove(self, ids: list[bytes]) -> asyncio.Future:
        """Tombstone finished messages now; the future resolves when that is durable
        (it fails if the write does, and the tombstone is then kept and written
        again once the spool can write)."""
        assert self._loop is not None
        for msg_id in ids:
            self._unindex(msg_id)
        self._owed.ids.extend(ids)
        fut = self._loop.create_future()
        self._owed_futures.append(fut)
        self._flush_finished()
        return fut

    def finish(self, msg_id: bytes) -> None:
        """Tombstone `msg_id` in the next batch (one record per loop iteration)."""
        self._unindex(msg_id)
        self._owed.ids.append(msg_id)
        self._schedule_flush()

    def finish_recipients(self, msg_id: bytes, indexes: list[int]) -> None:
        packed = self._index.get(msg_id)
        if packed is not None:
            self._owed.named.add(packed >> 64)
        self._owed.pairs.extend((msg_id, i) for i in indexes)
        self._schedule_flush()

    def note_schedule(self, msg_id: bytes, domain: str, attempts: int, due: float, *,
                      flags: int = 0, pending: tuple[int, ...] | list[int] = (),
                      reply: str = "", finished: dict[int, int] | None = None) -> None:
        """A deferred entry (`msg_id`'s recipients at `domain`): its attempt count, next
        due time (Unix seconds), flags, the recipients still pending, those finished in
        this attempt (index -> records.DELIVERED or BOUNCED; merged with those noted before
        for the message, so each record holds them all) and the last reply, as a
        SCHEDULE record in the next batch. No fsync of its own: a crash before that
        batch costs an early retry. Ignored for a message that is not live."""
        if msg_id not in self._index:
            return
        known = self._finished.get(msg_id)
        if finished:
            if known is None:
                known = self._finished[msg_id] = {}
            known.update(finished)
        state = rec.Schedule(msg_id, domain, attempts, due, flags, time.time(), tuple(pending),
                             dict(known) if known else {}, reply)
        self._owed.scheds.append((msg_id, domain, rec.schedule_payload(state), None, -1))
        self._schedule_flush()

    def schedules(self, msg_id: bytes) -> list[rec.Schedule]:
        """The newest durable SCHEDULE state of each deferred entry of `msg_id` (read back
        from the segments; [] when never deferred, or not written yet)."""
        out = []
        found = self._sched.get(msg_id, ())
        for k in range(0, len(found), 2):
            payload = self._read_sched(found[k + 1])
            if payload is not None:
                out.append(rec.parse_schedule_payload(payload))
        return out

    def _read_sched(self, packed: int) -> bytes | None:
        loc = _unpack(packed)
        try:
            buf = os.pread(self._fd_of(loc.segment), loc.length, loc.offset)
            rec.parse_header(buf, 0, len(buf))
            rec.check_crc(buf, 0, loc.length)
            return rec.schedule_body(buf, 0, loc.length)
        except (OSError, rec.RecordError) as exc:
            log.warning("spool %s: cannot read a schedule record at %s: %s", self.directory,
                        loc, exc)
            return None

    def _set_sched(self, msg_id: bytes, domain: str, packed: int) -> None:
        """The newest SCHEDULE record of (msg_id, domain) is at `packed` now."""
        old = self._sched.get(msg_id, ())
        new = []
        for k in range(0, len(old), 2):
            if old[k] == domain:
                self._sched_dec(old[k + 1] >> 64)
            else:
                new += old[k:k + 2]
        new += (domain, packed)
        self._sched[msg_id] = tuple(new)
        seg = packed >> 64
        self._sched_segs[seg] = self._sched_segs.get(seg, 0) + 1

    def _sched_dec(self, seg: int) -> None:
        n = self._sched_segs.get(seg, 0) - 1
        if n > 0:
            self._sched_segs[seg] = n
        else:
            self._sched_segs.pop(seg, None)
            if self._live.get(seg) == 0:   # maybe nothing else keeps it: see _complete
                self._sched_emptied.append((self._last_ticket, seg))

    def _sched_at(self, msg_id: bytes, domain: str) -> int | None:
        found = self._sched.get(msg_id, ())
        for k in range(0, len(found), 2):
            if found[k] == domain:
                return found[k + 1]
        return None

    def _unindex(self, msg_id: bytes) -> None:
        """`msg_id` is finished: no longer live; its tombstone will name its segment."""
        self._forget_hot(msg_id)
        self._finished.pop(msg_id, None)
        found = self._sched.pop(msg_id, ())
        for k in range(1, len(found), 2):
            self._sched_dec(found[k] >> 64)
        packed = self._index.pop(msg_id, None)
        if packed is not None:
            seg = packed >> 64
            self._live[seg] -= 1
            self._owed.named.add(seg)
            self._owed.emptied.add(seg)

    def _forget_hot(self, msg_id: bytes) -> None:
        hot = self._hot.pop(msg_id, None)
        if hot is not None:
            self._hot_bytes -= hot[3]

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_finished)

    def _flush_finished(self) -> int:
        """Append the owed RCPTS_DONE and TOMBSTONE records -> ticket of the last (0: none).

        While the spool cannot write they stay owed; the probe writes them.
        """
        self._flush_scheduled = False
        owed = self._owed
        if self._writer is None or self.write_error or not (owed.ids or owed.pairs or owed.scheds):
            return 0
        self._owed = _Meta([], [], set(), set(), [])
        futures, self._owed_futures = self._owed_futures, []
        return self._append_meta(owed, futures, lazy=not futures)

    def _append_meta(self, meta: _Meta, futures: list[asyncio.Future], *,
                     lazy: bool = False) -> int:
        """Append `meta`'s records -> the last ticket. lazy: nobody awaits them, so they
        may wait (up to bookkeeping_delay) to share the next message's batch."""
        assert self._writer is not None
        ticket = 0
        try:
            # SCHEDULE records first: a tombstone in the same batch comes after them
            scheds, meta.scheds = meta.scheds, []
            for k, (msg_id, domain, payload, expect, origin) in enumerate(scheds):
                if msg_id not in self._index or (expect is not None
                                                  and self._sched_at(msg_id, domain) != expect):
                    meta.scheds.append((msg_id, domain, payload, expect, origin))
                    continue   # finished meanwhile, or a rewrite overtaken by a newer state
                head = rec.schedule(payload, self._nonce)
                try:
                    ticket, segment, offset = self._writer.append(head, None, rec.CRC_OFFSET,
                                                                  lazy)
                    self._last_ticket = ticket
                except OSError:
                    meta.scheds.extend(scheds[k:])
                    raise
                self._live.setdefault(segment, 0)
                packed = _pack(segment, offset, len(head))
                self._set_sched(msg_id, domain, packed)
                self._waiting[ticket] = (None, None)
                # written again after a failure only while it is still the newest state
                meta.scheds.append((msg_id, domain, payload, packed, origin))
            heads = []
            if meta.pairs:
                heads.append(rec.rcpts_done(meta.pairs, self._nonce))
            if meta.ids or not (meta.pairs or ticket):   # an empty TOMBSTONE: the probe's record
                heads.append(rec.tombstone(meta.ids, self._nonce))
            for head in heads:
                ticket, segment, _ = self._writer.append(head, None, rec.CRC_OFFSET, lazy)
                self._last_ticket = ticket
                self._live.setdefault(segment, 0)
                self._refs.setdefault(segment, set()).update(meta.named)
                self._waiting[ticket] = (None, None)
        except OSError as exc:
            # A record appended before the error belongs to a batch that will fail
            # too (the writer fails everything behind a failed batch) or succeed:
            # either way writing all of it again is harmless (records are idempotent).
            self._owe(meta, [])
            self._failed(exc.errno)
            for f in futures:   # kept and written later; this attempt failed
                f.set_exception(SpoolError(exc.errno, f"spool write failed: {exc.strerror}"))
            return 0
        self._waiting[ticket] = (None, (meta, futures))
        return ticket

    def _owe(self, meta: _Meta, futures: list[asyncio.Future]) -> None:
        self._owed.ids.extend(meta.ids)
        self._owed.pairs.extend(meta.pairs)
        self._owed.named |= meta.named
        self._owed.emptied |= meta.emptied
        self._owed.scheds.extend(meta.scheds)
        self._owed_futures.extend(futures)

    def _on_completed(self) -> None:
        assert self._writer is not None
        self._complete(self._writer.completed())

    def _complete(self, done: list[tuple[int, int]]) -> None:
        if done:
            self._timed(len(done))
        if self._sched_emptied and done:
            durable = max((t for t, err in done if not err), default=0)
            ready = [seg for t, seg in self._sched_emptied if t <= durable]
            if ready:
                self._sched_emptied = [(t, seg) for t, seg in self._sched_emptied if t > durable]
                for seg in ready:
                    self._maybe_reclaim(seg)
        for ticket, err in done:
            fut, extra = self._waiting.pop(ticket)
            if err:
                self._failed(err)
                exc = SpoolError(err, f"spool write failed: {os.strerror(err)}")
                if isinstance(extra, bytes):
                    self._void(extra)
                elif extra is not None:
                    meta, futures = extra
                    self._owe(meta, [])
                    for f in futures:   # kept and written later; this attempt failed
                        if not f.done():
                            f.set_exception(exc)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                continue
            if ticket == self._probe_ticket:
                self._recovered_writing()
            if extra is not None and not isinstance(extra, bytes):
                meta, futures = extra
                for *_, origin in meta.scheds:   # schedules rewritten forward are durable
                    self._rewriting.discard(origin)
                for seg in meta.emptied:   # a durable tombstone may free segments
                    self._maybe_reclaim(seg)
                for f in futures:
                    if not f.done():
                        f.set_result(None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _timed(self, n: int) -> None:
        """Histograms for /metrics: `n` records completed now."""
        self.batch_hist[bisect.bisect_left(BATCH_BOUNDS, n)] += 1
        self.batch_sum += n
        if self._first_wait:
            now = time.perf_counter()
            took = now - self._first_wait
            self.latency_hist[bisect.bisect_left(LATENCY_BOUNDS, took)] += 1
            self.latency_sum += took
            # records appended while this batch was on its way wait from now on (about)
            self._first_wait = now if len(self._waiting) > n else 0.0

    def _void(self, msg_id: bytes) -> None:
        """A MESSAGE whose batch failed: never acknowledged, so not live; but part of
        it may be on disk in one piece, so it gets a tombstone too (written once the
        spool can write), or a restart would find it and deliver mail answered 451."""
        self._forget_hot(msg_id)
        packed = self._index.pop(msg_id, None)
        if packed is not None:
            seg = packed >> 64
            self._live[seg] -= 1
            self._owe(_Meta([msg_id], [], {seg}, {seg}, []), [])

    # -- write errors -----------------------------------------------------------

    def _failed(self, err: int) -> None:
        """A write failed: not writable until a probe batch succeeds (every PROBE_INTERVAL)."""
        if not self.write_error:
            log.warning("spool %s: write failed (%s); refusing new mail and holding "
                        "deliveries until a write succeeds", self.directory, os.strerror(err))
        if err in (errno.ENOSPC, errno.EDQUOT) and self._reserve_held:
            # The disk may be full of our own queue: without room for tombstones no
            # delivery could finish and nothing would ever be freed.
            try:
                os.unlink(self._reserve_path)
            except FileNotFoundError:
                pass    # an operator removed it first: the space is free all the same
            except OSError as exc:
                log.error("spool %s: cannot release the reserve: %s", self.directory, exc.strerror)
            self._reserve_held = False
            log.warning("spool %s: released the %d-byte reserve so deliveries can be "
                        "marked done; new mail is refused until it is back", self.directory,
                        self.reserve_space)
        self.write_error = err
        self._probe_ticket = 0
        if self._probe is None and self._loop is not None and self._writer is not None:
            self._probe = self._loop.call_later(PROBE_INTERVAL, self._try_writing)

    def _try_writing(self) -> None:
        """Resume the writer (a fresh segment) and write what is owed, or an empty
        TOMBSTONE: its completion says whether the fault has cleared."""
        self._probe = None
        if self._writer is None:
            return
        self._writer.resume()
        futures, self._owed_futures = self._owed_futures, []
        meta, self._owed = self._owed, _Meta([], [], set(), set(), [])
        self._probe_ticket = self._append_meta(meta, futures)

    def _recovered_writing(self) -> None:
        log.warning("spool %s: writing again after %s", self.directory,
                    os.strerror(self.write_error))
        self.write_error = 0
        self._probe_ticket = 0
        if self._writer is None:     # closing
            return
        current = self._writer.stats()["segment"]
        for seg in [s for s, n in self._live.items() if n == 0 and s < current]:
            if seg in self._live:   # a segment left empty by the failure
                self._maybe_reclaim(seg)
        self._schedule_flush()

    # -- backpressure -------------------------------------------------------------

    def admission(self) -> str | None:
        """Whether new mail may come: None, or the name of the reply (mta/model/replies.py)
        to refuse it with. Cheap enough for every MAIL FROM (statvfs at most once
        per FREE_SPACE_SAMPLE seconds); recovers by itself when the cause goes."""
        if not self.writable:
            return "SPOOL_ERROR"
        if self.max_queued_messages and len(self._index) >= self.max_queued_messages:
            return "QUEUE_FULL"
        if (self.min_free_space or self.min_free_percent or self.reserve_space) \
                and self._low_on_space():
            return "SPOOL_FULL"
        return None

    def _low_on_space(self) -> bool:
        """Free space below the limits, or the reserve not in place (sampled)."""
        now = time.monotonic()
        if now - self._space_checked >= FREE_SPACE_SAMPLE:
            self._space_checked = now
            try:
                st = os.statvfs(self.directory)
            except OSError as exc:
                log.warning("spool %s: statvfs failed: %s", self.directory, exc.strerror)
                self._space_low = True
                return True
            keep = max(self.min_free_space, st.f_blocks * st.f_frsize * self.min_free_percent // 100)
            free = st.f_bavail * st.f_frsize
            if self.reserve_space and not self._reserve_held and self.writable \
                    and free >= keep + 2 * self.reserve_space and self._make_reserve():
                free -= self.reserve_space
            low = free < keep or (self.reserve_space > 0 and not self._reserve_held)
            if low != self._space_low:
                log.warning("spool %s: %s: %d bytes free, %d kept free%s", self.directory,
                            "refusing new mail" if low else "accepting mail again", free, keep,
                            "" if self._reserve_held or not self.reserve_space
                            else ", reserve not in place")
            self._space_low = low
        return self._space_low

    def _make_reserve(self) -> bool:
        """(Re)create the reserve file: space held back so that when the disk fills,
        releasing it lets tombstones be written and deliveries free segments."""
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_space)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("spool %s: cannot make the reserve: %s", self.directory, exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(self._reserve_path)   # a partial reserve holds space for nothing
            return False
        self._reserve_held = True
        return True

    # -- reclamation ------------------------------------------------------------

    def _maybe_reclaim(self, seg: int) -> None:
        """Unlink `seg` if nothing in it is live or still needed; then its dependants."""
        if self._writer is None:    # closing: reclaim at the next start
            return
        if self._live.get(seg, 1) != 0 or seg >= self._writer.stats()["segment"]:
            return
        if any(ref != seg and ref in self._live for ref in self._refs.get(seg, ())):
            return
        if seg in self._rewriting:
            return      # its schedules are on their way forward: after that batch
        if self._sched_segs.get(seg):
            self._rewrite_schedules(seg)
            return
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(segment_path(self.directory, seg))
        except FileNotFoundError:
            pass    # a number a failed batch used: the writer unlinked it already
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        del self._live[seg]
        self._refs.pop(seg, None)
        for other, refs in list(self._refs.items()):
            if seg in refs:
                refs.discard(seg)
                self._maybe_reclaim(other)

    def _rewrite_schedules(self, seg: int) -> None:
        """`seg` could go but holds the newest SCHEDULE state of live entries: append
        those records again (same payload, same `written` time) and try again once
        that batch is durable."""
        self._rewriting.add(seg)
        moved = 0
        for msg_id, found in list(self._sched.items()):
            for k in range(0, len(found), 2):
                if found[k + 1] >> 64 != seg:
                    continue
                payload = self._read_sched(found[k + 1])
                if payload is None:   # unreadable: forget it (an earlier retry, no loss)
                    self._set_sched_gone(msg_id, found[k])
                    continue
                self._owed.scheds.append((msg_id, found[k], payload, found[k + 1], seg))
                moved += 1
        self._owed.emptied.add(seg)
        if moved:
            self._schedule_flush()
        elif self._loop is not None:
            self._rewriting.discard(seg)
            self._loop.call_soon(self._maybe_reclaim, seg)

    def _set_sched_gone(self, msg_id: bytes, domain: str) -> None:
        found = self._sched.get(msg_id, ())
        rest = []
        for k in range(0, len(found), 2):
            if found[k] == domain:
                self._sched_dec(found[k + 1] >> 64)
            else:
                rest += found[k:k + 2]
        if rest:
            self._sched[msg_id] = tuple(rest)
        else:
            self._sched.pop(msg_id, None)

    # -- reading ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self._index

    def ids(self) -> list[bytes]:
        return list(self._index)

    def location(self, msg_id: bytes) -> Location:
        """Where a live message's MESSAGE record is (KeyError when it is not live)."""
        return _unpack(self._index[msg_id])

    def read(self, msg_id: bytes) -> tuple[Envelope, bytes]:
        """Envelope and content (trace header + data) of a live message."""
        hot = self._hot.get(msg_id)
        if hot is not None:
            return hot[0], hot[1] + hot[2]
        loc = _unpack(self._index[msg_id])
        buf = os.pread(self._fd_of(loc.segment), loc.length, loc.offset)
        rec.parse_header(buf, 0, len(buf))   # either version: v1 segments from before an upgrade
        rec.check_crc(buf, 0, loc.length)
        _, env, content_at = rec.parse_message(buf, 0, loc.length)
        return Envelope.from_json(env), buf[content_at:]

    def _fd_of(self, segment: int) -> int:
        fd = self._fds.get(segment)
        if fd is None:
            fd = self._fds[segment] = os.open(segment_path(self.directory, segment), os.O_RDONLY)
        return fd

    def envelope(self, msg_id: bytes) -> Envelope:
        """The envelope of a live message without its content (for records about a
        message that is not being sent, e.g. when its site takes no connection): the
        record's head is read, not the message. KeyError when it is not live."""
        hot = self._hot.get(msg_id)
        if hot is not None:
            return hot[0]
        loc = _unpack(self._index[msg_id])
        head = min(loc.length, _ENVELOPE_PEEK)
        env, buf = None, b""
        for size in (head, loc.length):   # most envelopes fit the first read
            buf = os.pread(self._fd_of(loc.segment), size, loc.offset)
            rec.parse_header(buf, 0, loc.length)
            try:
                _, env, _ = rec.parse_message(buf, 0, len(buf))
                break
            except rec.RecordError:
                if size == loc.length:
                    raise
        return Envelope.from_json(env)

    @property
    def writable(self) -> bool:
        """False while the writer cannot write (closed, or after a write error):
        reception refuses new mail and delivery takes no new message, since
        neither its MESSAGE nor its TOMBSTONE record could be made durable."""
        return self._writer is not None and not self.write_error

    def health(self) -> dict:
        stats = self._writer.stats() if self._writer is not None else {}
        return {"messages": len(self._index), "segments": len(self._live),
                "waiting": len(self._waiting), "write_error": self.write_error,
                "owed_tombstones": len(self._owed.ids), "owed_recipients": len(self._owed.pairs),
                "scheduled_states": len(self._sched), "owed_schedules": len(self._owed.scheds),
                **stats}


@dataclass(slots=True)
class _Meta:
    """TOMBSTONE and RCPTS_DONE payloads on their way to the disk."""
    ids: list[bytes]                   # finished (or voided) messages
    pairs: list[tuple[bytes, int]]     # finished recipients
    named: set[int]                    # segments those records name (reclamation order)
    emptied: set[int]                  # segments to try to reclaim once they are durable
    # SCHEDULE payloads: (id, domain, payload, the location it must still replace to be
    # written (None: a new state), the segment it is rewritten from (-1: none))
    scheds: list[tuple[bytes, str, bytes, int | None, int]]


def _check_writable(directory: str) -> None:
    """Raise OSError(EROFS or EACCES, directory) unless we can create files there."""
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), directory)
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
