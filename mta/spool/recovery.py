"""Start-up scan: rebuild the spool index from the segment files.

Reads every NNNNNNNN.seg in order, checks each record (mta/spool/records.py)
and returns the live messages (accepted and not tombstoned). A record that
fails its checks is never taken as a message:
  - at the tail of a segment (the last, never-acknowledged batch before a
    crash) it is a torn write and is reported as `torn`;
  - anywhere else it is Corrupt: its bytes are copied to corrupt/ for the
    operator (never deleted, never silently skipped) and the scan goes on at
    the next record when the length field can be trusted, else at the next
    magic that starts a record with a valid checksum.
Diagnostics: warnings only (returned, and logged by the caller). Never raises
on damaged data; raises OSError when the directory cannot be read.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import orjson

from mta.spool import records as rec

SEGMENT_SUFFIX = ".seg"


@dataclass(slots=True)
class Location:
    segment: int      # segment number
    offset: int       # record start in the segment
    length: int       # record total_len


@dataclass(slots=True)
class Corrupt:
    segment: int      # where the bad bytes are
    offset: int
    length: int       # bytes copied to `saved_as`
    reason: str       # what check failed
    saved_as: str     # quarantine copy path ("" for an all-zero torn tail)


@dataclass
class Recovered:
    messages: dict[bytes, Location] = field(default_factory=dict)   # live messages by id
    envelopes: dict[bytes, dict] = field(default_factory=dict)      # their envelopes
    corrupt: list[Corrupt] = field(default_factory=list)            # quarantined records
    torn: list[Corrupt] = field(default_factory=list)               # torn tails (never acknowledged)
    segments: list[int] = field(default_factory=list)               # segment numbers found
    done_rcpts: dict[bytes, set[int]] = field(default_factory=dict)    # live id -> finished recipient indexes
    tombstone_refs: dict[int, set[int]] = field(default_factory=dict)  # segment -> segments its tombstones name
    finished: int = 0                                                # tombstoned messages seen


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"{number:08d}{SEGMENT_SUFFIX}")


def list_segments(directory: str) -> list[int]:
    out = []
    for name in os.listdir(directory):
        stem, dot, suffix = name.partition(".")
        if dot and "." + suffix == SEGMENT_SUFFIX and stem.isdigit() and len(stem) == 8:
            out.append(int(stem))
    return sorted(out)


def _next_candidate(buf, start: int, end: int) -> int:
    """Offset of the next record with a valid header and checksum, or end."""
    pos = start
    while True:
        pos = buf.find(rec.MAGIC, pos, end)
        if pos < 0:
            return end
        try:
            _, total = rec.parse_header(buf, pos, end - pos)
            rec.check_crc(buf, pos, total)
            return pos
        except rec.RecordError:
            pos += 1


def scan(directory: str, quarantine: str | None = None) -> Recovered:
    """Scan all segments of `directory`; see the module docstring."""
    quarantine = quarantine or os.path.join(directory, "corrupt")
    out = Recovered(segments=list_segments(directory))
    where: dict[bytes, int] = {}   # id -> segment, for tombstone references
    for seg in out.segments:
        path = segment_path(directory, seg)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _scan_segment(out, where, seg, buf, size, quarantine)
    return out


def _scan_segment(out: Recovered, where: dict, seg: int, buf, size: int, quarantine: str) -> None:
    pos = 0
    while pos < size:
        try:
            rtype, total = rec.parse_header(buf, pos, size - pos)
            rec.check_crc(buf, pos, total)
            if rtype == rec.RecordType.MESSAGE:
                msg_id, env, _ = rec.parse_message(buf, pos, total)
                out.messages[msg_id] = Location(seg, pos, total)
                out.envelopes[msg_id] = orjson.loads(env)
                where[msg_id] = seg
            elif rtype == rec.RecordType.TOMBSTONE:
                refs = out.tombstone_refs.setdefault(seg, set())
                for msg_id in rec.parse_tombstone(buf, pos, total):
                    if out.messages.pop(msg_id, None) is not None:
                        out.envelopes.pop(msg_id, None)
                        out.done_rcpts.pop(msg_id, None)
                        out.finished += 1
                    if msg_id in where:
                        refs.add(where[msg_id])
            else:
                refs = out.tombstone_refs.setdefault(seg, set())
                for msg_id, index in rec.parse_rcpts_done(buf, pos, total):
                    if msg_id in out.messages:
                        out.done_rcpts.setdefault(msg_id, set()).add(index)
                    if msg_id in where:
                        refs.add(where[msg_id])
            pos += total
        except (rec.RecordError, orjson.JSONDecodeError) as exc:
            reason = exc.reason if isinstance(exc, rec.RecordError) else "envelope is not JSON"
            nxt = _next_candidate(buf, pos + 1, size)
            if nxt == size:
                # Nothing valid follows: the tail of the last batch written
                # before a crash, which was never acknowledged with a 250.
                tail = buf[pos:size]
                saved = "" if tail.count(0) == len(tail) else _quarantine(quarantine, seg, pos, tail)
                out.torn.append(Corrupt(seg, pos, size - pos, reason, saved))
                return
            saved = _quarantine(quarantine, seg, pos, buf[pos:nxt])
            out.corrupt.append(Corrupt(seg, pos, nxt - pos, reason, saved))
            pos = nxt


def _quarantine(directory: str, seg: int, offset: int, data: bytes) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{seg:08d}-{offset:010d}.bad")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path
