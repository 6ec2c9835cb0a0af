"""Start-up scan: rebuild the spool index from the segment files.

Reads every NNNNNNNN.seg in order, checks each record (mta/spool/records.py)
and returns the live messages (accepted and not tombstoned). A record that
fails its checks is never taken as a message:
  - at the tail of a segment (the last, never-acknowledged batch before a
    crash) it is a torn write and is reported as `torn`;
  - anywhere else it is Corrupt: its bytes are copied to corrupt/ (0600) for
    the operator (never deleted, never silently skipped).
Where the scan goes on after damage (resynchronisation) is where forged
content could get in, so it goes on only at a record the writer wrote:
  - in a version 2 segment, at the next record that carries the segment's
    nonce and a valid checksum. Content cannot carry the nonce (records.py),
    so a record crafted inside a message body never matches. (Not at the end
    the damaged record's length field names: that field is outside the CRC,
    and content can hold a crafted record at each offset one flipped bit of it
    would name. The nonce search finds the true next record anyway.)
  - a version 1 segment (written before the nonce existed) has nothing that
    tells a real record from a crafted one, so it is not searched: the rest of
    the segment is quarantined as one piece and reported as corrupt when
    something like a record header is in it (it may hold accepted mail: the
    operator decides), else as a torn tail. Intact v1 segments recover in full;
    so does a v2 segment whose nonce is unknown (its SEGMENT record and the
    record after it both damaged), up to the damage.
Every search is linear in the segment: a candidate is checked for the nonce
(in its header) before its checksum, so crafted magics cost O(1) each.
SCHEDULE records (records.py) give each live message's deferred entries their
attempt count and due time back: the newest per (id, domain) by its `written`
time (a record rewritten forward keeps its time, so its copy never wins over a
newer state). A schedule for a message not live at that point is history.
Diagnostics: warnings only (returned, and logged by the caller). Never raises
on damaged data; raises OSError when the directory cannot be read.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

from mta.model.envelope import Envelope, EnvelopeError
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
    envelopes: dict[bytes, Envelope] = field(default_factory=dict)  # their envelopes
    corrupt: list[Corrupt] = field(default_factory=list)            # quarantined records
    torn: list[Corrupt] = field(default_factory=list)               # torn tails (never acknowledged)
    segments: list[int] = field(default_factory=list)               # segment numbers found
    done_rcpts: dict[bytes, set[int]] = field(default_factory=dict)    # live id -> finished recipient indexes
    tombstone_refs: dict[int, set[int]] = field(default_factory=dict)  # segment -> segments its tombstones name
    finished: int = 0                                                # tombstoned messages seen
    # live id -> {entry domain -> (newest SCHEDULE state, where that record is)}
    schedules: dict[bytes, dict[str, tuple[rec.Schedule, Location]]] = field(default_factory=dict)


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"{number:08d}{SEGMENT_SUFFIX}")


def list_segments(directory: str) -> list[int]:
    out = []
    for name in os.listdir(directory):
        stem, dot, suffix = name.partition(".")
        if dot and "." + suffix == SEGMENT_SUFFIX and stem.isdigit() and len(stem) == 8:
            out.append(int(stem))
    return sorted(out)


def _valid_at(buf, pos: int, end: int, version: int | None, nonce: bytes | None) -> bool:
    try:
        _, total = rec.parse_header(buf, pos, end - pos, version, nonce)
        rec.check_crc(buf, pos, total)
    except rec.RecordError:
        return False
    return True


def _resync(buf, pos: int, end: int, version: int, nonce: bytes | None) -> tuple[int, bool]:
    """Where the scan may go on after damage at `pos` -> (offset, searched).

    `searched` is False when the rest of the segment could not be searched (no
    nonce to tell the writer's records from content); see the module docstring.
    """
    if nonce is None:
        return end, False
    at = pos + 1
    while (at := buf.find(rec.MAGIC, at, end)) >= 0:
        if _valid_at(buf, at, end, version, nonce):
            return at, True
        at += 1
    return end, True


def _looks_valid_after(buf, pos: int, end: int) -> bool:
    """Whether a plausible record header (any nonce) follows `pos`: decides only how
    an unsearched rest is reported, never what is queued. Headers only, no
    checksums: content can hold a magic every few bytes, and checking each one's
    CRC over the rest of the segment would be quadratic."""
    at = pos + 1
    while (at := buf.find(rec.MAGIC, at, end)) >= 0:
        try:
            rec.parse_header(buf, at, end - at)
            return True
        except rec.RecordError:
            at += 1
    return False


def _framing(buf, size: int) -> tuple[int, bytes | None, int, rec.RecordError | None]:
    """The segment's format -> (version, nonce, first record offset, damage at 0).

    A v2 segment opens with its SEGMENT record. If that is damaged, the nonce
    is taken from the record right after it (a known boundary: the SEGMENT
    record has a fixed size) when that one checks out; else it stays unknown.
    """
    if size >= rec.HEADER_V1_SIZE and buf[:4] == rec.MAGIC and buf[4] == rec.V1:
        return rec.V1, None, 0, None
    try:
        rtype, total = rec.parse_header(buf, 0, size, rec.VERSION)
        rec.check_crc(buf, 0, total)
        if rtype != rec.RecordType.SEGMENT:
            raise rec.RecordError("segment does not start with its SEGMENT record")
        return rec.VERSION, rec.record_nonce(buf, 0), total, None
    except rec.RecordError as exc:
        first = rec.HEADER_SIZE
        nonce = rec.record_nonce(buf, first) if _valid_at(buf, first, size, rec.VERSION, None) else None
        return rec.VERSION, nonce, 0, exc


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
    version, nonce, pos, damage = _framing(buf, size)
    while pos < size:
        try:
            if damage is not None:
                raise damage
            rtype, total = rec.parse_header(buf, pos, size - pos, version, nonce)
            rec.check_crc(buf, pos, total)
            if rtype == rec.RecordType.MESSAGE:
                msg_id, env, _ = rec.parse_message(buf, pos, total)
                envelope = Envelope.from_json(env)
                out.messages[msg_id] = Location(seg, pos, total)
                out.envelopes[msg_id] = envelope
                where[msg_id] = seg
            elif rtype == rec.RecordType.TOMBSTONE:
                refs = out.tombstone_refs.setdefault(seg, set())
                for msg_id in rec.parse_tombstone(buf, pos, total):
                    if out.messages.pop(msg_id, None) is not None:
                        out.envelopes.pop(msg_id, None)
                        out.done_rcpts.pop(msg_id, None)
                        out.schedules.pop(msg_id, None)
                        out.finished += 1
                    if msg_id in where:
                        refs.add(where[msg_id])
            elif rtype == rec.RecordType.RCPTS_DONE:
                refs = out.tombstone_refs.setdefault(seg, set())
                for msg_id, index in rec.parse_rcpts_done(buf, pos, total):
                    if msg_id in out.messages:
                        out.done_rcpts.setdefault(msg_id, set()).add(index)
                    if msg_id in where:
                        refs.add(where[msg_id])
            elif rtype == rec.RecordType.SCHEDULE:
                state = rec.parse_schedule(buf, pos, total)
                if state.msg_id in out.messages:   # else finished already: history
                    mine = out.schedules.setdefault(state.msg_id, {})
                    old = mine.get(state.domain)
                    if old is None or old[0].written <= state.written:
                        mine[state.domain] = (state, Location(seg, pos, total))
            else:
                raise rec.RecordError("SEGMENT record inside a segment")
            pos += total
        except (rec.RecordError, EnvelopeError) as exc:
            damage = None
            reason = exc.reason if isinstance(exc, rec.RecordError) else str(exc)
            nxt, searched = _resync(buf, pos, size, version, nonce)
            if nxt == size and (searched or not _looks_valid_after(buf, pos, size)):
                # Nothing valid follows: the tail of the last batch written
                # before a crash, which was never acknowledged with a 250.
                tail = buf[pos:size]
                saved = "" if tail.count(0) == len(tail) else _quarantine(quarantine, seg, pos, tail)
                out.torn.append(Corrupt(seg, pos, size - pos, reason, saved))
                return
            if not searched:
                reason += f"; the rest of this version {version} segment is not searched for records"
            saved = _quarantine(quarantine, seg, pos, buf[pos:nxt])
            out.corrupt.append(Corrupt(seg, pos, nxt - pos, reason, saved))
            pos = nxt


def _quarantine(directory: str, seg: int, offset: int, data: bytes) -> str:
    """Copy damaged bytes for the operator; 0600: they are message content."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{seg:08d}-{offset:010d}.bad")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(fd, 0o600)   # an older copy may have been made 0644
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path
