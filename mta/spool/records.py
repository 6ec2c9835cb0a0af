"""Spool record layout: the one definition of what a segment file holds.

A segment (NNNNNNNN.seg) is an append-only sequence of records. Every record
starts with a fixed header and is covered by a CRC-32 (zlib's), which the
native writer (native/spool/writer.c) fills in at CRC_OFFSET just before the
write: one fdatasync covers many messages, so a torn batch must be detectable
record by record (Postfix has typed, length-prefixed records but no checksum;
we add one).

Version 2 (written since issue 10) frames every record with the segment's
nonce, 8 random bytes (os.urandom) drawn when the spool opens. The native
writer starts every segment it creates with a SEGMENT record carrying it, and
every later record repeats it inside the CRC. Message content is stored in
records verbatim, so a body can hold bytes that look like a record (magic,
lengths, even a correct CRC); it cannot hold the nonce, which never leaves
the spool. Recovery therefore resynchronises after damage only at a record
that carries the segment's nonce (see mta/spool/recovery.py).

    header v2 magic "MTAR" | version u8 = 2 | type u8 | flags u16 | total_len u32 | crc32 u32
              | nonce[8]                                              (24 bytes)
    header v1 magic "MTAR" | version u8 = 1 | type u8 | flags u16 | total_len u32 | crc32 u32
                                                    (16 bytes; read, never written)
    SEGMENT    (nothing: the header's nonce is the payload; first record of a v2 segment)
    MESSAGE    id[16] | envelope_len u32 | envelope (JSON) | content
    TOMBSTONE  count u32 | id[16] * count   (messages that are finished)
    RCPTS_DONE count u32 | (id[16] | rcpt index u32) * count
                                       (recipients finished while others still wait:
                                        a restart must not deliver them again)
    SCHEDULE   id[16] | attempts u32 | flags u32 | due f64 | written f64 | pending u16
               | finished u16 | domain_len u8 | reply_len u16
               | rcpt index u32 * pending | (rcpt index u32 | state u8) * finished
               | domain (ASCII, <= 255) | reply (UTF-8, <= MAX_REPLY bytes)
                                       (one scheduled entry -- a message's recipients at
                                        one domain -- was deferred: its attempt count,
                                        next due time (Unix seconds), flags, last reply
                                        and which of its recipients were delivered (1)
                                        or bounced (2); the newest record per (id,
                                        domain) counts, older ones are history. Written
                                        in the batch of whatever comes next, no fsync of
                                        its own: losing the last one costs an early
                                        retry, never a message.)

Compatibility: SCHEDULE (type 5) exists since issue 13. A daemon older than
that rejects the type: it quarantines each SCHEDULE record as corrupt (logging
a Corrupt record per record), resynchronises at the next record by the nonce,
and still recovers every message, only without their schedules. Downgrading
over a spool that holds SCHEDULE records is therefore noisy, not lossy.

All integers little-endian; total_len counts the header; the CRC covers bytes
[16:total_len] in both versions (in v2 that includes the nonce). Readers
reject unknown types and versions, lengths that run past the file, a nonce
other than the segment's, and CRC mismatches.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"MTAR"
VERSION = 2                          # what the writer writes
V1 = 1                               # still read: segments written before issue 10
NONCE_SIZE = 8
HEADER = struct.Struct("<4sBBHII8s")  # magic, version, type, flags, total_len, crc, nonce
HEADER_SIZE = HEADER.size             # 24
HEADER_V1 = struct.Struct("<4sBBHII")  # magic, version, type, flags, total_len, crc
HEADER_V1_SIZE = HEADER_V1.size       # 16
CRC_OFFSET = 12                       # where the writer stores the CRC
CRC_START = 16                        # the CRC covers [CRC_START:total_len], both versions
MESSAGE_FIXED = struct.Struct("<16sI")  # id, envelope_len
COUNT = struct.Struct("<I")
RCPT_DONE = struct.Struct("<16sI")      # id, recipient index
# id, attempts, flags, due, written, pending count, finished count, domain len, reply len
SCHEDULE_FIXED = struct.Struct("<16sIIddHHBH")
RCPT_STATE = struct.Struct("<IB")       # recipient index, state (FINISHED_STATES)
MAX_REPLY = 512                         # bytes of the last reply kept in a SCHEDULE record
DELIVERED, BOUNCED = 1, 2               # finished recipient states in a SCHEDULE record
ID_SIZE = 16
MAX_RECORD = 0xFFFFFFFF
_HEADER_SIZES = {V1: HEADER_V1_SIZE, VERSION: HEADER_SIZE}


class RecordType(IntEnum):
    MESSAGE = 1     # an accepted message: envelope + content
    TOMBSTONE = 2   # ids of messages that are finished (delivered, bounced, expired)
    RCPTS_DONE = 3  # (id, recipient index) pairs finished before their message is
    SEGMENT = 4     # v2: the first record of a segment, carrying its nonce
    SCHEDULE = 5    # issue 13: a deferred entry's attempts, due time, last reply


_TYPES = frozenset(RecordType)


def _head(rtype: RecordType, total: int, nonce: bytes) -> bytearray:
    if total > MAX_RECORD:
        raise ValueError(f"record of {total} bytes exceeds the 4 GiB record limit")
    return bytearray(HEADER.pack(MAGIC, VERSION, rtype, 0, total, 0, nonce))


def segment_header(nonce: bytes) -> bytes:
    """The SEGMENT record, CRC included: the native writer puts it verbatim at
    offset 0 of every segment it creates."""
    head = _head(RecordType.SEGMENT, HEADER_SIZE, nonce)
    struct.pack_into("<I", head, CRC_OFFSET, zlib.crc32(memoryview(head)[CRC_START:]))
    return bytes(head)


def message_head(msg_id: bytes, envelope: bytes, trace: bytes, content_len: int,
                 nonce: bytes) -> bytearray:
    """Header + id + envelope + trace header for a MESSAGE record.

    The content follows as a separate buffer (zero copy); `trace` (our
    Received header) is the first part of the stored content.
    """
    total = HEADER_SIZE + MESSAGE_FIXED.size + len(envelope) + len(trace) + content_len
    head = _head(RecordType.MESSAGE, total, nonce)
    head += MESSAGE_FIXED.pack(msg_id, len(envelope))
    head += envelope
    head += trace
    return head


def tombstone(ids: list[bytes], nonce: bytes) -> bytearray:
    head = _head(RecordType.TOMBSTONE, HEADER_SIZE + COUNT.size + ID_SIZE * len(ids), nonce)
    head += COUNT.pack(len(ids))
    for i in ids:
        head += i
    return head


def rcpts_done(pairs: list[tuple[bytes, int]], nonce: bytes) -> bytearray:
    head = _head(RecordType.RCPTS_DONE, HEADER_SIZE + COUNT.size + RCPT_DONE.size * len(pairs), nonce)
    head += COUNT.pack(len(pairs))
    for msg_id, index in pairs:
        head += RCPT_DONE.pack(msg_id, index)
    return head


@dataclass(slots=True)
class Schedule:
    """A SCHEDULE record's payload: the state of one scheduled entry of a message."""
    msg_id: bytes
    domain: str                    # the entry's recipient domain (its scheduled queue's)
    attempts: int                  # attempts that failed temporarily so far
    due: float                     # Unix time of the next attempt
    flags: int                     # QueuedMessage flags (DELAY_DSN_SENT)
    written: float                 # Unix time the state was noted (newest wins)
    pending: tuple[int, ...]       # recipient indexes still to deliver
    finished: dict[int, int]       # recipient index -> DELIVERED or BOUNCED
    reply: str                     # the last reply, "code status text", cut to MAX_REPLY bytes


def schedule_payload(s: Schedule) -> bytes:
    """The body of a SCHEDULE record (without header): what `schedule()` frames."""
    domain = s.domain.encode("ascii", "replace")[:255]
    reply = s.reply.encode("utf-8", "replace")[:MAX_REPLY]
    pending = s.pending[:0xFFFF]
    finished = list(s.finished.items())[:0xFFFF]
    out = bytearray(SCHEDULE_FIXED.pack(s.msg_id, s.attempts & 0xFFFFFFFF,
                                        s.flags & 0xFFFFFFFF, s.due, s.written, len(pending),
                                        len(finished), len(domain), len(reply)))
    for i in pending:
        out += COUNT.pack(i)
    for i, state in finished:
        out += RCPT_STATE.pack(i, state)
    out += domain
    out += reply
    return bytes(out)


def schedule(payload: bytes, nonce: bytes) -> bytearray:
    """A SCHEDULE record around `payload` (schedule_payload(); also a payload read back
    from an older segment, rewritten forward before that segment is reclaimed)."""
    head = _head(RecordType.SCHEDULE, HEADER_SIZE + len(payload), nonce)
    head += payload
    return head


class RecordError(ValueError):
    """A record that must not be trusted; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_header(buf: bytes | memoryview, offset: int, available: int,
                 version: int | None = None, nonce: bytes | None = None) -> tuple[int, int]:
    """Validate the header at `offset` -> (type, total_len); RecordError otherwise.

    `version`: the segment's format (None: either, for reading back a record
    whose place is known); `nonce`: the segment's nonce (v2), checked when given.
    """
    if available < HEADER_V1_SIZE:
        raise RecordError("truncated header")
    magic, found, rtype, _flags, total, _crc = HEADER_V1.unpack_from(buf, offset)
    if magic != MAGIC:
        raise RecordError("bad magic")
    size = _HEADER_SIZES.get(found)
    if size is None or (version is not None and found != version):
        raise RecordError(f"unknown version {found}" if size is None
                          else f"version {found} record in a version {version} segment")
    if total < size or total > available:
        raise RecordError("length runs past the end of the segment")
    if rtype not in _TYPES or (found == V1 and rtype == RecordType.SEGMENT):
        raise RecordError(f"unknown record type {rtype}")
    if nonce is not None and found == VERSION and buf[offset + CRC_START:offset + size] != nonce:
        raise RecordError("nonce is not the segment's")
    return rtype, total


def record_nonce(buf: bytes | memoryview, offset: int) -> bytes:
    """The nonce of the v2 header at `offset` (validate it first)."""
    return bytes(buf[offset + CRC_START:offset + HEADER_SIZE])


def check_crc(buf: bytes | memoryview, offset: int, total: int) -> None:
    stored = struct.unpack_from("<I", buf, offset + CRC_OFFSET)[0]
    actual = zlib.crc32(memoryview(buf)[offset + CRC_START:offset + total])
    if stored != actual:
        raise RecordError("checksum mismatch")


def _body(buf: bytes | memoryview, offset: int) -> int:
    """Where the record's body starts (after a header of its version)."""
    return offset + _HEADER_SIZES[buf[offset + 4]]


def parse_message(buf: bytes | memoryview, offset: int, total: int) -> tuple[bytes, memoryview, int]:
    """MESSAGE body -> (id, envelope bytes view, content offset)."""
    start = _body(buf, offset)
    if start + MESSAGE_FIXED.size > offset + total:
        raise RecordError("message record too short")
    msg_id, env_len = MESSAGE_FIXED.unpack_from(buf, start)
    env_start = start + MESSAGE_FIXED.size
    if env_start + env_len > offset + total:
        raise RecordError("envelope runs past the record")
    return bytes(msg_id), memoryview(buf)[env_start:env_start + env_len], env_start + env_len


def _count(buf: bytes | memoryview, offset: int, total: int) -> tuple[int, int]:
    start = _body(buf, offset)
    if start + COUNT.size > offset + total:
        raise RecordError("record too short for its count")
    return COUNT.unpack_from(buf, start)[0], start + COUNT.size


def parse_tombstone(buf: bytes | memoryview, offset: int, total: int) -> list[bytes]:
    count, start = _count(buf, offset, total)
    if start + count * ID_SIZE != offset + total:
        raise RecordError("tombstone count does not match its length")
    return [bytes(buf[start + i * ID_SIZE:start + (i + 1) * ID_SIZE]) for i in range(count)]


def parse_rcpts_done(buf: bytes | memoryview, offset: int, total: int) -> list[tuple[bytes, int]]:
    count, start = _count(buf, offset, total)
    if start + count * RCPT_DONE.size != offset + total:
        raise RecordError("recipient-done count does not match its length")
    return [(bytes(i), n) for i, n in RCPT_DONE.iter_unpack(memoryview(buf)[start:offset + total])]


def schedule_body(buf: bytes | memoryview, offset: int, total: int) -> bytes:
    """A SCHEDULE record's payload bytes (to parse, or to write again forward)."""
    return bytes(buf[_body(buf, offset):offset + total])


def parse_schedule(buf: bytes | memoryview, offset: int, total: int) -> Schedule:
    return parse_schedule_payload(schedule_body(buf, offset, total))


def parse_schedule_payload(p: bytes) -> Schedule:
    if len(p) < SCHEDULE_FIXED.size:
        raise RecordError("schedule record too short")
    msg_id, attempts, flags, due, written, npend, nfin, dlen, rlen = SCHEDULE_FIXED.unpack_from(p)
    at = SCHEDULE_FIXED.size
    if at + npend * COUNT.size + nfin * RCPT_STATE.size + dlen + rlen != len(p):
        raise RecordError("schedule record lengths do not match its size")
    if not (math.isfinite(due) and math.isfinite(written)):
        raise RecordError("schedule record with a time that is not a finite number")
    pending = tuple(COUNT.unpack_from(p, at + 4 * k)[0] for k in range(npend))
    at += npend * COUNT.size
    finished = {}
    for k in range(nfin):
        i, state = RCPT_STATE.unpack_from(p, at + k * RCPT_STATE.size)
        finished[i] = state
    at += nfin * RCPT_STATE.size
    domain = p[at:at + dlen].decode("ascii", "replace")
    reply = p[at + dlen:].decode("utf-8", "replace")
    return Schedule(msg_id, domain, attempts, due, flags, written, pending, finished, reply)
