"""The Scheduler and ReadyQueue on virtual time (tests/virtual_time.py), no sleeps: due
times on the timer wheel, routing once per queue, route failures, the backlog when a
ready queue is full, round-robin between scheduled queues, class lanes and their
weights and rate limits, and operator suspension. The delivery side is a fake outlet
(a real ReadyQueue and a wake counter), as the queues' Outlet interface allows."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from delivery_fakes import make_id
from virtual_time import VirtualLoop

from mta.egress.sites import MxHost, Site
from mta.egress.throttle import Rate, Throttle
from mta.model.envelope import Envelope, Recipient
from mta.model.ids import id_text
from mta.model.queued import InsertReason, QueuedMessage
from mta.queues.ready import ReadyQueue
from mta.queues.scheduled import ScheduledQueue, Scheduler

SITE = Site("mx.example.net", (MxHost("mx.example.net", 10, ("127.0.0.1",)),), 25, 0.0)


class Outlet:
    """One ready queue for everything, as a dispatcher would hold it."""

    def __init__(self, capacity: int, clock) -> None:
        self.ready = ReadyQueue("s1", SITE, capacity, clock=clock)
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class Rig:
    def __init__(self, capacity: int = 100, route_delay: float = 0.0, fail: Exception | None = None):
        self.loop = VirtualLoop()
        self.outlet = Outlet(capacity, self.loop.time)
        self.routed: list[str] = []
        self.failures: list[tuple[QueuedMessage, Exception]] = []

        async def route(q: ScheduledQueue) -> Site:
            self.routed.append(q.name)
            await asyncio.sleep(route_delay)
            if fail is not None:
                raise fail
            return SITE

        self.scheduler = Scheduler(route=route, outlet_for=lambda q, site: self.outlet,
                                   on_route_failure=lambda m, e: self.failures.append((m, e)),
                                   clock=self.loop.clock, monotonic=self.loop.time)
        self.scheduler.start(self.loop)

    def submit(self, *rcpts: str, tenant: str | None = None) -> list[QueuedMessage]:
        msg_id = make_id(self.loop.clock())
        env = Envelope(id_text(msg_id), "a@x.test", [Recipient(r) for r in rcpts], tenant=tenant)
        return self.scheduler.submit(msg_id, env)

    def ready(self) -> list[QueuedMessage]:
        out = []
        while (m := self.outlet.ready.pop()) is not None:
            out.append(m)
        return out

    def close(self) -> None:
        self.scheduler.stop()
        self.loop.close()


@pytest.fixture
def rig():
    rigs = []

    def make(**kw) -> Rig:
        rigs.append(Rig(**kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_submit_splits_by_domain_and_routes_each_queue_once(rig):
    r = rig(route_delay=0.5)
    first = r.submit("a@one.test", "b@two.test", "c@one.test")
    more = r.submit("d@one.test")
    assert [(m.queue.domain, m.rcpts) for m in first] == [("one.test", (0, 2)), ("two.test", (1,))]
    r.loop.settle(0.1)
    assert len(r.outlet.ready) == 0, "ready before the route lookup ended"
    r.loop.settle(0.5)
    assert sorted(r.routed) == ["one.test", "two.test"], "one lookup per queue, not per message"
    got = r.ready()
    assert sorted(map(id, got)) == sorted(map(id, first + more)), "got losses or extras"
    assert got[0].queue is not got[1].queue, "want the two queues served in turn"
    assert got.index(first[0]) < got.index(more[0]), "want FIFO inside a queue"
    r.submit("e@one.test")
    r.loop.settle(0.001)
    assert sorted(r.routed) == ["one.test", "two.test"], "the cached route was looked up again"
    r.loop.settle(61)                                    # the 60 s route cache runs out
    r.submit("f@one.test")
    r.loop.settle(1)
    assert r.routed.count("one.test") == 2


def test_a_scheduled_retry_becomes_ready_at_its_due_time_not_before(rig):
    r = rig()
    (msg,) = r.submit("a@one.test")
    r.loop.settle(0.001)
    assert r.ready() == [msg]
    due = r.loop.clock() + 300
    r.scheduler.schedule(msg, due, InsertReason.TRANSIENT_FAILURE)
    assert msg.due == due and r.scheduler.wheel.count == 1
    r.loop.settle(299)
    assert len(r.outlet.ready) == 0, "ready before its due time"
    r.loop.settle(2)                      # the wheel fires within one tick (1 s) after due
    assert r.ready() == [msg] and msg.due == 0.0
    assert r.scheduler.inserts[InsertReason.TRANSIENT_FAILURE] == 2   # schedule + ready


def test_a_moved_message_leaves_a_stale_wheel_entry_that_does_nothing(rig):
    r = rig()
    (msg,) = r.submit("a@one.test")
    r.loop.settle(0.001)
    r.ready()
    r.scheduler.schedule(msg, r.loop.clock() + 10, InsertReason.TRANSIENT_FAILURE)
    r.scheduler.schedule(msg, r.loop.clock() + 100, InsertReason.TRANSIENT_FAILURE)
    r.loop.settle(20)
    assert len(r.outlet.ready) == 0, "the first (superseded) due time still fired"
    r.loop.settle(90)
    assert r.ready() == [msg]


def test_route_failure_reaches_every_waiting_message(rig):
    r = rig(route_delay=1.0, fail=LookupError("no such domain"))
    msgs = r.submit("a@gone.test") + r.submit("b@gone.test")
    r.loop.settle(2)
    assert [m for m, _ in r.failures] == msgs and r.routed == ["gone.test"]
    assert r.scheduler.queues["gone.test"].resolving is None


def test_full_ready_queue_parks_in_the_backlog_and_pops_refill_in_order(rig):
    r = rig(capacity=3)
    msgs = [m for _ in range(10) for m in r.submit("a@one.test")]
    r.loop.settle(0.001)
    q = msgs[0].queue
    assert len(r.outlet.ready) == 3 and len(q.backlog) == 7
    assert r.scheduler.inserts[InsertReason.READY_FULL] == 7
    assert r.outlet.wakes == 3, "the outlet is woken only for messages it holds"
    assert r.outlet.ready.backlog() == 7
    assert r.ready() == msgs, "got another order, want FIFO through the backlog"
    assert not q.backlog and r.outlet.ready.lanes == 0


def test_round_robin_between_scheduled_queues_of_one_ready_queue(rig):
    r = rig(capacity=1000)
    for _ in range(50):
        r.submit("a@one.test", tenant="big")
    for _ in range(3):
        r.submit("b@one.test", tenant="small")
    r.loop.settle(0.001)
    first = [m.queue.tenant for m in r.ready()[:6]]
    assert first == ["big", "small"] * 3, f"got {first}: one campaign must not starve another"


def test_round_robin_holds_through_the_backlog_too(rig):
    r = rig(capacity=2)
    for _ in range(20):
        r.submit("a@one.test", tenant="big")
    for _ in range(2):
        r.submit("b@one.test", tenant="small")
    r.loop.settle(0.001)
    got = [m.queue.tenant for m in r.ready()]
    assert Counter(got) == {"big": 20, "small": 2}
    assert "small" in got[:4], f"got {got[:6]}: a blocked queue waits behind a whole backlog"


def test_suspended_queue_holds_due_messages_until_resumed_on_time(rig):
    r = rig()
    (first,) = r.submit("a@one.test")
    r.loop.settle(0.001)
    r.ready()
    q = first.queue
    r.scheduler.suspend(q, 60)
    held = r.submit("b@one.test")
    r.loop.settle(59)
    assert len(r.outlet.ready) == 0 and list(q.held or ()) == held
    assert q.suspended_until > r.scheduler.clock()   # still suspended, one second to go
    r.loop.settle(2)
    assert r.ready() == held and q.held is None and not q.suspended_until


def test_hold_mode_queues_without_routing(rig):
    r = rig()
    r.scheduler.hold = True
    msgs = r.submit("a@one.test")
    r.loop.settle(5)
    assert r.routed == [] and list(msgs[0].queue.backlog) == msgs


def test_finished_queue_is_forgotten(rig):
    r = rig()
    (msg,) = r.submit("a@one.test")
    r.loop.settle(0.001)
    r.ready()
    r.scheduler.finished(msg)
    assert "one.test" not in r.scheduler.queues


# --- ReadyQueue lanes ---------------------------------------------------------------------


def _queue(name: str, klass: str) -> ScheduledQueue:
    return ScheduledQueue(name, "x", name, "", klass=klass)


def _fill(rq: ReadyQueue, queue: ScheduledQueue, n: int) -> None:
    for i in range(n):
        assert rq.offer(QueuedMessage(i.to_bytes(16, "big"), queue, (0,)))


def test_class_weights_share_turns_between_lanes():
    rq = ReadyQueue("s1", SITE, 1000, {"transactional": (16, None), "bulk": (1, None)})
    _fill(rq, _queue("b", "bulk"), 200)
    _fill(rq, _queue("t", "transactional"), 200)
    got = Counter(rq.pop().queue.klass for _ in range(170))
    assert got == {"transactional": 160, "bulk": 10}, f"got {dict(got)}, want 16:1"


def test_a_full_bulk_lane_leaves_room_for_transactional():
    rq = ReadyQueue("s1", SITE, 5, {"transactional": (16, None), "bulk": (1, None)})
    bulk, tx = _queue("b", "bulk"), _queue("t", "transactional")
    _fill(rq, bulk, 5)
    assert not rq.offer(QueuedMessage(b"\xff" * 16, bulk, (0,))), "the bulk lane is full"
    assert rq.offer(QueuedMessage(b"\xfe" * 16, tx, (0,))), "its own lane has room"
    assert rq.pop().queue is tx


def test_lane_rate_limit_on_the_injected_clock():
    clock = VirtualLoop().clock      # a clock alone: the ready queue reads it, nothing runs
    rq = ReadyQueue("s1", SITE, 100, {"warmup": (1, Throttle(Rate(6, 60), burst=1))},
                    clock=clock)
    _fill(rq, _queue("w", "warmup"), 3)
    assert rq.pop() is not None
    assert rq.pop() is None and rq.wait_hint == pytest.approx(10.0)
    clock.advance(9.9)
    assert rq.pop() is None, "a token before its time"
    clock.advance(0.1)
    assert rq.pop() is not None and len(rq) == 1


def test_drain_takes_one_queue_or_everything_with_backlogs():
    rq = ReadyQueue("s1", SITE, 2)
    a, b = _queue("a", "bulk"), _queue("b", "bulk")
    for i in range(4):
        rq.offer(QueuedMessage(bytes([i]) * 16, a, (0,)))
    rq.offer(QueuedMessage(b"\x09" * 16, b, (0,)))
    assert len(rq.drain(a)) == 4 and not a.backlog, "a's ready and parked messages"
    assert len(rq.drain()) == 1 and len(rq) == 0 and rq.lanes == 0
