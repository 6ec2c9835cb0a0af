"""Spool record layout: the one definition of what a segment file holds.

A segment (NNNNNNNN.seg) is an append-only sequence of records. Every record
starts with a fixed 16-byte header and is covered by a CRC-32 (zlib's), which
the native writer (native/spool/writer.c) fills in at CRC_OFFSET just before
the write: one fdatasync covers many messages, so a torn batch must be
detectable record by record (Postfix has typed, length-prefixed records but
no checksum; we add one).

    header   magic "MTAR" | version u8 | type u8 | flags u16 | total_len u32 | crc32 u32
    MESSAGE  id[16] | envelope_len u32 | envelope (JSON) | content
    TOMBSTONE count u32 | id[16] * count   (messages that are finished)
    RCPTS_DONE count u32 | (id[16] | rcpt index u32) * count
                                       (recipients finished while others still wait:
                                        a restart must not deliver them again)

All integers little-endian; total_len counts the header; the CRC covers bytes
[16:total_len]. Readers reject unknown types and versions, lengths that run
past the file, and CRC mismatches (see mta/spool/recovery.py).
"""
from __future__ import annotations

import struct
import zlib
from enum import IntEnum

MAGIC = b"MTAR"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")   # magic, version, type, flags, total_len, crc
HEADER_SIZE = HEADER.size            # 16
CRC_OFFSET = 12                      # where the writer stores the CRC
MESSAGE_FIXED = struct.Struct("<16sI")  # id, envelope_len
COUNT = struct.Struct("<I")
RCPT_DONE = struct.Struct("<16sI")      # id, recipient index
ID_SIZE = 16
MAX_RECORD = 0xFFFFFFFF


class RecordType(IntEnum):
    MESSAGE = 1     # an accepted message: envelope + content
    TOMBSTONE = 2   # ids of messages that are finished (delivered, bounced, expired)
    RCPTS_DONE = 3  # (id, recipient index) pairs finished before their message is


def message_head(msg_id: bytes, envelope: bytes, trace: bytes, content_len: int) -> bytearray:
    """Header + id + envelope + trace header for a MESSAGE record.

    The content follows as a separate buffer (zero copy); `trace` (our
    Received header) is the first part of the stored content.
    """
    total = HEADER_SIZE + MESSAGE_FIXED.size + len(envelope) + len(trace) + content_len
    if total > MAX_RECORD:
        raise ValueError(f"record of {total} bytes exceeds the 4 GiB record limit")
    head = bytearray(HEADER.pack(MAGIC, VERSION, RecordType.MESSAGE, 0, total, 0))
    head += MESSAGE_FIXED.pack(msg_id, len(envelope))
    head += envelope
    head += trace
    return head


def tombstone(ids: list[bytes]) -> bytearray:
    total = HEADER_SIZE + COUNT.size + ID_SIZE * len(ids)
    head = bytearray(HEADER.pack(MAGIC, VERSION, RecordType.TOMBSTONE, 0, total, 0))
    head += COUNT.pack(len(ids))
    for i in ids:
        head += i
    return head


def rcpts_done(pairs: list[tuple[bytes, int]]) -> bytearray:
    total = HEADER_SIZE + COUNT.size + RCPT_DONE.size * len(pairs)
    head = bytearray(HEADER.pack(MAGIC, VERSION, RecordType.RCPTS_DONE, 0, total, 0))
    head += COUNT.pack(len(pairs))
    for msg_id, index in pairs:
        head += RCPT_DONE.pack(msg_id, index)
    return head


class RecordError(ValueError):
    """A record that must not be trusted; `reason` says why."""

    def __init__(self, reason: str, total_len: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.total_len = total_len   # bytes to skip to try the next record, 0 if unknown


def parse_header(buf: bytes | memoryview, offset: int, available: int) -> tuple[int, int]:
    """Validate the header at `offset` -> (type, total_len); RecordError otherwise."""
    if available < HEADER_SIZE:
        raise RecordError("truncated header")
    magic, version, rtype, _flags, total, _crc = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise RecordError("bad magic")
    if version != VERSION:
        raise RecordError(f"unknown version {version}")
    if total < HEADER_SIZE or total > available:
        raise RecordError("length runs past the end of the segment")
    if rtype not in (RecordType.MESSAGE, RecordType.TOMBSTONE, RecordType.RCPTS_DONE):
        raise RecordError(f"unknown record type {rtype}", total)
    return rtype, total


def check_crc(buf: bytes | memoryview, offset: int, total: int) -> None:
    stored = struct.unpack_from("<I", buf, offset + CRC_OFFSET)[0]
    actual = zlib.crc32(memoryview(buf)[offset + HEADER_SIZE:offset + total])
    if stored != actual:
        raise RecordError("checksum mismatch", total)


def parse_message(buf: bytes | memoryview, offset: int, total: int) -> tuple[bytes, memoryview, int]:
    """MESSAGE body -> (id, envelope bytes view, content offset)."""
    msg_id, env_len = MESSAGE_FIXED.unpack_from(buf, offset + HEADER_SIZE)
    env_start = offset + HEADER_SIZE + MESSAGE_FIXED.size
    if env_start + env_len > offset + total:
        raise RecordError("envelope runs past the record", total)
    return bytes(msg_id), memoryview(buf)[env_start:env_start + env_len], env_start + env_len


def parse_tombstone(buf: bytes | memoryview, offset: int, total: int) -> list[bytes]:
    (count,) = COUNT.unpack_from(buf, offset + HEADER_SIZE)
    start = offset + HEADER_SIZE + COUNT.size
    if start + count * ID_SIZE != offset + total:
        raise RecordError("tombstone count does not match its length", total)
    return [bytes(buf[start + i * ID_SIZE:start + (i + 1) * ID_SIZE]) for i in range(count)]


def parse_rcpts_done(buf: bytes | memoryview, offset: int, total: int) -> list[tuple[bytes, int]]:
    (count,) = COUNT.unpack_from(buf, offset + HEADER_SIZE)
    start = offset + HEADER_SIZE + COUNT.size
    if start + count * RCPT_DONE.size != offset + total:
        raise RecordError("recipient-done count does not match its length", total)
    return [(bytes(i), n) for i, n in RCPT_DONE.iter_unpack(memoryview(buf)[start:offset + total])]
