"""Operator controls (mta/control/actions.py) on a real DeliveryEngine on virtual time (the
rig of tests/test_dispatcher_unit.py): the state file holds suspensions, holds and shaping
overrides and a new engine gets them back; a damaged state file is set aside; delete and
bounce finish the selected entries (tombstone, DSN). The daemon doing the same over the
admin API is tests/scenarios/test_queue_surgery.py."""
from __future__ import annotations

import orjson
import pytest
from test_dispatcher_unit import SITE, Rig

from mta.control.actions import STATE_NAME, ControlError, Controls
from mta.model.attempt import RemoteReply
from mta.queues.select import Selector


@pytest.fixture
def rigs(monkeypatch, tmp_path):
    made = []

    def make() -> Rig:
        made.append(Rig(monkeypatch, tmp_path))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_state_survives_into_a_new_engine(rigs, tmp_path):
    r = rigs()
    r.send(1, "a@example.test")
    r.loop.settle(5)
    c = Controls(r.engine, tmp_path)
    c.suspend("queue", "example.test", duration=3600)
    c.suspend("source", "default", duration=3600)
    c.hold(Selector(tenant="t1"))
    c.limits({"kind": "site", "name": SITE, "values": {"connection_limit": 1}, "ttl": 3600,
              "reason": "test"})
    state = orjson.loads((tmp_path / STATE_NAME).read_bytes())
    assert [s["kind"] for s in state["suspensions"]] == ["queue", "source"]
    assert state["holds"] == [{"tenant": "t1"}]
    assert state["limits"][0]["values"] == {"connection_limit": 1}
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was renamed into place"

    r2 = rigs()
    c2 = Controls(r2.engine, tmp_path)
    assert c2.restore() == {"suspensions": 2, "rebinds": 0, "holds": 1, "limits": 1}
    assert r2.engine.scheduler.holds == [Selector(tenant="t1")]
    q = r2.engine.scheduler.queues["example.test"]
    assert q.suspended_until > r2.engine.scheduler.clock()
    assert r2.engine.egress.sources["default"].suspended_until > 0
    (o,) = r2.engine.limits.overrides()
    assert o["scope"] == f"site:{SITE}" and o["values"] == {"connection_limit": 1}
    assert c2.state() == {**state, "limits": state["limits"]}, "restored as saved"

    c2.resume("queue", "example.test")
    c2.release(Selector(tenant="t1"))
    c2.limits({"kind": "site", "name": SITE, "clear": True})
    state = orjson.loads((tmp_path / STATE_NAME).read_bytes())
    assert state["holds"] == [] and state["limits"] == []
    assert [s["kind"] for s in state["suspensions"]] == ["source"]


def test_a_damaged_state_file_is_set_aside(rigs, tmp_path):
    (tmp_path / STATE_NAME).write_bytes(b"{not json")
    r = rigs()
    assert Controls(r.engine, tmp_path).restore() == {"suspensions": 0, "rebinds": 0,
                                                      "holds": 0, "limits": 0}
    assert (tmp_path / (STATE_NAME + ".bad")).read_bytes() == b"{not json"
    assert not (tmp_path / STATE_NAME).exists()


def test_bad_requests_are_control_errors(rigs, tmp_path):
    c = Controls(rigs().engine, tmp_path)
    for args in ({"selector": {}}, {"selector": {"id": "xyz"}}, {}):
        with pytest.raises(ControlError):
            c.surgery("flush", args)
    with pytest.raises(ControlError):
        c.release(Selector(domain="never.test"))
    with pytest.raises(ControlError):
        c.limits({"kind": "site", "name": SITE, "values": {"no_such_key": 1}})
    with pytest.raises(ControlError):
        c.limits({"kind": "galaxy", "name": "x", "values": {"connection_limit": 1}})


def _deferred_rig(rigs):
    r = rigs()
    r.net.replies["later@example.test"] = RemoteReply(451, "4.2.0", "try later")
    (msg_id,) = r.send(1, "later@example.test", sender="alice@x.test")
    r.loop.settle(10)
    assert r.engine.scheduler.wheel.count == 1
    return r, msg_id


def test_delete_tombstones_without_a_dsn(rigs, tmp_path):
    r, msg_id = _deferred_rig(rigs)
    out = Controls(r.engine, tmp_path).delete(Selector(id=msg_id), "test")
    assert out["deleted"] == 1 and r.spool.finished == [msg_id] and r.dsns == []
    assert "example.test" not in r.engine.scheduler.queues, "the emptied queue is forgotten"
    r.loop.settle(3600)
    assert len(r.net.sends) == 1, "a deleted message was tried again"


def test_bounce_sends_one_dsn_and_tombstones(rigs, tmp_path):
    r, msg_id = _deferred_rig(rigs)
    out = Controls(r.engine, tmp_path).bounce(Selector(domain="example.test"), "cancelled")
    assert (out["bounced"], out["dsns"]) == (1, 1) and r.spool.finished == [msg_id]
    (sender, rcpts, dsn), = r.dsns
    assert (sender, rcpts) == ("", ["alice@x.test"])
    assert b"cancelled" in dsn and b"Status: 5.0.0" in dsn


def test_a_deferral_notes_its_schedule_in_the_spool(rigs):
    r, msg_id = _deferred_rig(rigs)
    (noted_id, domain, attempts, due, state), = r.spool.noted
    assert (noted_id, domain, attempts) == (msg_id, "example.test", 1)
    (msg, _), = [(m, w) for m, w in r.engine.scheduler.waiting() if m.id == msg_id]
    assert due == msg.due > r.loop.clock(), "the record holds the due time the wheel has"
    assert state["pending"] == (0,) and state["reply"] == "451 4.2.0 try later", state
    assert state["finished"] == {}


def test_a_rebind_survives_into_a_new_engine(monkeypatch, tmp_path):
    pools = '\n[[source]]\nname = "b"\naddress = "127.0.0.1"\n[[pool]]\nname = "p2"\nsources = ["b"]\n'
    made = [Rig(monkeypatch, tmp_path, delivery=pools)]
    try:
        r = made[0]
        r.net.replies["later@example.test"] = RemoteReply(451, "4.2.0", "try later")
        r.send(1, "later@example.test")
        r.loop.settle(10)
        out = Controls(r.engine, tmp_path).rebind("example.test", "p2")
        assert out["pool"] == "p2"
        made.append(Rig(monkeypatch, tmp_path, delivery=pools))
        c2 = Controls(made[1].engine, tmp_path)
        assert c2.restore()["rebinds"] == 1
        assert made[1].engine.scheduler.queues["example.test"].pool == "p2"
        assert c2.state()["rebinds"] == {"example.test": "p2"}
    finally:
        for r in made:
            r.close()
