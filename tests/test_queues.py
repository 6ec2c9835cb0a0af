"""Queue model units: queue names, the timer wheel, ready-queue fairness and
backpressure, and the retry policy. Table-driven; failures read got/want."""
from __future__ import annotations

import random

import pytest

from mta.model.queue_name import QueueName, format_name, parse_name
from mta.model.queued import QueuedMessage
from mta.queues.ready import ReadyQueue
from mta.queues.retry import RetryPolicy
from mta.queues.scheduled import ScheduledQueue
from mta.queues.timerwheel import TimerWheel


@pytest.mark.parametrize("campaign,tenant,domain,want", [
    ("spring", "acme", "Example.COM", "spring:acme@example.com"),
    (None, "acme", "example.com", "acme@example.com"),
    (None, None, "example.com", "example.com"),
    ("spring", None, "example.com", "spring:@example.com"),
    ("evil:x", "a@b", "example.com", "evilx:ab@example.com"),   # header values are cleaned
])
def test_queue_name_round_trip(campaign, tenant, domain, want):
    got = format_name(campaign, tenant, domain)
    assert got == want, f"got {got!r}, want {want!r}"
    parsed = parse_name(got)
    assert parsed.domain == domain.lower()
    assert parsed == QueueName(*(parsed)), "parse gives a QueueName"


def test_timer_wheel_fires_in_time_order_and_only_when_due():
    wheel = TimerWheel(0.0, slots=64)
    items = [random.uniform(0, 500) for _ in range(2000)]
    for due in items:
        wheel.insert(due, due)
    fired: list[float] = []
    for now in range(0, 520, 7):
        wheel.advance(float(now), fired.append)
        assert all(d <= now + 1e-9 for d in fired), "an item fired before it was due"
    assert sorted(fired) == sorted(items), "got missing or extra items, want each once"
    assert wheel.count == 0


def test_timer_wheel_long_sleep_fires_everything_overdue():
    wheel = TimerWheel(0.0, slots=8)
    for due in (3, 20, 100, 1000):
        wheel.insert(float(due), due)
    fired: list[int] = []
    wheel.advance(5000.0, fired.append)
    assert sorted(fired) == [3, 20, 100, 1000], f"got {fired}"


def _msgs(queue: ScheduledQueue, n: int) -> list[QueuedMessage]:
    return [QueuedMessage(bytes([i % 256]) * 16, queue, (0,)) for i in range(n)]


class _Site:
    name = "mx.example"


def test_ready_queue_round_robin_between_scheduled_queues():
    bulk = ScheduledQueue("bulk@x", "x", "bulk", "")
    tx = ScheduledQueue("tx@x", "x", "tx", "")
    rq = ReadyQueue("default", _Site(), capacity=1000)
    for m in _msgs(bulk, 500):
        rq.push(m)
    for m in _msgs(tx, 2):
        rq.push(m)
    first = [rq.pop().queue.name for _ in range(4)]
    assert first.count("tx@x") == 2, f"got {first}, want the transactional queue served in turn"


def test_ready_queue_backpressure_refills_from_backlog():
    q = ScheduledQueue("q@x", "x", "", "")
    rq = ReadyQueue("default", _Site(), capacity=3)
    msgs = _msgs(q, 10)
    for m in msgs:
        if not rq.push(m):
            q.backlog.append(m)
            rq.block(q)
    assert len(rq) == 3 and len(q.backlog) == 7
    got = []
    while (m := rq.pop()) is not None:
        got.append(m)
    assert got == msgs, "got a different order, want FIFO through the backlog"
    assert not q.backlog


@pytest.mark.parametrize("attempts,lo,hi", [(1, 48, 72), (2, 96, 144), (10, 800, 1200)])
def test_retry_backoff_doubles_with_jitter_up_to_max(attempts, lo, hi):
    p = RetryPolicy(initial=60, maximum=1000, max_age=10**6)
    for _ in range(50):
        delay = p.next_due(attempts, received=0, now=100) - 100
        assert lo <= delay <= hi, f"got {delay}, want {lo}..{hi}"


def test_retry_expires_at_max_age():
    p = RetryPolicy(initial=60, maximum=1000, max_age=300)
    assert p.next_due(1, received=0, now=300) is None
    assert p.next_due(5, received=0, now=290) <= 300, "the last attempt falls on the expiry"
