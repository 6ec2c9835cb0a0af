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
Diagnostics: store() failures resolve the future with SpoolError (the
session maps it to 451 4.3.0); after one failed sync every later store
fails too (the writer is broken: nothing after an fsync error is trusted).
"""
from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from typing import Any

import orjson

from mta._native.spool import SegmentWriter
from mta.spool import records as rec
from mta.spool.recovery import Location, Recovered, scan, segment_path


def _pack(segment: int, offset: int, length: int) -> int:
    return (segment << 64) | (offset << 32) | length


def _unpack(packed: int) -> Location:
    return Location(packed >> 64, (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF)


def _hot_size(env: bytes, trace: bytes, content: Any) -> int:
    return len(env) + len(trace) + len(content) + 200   # + the tuple, dict slot and objects


class SpoolError(OSError):
    """The write path failed; the message was not accepted."""


class Spool:
    """Store, load, remove and enumerate messages; see the module docstring."""

    def __init__(self, directory: str, *, segment_size: int = 64 << 20, max_batch: int = 1024,
                 hot_cache: int = 256 << 20):
        self.directory = directory
        self.segment_size = segment_size
        self.max_batch = max_batch
        self._writer: SegmentWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, tuple[asyncio.Future, Any]] = {}   # ticket -> (future, buffers kept alive)
        # live message id -> where it is, packed in one int (_pack): a Location object
        # per message would cost ~110 bytes more at ten million queued
        self._index: dict[bytes, int] = {}
        self._live: dict[int, int] = {}               # segment -> live messages in it
        self._refs: dict[int, set[int]] = {}          # segment -> segments its tombstones name
        self._fds: dict[int, int] = {}                # read fds of segments
        self.recovered: Recovered | None = None
        self._finished: list[bytes] = []              # ids to tombstone in the next batch
        self._finished_rcpts: list[tuple[bytes, int]] = []  # recipients done, same
        self._flush_scheduled = False
        # Recently stored messages, kept so a fast delivery needs no read or checksum:
        # id -> (envelope JSON, trace, content). FIFO-evicted past hot_cache bytes.
        # (OrderedDict: popping the oldest of a plain dict rescans its deleted slots,
        # which made every insert O(evictions so far) once the cache was full.)
        self._hot: OrderedDict[bytes, tuple[bytes, bytes, Any]] = OrderedDict()
        self._hot_bytes = 0
        self._hot_limit = hot_cache
        self.write_error = 0                          # errno of the last failed batch, 0 when writing

    # -- life cycle ------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> Recovered:
        """Scan what is on disk, then start the writer on a fresh segment."""
        os.makedirs(self.directory, exist_ok=True)
        found = scan(self.directory)
        for msg_id, loc in found.messages.items():
            self._index[msg_id] = _pack(loc.segment, loc.offset, loc.length)
            self._live[loc.segment] = self._live.get(loc.segment, 0) + 1
        for seg in found.segments:
            self._live.setdefault(seg, 0)
        self._refs = {s: set(r) for s, r in found.tombstone_refs.items()}
        first = (found.segments[-1] + 1) if found.segments else 1
        self._writer = SegmentWriter(self.directory, first, self.segment_size, self.max_batch)
        self._loop = loop
        loop.add_reader(self._writer.eventfd, self._on_completed)
        self.recovered = found
        for seg in list(self._live):
            self._maybe_reclaim(seg)
        return found

    async def close(self) -> None:
        if self._writer is None:
            return
        self._flush_finished()           # pending tombstones go into the last batch
        writer, self._writer = self._writer, None
        assert self._loop is not None
        self._loop.remove_reader(writer.eventfd)
        await self._loop.run_in_executor(None, writer.flush)
        self._complete(writer.completed())
        writer.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the write path -------------------------------------------------------

    def store(self, msg_id: bytes, envelope: dict, trace: bytes, content) -> asyncio.Future:
        """Append a MESSAGE record; the future resolves when it is durable."""
        assert self._loop is not None
        fut = self._loop.create_future()
        if self._writer is None:
            fut.set_exception(SpoolError("spool is closed"))
            return fut
        env = orjson.dumps(envelope)
        head = rec.message_head(msg_id, env, trace, len(content))
        try:
            ticket, segment, offset = self._writer.append(head, content, rec.CRC_OFFSET)
        except OSError as exc:
            fut.set_exception(SpoolError(exc.errno, f"spool write failed: {exc.strerror}"))
            return fut
        self._waiting[ticket] = (fut, msg_id)
        if self._hot_limit:
            # orjson's bytes keep their whole output buffer (4 KiB+ for a 200-byte
            # envelope): an exact-size copy is what the cache should hold.
            env = bytes(memoryview(env))
            self._hot[msg_id] = (env, trace, content)
            self._hot_bytes += _hot_size(env, trace, content)
        while self._hot_bytes > self._hot_limit:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= _hot_size(*old)
        self._index[msg_id] = _pack(segment, offset, len(head) + len(content))
        self._live[segment] = self._live.get(segment, 0) + 1
        return fut

    def remove(self, ids: list[bytes]) -> asyncio.Future:
        """Tombstone finished messages; the future resolves when that is durable."""
        emptied = set()
        named = set()
        for msg_id in ids:
            self._forget_hot(msg_id)
            packed = self._index.pop(msg_id, None)
            if packed is not None:
                seg = packed >> 64
                named.add(seg)
                self._live[seg] -= 1
                emptied.add(seg)
        return self._append_meta(rec.tombstone(ids), named, emptied)

    def remove_recipients(self, pairs: list[tuple[bytes, int]]) -> asyncio.Future:
        """Record finished recipients of messages that still wait for others."""
        named = {self._index[i] >> 64 for i, _ in pairs if i in self._index}
        return self._append_meta(rec.rcpts_done(pairs), named, set())

    def finish(self, msg_id: bytes) -> None:
        """Tombstone `msg_id` in the next batch (one record per loop iteration)."""
        self._forget_hot(msg_id)
        self._finished.append(msg_id)
        self._schedule_flush()

    def finish_recipients(self, msg_id: bytes, indexes: list[int]) -> None:
        self._finished_rcpts.extend((msg_id, i) for i in indexes)
        self._schedule_flush()

    def _forget_hot(self, msg_id: bytes) -> None:
        hot = self._hot.pop(msg_id, None)
        if hot is not None:
            self._hot_bytes -= _hot_size(*hot)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_finished)

    def _flush_finished(self) -> None:
        self._flush_scheduled = False
        if self._writer is None:
            return
        if self._finished_rcpts:
            pairs, self._finished_rcpts = self._finished_rcpts, []
            self.remove_recipients(pairs)
        if self._finished:
            ids, self._finished = self._finished, []
            self.remove(ids)

    def _append_meta(self, head: bytearray, named: set[int], emptied: set[int]) -> asyncio.Future:
        assert self._loop is not None and self._writer is not None
        fut = self._loop.create_future()
        ticket, segment, _ = self._writer.append(head, None, rec.CRC_OFFSET)
        self._live.setdefault(segment, 0)
        self._refs.setdefault(segment, set()).update(named)
        self._waiting[ticket] = (fut, emptied)
        return fut

    def _on_completed(self) -> None:
        assert self._writer is not None
        self._complete(self._writer.completed())

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for ticket, err in done:
            fut, extra = self._waiting.pop(ticket)
            if err:
                self.write_error = err
                if isinstance(extra, bytes):  # a message that never became durable
                    self._forget_hot(extra)
                    packed = self._index.pop(extra, None)
                    if packed is not None:
                        self._live[packed >> 64] -= 1
                if not fut.done():
                    fut.set_exception(SpoolError(err, f"spool write failed: {os.strerror(err)}"))
                continue
            if isinstance(extra, set):  # a durable tombstone may free segments
                for seg in extra:
                    self._maybe_reclaim(seg)
            if not fut.done():
                fut.set_result(None)

    # -- reclamation ------------------------------------------------------------

    def _maybe_reclaim(self, seg: int) -> None:
        """Unlink `seg` if nothing in it is live or still needed; then its dependants."""
        if self._writer is None:    # closing: reclaim at the next start
            return
        if self._live.get(seg, 1) != 0 or seg >= self._writer.stats()["segment"]:
            return
        if any(ref != seg and ref in self._live for ref in self._refs.get(seg, ())):
            return
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        os.unlink(segment_path(self.directory, seg))
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

    # -- reading ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self._index

    def ids(self) -> list[bytes]:
        return list(self._index)

    def read(self, msg_id: bytes) -> tuple[dict, bytes]:
        """Envelope and content (trace header + data) of a live message."""
        hot = self._hot.get(msg_id)
        if hot is not None:
            return orjson.loads(hot[0]), hot[1] + hot[2]
        loc = _unpack(self._index[msg_id])
        fd = self._fds.get(loc.segment)
        if fd is None:
            fd = self._fds[loc.segment] = os.open(segment_path(self.directory, loc.segment), os.O_RDONLY)
        buf = os.pread(fd, loc.length, loc.offset)
        rec.parse_header(buf, 0, len(buf))
        rec.check_crc(buf, 0, loc.length)
        _, env, content_at = rec.parse_message(buf, 0, loc.length)
        return orjson.loads(env), buf[content_at:]

    @property
    def writable(self) -> bool:
        """False while the writer cannot write (closed, or after a write error):
        reception refuses new mail and delivery takes no new message, since
        neither its MESSAGE nor its TOMBSTONE record could be made durable."""
        return self._writer is not None and not self.write_error

    def health(self) -> dict:
        stats = self._writer.stats() if self._writer is not None else {}
        return {"messages": len(self._index), "segments": len(self._live),
                "waiting": len(self._waiting), **stats}
