"""Egress pools (smooth weighted round-robin), egress rules, queue-class lanes, config checks."""
from __future__ import annotations

from collections import Counter

import pytest

from mta.config import ConfigError, parse_config
from mta.egress.pools import Egress, Pool, Source, smooth_wrr
from mta.model.envelope import Envelope
from mta.model.queued import QueuedMessage
from mta.queues.ready import ReadyQueue
from mta.queues.scheduled import ScheduledQueue

CONFIG = """
[[source]]
name = "a"
address = "127.1.0.1"
[[source]]
name = "b"
address = "127.1.0.2"
[[source]]
name = "c"
address = "127.1.0.3"
[[pool]]
name = "p31"
sources = [{source = "a", weight = 3}, "b"]
[[pool]]
name = "vip"
sources = ["c"]
[[egress_rule]]
tenant = "acme"
pool = "p31"
[[egress_rule]]
header = "X-Mailer-Kind"
header_value = "receipt"
queue_class = "transactional"
pool = "vip"
[[queue_class]]
name = "warmup"
weight = 2
"""


def _src(name: str) -> Source:
    return Source(name, None, "x.test")


def test_smooth_wrr_spreads_and_honours_weights():
    a, b, c = _src("a"), _src("b"), _src("c")
    seq = [s.name for s in smooth_wrr([(a, 3), (b, 1), (c, 2)])]
    assert Counter(seq) == {"a": 3, "b": 1, "c": 2}
    assert "aaa" not in "".join(seq), f"got {seq}: weight 3 must not come as one burst"


def test_pool_skips_a_suspended_source():
    a, b = _src("a"), _src("b")
    pool = Pool("p", [(a, 1), (b, 1)])
    a.suspended_until = 10**12
    assert {pool.next().name for _ in range(10)} == {"b"}
    b.suspended_until = 10**12       # every source suspended: one is returned (it waits)
    assert pool.next().name in {"a", "b"}


def _env(sender: str, **fields) -> Envelope:
    return Envelope("", sender, [], **fields)


def test_rules_choose_pool_and_class():
    eg = Egress(parse_config(CONFIG))
    assert eg.select(_env("x@y.test", tenant="acme")) == ("bulk", "p31")
    assert eg.select(_env("x@y.test", headers={"X-Mailer-Kind": "Receipt"})) == \
        ("transactional", "vip")
    assert eg.select(_env("x@y.test", queue_class="warmup")) == ("warmup", "default")
    assert eg.select(_env("x@y.test", queue_class="no-such-class")) == ("bulk", "default")
    weights = Counter(eg.pools["p31"].next().name for _ in range(400))
    assert weights == {"a": 300, "b": 100}


@pytest.mark.parametrize("bad,want", [
    ('[[pool]]\nname = "p"\nsources = ["zz"]\n', "pool[0].sources[0]: no [[source]] is named 'zz'"),
    ('[egress]\ndefault_class = "vip"\n', "egress.default_class: 'vip' is not a queue class"),
    ('[[egress_rule]]\npool = "nope"\n', "egress_rule[0].pool: no [[pool]] is named 'nope'"),
    ('[[source]]\nname = "a"\naddress = "127.1.0.1"\n[[source]]\nname = "a"\naddress = "127.1.0.2"\n',
     "source[1].name: 'a' is already the name of source[0]"),
])
def test_egress_config_problems_name_the_key(bad, want):
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    assert want in str(e.value), f"got {e.value}"


class _Site:
    name = "mx.test"


def test_transactional_lane_is_not_blocked_by_a_full_bulk_lane():
    bulk = ScheduledQueue("b@x", "x", "", "", klass="bulk")
    tx = ScheduledQueue("transactional/b@x", "x", "", "", klass="transactional")
    rq = ReadyQueue("s", _Site(), capacity=100, lane_for={"transactional": (16, None),
                                                          "bulk": (1, None)})
    for i in range(100):
        assert rq.push(QueuedMessage(bytes([i]) * 16, bulk, (0,)))
    assert not rq.push(QueuedMessage(b"\xff" * 16, bulk, (0,))), "the bulk lane is bounded"
    assert rq.push(QueuedMessage(b"\xee" * 16, tx, (0,))), "the transactional lane has room"
    assert rq.pop().queue is tx, "the transactional message goes first (weight 16 vs 1)"
    taken = [rq.pop().queue.klass for _ in range(5)]
    assert taken == ["bulk"] * 5


def pick_pool(envelope: Envelope, klass: str) -> str | None:
    """egress.pool_hook used below: VIP senders to pool "vip", others to the rules."""
    return "vip" if envelope.sender.startswith("vip@") else None


def test_pool_hook_decides_when_no_rule_does():
    eg = Egress(parse_config(CONFIG + '[egress]\npool_hook = "test_egress_pools:pick_pool"\n'))
    assert eg.select(_env("vip@y.test")) == ("bulk", "vip")
    assert eg.select(_env("x@y.test")) == ("bulk", "default")
    assert eg.select(_env("vip@y.test", tenant="acme")) == ("bulk", "p31"), \
        "a matching rule wins over the hook"


def test_pool_hook_that_cannot_load_is_a_clear_error():
    from mta.egress.pools import EgressError
    with pytest.raises(EgressError, match="no_such_module"):
        Egress(parse_config('[egress]\npool_hook = "no_such_module:f"\n'))


def test_check_config_reports_a_bad_shaping_file(tmp_path, capsys):
    from mta.cli import main
    (tmp_path / "shaping.toml").write_text('["default"]\nconnection_limt = 3\n')
    conf = tmp_path / "mta.toml"
    conf.write_text(f'[egress]\nshaping = ["{tmp_path / "shaping.toml"}"]\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n')
    assert main(["check-config", "-c", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "shaping.toml: [default]: connection_limt: unknown key" in err, err


def test_class_rate_limit_skips_a_throttled_lane():
    from mta.egress.throttle import Throttle
    from mta.model.rate import Rate
    warm = ScheduledQueue("warmup/b@x", "x", "", "", klass="warmup")
    bulk = ScheduledQueue("b@x", "x", "", "", klass="bulk")
    rq = ReadyQueue("s", _Site(), capacity=100,
                    lane_for={"warmup": (1000, Throttle(Rate(1, 60), burst=1)), "bulk": (1, None)})
    for i in range(5):
        rq.push(QueuedMessage(bytes([i]) * 16, warm, (0,)))
        rq.push(QueuedMessage(bytes([100 + i]) * 16, bulk, (0,)))
    got = [rq.pop().queue.klass for _ in range(5)]
    assert got == ["warmup"] + ["bulk"] * 4, f"got {got}: one warm-up message per minute"
    assert rq.pop().queue.klass == "bulk"
    assert rq.pop() is None and len(rq) == 4 and rq.wait_hint > 50, \
        "only throttled messages left: nothing now, a hint when to look again"
