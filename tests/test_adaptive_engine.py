"""Adaptive delivery on a real DeliveryEngine (virtual time, fake SMTP client): what the
rules do to live dispatchers and queues (mta/delivery/adapt.py). A cut connection_limit
closes idle connections only and keeps the throttle's bucket; the backoff_on shorthand
pauses the (source, site) and lets it go after backoff_for; a tenant held at a provider
waits while another tenant's mail flows; bounce sends what a campaign has queued back
with DSNs; a dispatcher made while its pair is suspended starts paused."""
from __future__ import annotations

import pytest
from test_dispatcher_unit import SITE, Rig

from mta.model.attempt import RemoteReply

SLOW = RemoteReply(451, "4.7.1", "slow down, tenant t1 is sending too much")


@pytest.fixture
def rig(monkeypatch, tmp_path):
    rigs = []

    def make(**kw) -> Rig:
        rigs.append(Rig(monkeypatch, tmp_path, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def _send(r, n, rcpt="user@example.test", tenant="", campaign=""):
    from delivery_fakes import make_id
    ids = []
    for _ in range(n):
        msg_id = make_id(r.loop.clock())
        env = r.spool.add(msg_id, "a@x.test", [rcpt], tenant=tenant, campaign=campaign)
        r.engine.submit(msg_id, env)
        ids.append(msg_id)
    return ids


def test_a_cut_connection_limit_closes_idle_connections_and_steps_back(rig):
    r = rig(delivery='connection_limit = 4\nidle_timeout = "10m"',
            shaping='["default"]\nmax_message_rate = "600/m"\n'
                    '[[default.automation]]\nname = "slow"\nstatus = ["4.7.1"]\n'
                    'set = { connection_limit = 1 }\nduration = "10m"\nsteps = 1\n')
    _send(r, 4)
    r.loop.settle(5)
    d = r.dispatcher
    bucket = d.msg_throttle
    assert r.net.open == 4 and d.limits.connection_limit == 4
    r.net.replies["slow@example.test"] = SLOW
    _send(r, 1, "slow@example.test")
    r.loop.settle(5)
    del r.net.replies["slow@example.test"]   # the provider stops complaining
    assert d.limits.connection_limit == 1
    assert "override:pair:default->" + SITE in d.limits.matched
    assert r.net.open == 1, "idle connections above the cut limit stayed open"
    assert d.msg_throttle is bucket, "the throttle was replaced (its tokens lost)"
    connects = len(r.net.connects)
    # (the dispatcher may be reaped once idle: ask the limits source for the path)
    path = r.engine.limits.path("default", SITE, "example.test", [SITE])
    r.loop.settle(600)                      # duration: one step (a cut of 3 -> 2)
    assert r.engine.limits.limits(path).connection_limit == 2
    r.loop.settle(600)                      # steps = 1: the configured 4
    assert r.engine.limits.limits(path).connection_limit == 4
    assert r.engine.limits.overrides() == []
    assert len(r.net.connects) == connects, "stepping back opened connections for nothing"
    view = r.engine.adaptive.adaptive.view()
    assert view == []


def test_backoff_on_pauses_the_pair_then_lets_it_go(rig):
    r = rig(shaping=f'[site."{SITE}"]\nbackoff_on = [\'try again later\']\n'
                    f'backoff_for = "30m"\n')
    r.net.replies["defer@example.test"] = RemoteReply(451, "4.2.0", "try again later")
    _send(r, 1, "defer@example.test")
    r.loop.settle(3)
    d = r.dispatcher
    now = r.loop.clock()
    assert d.paused_until(now) == pytest.approx(now + 1800 - 2, abs=2)
    assert d.backoffs == 1
    del r.net.replies["defer@example.test"]
    ids = _send(r, 2)
    r.loop.settle(1700)
    assert not set(ids) & set(r.spool.finished), "delivered while backed off"
    r.loop.settle(200)
    assert set(ids) <= set(r.spool.finished)


def test_a_tenant_held_at_a_provider_waits_while_others_flow(rig):
    r = rig(shaping='[[default.automation]]\nname = "tenant-out"\ntext = \'tenant t1\'\n'
                    'action = ["suspend_tenant"]\nduration = "1h"\n')
    r.net.replies["slow@example.test"] = SLOW
    _send(r, 1, "slow@example.test", tenant="t1")
    r.loop.settle(3)
    (hold,) = r.engine.adaptive.adaptive.view()
    assert (hold["action"], hold["target"], hold["provider"]) == ("suspend_tenant", "t1", SITE)
    held = _send(r, 3, tenant="t1")
    other = _send(r, 3, tenant="t2")
    r.loop.settle(60)
    assert set(other) <= set(r.spool.finished)
    assert not set(held) & set(r.spool.finished), "a held tenant's mail went out"
    r.loop.settle(3600)
    assert set(held) <= set(r.spool.finished), "the hold did not end"


def test_bounce_returns_what_the_campaign_has_queued(rig):
    r = rig(shaping='[[default.automation]]\nname = "blocked"\nstatus = ["5.7.1"]\n'
                    'action = ["bounce", "suspend_campaign"]\nduration = "1h"\n')
    r.net.replies["grey@example.test"] = RemoteReply(451, "4.2.0", "greylisted")
    waiting = _send(r, 3, "grey@example.test", tenant="t1", campaign="spring")
    other = _send(r, 2, "grey@example.test", tenant="t1", campaign="autumn")
    r.loop.settle(3)                 # deferred: they wait for their retry in their queues
    assert not r.spool.finished and not r.dsns
    r.net.replies["blocked@example.test"] = RemoteReply(554, "5.7.1", "campaign blocked")
    _send(r, 1, "blocked@example.test", tenant="t1", campaign="spring")
    r.loop.settle(3)
    assert set(waiting) <= set(r.spool.finished), "queued mail was not bounced"
    assert not set(other) & set(r.spool.finished), "another campaign's mail was bounced"
    assert len(r.dsns) == 4          # the blocked message and the three bounced
    assert b"adaptive delivery rule blocked" in r.dsns[-1][2]
    (hold,) = r.engine.adaptive.adaptive.view()
    assert (hold["action"], hold["target"]) == ("suspend_campaign", "spring")


def test_a_dispatcher_made_during_a_pair_suspension_starts_paused(rig):
    r = rig(shaping='[[default.automation]]\nname = "ts"\ntext = \'\\[TS01\\]\'\n'
                    'action = ["suspend"]\nduration = "1h"\n')
    r.net.replies["ts@example.test"] = RemoteReply(421, "4.7.0", "[TS01] deferred")
    _send(r, 1, "ts@example.test")
    r.loop.settle(3)
    r.engine.dispatchers.clear()          # as after the reaper (or a restart)
    r.engine.paths.clear()
    del r.net.replies["ts@example.test"]
    ids = _send(r, 1)
    r.loop.settle(60)
    (d,) = r.engine.dispatchers.values()
    assert d.paused_until(r.loop.clock()) and not set(ids) & set(r.spool.finished)


def test_suspend_source_is_the_operators_source_suspension_and_ends(rig):
    r = rig(shaping='[[default.automation]]\nname = "ip-banned"\nstatus = ["5.7.606"]\n'
                    'action = ["suspend_source"]\nduration = "1d"\n')
    r.net.replies["x@example.test"] = RemoteReply(550, "5.7.606", "Access denied, banned "
                                                  "sending IP [127.0.0.1]")
    _send(r, 1, "x@example.test")
    r.loop.settle(3)
    src = r.engine.egress.sources["default"]
    now = r.loop.clock()
    assert src.suspended_until == pytest.approx(now + 86400 - 2, abs=2)
    r.loop.settle(86400)
    assert src.suspended_until == 0.0


def test_mail_of_a_suspended_pair_goes_to_the_pools_other_sources(rig):
    r = rig(shaping='[[default.automation]]\nname = "ts"\ntext = \'\\[TS01\\]\'\n'
                    'action = ["suspend"]\nduration = "1h"\n')
    # two sources in the default pool
    from mta.config.load import parse_config
    from mta.egress.pools import Egress
    cfg = parse_config('[server]\nhostname = "mx.test"\n'
                       '[delivery]\nroutes = {"example.test" = "127.0.0.1:2525"}\n'
                       '[[source]]\nname = "s1"\naddress = "127.0.0.1"\n'
                       '[[source]]\nname = "s2"\naddress = "127.0.0.1"\n'
                       '[[pool]]\nname = "p"\nsources = ["s1", "s2"]\n'
                       '[egress]\ndefault_pool = "p"\n')
    r.engine.reconfigure(cfg, r.engine.shaping, Egress(cfg))
    r.net.replies["ts@example.test"] = RemoteReply(421, "4.7.0", "[TS01] deferred")
    _send(r, 1, "ts@example.test")
    r.loop.settle(3)
    (paused,) = r.engine.adaptive.adaptive.paused     # one (source, site) of the two
    del r.net.replies["ts@example.test"]
    sent = r.engine.dispatchers[paused].sent
    ids = _send(r, 6)
    r.loop.settle(30)
    # round robin would have given half of them to the paused source for an hour
    assert set(ids) <= set(r.spool.finished), "mail waited for a suspended pair"
    assert r.engine.dispatchers[paused].sent == sent
