"""Adaptive delivery (mta.egress.adaptive) on virtual time: rule matching, triggers after N
matches in a window, suspensions and their end, shaping values set through the
LimitsSource and stepped back (halving the cut, never all at once), good deliveries as a
way back, rate windows (per-minute ring, minimum volumes, throttle and suspend), state
kept across a restart, and the rules as the shaping files give them (the backoff_on
shorthand, the shipped Gmail / Yahoo / Microsoft / [TS01] rules)."""
from __future__ import annotations

import dataclasses

import pytest
from virtual_time import VirtualLoop

from mta.config.load import parse_config
from mta.egress.adaptive import Adaptive, Window
from mta.egress.limits import LimitsSource
from mta.egress.shaping import Shaping, ShapingError
from mta.model.attempt import RemoteReply
from mta.model.log_records import RecordType
from mta.model.rate import Rate

DELIVERY = dataclasses.asdict(parse_config("").delivery)
YAHOO_MX = ("mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net")
YAHOO = ",".join(YAHOO_MX)
GMAIL_MX = ("gmail-smtp-in.l.google.com",)
OUTLOOK_MX = ("hotmail-com.olc.protection.outlook.com",)
TS01 = RemoteReply(421, "4.7.0", "[TS01] Messages from 192.0.2.1 temporarily deferred due "
                   "to user complaints - 4.16.55.1; see https://postmaster.yahooinc.com")
OK = RemoteReply(250, "2.0.0", "ok")


class Hands:
    """A fake Actuator: records what adaptive delivery asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.records: list[tuple[RecordType, dict]] = []
        self.saves = 0

    def pause_pair(self, source, provider, site, until, reply):
        self.calls.append(("pause_pair", source, provider, site, until))

    def lift_pair(self, source, provider, site, until):
        self.calls.append(("lift_pair", source, provider, site))

    def pause_source(self, source, until):
        self.calls.append(("pause_source", source, until))

    def lift_source(self, source, until):
        self.calls.append(("lift_source", source))

    def hold(self, provider, site, kind, target, until):
        self.calls.append(("hold", provider, kind, target, until))

    def bounce(self, source, provider, site, tenant, campaign, reason):
        self.calls.append(("bounce", source, provider, tenant, campaign))
        return 7

    def log(self, rtype, **fields):
        self.records.append((rtype, fields))

    def changed(self):
        self.saves += 1

    def kinds(self):
        return [(t.value, f["rule"], f["action"]) for t, f in self.records]


def config(**adaptive):
    text = "[adaptive]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                    for k, v in adaptive.items())
    return parse_config(text).adaptive


@pytest.fixture
def rig(tmp_path):
    loop = VirtualLoop()
    rules = tmp_path / "rules.toml"
    rules.write_text("""
[provider.slowpoke]
match = ["*.slow.test"]
max_message_rate = "100/m"
connection_limit = 8

[[provider.slowpoke.automation]]
name = "slow-down"
status = ["4.7."]
text = 'slow down'
after = 3
within = "10m"
set = { max_message_rate = "10/m", connection_limit = 2 }
duration = "30m"
steps = 2
recover_after = 50

[[provider.slowpoke.automation]]
name = "tenant-out"
text = 'tenant \\S+ blocked'
action = ["suspend_tenant", "suspend_campaign", "bounce", "suspend_source"]
duration = "2h"
""")
    shaping = Shaping.load([rules], DELIVERY)
    limits = LimitsSource(shaping, clock=loop.clock)
    limits.start(loop)
    hands = Hands()
    ad = Adaptive(limits, hands, config(min_volume=100, min_complaint_volume=200), clock=loop.clock)
    ad.start(loop)

    class Rig:
        pass

    r = Rig()
    r.loop, r.limits, r.hands, r.ad, r.shaping = loop, limits, hands, ad, shaping

    def path(source="ip-1", mx=("mx1.slow.test",), domain="slow.test"):
        return limits.path(source, ",".join(mx), domain, mx)

    def send(replies, source="ip-1", mx=("mx1.slow.test",), tenant="t1", campaign="c1",
             fresh=True):
        """One attempt's replies; each attempt gets its own reply objects, as from the
        wire (one object for several recipients stays one: a session error)."""
        if fresh:
            copies: dict[int, RemoteReply] = {}
            replies = [copies.setdefault(id(x), RemoteReply(x.code, x.status, x.text))
                       for x in replies]
        p = path(source, mx)
        provider = p.provider or p.site
        ad.observe(source, provider, p.provider is None, limits.limits(p),
                   list(enumerate(replies)), tenant, campaign,
                   lambda r: r.status.startswith("5.1."))
    r.path, r.send = path, send
    yield r
    ad.stop()
    limits.stop()
    loop.close()


# --- rules from the shaping files -----------------------------------------------------------


def test_shipped_rules_cover_gmail_yahoo_microsoft_and_ts01():
    shaping = Shaping.load([], DELIVERY)

    def rules(domain, mx):
        return {r.name: r for r in shaping.limits("ip-1", domain, mx).automation}

    y = rules("yahoo.com", YAHOO_MX)
    assert y["ts-complaints"].matches(TS01.code, TS01.status, TS01.text)
    assert y["ts-complaints"].actions == ("suspend",)
    assert y["yahoo-tss04"].matches(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily "
                                    "deferred due to unexpected volume or user complaints")
    g = rules("gmail.com", GMAIL_MX)
    assert g["gmail-rate-limited"].matches(421, "4.7.28", "Our system has detected an unusual "
                                           "rate of unsolicited mail")
    assert not g["gmail-rate-limited"].matches(421, "4.7.0", "try later")
    assert g["gmail-low-reputation"].after == 3
    m = rules("hotmail.com", OUTLOOK_MX)
    assert m["microsoft-rate-limited"].matches(451, "4.7.650", "The mail server [192.0.2.1] "
                                               "has been temporarily rate limited due to IP "
                                               "reputation.")
    assert m["microsoft-banned-ip"].matches(550, "5.7.606", "Access denied, banned sending IP")
    assert m["microsoft-blocklist"].matches(550, "5.7.1", "Unfortunately, messages from "
                                            "[192.0.2.1] weren't sent. Please contact your "
                                            "Internet service provider since part of their "
                                            "network is on our block list (S3150).")
    # the seed's wording ("421 4.16.55 [TS01] ...") holds for any destination
    other = rules("example.test", ("mx.example.test",))
    assert other["ts-complaints"].matches(421, "4.16.55", "[TS01] Messages from 192.0.2.1 "
                                          "temporarily deferred due to user complaints")


def test_backoff_on_is_a_rule_and_a_later_file_replaces_or_disables_rules(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("""
[site."mx.a.test"]
backoff_on = ['try again later \\(scripted\\)']
backoff_for = "1h"

[[default.automation]]
name = "ts-permanent"
enabled = false

[[provider.yahoo.automation]]
name = "yahoo-tss04"
text = '\\[TSS04\\]'
action = ["suspend_source"]
duration = "5m"
""")
    shaping = Shaping.load([f], DELIVERY)
    a = {r.name: r for r in shaping.limits("ip-1", "a.test", ["mx.a.test"]).automation}
    assert set(a) == {"ts-complaints", "backoff_on"}
    assert a["backoff_on"].matches(451, "4.2.0", "try again later (scripted)")
    assert not a["backoff_on"].matches(550, "5.2.0", "try again later (scripted)"), "4xx only"
    assert (a["backoff_on"].actions, a["backoff_on"].duration) == (("suspend",), 3600.0)
    y = {r.name: r for r in shaping.limits("ip-1", "yahoo.com", YAHOO_MX).automation}
    assert y["yahoo-tss04"].actions == ("suspend_source",) and y["yahoo-tss04"].set == ()


@pytest.mark.parametrize("body, problem", [
    ('name = "x"\naction = ["suspend"]', "a rule needs a status or a text pattern"),
    ('name = "x"\ntext = "a"', "a rule needs an action or a set table"),
    ('name = "x"\ntext = "a"\naction = ["explode"]', "action[0]: 'explode' is not one of"),
    ('name = "x"\nstatus = ["4.7"]\naction = ["suspend"]', "status[0]: '4.7' is not an "
     "enhanced status code"),
    ('name = "x"\ntext = "("\naction = ["suspend"]', "text: \"(\" is not a regular expression"),
    ('name = "x"\ntext = "a"\nset = { scope = "site" }', "set: scope: not a key a rule may set"),
    ('name = "x"\ntext = "a"\nset = { connection_limit = 0 }', "set.connection_limit: 0 is "
     "out of range"),
    ('name = "x"\ntext = "a"\naction = ["suspend"]\nafter = 0', "after: 0 is out of range"),
    ('text = "a"\naction = ["suspend"]', "name: required"),
])
def test_a_bad_rule_names_file_table_and_problem(tmp_path, body, problem):
    f = tmp_path / "bad.toml"
    f.write_text("[[provider.google.automation]]\n" + body + "\n")
    with pytest.raises(ShapingError) as e:
        Shaping.load([f], DELIVERY)
    assert f"{f}: [provider.google]: automation[0]: " in str(e.value)
    assert problem in str(e.value)


def test_a_rule_reads_only_the_first_512_characters_of_a_reply(rig):
    rule = next(r for r in rig.limits.limits(rig.path()).automation if r.name == "slow-down")
    assert rule.matches(421, "4.7.1", "please slow down")
    assert not rule.matches(421, "4.7.1", "x" * 512 + "slow down")
    assert not rule.matches(421, "4.2.1", "slow down"), "status prefix 4.7."


# --- triggers, actions, the way back -----------------------------------------------------------


def test_ts01_suspends_the_source_provider_pair_for_the_duration(rig):
    now = rig.loop.clock()
    rig.send([TS01, TS01], mx=YAHOO_MX)
    assert rig.hands.calls == [("pause_pair", "ip-1", "yahoo", False, now + 3600)]
    assert rig.ad.pair_until("ip-1", "yahoo") == now + 3600
    assert rig.hands.kinds() == [("AdaptiveAction", "ts-complaints", "suspend")]
    rec = rig.hands.records[0][1]
    assert rec["provider"] == "yahoo" and rec["until"] == now + 3600
    assert "[TS01]" in rec["reason"]
    # replies of attempts in flight do not stack actions or records
    rig.send([TS01], mx=YAHOO_MX)
    assert len(rig.hands.records) == 1
    view = rig.ad.view()
    assert [(v["rule"], v["action"], v["left"]) for v in view] == [
        ("ts-complaints", "suspend", 3600.0)]
    rig.loop.settle(3599)
    assert rig.ad.active, "ended early"
    rig.loop.settle(2)
    assert not rig.ad.active and rig.ad.pair_until("ip-1", "yahoo") == 0
    assert rig.hands.calls[-1] == ("lift_pair", "ip-1", "yahoo", False)
    assert rig.hands.kinds()[-1] == ("AdaptiveRestore", "ts-complaints", "suspend")


def test_after_n_matches_within_the_window_only(rig):
    slow = RemoteReply(421, "4.7.1", "slow down please")
    rig.send([slow])
    rig.loop.settle(400)
    rig.send([slow])
    rig.loop.settle(400)          # the first match is now 800 s old: outside 10m
    rig.send([slow])
    assert not rig.ad.active, "three matches, but not within 10 minutes"
    rig.loop.settle(700)          # t = 1500: the last three are 400, 800, 1500
    rig.send([slow, slow, slow])  # one attempt is one match, whatever its recipients
    assert not rig.ad.active
    rig.send([OK])                # (a 2xx is no match and resets nothing)
    rig.loop.settle(100)
    rig.send([slow])              # t = 1600: the last three are 800, 1500, 1600
    assert not rig.ad.active
    rig.send([slow])              # 1500, 1600, 1600: within 10 minutes
    assert [a.rule for a in rig.ad.active.values()] == ["slow-down"]


def test_set_values_come_back_in_steps_halving_the_cut(rig):
    slow = RemoteReply(421, "4.7.1", "slow down please")
    p = rig.path()
    for _ in range(3):
        rig.send([slow])
    lim = rig.limits.limits(p)
    assert (lim.max_message_rate, lim.connection_limit) == (Rate(10, 60), 2)
    assert "override:source_provider:ip-1->slowpoke" in lim.matched
    # another source at the same provider and the same source elsewhere are untouched
    assert rig.limits.limits(rig.path("ip-2")).connection_limit == 8
    assert rig.limits.limits(rig.path(mx=("mx.other.test",))).connection_limit != 2
    rig.loop.settle(1800.5)       # the duration: first step, half the cut back
    lim = rig.limits.limits(p)
    assert (lim.max_message_rate, lim.connection_limit) == (Rate(55, 60), 5)
    rig.loop.settle(1800)         # second step
    lim = rig.limits.limits(p)
    assert (lim.max_message_rate, lim.connection_limit) == (Rate(77.5, 60), 6)
    rig.loop.settle(1800)         # steps = 2: then the configured values
    lim = rig.limits.limits(p)
    assert (lim.max_message_rate, lim.connection_limit) == (Rate(100, 60), 8)
    assert not any(m.startswith("override") for m in lim.matched)
    assert rig.hands.kinds() == [("AdaptiveAction", "slow-down", "set"),
                                 ("AdaptiveRestore", "slow-down", "set"),
                                 ("AdaptiveRestore", "slow-down", "set"),
                                 ("AdaptiveRestore", "slow-down", "set")]
    steps = [f for _, f in rig.hands.records[1:]]
    assert steps[0]["value"] == {"max_message_rate": "55/m", "connection_limit": 5}
    assert steps[0]["reason"].startswith("step 1 of 3")
    assert steps[-1]["until"] is None and steps[-1]["reason"].startswith("done")


def test_good_deliveries_step_back_before_the_time_and_a_new_match_cuts_again(rig):
    slow = RemoteReply(421, "4.7.1", "slow down please")
    p = rig.path()
    for _ in range(3):
        rig.send([slow])
    rig.send([OK] * 49)
    assert rig.limits.limits(p).connection_limit == 2
    rig.send([OK])                # 50 good deliveries: one step
    assert rig.limits.limits(p).connection_limit == 5
    for _ in range(3):            # the provider complains again: the full cut
        rig.send([slow])
    assert rig.limits.limits(p).connection_limit == 2
    assert rig.ad.active[("slow-down", "set", "ip-1", "slowpoke", "")].step == 0


def test_tenant_campaign_source_and_bounce_actions(rig):
    now = rig.loop.clock()
    rig.send([RemoteReply(550, "5.7.1", "tenant t1 blocked")], tenant="t1", campaign="spring")
    assert ("hold", "slowpoke", "tenant", "t1", now + 7200) in rig.hands.calls
    assert ("hold", "slowpoke", "campaign", "spring", now + 7200) in rig.hands.calls
    assert ("bounce", "ip-1", "slowpoke", "t1", "spring") in rig.hands.calls
    assert ("pause_source", "ip-1", now + 7200) in rig.hands.calls
    assert rig.ad.hold_until("slowpoke", "t1", "") == now + 7200
    assert rig.ad.hold_until("slowpoke", "t2", "spring") == now + 7200
    assert rig.ad.hold_until("other", "t1", "spring") == 0
    bounce = next(f for t, f in rig.hands.records if f["action"] == "bounce")
    assert bounce["value"] == 7
    rig.loop.settle(7201)
    assert rig.ad.hold_until("slowpoke", "t1", "") == 0
    assert ("lift_source", "ip-1") in rig.hands.calls


# --- rates -----------------------------------------------------------------------------------


def test_window_ring_drops_old_minutes_in_constant_time():
    w = Window(60, 0.0)
    w.add(0.0, (10, 9, 1, 0, 0))
    w.add(59 * 60.0, (10, 10, 0, 0, 0))
    assert w.read(59 * 60.0)[:3] == [20, 19, 1]
    assert w.read(60 * 60.0)[:3] == [10, 10, 0], "the first minute left the window"
    assert w.read(10_000 * 60.0) == [0, 0, 0, 0, 0]


def test_bounce_rate_throttles_then_suspends_above_minimum_volume(rig):
    hard = RemoteReply(550, "5.1.1", "no such user")
    p = rig.path()
    rig.send([hard] * 20 + [OK] * 60)       # 25 % but 80 < min_volume 100: nothing
    assert not rig.ad.active
    rig.send([OK] * 20)                     # 100 tried, 20 % hard: suspend (10 %)
    (a,) = rig.ad.active.values()
    assert (a.rule, a.action) == ("rate:bounce", "suspend")
    assert "bounce rate 20.00 % of 100" in a.reason
    rig.loop.settle(4 * 3600 + 1)           # suspend_for 4h
    assert not rig.ad.active
    rig.send([hard] * 4 + [OK] * 96)        # 4 %: throttle (3 %)
    (a,) = rig.ad.active.values()
    assert (a.rule, a.action) == ("rate:bounce", "set")
    # half of what it sent in the window (100 in 1 minute), below its 100/m limit: 50/m
    assert rig.limits.limits(p).max_message_rate == Rate(50, 60)


def test_complaint_rate_counts_against_deliveries(rig):
    rig.send([OK] * 199)
    for _ in range(2):
        rig.ad.complaint("ip-1", "slowpoke", False)
    assert not rig.ad.active, "199 delivered is below min_complaint_volume 200"
    rig.send([OK])                         # 2 / 200 = 1 %: suspend (0.5 %)
    (a,) = rig.ad.active.values()
    assert (a.rule, a.action) == ("rate:complaint", "suspend")


def test_deferral_rate_ignores_greylisting(rig):
    grey = RemoteReply(450, "4.7.1", "greylisted, try again in 5 minutes")
    policy = RemoteReply(421, "4.7.0", "too much mail from you")
    rig.send([grey] * 80 + [OK] * 20)
    assert not rig.ad.active
    rig.send([policy] * 35 + [OK] * 65)   # 35 of 200 = 17.5 %: under 30 %
    assert not rig.ad.active
    rig.send([policy] * 60)               # 95 of 260 = 36.5 %: throttle
    (a,) = rig.ad.active.values()
    assert (a.rule, a.action) == ("rate:deferral", "set")


# --- restart ---------------------------------------------------------------------------------


def test_state_survives_a_restart_and_steps_on(rig):
    slow = RemoteReply(421, "4.7.1", "slow down please")
    for _ in range(3):
        rig.send([slow])
    rig.send([TS01], mx=YAHOO_MX)
    state = rig.ad.state()
    assert rig.hands.saves >= 2
    rig.loop.settle(600)
    # a new process: a fresh LimitsSource and Adaptive over the same files
    limits = LimitsSource(rig.shaping, clock=rig.loop.clock)
    limits.start(rig.loop)
    hands = Hands()
    ad = Adaptive(limits, hands, config(), clock=rig.loop.clock)
    assert ad.restore(state) == 2
    ad.start(rig.loop)
    assert hands.calls == [("pause_pair", "ip-1", "yahoo", False, state["actions"][1]["until"])]
    assert limits.limits(rig.path()).connection_limit == 2
    assert {(v["rule"], v["left"]) for v in ad.view()} == {("slow-down", 1200.0),
                                                           ("ts-complaints", 3000.0)}
    rig.loop.settle(1200.5)
    assert limits.limits(rig.path()).connection_limit == 5, "did not step on after restore"
    rig.loop.settle(1800)
    assert ad.pair_until("ip-1", "yahoo") == 0
    ad.stop()
    limits.stop()


def test_restore_drops_ended_suspensions_and_bad_entries(rig):
    rig.send([TS01], mx=YAHOO_MX)
    state = rig.ad.state()
    state["actions"].append({"rule": "x", "action": "explode"})
    rig.loop.settle(4000)
    ad = Adaptive(rig.limits, Hands(), config(), clock=rig.loop.clock)
    assert ad.restore(state) == 0
    with pytest.raises(ValueError):
        ad.restore({"version": 99})


def test_a_site_failure_is_one_event_however_many_messages_it_defers(rig):
    slow = RemoteReply(421, "4.7.1", "slow down: too many connections")
    for _ in range(5):            # five queued messages deferred with one greeting reply
        rig.send([slow], fresh=False)
    assert not rig.ad.active, "one failure counted as three matches"
    w = rig.ad._windows[("ip-1", "slowpoke")]
    assert w.read(rig.loop.clock())[0] == 1
