"""The Python spool layer over the native writer: store, read, tombstones,
reclamation, and the start-up scan's handling of torn and corrupt records."""
from __future__ import annotations

import asyncio
import os

import pytest

from mta.ids import new_id
from mta.spool import Spool, records as rec
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
        futs.append(spool.store(msg_id, {"id": msg_id.hex(), "sender": "a@b", "rcpts": [["c@d", None, None]]},
                                b"Received: test\r\n", content))
    await asyncio.gather(*futs)
    for msg_id, content in sent.items():
        env, stored = spool.read(msg_id)
        assert stored == b"Received: test\r\n" + content, "got different content, want what was stored"
        assert env["id"] == msg_id.hex()
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


def test_record_layout_matches_native_writer_crc_offset():
    head = rec.message_head(b"\x01" * 16, b"{}", b"", 0)
    assert rec.HEADER_SIZE == 16 and rec.CRC_OFFSET == 12
    magic, version, rtype, _, total, crc = rec.HEADER.unpack_from(head, 0)
    assert (magic, version, rtype, total, crc) == (b"MTAR", 1, rec.RecordType.MESSAGE, len(head), 0)
