"""The operator's Selector (mta/queues/select.py) and what the Scheduler does with it on
virtual time: holds and release, flush of deferred entries, take (delete/bounce), and
recovered entries put back at their saved due time with their attempts (issue 13)."""
from __future__ import annotations

import pytest
from test_scheduler_unit import Rig

from mta.model.ids import id_text
from mta.model.queued import InsertReason
from mta.queues.select import Selector, SelectorError
from mta.spool import records as rec


@pytest.fixture
def r():
    rig = Rig()
    yield rig
    rig.close()


def test_selector_json_round_trip_and_refusals():
    sel = Selector.from_json({"tenant": "t1", "domain": "One.Test"})
    assert (sel.tenant, sel.domain) == ("t1", "one.test")
    assert Selector.from_json(sel.to_json()) == sel
    one = Selector.from_json({"id": "00" * 16})
    assert one.id == bytes(16) and one.to_json() == {"id": "00" * 16}
    for bad in ({}, {"all": False}, {"nope": "x"}, {"id": "zz"}, {"queue": 5},
                {"all": True, "domain": "x"}, {"domain": "x" * 2000}, []):
        with pytest.raises(SelectorError):
            Selector.from_json(bad)
    assert Selector.from_json({"all": True}).all


def test_matching_by_each_field(r):
    a, = r.submit("a@one.test", tenant="t1")
    b, = r.submit("b@two.test", tenant="t2")
    r.loop.settle(0.1)
    assert Selector(domain="one.test").matches(a) and not Selector(domain="one.test").matches(b)
    assert Selector(tenant="t2").matches(b) and not Selector(tenant="t2").matches(a)
    assert Selector(queue=a.queue.name).matches(a)
    assert Selector(id=b.id).matches(b) and not Selector(id=b.id).matches(a)
    assert Selector(site="mx.example.net").matches(a), "the queue's resolved site"
    assert Selector(all=True).matches(a) and Selector(all=True).matches(b)
    assert not Selector(tenant="t1", domain="two.test").matches(b), "fields combine with AND"


def test_hold_keeps_due_messages_until_release(r):
    s = r.scheduler
    s.add_hold(Selector(domain="one.test"))
    held, = r.submit("a@one.test")
    free, = r.submit("b@two.test")
    r.loop.settle(1)
    assert r.ready() == [free]
    assert list(held.queue.held) == [held]
    assert [m for m, where in s.waiting() if where == "held"] == [held]
    assert s.release(Selector(domain="other.test")) == 0, "no such hold: nothing released"
    assert s.release(Selector(domain="one.test")) == 1 and s.holds == []
    r.loop.settle(0.1)
    assert r.ready() == [held]


def test_a_deferred_held_message_is_held_when_due(r):
    s = r.scheduler
    msg, = r.submit("a@one.test")
    r.loop.settle(0.1)
    r.ready()
    s.schedule(msg, r.loop.clock() + 30, InsertReason.TRANSIENT_FAILURE)
    s.add_hold(Selector(id=msg.id))
    r.loop.settle(40)
    assert len(r.outlet.ready) == 0 and list(msg.queue.held) == [msg]


def test_flush_makes_deferred_entries_due_now(r):
    s = r.scheduler
    a, = r.submit("a@one.test")
    b, = r.submit("b@two.test")
    r.loop.settle(0.1)
    r.ready()
    for m in (a, b):
        s.schedule(m, r.loop.clock() + 3600, InsertReason.TRANSIENT_FAILURE)
    assert s.flush(Selector(domain="one.test")) == 1
    r.loop.settle(0.1)
    assert r.ready() == [a]
    r.loop.settle(3700)
    assert r.ready() == [b], "the other one kept its due time"
    assert s.flush(Selector(all=True)) == 0, "nothing deferred is left"
    r.loop.settle(10)
    assert r.ready() == [], "the flushed entry's old wheel entry is stale"


def test_take_removes_from_wheel_backlog_and_held(r):
    s = r.scheduler
    a, = r.submit("a@one.test")
    r.loop.settle(0.1)
    r.ready()
    s.schedule(a, r.loop.clock() + 60, InsertReason.TRANSIENT_FAILURE)
    s.add_hold(Selector(tenant="t9"))
    held, = r.submit("b@one.test", tenant="t9")
    r.loop.settle(0.1)
    taken = s.take(Selector(domain="one.test"))
    assert sorted(map(id, taken)) == sorted(map(id, [a, held]))
    assert held.queue.held is None
    r.loop.settle(120)
    assert r.ready() == [], "a taken entry came due anyway"


def test_recovered_entries_keep_attempts_and_due_time(r):
    s = r.scheduler
    from delivery_fakes import make_id
    from mta.model.envelope import Envelope, Recipient
    msg_id = make_id(r.loop.clock() - 600)
    env = Envelope(id_text(msg_id), "a@x.test", [Recipient("a@one.test"), Recipient("b@two.test")])
    due = r.loop.clock() + 90
    state = rec.Schedule(msg_id, "one.test", 4, due, 1, r.loop.clock() - 10, (0,), {}, "451 x")
    s.saved = {msg_id: {"one.test": (state, None)}}
    later, now = s.submit(msg_id, env, reason=InsertReason.RECOVERED)
    s.saved = None
    assert (later.attempts, later.flags, later.due) == (4, 1, due)
    assert now.attempts == 0, "an entry without a saved state goes at once"
    r.loop.settle(0.1)
    assert r.ready() == [now]
    r.loop.settle(80)
    assert r.ready() == [], "before its saved due time"
    r.loop.settle(12)
    assert r.ready() == [later]


def test_a_hold_by_site_catches_messages_once_their_route_resolves():
    rig = Rig(route_delay=0.5)
    try:
        rig.scheduler.add_hold(Selector(site="mx.example.net"))
        msg, = rig.submit("a@one.test")
        rig.loop.settle(1)
        assert rig.ready() == [] and list(msg.queue.held) == [msg]
    finally:
        rig.close()
