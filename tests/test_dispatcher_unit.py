"""Dispatcher decisions and the engine's wiring, on virtual time (no sockets, no sleeps):
which message goes next, connection reuse, the shaping limits applied, and limits
changed while a (source, site) runs (mta/egress/limits.py). The real DeliveryEngine,
Scheduler, ReadyQueue, Dispatcher and Outcomes run on a VirtualLoop; the spool is a
dict and the SMTP client a script (tests/delivery_fakes.py)."""
from __future__ import annotations

import asyncio

import pytest
from delivery_fakes import FakeSpool, Net, make_id
from virtual_time import VirtualLoop

import mta.delivery.dispatcher as dispatcher_module
from mta.config.load import parse_config
from mta.delivery.engine import DeliveryEngine
from mta.egress.limits import Scope
from mta.model.attempt import RemoteReply

SITE = "[127.0.0.1]:2525"   # the static route of example.test: no DNS


class Rig:
    def __init__(self, monkeypatch, tmp_path, delivery: str = "", shaping: str = ""):
        self.loop = VirtualLoop()
        files = ""
        if shaping:
            (tmp_path / "shaping.toml").write_text(shaping)
            files = f'[egress]\nshaping = ["{tmp_path / "shaping.toml"}"]\n'
        config = parse_config(
            f'[server]\nhostname = "mx.test"\n{files}'
            f'[delivery]\nroutes = {{"example.test" = "127.0.0.1:2525"}}\n{delivery}\n')
        self.spool = FakeSpool()
        self.dsns: list[tuple[str, list[str], bytes]] = []
        self.net = Net(self.loop)
        monkeypatch.setattr(dispatcher_module, "SmtpClient", self.net.client())
        self.engine = DeliveryEngine(config, self.spool, None,
                                     lambda s, r, c: self.dsns.append((s, r, c)),
                                     clock=self.loop.clock)
        self.engine.start(self.loop)

    def send(self, n: int, rcpt: str = "user@example.test", sender: str = "a@x.test") -> list[bytes]:
        ids = []
        for _ in range(n):
            msg_id = make_id(self.loop.clock())
            env = self.spool.add(msg_id, sender, [rcpt])
            self.engine.submit(msg_id, env)
            ids.append(msg_id)
        return ids

    @property
    def dispatcher(self):
        ((key, d),) = self.engine.dispatchers.items()
        assert key == ("default", SITE)
        return d

    def close(self) -> None:
        self.loop.run(self.engine.stop())
        # a worker's exit wakes its dispatcher, which may start another: cancel those too
        while pending := asyncio.all_tasks(self.loop):
            for t in pending:
                t.cancel()
            self.loop.run(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


@pytest.fixture
def rig(monkeypatch, tmp_path):
    rigs = []

    def make(**kw) -> Rig:
        rigs.append(Rig(monkeypatch, tmp_path, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_connections_are_reused_up_to_max_deliveries(rig):
    r = rig(delivery="connection_limit = 1\nmax_deliveries_per_connection = 3")
    ids = r.send(7)
    r.loop.settle(20)
    assert r.spool.finished == ids, "got a different order or a loss, want FIFO, all delivered"
    conns = [n for n, _, _ in r.net.sends]
    assert conns == [1, 1, 1, 2, 2, 2, 3], f"got connections {conns}, want 3 per connection"
    assert r.net.peak == 1 and r.dispatcher.peak == 1


def test_connection_limit_caps_parallel_sessions(rig):
    r = rig(delivery="connection_limit = 3")
    r.send(12)
    r.loop.settle(0.5)
    assert r.net.open == 3 and r.dispatcher.active == 3
    r.loop.settle(10)
    assert len(r.spool.finished) == 12 and r.net.peak == 3
    # 12 messages, 3 connections, 1 s each: the last transaction ends at 4 s
    assert r.net.sends[-1][2] - r.net.connects[0] == pytest.approx(4.0, abs=0.01)


def test_idle_connection_is_kept_for_idle_timeout_then_closed(rig):
    r = rig(delivery='idle_timeout = "5s"')
    r.send(1)
    r.loop.settle(3)
    assert r.net.open == 1, "closed before idle_timeout"
    r.send(1)                            # reuses the idle connection
    r.loop.settle(2)
    assert len(r.net.connects) == 1 and len(r.spool.finished) == 2
    r.loop.settle(6)
    assert r.net.open == 0, "an idle connection outlived idle_timeout"


def test_message_rate_from_shaping_spaces_transactions(rig):
    r = rig(shaping='["default"]\nmax_message_rate = "30/m"\n', delivery="connection_limit = 4")
    r.net.send_time = 0.0
    r.send(5)
    r.loop.settle(60)
    times = [t - r.net.sends[0][2] for _, _, t in r.net.sends]
    # one token to start (burst 1 at 0.5/s), then one every 2 s
    assert times == pytest.approx([0, 2, 4, 6, 8], abs=0.01), f"got {times}"


def test_site_failure_defers_everything_waiting(rig):
    r = rig(delivery='connection_limit = 1\nretry_initial = "1m"\nretry_max = "1m"')
    r.net.refuse = True
    r.send(4)
    r.loop.settle(1)
    assert not r.spool.finished and r.engine.outcomes.counters["deferred"] == 4
    assert r.dispatcher.ready.__len__() == 0 and r.engine.scheduler.wheel.count == 4
    r.net.refuse = False
    r.loop.settle(80)                     # retry due after 48..72 s; the wheel ticks each 1 s
    assert len(r.spool.finished) == 4, "the deferred messages were not retried"


def test_a_session_dying_mid_message_settles_every_recipient_once(rig):
    """One recipient per transaction: the first is delivered, the second refused
    (5xx), then the session dies in the third; one result for the whole entry: the
    delivered and bounced recipients are done on disk, the other two retried, one DSN."""
    r = rig(shaping='["default"]\nmax_recipients_per_transaction = 1\n',
            delivery='retry_initial = "1m"\nretry_max = "1m"')
    r.net.replies["gone@example.test"] = RemoteReply(550, "5.1.1", "no such user")
    r.net.drop_at = "c@example.test"
    msg_id = make_id(r.loop.clock())
    env = r.spool.add(msg_id, "a@x.test", ["ok@example.test", "gone@example.test",
                                           "c@example.test", "d@example.test"])
    r.engine.submit(msg_id, env)
    r.loop.settle(5)
    assert [rcpt for _, rcpt, _ in r.net.sends] == ["ok@example.test", "gone@example.test"]
    assert r.spool.rcpts_done == [(msg_id, [0, 1])]
    assert msg_id not in r.spool.finished
    assert [d[1] for d in r.dsns] == [["a@x.test"]], "one DSN for the bounce"
    assert r.engine.outcomes.counters == {"delivered": 1, "bounced": 1, "deferred": 2,
                                          "expired": 0}
    r.net.drop_at = None
    r.loop.settle(80)                     # the retry: only the two left are sent
    assert [rcpt for _, rcpt, _ in r.net.sends[2:]] == ["c@example.test", "d@example.test"]
    assert msg_id in r.spool.finished


def test_per_recipient_results_tombstone_and_bounce(rig):
    r = rig()
    r.net.replies["gone@example.test"] = RemoteReply(550, "5.1.1", "no such user")
    r.net.replies["later@example.test"] = RemoteReply(451, "4.2.0", "try later")
    msg_id = make_id(r.loop.clock())
    env = r.spool.add(msg_id, "a@x.test", ["ok@example.test", "gone@example.test",
                                           "later@example.test"])
    r.engine.submit(msg_id, env)
    r.loop.settle(3)
    assert r.spool.rcpts_done == [(msg_id, [0, 1])], "delivered and bounced are done on disk"
    assert msg_id not in r.spool.finished, "a recipient still waits for a retry"
    assert [d[1] for d in r.dsns] == [["a@x.test"]], "one DSN for the bounce, to the sender"
    assert r.engine.outcomes.counters == {"delivered": 1, "bounced": 1, "deferred": 1,
                                          "expired": 0}


# --- limits changed while the path runs ------------------------------------------------


def test_raised_connection_limit_lets_waiting_messages_go_at_once(rig):
    r = rig(delivery="connection_limit = 1")
    r.net.send_time = 10.0
    r.send(4)
    r.loop.settle(1)
    assert r.net.open == 1
    r.engine.limits.set(Scope("site", SITE), {"connection_limit": 4}, reason="test")
    r.loop.settle(0.001)
    assert r.net.open == 4, f"got {r.net.open} connections right after the raise, want 4"
    assert r.dispatcher.limits.connection_limit == 4
    assert "override:site:" + SITE in r.dispatcher.limits.matched


def test_lowered_connection_limit_closes_idle_and_busy_above_it(rig):
    r = rig(delivery='connection_limit = 4\nidle_timeout = "1m"')
    r.send(4)
    r.loop.settle(2)
    assert r.net.open == 4 and len(r.spool.finished) == 4, "4 connections, now idle"
    r.engine.limits.set(Scope("pair", "default", SITE), {"connection_limit": 1})
    r.loop.settle(0.001)
    assert r.net.open == 1, f"got {r.net.open} idle connections above the new limit 1"
    r.send(3)
    r.loop.settle(10)
    assert len(r.spool.finished) == 7 and r.net.open == 1
    assert len(r.net.connects) == 4, "no new connection may open above the lowered limit"


def test_expired_override_restores_the_shaping_files(rig):
    r = rig(delivery="connection_limit = 2")
    r.send(1)
    r.loop.settle(2)
    d = r.dispatcher
    r.engine.limits.set(Scope("source", "default"), {"max_deliveries_per_connection": 1},
                        ttl=30)
    assert d.limits.max_deliveries_per_connection == 1
    r.loop.settle(31)
    assert d.limits.max_deliveries_per_connection == 1000, "the override outlived its ttl"
    assert not any(m.startswith("override:") for m in d.limits.matched)


def test_rate_change_keeps_the_bucket(rig):
    r = rig(shaping='["default"]\nmax_message_rate = "1/s"\n')
    r.net.send_time = 0.0
    r.send(1)
    r.loop.settle(0.1)                    # the one token is spent
    d = r.dispatcher
    bucket = d.msg_throttle
    r.engine.limits.set(Scope("site", SITE), {"max_message_rate": "10/m"})
    assert d.msg_throttle is bucket and str(bucket.rate) == "10/m"
    r.send(1)
    r.loop.settle(10)
    gap = r.net.sends[1][2] - r.net.sends[0][2]
    # the bucket kept what it had: 0.1 token earned at 1/s before the change, the other
    # 0.9 at 10/m (5.4 s); a fresh bucket would have sent at once
    assert gap == pytest.approx(5.5, abs=0.01), f"got {gap:.2f}s between messages"


def test_site_wide_limit_override_reaches_the_site_state(rig):
    r = rig(delivery="connection_limit = 8")
    r.net.send_time = 10.0
    r.send(6)
    r.loop.settle(1)
    assert r.net.open == 6
    r.engine.limits.set(Scope("site", SITE), {"site_connection_limit": 2})
    assert r.dispatcher.site_state.connection_limit == 2
    r.loop.settle(12)                     # the busy ones finish; only 2 stay open
    r.send(6)
    r.loop.settle(1)
    assert r.net.open <= 2, f"got {r.net.open} connections, site limit 2"
