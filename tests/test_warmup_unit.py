"""IP warm-up (mta/egress/warmup.py) on a virtual clock: caps per day and hour per provider
class, the day's rollover, growth and hold-back from the day's replies and complaints,
overflow to the pool's warm sources, waiting when all are capped, the state file, and the
engine's routing of what a warming source may not take (real DeliveryEngine, Scheduler,
Dispatcher on a VirtualLoop; the SMTP client is a script)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from test_dispatcher_unit import Rig as EngineRig
from virtual_time import START, VirtualClock

from mta.config import ConfigError
from mta.config.load import parse_config
from mta.egress.pools import Egress
from mta.egress.shaping import Shaping, ShapingError
from mta.egress.warmup import STATE_NAME, Warmup
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.log_records import FIELDS, RecordType
from mta.model.queued import InsertReason

DAY = 240.0          # day_length "240s": an hour is 10 s
HOUR = DAY / 24
GMAIL = SimpleNamespace(name="gmail-smtp-in.l.google.com",
                        hosts=[SimpleNamespace(name="gmail-smtp-in.l.google.com")])
OTHER = SimpleNamespace(name="mx.other.test", hosts=[SimpleNamespace(name="mx.other.test")])
THIRD = SimpleNamespace(name="mx.third.test", hosts=[SimpleNamespace(name="mx.third.test")])


class Logs:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, rtype: RecordType, **fields) -> None:
        assert set(fields) | {"time"} <= set(FIELDS[rtype]), set(fields) - set(FIELDS[rtype])
        self.records.append({"type": rtype.value, **fields})


def warmup_toml(sources: str = 'warmup_start = "now"', warmup: str = "",
                hour_divisor: int = 1) -> str:
    """Sources "new" (warming unless `sources` says otherwise) and "old", pools "warming"
    (new) and "mixed" (both), and [warmup] with 4-minute days and small caps."""
    return f"""
[[source]]
name = "new"
address = "127.0.45.1"
{sources}
[[source]]
name = "old"
address = "127.0.45.2"
[[pool]]
name = "warming"
sources = ["new"]
[[pool]]
name = "mixed"
sources = ["new", "old"]
[warmup]
day_length = "{DAY:g}s"
major = [10, 20, 40]
small = [4, 8]
default = [3, 6]
hour_divisor = {hour_divisor}
min_volume = 10
{warmup}
"""


def config(sources: str = 'warmup_start = "now"', warmup: str = "", hour_divisor: int = 1):
    return parse_config(warmup_toml(sources, warmup, hour_divisor))


def shaping(tmp_path=None, text: str = "") -> Shaping:
    files = []
    if text:
        (tmp_path / "shaping.toml").write_text(text)
        files = [tmp_path / "shaping.toml"]
    return Shaping.load(files, {"connection_limit": 5, "max_deliveries_per_connection": 5,
                                "max_recipients_per_transaction": 5, "idle_timeout": 5,
                                "tls": "off", "retry_initial": 5, "retry_max": 10})


class Rig:
    def __init__(self, tmp_path, cfg=None, shape=None, clock=None):
        self.clock = clock or VirtualClock()
        self.cfg = cfg or config()
        self.logs = Logs()
        self.egress = Egress(self.cfg)
        self.path = tmp_path / STATE_NAME
        self.warmup = Warmup(self.cfg, shape or shaping(), state_path=self.path,
                             logs=self.logs, clock=self.clock)

    def pick(self, pool: str = "warming", site=OTHER):
        p = self.egress.pools[pool]
        got = self.warmup.pick(p, p.next(), site)
        return got.name if got is not None else None

    def picks(self, n: int, **kw) -> list:
        return [self.pick(**kw) for _ in range(n)]

    def reply(self, code: int, status: str, n: int = 1, site=OTHER, source="new") -> None:
        at = Attempt(source, site.name, mx=site.name)
        msg = SimpleNamespace(rcpts=list(range(n)))
        self.warmup.observe(AttemptResult(msg, None, at, [(i, RemoteReply(code, status, "x"))
                                                          for i in range(n)]))


def test_day_cap_then_wait_until_the_next_day(tmp_path):
    r = Rig(tmp_path)
    assert r.picks(4) == ["new", "new", "new", None]     # default class: 3 on day 1
    assert r.warmup.resume_at == START + DAY
    r.clock.advance(DAY - 1)
    assert r.pick() is None                                # still day 1
    r.clock.advance(1)
    assert r.picks(7) == ["new"] * 6 + [None]              # day 2: 6


def test_hour_cap_is_the_day_cap_over_hour_divisor(tmp_path):
    r = Rig(tmp_path, config(hour_divisor=2))
    assert r.warmup.cfg.hour_divisor == 2
    assert r.picks(3) == ["new", "new", None]              # ceil(3 / 2) = 2 an hour
    assert r.warmup.resume_at == START + HOUR
    r.clock.advance(HOUR)
    assert r.picks(2) == ["new", None]                     # the day's 3rd, then the day cap
    assert r.warmup.resume_at == START + DAY


def test_caps_count_per_provider_and_class(tmp_path):
    r = Rig(tmp_path)
    assert r.picks(11, site=GMAIL) == ["new"] * 10 + [None]   # Gmail: major, 10
    assert r.picks(4, site=OTHER) == ["new"] * 3 + [None]     # a site of its own: default
    assert r.picks(4, site=THIRD) == ["new"] * 3 + [None]     # another, counted apart
    view, = r.warmup.view()
    use = {u["target"]: (u["class"], u["day"]) for u in view["use"]}
    assert use == {"google": ("major", 10), "site:mx.other.test": ("default", 3),
                   "site:mx.third.test": ("default", 3)}


def test_warmup_class_comes_from_the_provider_table(tmp_path):
    shape = shaping(tmp_path, '[provider.smallisp]\nmatch = ["*.other.test"]\n'
                              'warmup_class = "small"\n')
    r = Rig(tmp_path, shape=shape)
    assert r.picks(5) == ["new"] * 4 + [None]               # small: 4
    assert shape.warmup_class("google") == "major" and shape.warmup_class(None) == "default"
    with pytest.raises(ShapingError, match="warmup_class"):
        shaping(tmp_path, '[provider.x]\nmatch = ["*.x.test"]\nwarmup_class = "huge"\n')


def test_what_a_capped_source_may_not_send_goes_to_the_warm_one(tmp_path):
    r = Rig(tmp_path)
    got = r.picks(20, pool="mixed")
    assert got.count("new") == 3 and got.count("old") == 17 and None not in got
    assert r.warmup.view()[0]["use"][0]["day"] == 3


def test_an_all_capped_pool_is_remembered_until_a_cap_frees(tmp_path):
    r = Rig(tmp_path)
    r.picks(3)
    assert r.pick() is None
    blocked = dict(r.warmup._blocked)
    assert blocked == {("warming", "site:mx.other.test"): START + DAY}
    assert r.pick() is None and r.warmup.resume_at == START + DAY
    r.clock.advance(DAY)
    assert r.pick() == "new"


def test_the_cap_grows_each_day_and_ends(tmp_path):
    r = Rig(tmp_path)
    caps = []
    for _ in range(4):
        caps.append(sum(1 for x in r.picks(10) if x))
        r.clock.advance(DAY)
    assert caps == [3, 6, 10, 10]                 # [3, 6], then no cap
    grown = [x for x in r.logs.records if x["class"] == "default"]
    assert [(x["day"], x["cap"], x["action"]) for x in grown] == [
        (2, 6, "grown"), (3, None, "grown")]      # warm at default: nothing more to log
    assert r.warmup.view()[0]["classes"][2]["day_cap"] is None


def test_a_day_over_the_bounce_threshold_holds_the_cap(tmp_path):
    r = Rig(tmp_path)
    r.picks(3)
    r.reply(250, "2.0.0", n=90)
    r.reply(550, "5.1.1", n=10)                   # 10 % > 3 %
    view = r.warmup.view()[0]["classes"][2]
    assert not view["may_grow"] and view["why_not"].startswith("bounce rate 10.00 % > 3 %")
    r.clock.advance(DAY)
    assert r.picks(4) == ["new"] * 3 + [None]     # held at 3
    rec = [x for x in r.logs.records if x["class"] == "default"][-1]
    assert (rec["action"], rec["cap"], rec["tried"], rec["bounced"]) == ("held", 3, 100, 10)
    assert "bounce rate" in rec["reason"]
    r.clock.advance(DAY)                          # an idle day: grows
    assert r.picks(7) == ["new"] * 6 + [None]


def test_complaints_and_sender_deferrals_hold_but_greylisting_does_not(tmp_path):
    r = Rig(tmp_path, config(warmup='on_breach = "step_back"'))
    r.clock.advance(DAY)                          # day 2: cap 6
    r.reply(250, "2.0.0", n=100, site=GMAIL)
    r.reply(451, "4.3.0", n=50, site=GMAIL)       # greylisting: not about the sender
    r.warmup.complaint("new", GMAIL.name)         # 1 in 150 = 0.67 % > 0.2 %
    r.reply(250, "2.0.0", n=100)
    r.reply(421, "4.7.0", n=20)                   # [TS01]-style deferral: 16.7 % > 10 %
    classes = {c["class"]: c for c in r.warmup.view()[0]["classes"]}
    assert classes["major"]["why_not"].startswith("complaint rate 0.67 %")
    assert classes["default"]["why_not"].startswith("deferral rate 16.67 %")
    assert classes["small"]["may_grow"]
    r.clock.advance(DAY)
    caps = {c["class"]: c["day_cap"] for c in r.warmup.view()[0]["classes"]}
    assert caps == {"major": 10, "small": None, "default": 3}   # stepped back; small done


def test_state_survives_a_restart(tmp_path):
    r = Rig(tmp_path)
    r.clock.advance(DAY + 3 * HOUR)
    r.picks(4)                                    # day 2: 6 allowed, 4 used
    r.reply(550, "5.1.1", n=2)
    r.warmup.stop()
    state = json.loads(r.path.read_text())
    assert state["sources"]["new"]["start"] == START and state["sources"]["new"]["day"] == 2
    again = Rig(tmp_path, clock=r.clock)          # "now" keeps the first start
    view, = again.warmup.view()
    assert view["day"] == 2 and view["start"] == START
    assert view["use"][0]["day"] == 4 and view["classes"][2]["bounced"] == 2
    assert again.picks(3) == ["new", "new", None]


def test_a_changed_start_begins_again_and_an_unreadable_file_is_set_aside(tmp_path):
    r = Rig(tmp_path)
    r.clock.advance(DAY)
    r.picks(2)
    r.warmup.stop()
    moved = Rig(tmp_path, config(sources='warmup_start = 2027-01-16'), clock=r.clock)
    assert moved.warmup.view()[0]["day"] == 1     # the date is after the virtual START
    r.path.write_text("{not json")
    fresh = Rig(tmp_path, clock=r.clock)
    assert fresh.warmup.view()[0]["day"] == 1
    assert (tmp_path / (STATE_NAME + ".bad")).exists()


def test_a_warm_source_is_not_counted(tmp_path):
    r = Rig(tmp_path, config(sources=""))
    assert r.warmup.sources == {}
    assert r.picks(50) == ["new"] * 50


def test_a_dated_start_counts_days_from_midnight_utc():
    # START is 2027-01-15T08:00:00Z; with 1-day days, a start on 2027-01-13 is day 3
    cfg = parse_config('[[source]]\nname = "new"\naddress = "127.0.45.1"\n'
                       'warmup_start = 2027-01-13\n')
    w = Warmup(cfg, shaping(), state_path=None, clock=VirtualClock())
    assert w.view()[0]["day"] == 3
    assert [c["day_cap"] for c in w.view()[0]["classes"]] == [40000, 4000, 4000]


@pytest.mark.parametrize("bad, why", [
    ("major = [10, 30]", "more than double"),
    ("small = []", "non-empty"),
    ("max_bounce_rate = 120", "0..100"),
])
def test_bad_schedules_and_thresholds_are_refused(bad, why):
    with pytest.raises(ConfigError, match=why):
        parse_config(f"[warmup]\n{bad}\n")


# -- the engine: routing what a warming source may not take ---------------------------------


@pytest.fixture
def engine_rig(monkeypatch, tmp_path):
    """tests/test_dispatcher_unit.py's rig (the real engine on a VirtualLoop, a scripted
    network) with this file's sources, pools and [warmup], the state in tmp_path."""
    rigs = []

    def make(pool: str) -> Rig:
        rest = (f'[spool]\ndirectory = "{tmp_path}"\n[egress]\ndefault_pool = "{pool}"\n'
                + warmup_toml())
        rigs.append(EngineRig(monkeypatch, tmp_path, delivery=rest))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def sent_by_source(r: EngineRig) -> dict[str, int]:
    return {key[0]: d.sent for key, d in r.engine.dispatchers.items()}


def run(r: EngineRig, seconds: float) -> None:
    r.loop.run(asyncio.sleep(seconds))


def test_engine_sends_the_rest_through_the_warm_source(engine_rig):
    r = engine_rig("mixed")
    r.send(20)
    run(r, 30)
    assert sent_by_source(r) == {"new": 3, "old": 17}
    assert len(r.net.sends) == 20


def test_engine_holds_what_no_source_may_send_until_the_next_day(engine_rig):
    r = engine_rig("warming")
    r.send(10)
    run(r, 30)
    assert len(r.net.sends) == 3
    assert r.engine.scheduler.inserts[InsertReason.WARMUP] >= 7
    run(r, DAY)                                    # day 2: 6 more, the last one waits again
    assert len(r.net.sends) == 9
    run(r, DAY)
    assert len(r.net.sends) == 10                 # day 3: no cap left
    assert r.spool.finished and len(set(r.spool.finished)) == 10
    state = json.loads((r.engine.config.spool.directory / STATE_NAME).read_text())
    assert state["sources"]["new"]["day"] == 3


def test_the_operator_view_round_trips(tmp_path):
    from mta.control.views import WarmupRow
    r = Rig(tmp_path)
    r.picks(2, site=GMAIL)
    r.reply(550, "5.1.1", n=20)
    rows = [WarmupRow.from_json(v) for v in r.warmup.view()]
    assert [WarmupRow.from_json(x.to_json()) for x in rows] == rows
    (row,) = rows
    assert (row.source, row.day, [c.klass for c in row.classes]) == ("new", 1, list(
        ("major", "small", "default")))
    default = row.classes[2]
    assert (default.day_cap, default.hour_cap, default.tried, default.bounced) == (3, 3, 20, 20)
    assert not default.may_grow and default.why_not.startswith("bounce rate 100.00 %")
    assert [(u.target, u.klass, u.day, u.hour) for u in row.use] == [("google", "major", 2, 2)]


def test_a_reload_takes_new_schedules_and_sources(tmp_path):
    r = Rig(tmp_path)
    r.picks(2)
    r.warmup.reconfigure(config(sources='warmup_start = "now"', hour_divisor=1),
                         shaping(tmp_path, '[provider.o]\nmatch = ["*.other.test"]\n'
                                           'warmup_class = "small"\n'))
    # the site is now provider "o", class small: counted under its new name, cap 4
    assert r.picks(5) == ["new"] * 4 + [None]
    assert {u["target"]: u["day"] for u in r.warmup.view()[0]["use"]} == {
        "site:mx.other.test": 2, "o": 4}
    r.warmup.reconfigure(config(sources=""), shaping())
    assert r.warmup.sources == {} and r.pick() == "new"
