"""The Python spool layer over the native writer: store, read, tombstones,
reclamation, and the start-up scan's handling of torn and corrupt records."""
from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from pathlib import Path

import orjson
import pytest
from tmpfs import fill, tmpfs

from mta.model.envelope import Envelope, Recipient
from mta.model.ids import new_id
from mta.model.replies import REPLIES
from mta.spool import Spool, SpoolError
from mta.spool import records as rec
from mta.spool.recovery import list_segments, scan, segment_path


def run(coro):
    return asyncio.run(coro)


async def _fill(directory: str, n: int, segment_size: int = 1 << 20, size: int = 1000) -> dict[bytes, bytes]:
    spool = Spool(directory, segment_size=segment_size)
    spool.open(asyncio.get_running_loop())
    sent = {}
    futs = []
    for i in range(n):
        msg_id = new_id()
        content = bytearray(b"Subject: %d\r\n\r\n" % i + b"x" * size + b"\r\n")
        sent[msg_id] = bytes(content)
        futs.append(spool.store(msg_id, Envelope(msg_id.hex(), "a@b", [Recipient("c@d")]),
                                b"Received: test\r\n", content))
    await asyncio.gather(*futs)
    for msg_id, content in sent.items():
        env, stored = spool.read(msg_id)
        assert stored == b"Received: test\r\n" + content, "got different content, want what was stored"
        assert env.id == msg_id.hex()
    await spool.close()
    return sent


def test_store_then_recover(tmp_path):
    sent = run(_fill(str(tmp_path), 300, segment_size=64 << 10))
    found = scan(str(tmp_path))
    assert set(found.messages) == set(sent), "got a different set of ids after the scan, want all stored"
    assert len(found.segments) > 1, "want several segments with a 64 KiB segment size"
    assert not found.corrupt and not found.torn


def test_tombstones_reclaim_segments(tmp_path):
    async def main():
        sent = await _fill(str(tmp_path), 200, segment_size=32 << 10)
        spool = Spool(str(tmp_path), segment_size=32 << 10)
        spool.open(asyncio.get_running_loop())
        assert len(spool) == 200
        ids = list(sent)
        await spool.remove(ids[:150])
        left = list_segments(str(tmp_path))
        await spool.remove(ids[150:])
        assert len(spool) == 0
        await spool.close()
        return left
    segments_mid = run(main())
    found = scan(str(tmp_path))
    assert not found.messages, f"got {len(found.messages)} messages back, want 0 after tombstoning all"
    # Only segments still needed (current writer segments) may remain.
    assert len(list_segments(str(tmp_path))) <= 3, f"got {list_segments(str(tmp_path))}, want reclaimed"
    assert segments_mid, "some segments were still live midway"


def test_tombstone_segment_kept_while_it_protects_older_messages(tmp_path):
    """A segment holding tombstones must outlive the segments whose messages it finishes."""
    async def main():
        sent = await _fill(str(tmp_path), 40, segment_size=16 << 10)  # several segments
        spool = Spool(str(tmp_path), segment_size=16 << 10)
        spool.open(asyncio.get_running_loop())
        ids = list(sent)
        await spool.remove(ids[:1])   # one message of the first segment
        await spool.close()
        return ids
    ids = run(main())
    found = scan(str(tmp_path))
    assert ids[0] not in found.messages, "got the finished message back, want it to stay finished"
    assert len(found.messages) == 39


def _corrupt_at(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_torn_tail_is_not_a_message(tmp_path):
    sent = run(_fill(str(tmp_path), 10))
    seg = segment_path(str(tmp_path), list_segments(str(tmp_path))[0])
    size = os.path.getsize(seg)
    os.truncate(seg, size - 100)   # the last record loses its end, as in a power cut
    found = scan(str(tmp_path))
    assert len(found.messages) == 9, f"got {len(found.messages)}, want 9 intact messages"
    assert len(found.torn) == 1 and found.torn[0].reason == "length runs past the end of the segment"
    assert set(found.messages) < set(sent)


def test_checksum_mismatch_is_quarantined_and_scan_continues(tmp_path):
    run(_fill(str(tmp_path), 10))
    first = scan(str(tmp_path))
    victim = sorted(first.messages.items(), key=lambda kv: kv[1].offset)[4]
    seg = segment_path(str(tmp_path), victim[1].segment)
    _corrupt_at(seg, victim[1].offset + victim[1].length - 10)   # flip a content byte
    found = scan(str(tmp_path))
    assert victim[0] not in found.messages, "got the damaged message back, want it refused"
    assert len(found.messages) == 9, "records after the damaged one must still be found"
    assert len(found.corrupt) == 1 and found.corrupt[0].reason == "checksum mismatch"
    saved = found.corrupt[0].saved_as
    assert os.path.exists(saved) and os.path.getsize(saved) == victim[1].length, \
        "the damaged record must be kept in corrupt/, not deleted"


@pytest.mark.parametrize("field_offset,reason", [
    (0, "bad magic"),            # magic
    (4, "unknown version"),      # version byte
    (5, "unknown record type"),  # type byte
])
def test_bad_headers_are_refused(tmp_path, field_offset, reason):
    run(_fill(str(tmp_path), 5))
    first = scan(str(tmp_path))
    victim = sorted(first.messages.items(), key=lambda kv: kv[1].offset)[2]
    _corrupt_at(segment_path(str(tmp_path), victim[1].segment), victim[1].offset + field_offset)
    found = scan(str(tmp_path))
    assert victim[0] not in found.messages
    assert len(found.messages) == 4
    reasons = [c.reason for c in found.corrupt]
    assert any(r.startswith(reason) for r in reasons), f"got {reasons}, want {reason!r}"


def test_writer_never_appends_to_an_old_segment(tmp_path):
    run(_fill(str(tmp_path), 3))
    run(_fill(str(tmp_path), 3))
    assert list_segments(str(tmp_path)) == [1, 2], "each start must open a fresh segment"
    assert len(scan(str(tmp_path)).messages) == 6


def test_record_layout_matches_native_writer_crc_offset(tmp_path):
    nonce = b"\x07" * rec.NONCE_SIZE
    head = rec.message_head(b"\x01" * 16, b"{}", b"", 0, nonce)
    assert rec.HEADER_SIZE == 24 and rec.CRC_OFFSET == 12 and rec.CRC_START == 16
    magic, version, rtype, _, total, crc, got_nonce = rec.HEADER.unpack_from(head, 0)
    assert (magic, version, rtype, total, crc, got_nonce) == \
        (b"MTAR", 2, rec.RecordType.MESSAGE, len(head), 0, nonce)
    # Every segment the writer creates opens with the spool's SEGMENT record.
    run(_fill(str(tmp_path), 3))
    data = Path(segment_path(str(tmp_path), 1)).read_bytes()
    rtype, total = rec.parse_header(data, 0, len(data), rec.VERSION)
    rec.check_crc(data, 0, total)
    assert (rtype, total) == (rec.RecordType.SEGMENT, rec.HEADER_SIZE)
    assert rec.record_nonce(data, 0) == rec.record_nonce(data, rec.HEADER_SIZE), \
        "want every record of the segment to carry the segment's nonce"


# -- forged records in message content (issue 10) -----------------------------------------
#
# A message body is stored verbatim, so an outsider can put bytes in it that look like a
# record: magic, version, a MESSAGE type, a correct length and CRC, a plausible envelope.
# Recovery must never queue such a record, whatever damage precedes it.

FORGED_ID = bytes.fromhex("0badc0de" * 4)


def _forged_record(version: int) -> bytes:
    """A record as an attacker would craft it: valid in every way a reader can check
    without the segment's nonce (here a guessed one for version 2)."""
    env = orjson.dumps({"id": FORGED_ID.hex(), "sender": "attacker@evil.example",
                        "rcpts": [["victim@example.com", None, None]], "size": 5})
    body = rec.MESSAGE_FIXED.pack(FORGED_ID, len(env)) + env + b"Hello"
    if version == 1:
        head = bytearray(rec.HEADER_V1.pack(rec.MAGIC, 1, rec.RecordType.MESSAGE, 0,
                                            rec.HEADER_V1_SIZE + len(body), 0))
    else:
        head = bytearray(rec.HEADER.pack(rec.MAGIC, 2, rec.RecordType.MESSAGE, 0,
                                         rec.HEADER_SIZE + len(body), 0, os.urandom(rec.NONCE_SIZE)))
    raw = head + body
    struct.pack_into("<I", raw, rec.CRC_OFFSET, zlib.crc32(raw[rec.CRC_START:]))
    return bytes(raw)


async def _store_carrier(directory: str) -> tuple[list[bytes], bytes]:
    """Three messages; the middle one (the carrier) holds both forged records."""
    spool = Spool(directory)
    spool.open(asyncio.get_running_loop())
    ids = [new_id() for _ in range(3)]
    bodies = [b"Subject: before\r\n\r\nplain\r\n",
              b"Subject: carrier\r\n\r\n" + b"x" * 3000 + _forged_record(1) + b"y" * 100
              + _forged_record(2) + b"z" * 3000 + b"\r\n",
              b"Subject: after\r\n\r\nplain\r\n"]
    for msg_id, body in zip(ids, bodies):
        await spool.store(msg_id, Envelope(msg_id.hex(), "a@b", [Recipient("c@d")]),
                          b"Received: test\r\n", bytearray(body))
    await spool.close()
    return ids, bodies[1]


@pytest.mark.parametrize("damage", ["body", "length", "torn"])
def test_record_forged_in_a_body_is_never_recovered(tmp_path, damage):
    """The carrier is damaged before its forged records: by a flipped body byte, by a
    wrong length field (resync must search), or by a crash mid-write (torn tail)."""
    ids, carrier = run(_store_carrier(str(tmp_path)))
    first = scan(str(tmp_path))
    loc = first.messages[ids[1]]
    path = segment_path(str(tmp_path), loc.segment)
    forged_at = loc.offset + loc.length - len(carrier) + carrier.index(rec.MAGIC)
    if damage == "body":
        _corrupt_at(path, forged_at - 10)
    elif damage == "length":
        with open(path, "r+b") as f:
            f.seek(loc.offset + 8)
            f.write(struct.pack("<I", loc.length - 7))
    else:
        os.truncate(path, forged_at + 400)   # both forged records whole, the carrier cut
    found = scan(str(tmp_path))
    assert FORGED_ID not in found.messages, "got the record forged in a body queued as a message"
    assert ids[1] not in found.messages, "got the damaged carrier back, want it refused"
    assert ids[0] in found.messages
    if damage == "torn":
        assert len(found.torn) == 1 and not found.corrupt
    else:
        assert ids[2] in found.messages, "want the record after the damage found again"
        assert len(found.corrupt) == 1


# -- version 1 segments (written before the nonce) ------------------------------------------


def _v1_record(rtype: int, body: bytes) -> bytes:
    raw = bytearray(rec.HEADER_V1.pack(rec.MAGIC, 1, rtype, 0, rec.HEADER_V1_SIZE + len(body), 0)) + body
    struct.pack_into("<I", raw, rec.CRC_OFFSET, zlib.crc32(raw[rec.CRC_START:]))
    return bytes(raw)


def _v1_message(msg_id: bytes, content: bytes) -> bytes:
    env = orjson.dumps({"id": msg_id.hex(), "sender": "a@b", "rcpts": [["c@d", None, None]]})
    return _v1_record(rec.RecordType.MESSAGE, rec.MESSAGE_FIXED.pack(msg_id, len(env)) + env + content)


def _write_v1_spool(directory: str, contents: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Segment 1 as the version 1 writer left it; -> (ids, record offsets)."""
    ids = [new_id() for _ in contents]
    data, offsets = b"", []
    for msg_id, content in zip(ids, contents):
        offsets.append(len(data))
        data += _v1_message(msg_id, content)
    finished = new_id()   # a message finished before the upgrade
    offsets.append(len(data))
    data += _v1_message(finished, b"done\r\n")
    data += _v1_record(rec.RecordType.TOMBSTONE, rec.COUNT.pack(1) + finished)
    with open(segment_path(directory, 1), "wb") as f:
        f.write(data)
    return ids, offsets


def test_version1_spool_recovers_after_upgrade(tmp_path):
    contents = [b"Subject: %d\r\n\r\nold mail\r\n" % i for i in range(5)]
    ids, _ = _write_v1_spool(str(tmp_path), contents)

    async def main():
        spool = Spool(str(tmp_path))
        found = spool.open(asyncio.get_running_loop())
        assert set(found.messages) == set(ids) and found.finished == 1
        assert not found.corrupt and not found.torn
        for msg_id, content in zip(ids, contents):
            assert spool.read(msg_id)[1] == content, "want the v1 record read back as written"
        new = new_id()
        await spool.store(new, Envelope(new.hex(), "a@b", [Recipient("c@d")]),
                          b"", bytearray(b"new\r\n"))
        await spool.remove(ids[:2])
        await spool.close()
        return new
    new = run(main())
    found = scan(str(tmp_path))
    assert set(found.messages) == set(ids[2:]) | {new}
    assert list_segments(str(tmp_path)) == [1, 2], "want new records in a fresh v2 segment"


@pytest.mark.parametrize("damage", ["body", "length"])
def test_version1_segment_is_not_searched_after_damage(tmp_path, damage):
    """A v1 segment has no nonce: after damage nothing in it tells a real record from
    one crafted in a body, not even the damaged record's length field (outside the
    CRC: one flipped bit can name a crafted record), so the rest is quarantined whole."""
    contents = [b"a\r\n", b"x" * 2000 + _forged_record(1) + b"y" * 2000, b"c\r\n", b"d\r\n"]
    ids, offsets = _write_v1_spool(str(tmp_path), contents)
    path = segment_path(str(tmp_path), 1)
    if damage == "body":
        _corrupt_at(path, offsets[1] + 500)
    else:                                  # the length now names the crafted record
        forged_at = offsets[1] + len(_v1_message(ids[1], contents[1])) - len(contents[1]) + 2000
        with open(path, "r+b") as f:
            f.seek(offsets[1] + 8)
            f.write(struct.pack("<I", forged_at - offsets[1]))
    found = scan(str(tmp_path))
    assert FORGED_ID not in found.messages, "got the record crafted in a body queued"
    assert set(found.messages) == {ids[0]}
    assert len(found.corrupt) == 1
    bad = found.corrupt[0]
    assert "not searched" in bad.reason
    assert bad.length == os.path.getsize(path) - offsets[1], "want the rest quarantined whole"
    assert os.stat(bad.saved_as).st_mode & 0o777 == 0o600


def test_spool_directory_and_files_are_private(tmp_path):
    directory = str(tmp_path / "spool")
    run(_fill(directory, 2))
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(segment_path(directory, 1)).st_mode & 0o777 == 0o600


# -- faults: a full disk, owed tombstones, backpressure (issue 10) ------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, unmounted at the end."""
    with tmpfs(tmp_path / "spool", "2m") as path:
        yield path


ENVELOPE = Envelope("", "a@b", [Recipient("c@d")])


def test_full_disk_owes_tombstones_and_recovers(small_tmpfs):
    directory = str(small_tmpfs / "q")
    filler = small_tmpfs / "filler"

    async def main():
        spool = Spool(directory, segment_size=1 << 20)
        spool.open(asyncio.get_running_loop())
        kept = [new_id() for _ in range(3)]
        for msg_id in kept:
            await spool.store(msg_id, ENVELOPE, b"", bytearray(b"x" * 1000))
        assert fill(small_tmpfs) == filler
        spool.finish(kept[0])              # delivered: its tombstone must not be lost
        refused = new_id()
        with pytest.raises(SpoolError):
            await spool.store(refused, ENVELOPE, b"", bytearray(b"y" * 100_000))
        await asyncio.sleep(0.1)
        assert not spool.writable and spool.admission() == "SPOOL_ERROR"
        assert spool.health()["owed_tombstones"] >= 1
        await asyncio.sleep(1.2)           # probes fail while the disk stays full
        assert not spool.writable and spool.health()["failed_batches"] >= 2
        filler.unlink()
        for _ in range(40):
            await asyncio.sleep(0.1)
            if spool.writable:
                break
        assert spool.writable, "want the spool writable again once space returned, no restart"
        assert spool.admission() is None
        assert spool.health()["owed_tombstones"] == 0
        after = new_id()
        await spool.store(after, ENVELOPE, b"", bytearray(b"z" * 1000))
        await spool.close()
        return kept, refused, after
    kept, refused, after = run(main())
    found = scan(directory)
    assert kept[0] not in found.messages, "got the delivered message back: its tombstone was lost"
    assert refused not in found.messages, "got a message that was answered 451 back"
    assert set(found.messages) == {kept[1], kept[2], after}
    assert not [n for n in os.listdir(directory) if n.endswith(".seg") and
                os.path.getsize(os.path.join(directory, n)) == 0], "want no empty segments left"


def test_admission_by_queue_size_and_free_space(tmp_path):
    async def main():
        spool = Spool(str(tmp_path), max_queued_messages=2)
        spool.open(asyncio.get_running_loop())
        assert spool.admission() is None
        ids = [new_id(), new_id()]
        for msg_id in ids:
            await spool.store(msg_id, ENVELOPE, b"", bytearray(b"x"))
        assert spool.admission() == "QUEUE_FULL"
        await spool.remove(ids[:1])
        assert spool.admission() is None, "want QUEUE_FULL to clear by itself"
        spool.min_free_space = 1
        assert spool.admission() is None   # samples statvfs
        spool.min_free_space = 1 << 62     # more than any disk has
        assert spool.admission() is None, "want statvfs sampled at most once a second"
        spool._space_checked -= 2          # a second later
        assert spool.admission() == "SPOOL_FULL"
        spool.min_free_space = 0
        spool.min_free_percent = 100
        spool._space_checked -= 2
        assert spool.admission() == "SPOOL_FULL"
        spool.min_free_percent = 0
        spool._space_checked -= 2
        assert spool.admission() is None
        await spool.close()
        assert spool.admission() == "SPOOL_ERROR", "want a closed spool refused"
    run(main())
    assert REPLIES["SPOOL_FULL"][:2] == (452, "4.3.1") and REPLIES["QUEUE_FULL"][:2] == (451, "4.3.2")
    assert REPLIES["SPOOL_ERROR"][0] == 451


def test_reserve_is_released_on_enospc_and_restored(small_tmpfs):
    """A disk full of our own queue: releasing the reserve lets tombstones through."""
    directory = str(small_tmpfs)

    async def main():
        spool = Spool(directory, segment_size=1 << 20, reserve_space=512 << 10)
        spool.open(asyncio.get_running_loop())
        reserve = os.path.join(directory, "reserve")
        assert os.path.getsize(reserve) == 512 << 10 and os.stat(reserve).st_mode & 0o777 == 0o600
        stored = []
        with pytest.raises(SpoolError):
            while True:                    # the queue fills the disk
                msg_id = new_id()
                await spool.store(msg_id, ENVELOPE, b"", bytearray(b"m" * 50_000))
                stored.append(msg_id)
        assert not os.path.exists(reserve), "want the reserve released at ENOSPC"
        for _ in range(20):
            await asyncio.sleep(0.1)
            if spool.writable:
                break
        assert spool.writable, "want tombstones writable again from the reserve's space"
        spool._space_checked -= 2
        assert spool.admission() == "SPOOL_FULL", "want new mail refused until the reserve is back"
        await spool.remove(stored)         # deliveries finish: segments are reclaimed
        spool._space_checked -= 2
        assert spool.admission() is None and os.path.getsize(reserve) == 512 << 10
        await spool.close()
        return stored
    stored = run(main())
    assert not scan(directory).messages
    assert len(stored) > 10


@pytest.mark.parametrize("version", [1, 2])
def test_scan_after_damage_is_linear_in_crafted_magics(tmp_path, version):
    """A body packed with record-like headers (each claiming the rest of the body)
    after a damaged record: every candidate is rejected in O(1), never by a CRC over
    the rest of the segment (which would be quadratic: minutes for this megabyte)."""
    size = rec.HEADER_SIZE if version == 2 else rec.HEADER_V1_SIZE
    n = (1 << 20) // size
    body = b"".join(struct.pack("<4sBBHII", rec.MAGIC, version, rec.RecordType.MESSAGE, 0,
                                (n - i) * size, 0).ljust(size, b"\0") for i in range(n))
    if version == 1:
        _, offsets = _write_v1_spool(str(tmp_path), [b"a\r\n", body, b"c\r\n"])
        damage_at = offsets[1] + 8                # the carrier's length field
    else:
        async def store():
            spool = Spool(str(tmp_path))
            spool.open(asyncio.get_running_loop())
            for content in (b"a\r\n", body, b"c\r\n"):
                await spool.store(new_id(), ENVELOPE, b"", bytearray(content))
            await spool.close()
        run(store())
        carrier = sorted(scan(str(tmp_path)).messages.values(), key=lambda loc: loc.offset)[1]
        damage_at = carrier.offset + 8
    path = segment_path(str(tmp_path), 1)
    with open(path, "r+b") as f:
        f.seek(damage_at)
        f.write(struct.pack("<I", 100))
    t0 = time.monotonic()
    found = scan(str(tmp_path))
    took = time.monotonic() - t0
    assert took < 5.0, f"got {took:.1f}s for a 1 MiB segment, want linear time"
    assert len(found.messages) == (2 if version == 2 else 1)


def test_envelope_reads_only_the_record_head(tmp_path):
    """Spool.envelope: the stored envelope of a live message, from the hot cache or from
    the record's head (a large envelope takes a second read), KeyError once finished."""
    import asyncio

    from mta.model.envelope import Envelope, Recipient
    from mta.spool import Spool

    async def main():
        spool = Spool(str(tmp_path), hot_cache=0)
        spool.open(asyncio.get_running_loop())
        small = Envelope("a", "s@x.test", [Recipient("r@y.test")], "helo", "127.0.0.1", 1)
        many = Envelope("b", "s@x.test", [Recipient(f"r{i}@y.test") for i in range(500)],
                        "helo", "127.0.0.1", 1)
        ids = [b"A" * 16, b"B" * 16]
        for msg_id, env in zip(ids, (small, many)):
            await spool.store(msg_id, env, b"", b"Subject: x\r\n\r\n" + b"x" * 100000)
        got = [spool.envelope(i) for i in ids]
        assert [len(e.recipients) for e in got] == [1, 500]
        assert got[1].recipients[499].address == "r499@y.test"
        spool.finish(ids[0])
        with pytest.raises(KeyError):
            spool.envelope(ids[0])
        await spool.close()

    asyncio.run(main())
