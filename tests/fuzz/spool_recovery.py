"""Fuzz target: spool recovery, mta.spool.recovery.scan(directory), over damaged segments.

The base segments are written once per process by the real Spool (its native
writer, so they follow whatever record format the writer writes) plus one version 1
segment (the format before issue 10, still read). Some stored messages carry, in
their content, records an attacker could craft: a complete record from another
spool run (valid checksum, another nonce) and a version 1 record with a valid
checksum. Each input is a list of in-place damages (bit flips, overwrites,
truncation, zeroed ranges and pages, a 32-bit field set) applied before a scan.
Invariants:
  - scan never raises on damaged data;
  - every message it returns was written as a real record (never a crafted one),
    and its Location points at a record that checks out again;
  - envelopes, done_rcpts and schedules (SCHEDULE records) name only returned
    messages, and every schedule's Location points at a SCHEDULE record that
    checks out again and holds that state;
  - undamaged segments give back exactly the live (not tombstoned) messages.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from pathlib import Path

import atheris
from v1_segment import v1_message, v1_record

from mta.model.envelope import Envelope, Recipient
from mta.model.ids import new_id
from mta.spool import Spool
from mta.spool import records as rec
from mta.spool.recovery import scan, segment_path

MAX_LEN = 4096
TIMEOUT = 20
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()   # quarantine fsyncs are cheap there
PREFIX = "mta-fuzz-spool-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _work_dir() -> str:
    """SCRATCH/mta-fuzz-spool-<pid>. libFuzzer ends the process with exit(), so Python's
    atexit never runs: each start removes the directories of runs that are gone."""
    for name in os.listdir(SCRATCH):
        pid = name[len(PREFIX):]
        if name.startswith(PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(SCRATCH, name), ignore_errors=True)
    path = os.path.join(SCRATCH, f"{PREFIX}{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path)
    return path


WORK = _work_dir()


def _envelope(msg_id: bytes) -> Envelope:
    return Envelope(msg_id.hex(), "a@b.example", [Recipient("c@d.example"), Recipient("e@d.example")])


async def _write(directory: str, contents: list[bytes], finished: int, rcpt_done: int) -> list[bytes]:
    """Store `contents` with the real Spool, tombstone the first `finished`, mark one recipient done."""
    spool = Spool(directory, segment_size=2048)
    spool.open(asyncio.get_running_loop())
    ids = [new_id() for _ in contents]
    await asyncio.gather(*(spool.store(i, _envelope(i), b"Received: fuzz\r\n", bytearray(c))
                           for i, c in zip(ids, contents)))
    if rcpt_done:
        spool.finish_recipients(ids[-1], [1])
        spool.note_schedule(ids[-1], "d.example", 2, 1.7e9, pending=(0,), reply="451 fuzz")
    if finished:
        await spool.remove(ids[:finished])   # written with the recipient above, durable when it resolves
    await spool.close()
    return ids


def _build() -> tuple[dict[str, list[bytes]], set[bytes], set[bytes], set[bytes]]:
    """-> (segments per base, real ids, ids live when undamaged, crafted ids)."""
    scratch = os.path.join(WORK, "scratch")
    crafted_ids = asyncio.run(_write(scratch, [b"Subject: crafted\r\n\r\nfrom another run\r\n"], 0, 0))
    found = scan(scratch)
    loc = found.messages[crafted_ids[0]]
    with open(segment_path(scratch, loc.segment), "rb") as f:
        f.seek(loc.offset)
        other_run = f.read(loc.length)
    v1_id = new_id()
    crafted = other_run + v1_message(v1_id, b"Subject: crafted v1\r\n\r\nx\r\n")
    contents = [b"Subject: %d\r\n\r\n" % k + b"line\r\n" * (k * 7) for k in range(6)]
    contents[2] = b"Subject: carrier\r\n\r\n" + crafted + b"\r\n"
    contents[4] = crafted + b"\r\n" + crafted
    v2_dir = os.path.join(WORK, "v2")
    ids = asyncio.run(_write(v2_dir, contents, 1, 1))
    v2 = [Path(segment_path(v2_dir, n)).read_bytes() for n in sorted(_segments(v2_dir))]

    v1_ids = [new_id() for _ in range(4)]
    v1 = b"".join(v1_message(i, b"Subject: v1\r\n\r\n" + (crafted if k == 1 else b"body\r\n"))
                  for k, i in enumerate(v1_ids))
    v1 += v1_record(rec.RecordType.TOMBSTONE, rec.COUNT.pack(1) + v1_ids[0])
    v1 += v1_message(new_id(), b"torn")[:-2]   # the never-acknowledged tail of a crash
    bases = {"v2": v2, "v1": [v1], "both": [v1, *v2]}
    live = set(ids[1:]) | set(v1_ids[1:])
    return bases, set(ids) | set(v1_ids), live, {crafted_ids[0], v1_id}


def _segments(directory: str) -> list[int]:
    return [int(n[:8]) for n in os.listdir(directory) if n.endswith(".seg")]


BASES, REAL, LIVE, CRAFTED = _build()
BASE_NAMES = sorted(BASES)


def _mutate(fdp: atheris.FuzzedDataProvider, segs: list[bytearray]) -> int:
    """Apply the input's damage; returns how many mutations changed something.

    Damage happens in place, as on a disk: nothing shifts the bytes after it (no
    insertion or deletion), so content never lands on a record boundary by
    relocation; a misdirected write of message content is out of this model
    (docs/fuzzing.md says why)."""
    changed = 0
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        seg = segs[fdp.ConsumeIntInRange(0, len(segs) - 1)]
        op = fdp.ConsumeIntInRange(0, 5)
        at = fdp.ConsumeIntInRange(0, max(0, len(seg) - 1))
        span = min(fdp.ConsumeIntInRange(1, 64), len(seg) - at)
        before = bytes(seg)
        if op == 0 and seg:                       # flip one bit
            seg[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 1:                             # overwrite with input bytes
            seg[at:at + span] = fdp.ConsumeBytes(span).ljust(span, b"\0")
        elif op == 2:                             # truncate (a torn write)
            del seg[at:]
        elif op == 3:                             # zero a range (an unwritten block)
            seg[at:at + span] = bytes(span)
        elif op == 4:                             # a 4 KiB page never written: zeros to the end
            page = at & ~4095
            seg[page:] = bytes(len(seg) - page)
        else:                                     # a 32-bit field (length, count) set to a value
            seg[at:at + 4] = struct.pack("<I", fdp.ConsumeIntInRange(0, 0xFFFFFFFF))[:len(seg[at:at + 4])]
        changed += bytes(seg) != before
    return changed


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    segs = [bytearray(s) for s in BASES[BASE_NAMES[fdp.ConsumeIntInRange(0, len(BASE_NAMES) - 1)]]]
    changed = _mutate(fdp, segs)
    directory = os.path.join(WORK, "case")
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory)
    for n, seg in enumerate(segs, 1):
        with open(segment_path(directory, n), "wb") as f:
            f.write(seg)
    found = scan(directory)

    got = set(found.messages)
    assert not got & CRAFTED, "a record crafted inside message content was recovered as a message"
    assert got <= REAL, "recovery returned an id that was never written"
    assert set(found.envelopes) == set(found.messages), "envelopes do not match the recovered messages"
    assert set(found.done_rcpts) <= set(found.messages), "finished recipients of a message that is not live"
    assert set(found.schedules) <= set(found.messages), "a schedule of a message that is not live"
    for msg_id, states in found.schedules.items():
        for domain, (state, loc) in states.items():
            buf = bytes(segs[loc.segment - 1])
            rec.parse_header(buf, loc.offset, len(buf) - loc.offset)
            rec.check_crc(buf, loc.offset, loc.length)
            assert rec.parse_schedule(buf, loc.offset, loc.length) == state, "Location names another record"
            assert (state.msg_id, state.domain) == (msg_id, domain)
    for msg_id, loc in found.messages.items():
        buf = bytes(segs[loc.segment - 1])
        rec.parse_header(buf, loc.offset, len(buf) - loc.offset)
        rec.check_crc(buf, loc.offset, loc.length)
        assert rec.parse_message(buf, loc.offset, loc.length)[0] == msg_id, "Location names another record"
    if not changed:
        assert not found.corrupt, f"undamaged segments reported corrupt: {found.corrupt}"
        want = {i for i in LIVE if any(i in bytes(s) for s in segs)}
        assert got == want, f"undamaged segments: {len(got)} messages back, want {len(want)}"


def seeds():
    yield b""
    for base in range(len(BASE_NAMES)):
        for op in range(6):
            yield bytes([base, 1, 0, op, 40, 7, 0x55, 0x13, 0xff, 0xff, 0xff, 0x7f]) + bytes(range(16))
