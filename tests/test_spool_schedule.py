"""SCHEDULE records (issue 13): a deferred entry's attempts, due time and last reply
survive a restart, the newest state wins, and reclaiming a segment that holds the
newest state of a live message rewrites it forward first."""
from __future__ import annotations

import asyncio

import pytest

from mta.model.envelope import Envelope, Recipient
from mta.model.ids import new_id
from mta.spool import Spool
from mta.spool import records as rec
from mta.spool.recovery import list_segments, scan


def run(coro):
    return asyncio.run(coro)


async def _settle(spool: Spool) -> None:
    for _ in range(20):   # a loop turn to append, then the writer's completion
        await asyncio.sleep(0.01)


async def _store(spool: Spool, n: int, rcpts=("c@d.test",), size: int = 1000) -> list[bytes]:
    ids, futs = [], []
    for _ in range(n):
        msg_id = new_id()
        ids.append(msg_id)
        futs.append(spool.store(msg_id, Envelope(msg_id.hex(), "a@b.test",
                                                 [Recipient(r) for r in rcpts]),
                                b"Received: test\r\n", b"x" * size + b"\r\n"))
    await asyncio.gather(*futs)
    return ids


def test_record_round_trip():
    s = rec.Schedule(new_id(), "d.test", 3, 1234.5, 1, 1000.25, (0, 2), {1: rec.DELIVERED,
                                                                       3: rec.BOUNCED},
                     "451 4.2.0 greylisted")
    assert rec.parse_schedule_payload(rec.schedule_payload(s)) == s
    long = rec.Schedule(s.msg_id, "d.test", 1, 1.0, 0, 1.0, (0,), {}, "é" * 1000)
    back = rec.parse_schedule_payload(rec.schedule_payload(long))
    assert len(back.reply.encode()) <= rec.MAX_REPLY, "want the reply cut to MAX_REPLY bytes"


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_damaged_payload_is_refused(cut):
    s = rec.Schedule(new_id(), "d.test", 3, 1234.5, 0, 1000.0, (0,), {}, "451 x")
    with pytest.raises(rec.RecordError):
        rec.parse_schedule_payload(rec.schedule_payload(s)[:-cut])


def test_schedule_survives_a_restart_and_newest_wins(tmp_path):
    async def main():
        spool = Spool(str(tmp_path))
        spool.open(asyncio.get_running_loop())
        a, b, gone = await _store(spool, 3)
        spool.note_schedule(a, "d.test", 1, 1000.0, pending=(0,), reply="451 first")
        await _settle(spool)
        spool.note_schedule(a, "d.test", 2, 2000.0, pending=(0,), reply="451 second")
        spool.note_schedule(b, "d.test", 5, 3000.0, flags=1, pending=(0,), reply="421 busy")
        spool.note_schedule(gone, "d.test", 1, 4000.0, pending=(0,))
        await spool.remove([gone])
        await _settle(spool)
        assert [s.attempts for s in spool.schedules(a)] == [2]
        await spool.close()
        return a, b, gone
    a, b, gone = run(main())
    found = scan(str(tmp_path))
    assert set(found.schedules) == {a, b}, "want schedules for live messages only"
    sa, _ = found.schedules[a]["d.test"]
    assert (sa.attempts, sa.due, sa.reply) == (2, 2000.0, "451 second")
    sb, _ = found.schedules[b]["d.test"]
    assert (sb.attempts, sb.due, sb.flags) == (5, 3000.0, 1)

    async def again():
        spool = Spool(str(tmp_path))
        spool.open(asyncio.get_running_loop())
        states = spool.schedules(a)
        await spool.close()
        return states
    assert [s.reply for s in run(again())] == ["451 second"]


def test_entries_of_two_domains_keep_their_own_state(tmp_path):
    async def main():
        spool = Spool(str(tmp_path))
        spool.open(asyncio.get_running_loop())
        [m] = await _store(spool, 1, rcpts=("x@one.test", "y@two.test"))
        spool.note_schedule(m, "one.test", 1, 100.0, pending=(0,))
        spool.note_schedule(m, "two.test", 4, 400.0, pending=(1,))
        spool.note_schedule(m, "one.test", 2, 200.0, pending=(0,))
        await _settle(spool)
        states = {s.domain: s.attempts for s in spool.schedules(m)}
        await spool.close()
        return m, states
    m, states = run(main())
    assert states == {"one.test": 2, "two.test": 4}
    found = scan(str(tmp_path))
    assert {d: s.attempts for d, (s, _) in found.schedules[m].items()} == states


def test_reclaimed_segment_rewrites_the_newest_state_forward(tmp_path):
    """The newest state of a live message sits in a segment whose own messages all
    finish: the segment goes, the state does not."""
    async def main():
        spool = Spool(str(tmp_path), segment_size=16 << 10)
        spool.open(asyncio.get_running_loop())
        [keep] = await _store(spool, 1)
        filler = await _store(spool, 20, size=3000)   # several segments after keep's
        spool.note_schedule(keep, "d.test", 7, 7777.0, pending=(0,), reply="451 seven")
        await _settle(spool)
        where = spool._sched[keep][1] >> 64
        later = await _store(spool, 20, size=3000)    # the writer moves past that segment
        await spool.remove(filler + later)
        await _settle(spool)
        segs = list_segments(str(tmp_path))
        states = spool.schedules(keep)
        await spool.close()
        return keep, where, segs, states
    keep, where, segs, states = run(main())
    assert where not in segs, f"want segment {where} (its messages finished) reclaimed: {segs}"
    assert [s.attempts for s in states] == [7]
    found = scan(str(tmp_path))
    s, loc = found.schedules[keep]["d.test"]
    assert (s.attempts, s.due, s.reply) == (7, 7777.0, "451 seven")
    assert loc.segment != where


def test_reclamation_at_open_rewrites_forward(tmp_path):
    async def first():
        spool = Spool(str(tmp_path), segment_size=16 << 10)
        spool.open(asyncio.get_running_loop())
        [keep] = await _store(spool, 1)
        filler = await _store(spool, 10, size=3000)
        spool.note_schedule(keep, "d.test", 3, 333.0, pending=(0,))
        await _settle(spool)
        await _store(spool, 10, size=3000)
        await spool.close()
        return keep, filler
    keep, filler = run(first())

    async def second():
        spool = Spool(str(tmp_path), segment_size=16 << 10)
        spool.open(asyncio.get_running_loop())
        await spool.remove(filler)
        await _settle(spool)
        await spool.close()
    run(second())

    async def third():
        spool = Spool(str(tmp_path), segment_size=16 << 10)
        spool.open(asyncio.get_running_loop())   # reclaims at open: rewrites first
        await _settle(spool)
        states = spool.schedules(keep)
        await spool.close()
        return states
    assert [s.attempts for s in run(third())] == [3]
    s, _ = scan(str(tmp_path)).schedules[keep]["d.test"]
    assert s.attempts == 3


@pytest.mark.parametrize("due", [float("nan"), float("inf")])
def test_a_time_that_is_not_finite_is_refused(due):
    s = rec.Schedule(new_id(), "d.test", 1, due, 0, 1.0, (0,), {}, "")
    with pytest.raises(rec.RecordError):
        rec.parse_schedule_payload(rec.schedule_payload(s))


def test_segments_of_nothing_but_superseded_schedules_are_reclaimed(tmp_path):
    """A quiet spool whose only writes are deferrals of the same messages: the segments
    they fill go once newer states supersede theirs (not only at the next start)."""
    async def main():
        spool = Spool(str(tmp_path), segment_size=8 << 10)
        spool.open(asyncio.get_running_loop())
        ids = await _store(spool, 3, size=100)
        for n in range(400):   # ~100 KiB of SCHEDULE records: a dozen segments
            for msg_id in ids:
                spool.note_schedule(msg_id, "d.test", n, 1000.0 + n, pending=(0,),
                                    reply="451 4.2.0 greylisted " + "x" * 40)
            await asyncio.sleep(0)
        await _settle(spool)
        segs = list_segments(str(tmp_path))
        states = [s.attempts for i in ids for s in spool.schedules(i)]
        await spool.close()
        return ids, segs, states
    ids, segs, states = run(main())
    assert states == [399] * 3
    assert len(segs) <= 4, f"got {len(segs)} segments, want the superseded ones reclaimed"
    found = scan(str(tmp_path))
    assert [found.schedules[i]["d.test"][0].attempts for i in ids] == [399] * 3
