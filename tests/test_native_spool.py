"""Tests for mta._native.spool.SegmentWriter on a real disk (tmp_path).

Each test reads the segment files back rather than trusting the writer's own
account: a record is where append() said, byte for byte, with the crc32 that
recovery will check.
"""
import asyncio
import errno
import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from mta._native.spool import SegmentWriter

CRC_OFFSET = 12  # heads carry a 16-byte prefix: 12 bytes of header, then the crc32
PREFIX = 16


def seg_path(directory: Path, no: int) -> Path:
    return directory / f"{no:08d}.seg"


def make_head(rng: random.Random, extra: int) -> bytearray:
    head = bytearray(rng.randbytes(PREFIX + extra))
    head[CRC_OFFSET:CRC_OFFSET + 4] = b"\0\0\0\0"
    return head


def check_record(directory: Path, seg: int, off: int, head: bytes, body: bytes) -> None:
    with open(seg_path(directory, seg), "rb") as f:
        f.seek(off)
        got = f.read(len(head) + len(body))
    want = head + body
    assert got == want, f"segment {seg} offset {off}: got {got[:32]!r}..., want {want[:32]!r}..."
    (crc,) = struct.unpack_from("<I", got, CRC_OFFSET)
    want_crc = zlib.crc32(got[CRC_OFFSET + 4:])
    assert crc == want_crc, f"segment {seg} offset {off}: got crc {crc:#x}, want {want_crc:#x}"


def open_segment_fds(directory: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith(".seg"):
            out.append(target)
    return out


def test_random_records_round_trip(tmp_path: Path) -> None:
    rng = random.Random(1)
    w = SegmentWriter(str(tmp_path), 7, segment_bytes=1 << 20)
    kept = []  # (ticket, seg, off, head, body bytes)
    for i in range(1000):
        head = make_head(rng, rng.randrange(0, 200))
        kind = i % 4
        raw = rng.randbytes(rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(5000, 70000)]))
        body = {0: raw, 1: memoryview(bytearray(raw)), 2: None, 3: bytearray(raw)}[kind]
        ticket, seg, off = w.append(head, body, CRC_OFFSET)
        kept.append((ticket, seg, off, head, b"" if body is None else bytes(body)))
    w.flush()
    done = w.completed()
    assert done == [(t, 0) for t, *_ in kept], f"got {done[:5]}..., want every ticket with err 0"
    assert [t for t, *_ in kept] == list(range(1, 1001))
    for ticket, seg, off, head, body in kept:
        # The writer stored the crc into the caller's head too.
        check_record(tmp_path, seg, off, bytes(head), body)
    # Records of a segment are contiguous, in append order, with nothing after the last.
    ends: dict[int, int] = {}
    for _, seg, off, head, body in kept:
        assert off == ends.get(seg, 0), f"segment {seg}: got offset {off}, want {ends.get(seg, 0)}"
        ends[seg] = off + len(head) + len(body)
    assert min(ends) == 7
    for seg, end in ends.items():
        assert seg_path(tmp_path, seg).stat().st_size == end
    st = w.stats()
    assert st["records"] == 1000 and st["bytes"] == sum(ends.values())
    assert st["segment"] == max(ends)
    w.close()


def test_rollover_and_big_record(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 0, segment_bytes=1000)
    placed = []
    for size in (400, 400, 400, 3000, 100, 100, 1000, 16):
        body = b"b" * (size - PREFIX) if size > PREFIX else None
        placed.append(w.append(bytearray(PREFIX), body, CRC_OFFSET))
    got = [(seg, off) for _, seg, off in placed]
    want = [(0, 0), (0, 400), (1, 0), (2, 0), (3, 0), (3, 100), (4, 0), (5, 0)]
    assert got == want, f"got {got}, want {want}"
    w.flush()
    assert [e for _, e in w.completed()] == [0] * 8
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{n:08d}.seg" for n in range(6)], f"got {names}"
    sizes = [seg_path(tmp_path, n).stat().st_size for n in range(6)]
    assert sizes == [800, 400, 3000, 200, 1000, 16], f"got {sizes}"
    # roll(): a new segment for the next append; a no-op while that one is empty.
    assert w.roll() == 6
    assert w.roll() == 6
    assert w.append(bytearray(PREFIX), b"x", CRC_OFFSET)[1:] == (6, 0)
    assert w.stats()["segment"] == 6
    w.close()
    assert seg_path(tmp_path, 6).stat().st_size == PREFIX + 1


def test_group_commit_shares_syncs(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 1)
    body = b"m" * 2000
    for _ in range(5000):
        w.append(bytearray(PREFIX), body, CRC_OFFSET)
    w.flush()
    st = w.stats()
    assert st["records"] == 5000
    assert st["syncs"] == st["batches"], "one segment: one FDATASYNC per batch"
    assert st["syncs"] <= 500, f"got {st['syncs']} syncs for 5000 records, want far fewer"
    assert st["max_batch_records"] > 10
    assert len(w.completed()) == 5000
    w.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_eventfd_wakes_the_loop(tmp_path: Path, loop_kind: str) -> None:
    if loop_kind == "uvloop":
        import uvloop   # required (requirements-dev.txt): a missing one fails, never skips
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    w = SegmentWriter(tmp_path, 1, segment_bytes=256 << 10)
    seen: list[tuple[int, int]] = []
    total = 3000

    async def main() -> None:
        all_done = asyncio.Event()

        def _on_completed() -> None:
            seen.extend(w.completed())
            if len(seen) >= total:
                all_done.set()

        loop.add_reader(w.eventfd, _on_completed)
        try:
            for i in range(total):
                w.append(bytearray(PREFIX + i % 50), b"x" * (i % 3000), CRC_OFFSET)
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(all_done.wait(), 10)
            await asyncio.sleep(0.05)  # a late duplicate would show up here
        finally:
            loop.remove_reader(w.eventfd)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen == [(t, 0) for t in range(1, total + 1)], f"got {len(seen)} completions"
    assert w.completed() == []
    w.close()


def test_buffers_are_held_until_completed(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 1)
    head = bytearray(PREFIX)
    w.append(head, None, CRC_OFFSET)
    w.flush()
    with pytest.raises(BufferError):
        head.extend(b"resize would move the buffer under the writer")
    (ticket, err), = w.completed()
    assert (ticket, err) == (1, 0)
    head.extend(b"ok now")
    assert struct.unpack_from("<I", head, CRC_OFFSET)[0] == zlib.crc32(bytes(PREFIX - CRC_OFFSET - 4))
    w.close()


def test_directory_sync_and_segment_fds(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 100, segment_bytes=100)
    for i in range(20):
        assert w.append(bytearray(PREFIX), b"z" * 90, CRC_OFFSET)[1:] == (100 + i, 0)
        w.flush()
    st = w.stats()
    assert st["dir_syncs"] == 20, f"got {st['dir_syncs']} directory fsyncs, want one per new segment"
    assert st["syncs"] == 20
    # Finished segments are closed; only the newest stays open.
    assert open_segment_fds(tmp_path) == [str(seg_path(tmp_path, 119))]
    w.close()
    assert open_segment_fds(tmp_path) == []
    assert len(w.completed()) == 20, "completions taken by close() are still reported"


def test_one_batch_spanning_segments(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 1, segment_bytes=4096)
    rng = random.Random(2)
    kept = []
    for _ in range(3000):
        head = make_head(rng, 4)
        body = rng.randbytes(rng.randrange(0, 600))
        kept.append((*w.append(head, body, CRC_OFFSET), head, body))
    w.flush()
    assert all(err == 0 for _, err in w.completed())
    for _, seg, off, head, body in kept:
        check_record(tmp_path, seg, off, bytes(head), body)
    st = w.stats()
    assert st["dir_syncs"] <= st["batches"] and st["syncs"] >= kept[-1][1]
    w.close()


@pytest.mark.parametrize(
    "name, call, exc",
    [
        ("crc past the end", lambda w: w.append(bytearray(15), None, 12), ValueError),
        ("negative crc", lambda w: w.append(bytearray(16), None, -1), ValueError),
        ("read-only head", lambda w: w.append(b"\0" * 16, None, 12), BufferError),
        ("body not a buffer", lambda w: w.append(bytearray(16), "text", 12), TypeError),
    ],
)
def test_bad_arguments(tmp_path: Path, name: str, call, exc) -> None:
    w = SegmentWriter(tmp_path, 1)
    with pytest.raises(exc):
        call(w)
    # Nothing was queued, and the writer still works.
    assert w.append(bytearray(16), None, 12)[:2] == (1, 1), name
    w.close()


def test_lifecycle_errors(tmp_path: Path) -> None:
    seg_path(tmp_path, 5).write_bytes(b"old")
    with pytest.raises(FileExistsError):
        SegmentWriter(tmp_path, 5)
    with pytest.raises(FileNotFoundError):
        SegmentWriter(tmp_path / "missing", 1)
    for bad in ({"first_segment": -1}, {"segment_bytes": 0}, {"max_batch": 0}):
        with pytest.raises(ValueError):
            SegmentWriter(tmp_path, **{"first_segment": 1, **bad})
    w = SegmentWriter(tmp_path, 6)
    w.append(bytearray(16), b"x", 12)
    w.close()
    w.close()  # idempotent
    assert w.completed() == [(1, 0)]
    assert w.completed() == []
    with pytest.raises(RuntimeError):
        w.append(bytearray(16), b"x", 12)
    with pytest.raises(RuntimeError):
        w.roll()
    w.flush()  # nothing left: returns
    assert w.stats()["records"] == 1
    assert seg_path(tmp_path, 5).read_bytes() == b"old"
    with SegmentWriter(tmp_path, 7) as w2:
        w2.append(bytearray(16), None, 12)
    assert seg_path(tmp_path, 7).stat().st_size == 16


def test_later_segment_exists_breaks_writer(tmp_path: Path) -> None:
    seg_path(tmp_path, 2).write_bytes(b"not ours")
    w = SegmentWriter(tmp_path, 1, segment_bytes=32)
    w.append(bytearray(16), b"a" * 16, 12)
    w.flush()
    assert w.completed() == [(1, 0)]
    w.append(bytearray(16), b"b", 12)  # goes to segment 2, which exists: O_EXCL fails
    w.flush()
    got = w.completed()
    assert got == [(2, errno.EEXIST)], f"got {got}, want [(2, EEXIST)]"
    with pytest.raises(FileExistsError):
        w.append(bytearray(16), None, 12)
    assert seg_path(tmp_path, 2).read_bytes() == b"not ours"
    w.close()


EFBIG_SCRIPT = textwrap.dedent(
    """
    import errno, os, resource, signal, sys
    from mta._native.spool import SegmentWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    d = sys.argv[1]
    w = SegmentWriter(d, 1, segment_bytes=1 << 20, prologue=b"P" * 24)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    t1 = w.append(bytearray(16), b"x" * 60_000, 12)
    w.flush()
    assert w.completed() == [(1, 0)]
    # Crosses the limit: the WRITEV comes back short, the pwritev of the rest gets EFBIG.
    w.append(bytearray(16), b"y" * 60_000, 12)
    w.flush()
    got = w.completed()
    assert got == [(2, errno.EFBIG)], f"got {got}"
    assert w.stats()["short_writes"] == 1 and w.stats()["failed_batches"] == 1
    try:
        w.append(bytearray(16), b"z", 12)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
    else:
        raise AssertionError("append after a failed batch did not raise")
    # The fault clears (here: a record that fits); resume() continues in a fresh
    # segment, never in the one whose last write failed.
    w.resume()
    t, seg, off = w.append(bytearray(16), b"z" * 1000, 12)
    assert (seg, off) == (2, 24), (seg, off)
    w.flush()
    assert w.completed() == [(t, 0)]
    # A failing batch that created its segment: the file goes (nothing acknowledged in it).
    w.roll()
    w.append(bytearray(16), b"w" * 200_000, 12)
    w.flush()
    assert w.completed()[0][1] == errno.EFBIG
    assert sorted(os.listdir(d)) == ["00000001.seg", "00000002.seg"], os.listdir(d)
    w.resume()
    t, seg, off = w.append(bytearray(16), b"v", 12)
    w.flush()
    assert w.completed() == [(t, 0)] and (seg, off) == (4, 24), (seg, off)
    w.close()
    print("ok")
    """
)


def test_write_error_then_resume_in_a_fresh_segment(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", EFBIG_SCRIPT, str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert seg_path(tmp_path, 1).stat().st_size == 100_000
    assert seg_path(tmp_path, 2).read_bytes()[:24] == b"P" * 24
    assert seg_path(tmp_path, 4).stat().st_size == 24 + 17


def test_prologue_opens_every_segment(tmp_path: Path) -> None:
    prologue = b"SEGMENT-HEADER-24-BYTES!"
    with SegmentWriter(tmp_path, 1, segment_bytes=1000, prologue=prologue) as w:
        placed = [w.append(bytearray(16), b"r" * 300, 12) for _ in range(7)]
        w.flush()
        assert all(err == 0 for _, err in w.completed())
    # 24 + 3 * 316 fits 1000: three records per segment, each after the prologue.
    assert [(seg, off) for _, seg, off in placed] == \
        [(1, 24), (1, 340), (1, 656), (2, 24), (2, 340), (2, 656), (3, 24)]
    for no in (1, 2, 3):
        data = seg_path(tmp_path, no).read_bytes()
        assert data[:24] == prologue and seg_path(tmp_path, no).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        SegmentWriter(tmp_path, 9, segment_bytes=16, prologue=prologue)


def _completed_within(w: SegmentWriter, seconds: float) -> list[tuple[int, int]]:
    """completed() polled until something is there or `seconds` pass."""
    import time
    end = time.monotonic() + seconds
    while True:
        done = w.completed()
        if done or time.monotonic() >= end:
            return done
        time.sleep(0.002)


def test_lazy_record_waits_for_an_urgent_one_and_shares_its_batch(tmp_path: Path) -> None:
    rng = random.Random(7)
    w = SegmentWriter(tmp_path, 1, lazy_delay=30.0)
    lazy_head = make_head(rng, 10)
    t1, seg1, off1 = w.append(lazy_head, None, CRC_OFFSET, lazy=True)
    assert _completed_within(w, 0.3) == [], "got a lazy record synced at once, want it to wait"
    assert w.stats()["batches"] == 0
    urgent_head = make_head(rng, 10)
    t2, seg2, off2 = w.append(urgent_head, b"body", CRC_OFFSET)
    done = _completed_within(w, 5.0)
    while len(done) < 2:
        done += _completed_within(w, 5.0)
    assert done == [(t1, 0), (t2, 0)]
    st = w.stats()
    assert (st["batches"], st["records"], st["syncs"]) == (1, 2, 1), \
        f"got {st}, want both records in one batch with one fdatasync"
    check_record(tmp_path, seg1, off1, bytes(lazy_head), b"")
    check_record(tmp_path, seg2, off2, bytes(urgent_head), b"body")
    w.close()


def test_lazy_record_alone_is_synced_after_its_delay(tmp_path: Path) -> None:
    import time
    w = SegmentWriter(tmp_path, 1, lazy_delay=0.2)
    t0 = time.monotonic()
    ticket, seg, off = w.append(make_head(random.Random(1), 4), None, CRC_OFFSET, lazy=True)
    done = _completed_within(w, 5.0)
    took = time.monotonic() - t0
    assert done == [(ticket, 0)]
    assert 0.15 <= took < 3.0, f"got the lazy record synced after {took:.3f}s, want about 0.2s"


def test_flush_and_close_do_not_wait_for_lazy_records(tmp_path: Path) -> None:
    import time
    w = SegmentWriter(tmp_path, 1, lazy_delay=30.0)
    a, *_ = w.append(make_head(random.Random(2), 4), None, CRC_OFFSET, lazy=True)
    t0 = time.monotonic()
    w.flush()
    assert time.monotonic() - t0 < 5.0
    assert w.completed() == [(a, 0)]
    b, seg, off = w.append(make_head(random.Random(3), 4), b"x", CRC_OFFSET, lazy=True)
    t0 = time.monotonic()
    w.close()
    assert time.monotonic() - t0 < 5.0, "got close() waiting out the lazy delay"
    assert w.completed() == [(b, 0)]
    assert seg_path(tmp_path, seg).stat().st_size == off + PREFIX + 4 + 1


def test_lazy_delay_zero_makes_lazy_records_urgent(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, 1)
    t, *_ = w.append(make_head(random.Random(4), 4), None, CRC_OFFSET, lazy=True)
    assert _completed_within(w, 5.0) == [(t, 0)]
    w.close()
    with pytest.raises(ValueError):
        SegmentWriter(tmp_path / "x", 1, lazy_delay=-1.0)
