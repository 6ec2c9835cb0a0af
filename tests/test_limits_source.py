"""The limits source (mta.egress.limits): run-time overrides over the shaping files, by
provider, site, source and (source, site); checks and their messages; expiry on virtual
time; subscribers told what changed."""
from __future__ import annotations

import dataclasses

import pytest
from virtual_time import VirtualLoop

from mta.config.load import parse_config
from mta.egress.limits import LimitsError, LimitsSource, Scope, retune
from mta.egress.shaping import Shaping
from mta.egress.throttle import Throttle
from mta.model.rate import Rate

DELIVERY = dataclasses.asdict(parse_config("").delivery)
GMAIL_MX = ("alt1.gmail-smtp-in.l.google.com", "gmail-smtp-in.l.google.com")
GMAIL_SITE = ",".join(GMAIL_MX)


@pytest.fixture
def source(tmp_path):
    f = tmp_path / "shaping.toml"
    f.write_text('["default"]\nconnection_limit = 10\n'
                 '[provider.google]\nmatch = ["*.google.com"]\nconnection_limit = 5\n')
    return LimitsSource(Shaping.load([f], DELIVERY, shipped=False))


def _gmail(src: LimitsSource, source: str = "ip-1"):
    return src.path(source, GMAIL_SITE, "gmail.com", GMAIL_MX)


def test_no_override_is_the_shaping_files(source):
    lim = source.limits(_gmail(source))
    assert (lim.connection_limit, lim.matched) == (5, ("default", "provider:google"))
    assert _gmail(source).provider == "google"


def test_overrides_rank_provider_site_source_pair(source):
    seen = []
    source.subscribe(seen.append)
    path = _gmail(source)
    source.set(Scope("pair", "ip-1", GMAIL_SITE), {"connection_limit": 1})
    source.set(Scope("source", "ip-1"), {"connection_limit": 2, "max_message_rate": "60/m"})
    source.set(Scope("site", GMAIL_SITE), {"connection_limit": 3, "tls": "required"})
    source.set(Scope("provider", "google"), {"connection_limit": 4, "idle_timeout": "1s"})
    lim = source.limits(path)
    got = (lim.connection_limit, lim.max_message_rate, lim.tls, lim.idle_timeout)
    assert got == (1, Rate(60, 60), "required", 1.0), f"got {got}: the pair must win"
    assert lim.matched[-4:] == ("override:provider:google", f"override:site:{GMAIL_SITE}",
                                "override:source:ip-1", f"override:pair:ip-1->{GMAIL_SITE}")
    assert len(seen) == 4 and source.generation == 4
    other = source.limits(_gmail(source, "ip-2"))        # another source: not the pair's
    assert other.connection_limit == 3, f"got {other.connection_limit}, want the site's 3"
    assert source.clear(Scope("pair", "ip-1", GMAIL_SITE))
    assert source.limits(path).connection_limit == 2
    assert source.clear(Scope("source", "ip-1"), ["connection_limit"])
    lim = source.limits(path)
    assert (lim.connection_limit, lim.max_message_rate) == (3, Rate(60, 60))
    assert not source.clear(Scope("pair", "ip-1", GMAIL_SITE)), "nothing left to clear"


def test_set_merges_keys_into_the_scope(source):
    scope = Scope("site", GMAIL_SITE)
    source.set(scope, {"connection_limit": 2})
    source.set(scope, {"max_deliveries_per_connection": 7})
    lim = source.limits(_gmail(source))
    assert (lim.connection_limit, lim.max_deliveries_per_connection) == (2, 7)
    assert [o["values"] for o in source.overrides()] == [
        {"connection_limit": 2, "max_deliveries_per_connection": 7}]


@pytest.mark.parametrize("scope, values, want", [
    (Scope("site", "x"), {"conection_limit": 1}, "conection_limit is not a shaping key"),
    (Scope("site", "x"), {"connection_limit": 0}, "connection_limit: 0 is out of range"),
    (Scope("site", "x"), {"max_message_rate": "fast"}, "max_message_rate: "),
    (Scope("site", "x"), {"scope": "site"}, "scope is decided by the shaping files"),
    (Scope("source", "ip-1"), {"site_connection_limit": 3}, "applies to a whole site"),
    (Scope("site", "x"), {}, "no keys to override"),
])
def test_bad_overrides_are_refused_with_the_reason(source, scope, values, want):
    with pytest.raises(LimitsError, match=want.replace("(", r"\(")):
        source.set(scope, values)
    assert source.generation == 0 and not source.overrides()


def test_scope_needs_its_names():
    with pytest.raises(LimitsError, match="one of: provider, site, source, source_provider, pair"):
        Scope("domain", "example.com")
    with pytest.raises(LimitsError, match="a source and a site"):
        Scope("pair", "ip-1")


def test_an_override_expires_on_time_and_subscribers_hear_it(source):
    loop = VirtualLoop()
    src = LimitsSource(source.shaping, clock=loop.clock)
    seen = []
    src.subscribe(seen.append)
    src.start(loop)
    scope = Scope("site", GMAIL_SITE)
    src.set(scope, {"connection_limit": 1}, ttl=60, reason="adaptive: 421 storm")
    src.set(Scope("source", "ip-9"), {"connection_limit": 2}, ttl=600)
    assert src.overrides()[0]["expires"] == loop.clock() + 60
    loop.settle(59.9)
    assert src.limits(_gmail(src)).connection_limit == 1, "expired early"
    loop.settle(0.2)
    assert src.limits(_gmail(src)).connection_limit == 5, "not expired after its ttl"
    assert seen == [scope, Scope("source", "ip-9"), scope]
    loop.settle(600)
    assert not src.overrides() and src.next_expiry() is None
    src.stop()
    loop.close()


def test_a_rate_change_keeps_the_bucket_and_its_earned_tokens():
    bucket = Throttle(Rate(1, 1))                  # burst 1
    assert bucket.delay(0.0) == 0.0                # the one token is spent
    # 0.5 s at 1/s earns half a token; the rest comes at the new 6/m: 5 s, not a new burst
    assert retune(bucket, Rate(6, 60), 0.5) is bucket
    assert bucket.delay(0.5) == pytest.approx(5.0)
    assert bucket.delay(5.5) == 0.0
    fast = retune(bucket, Rate(100, 1), 5.5)       # a bigger burst fills only with time
    assert fast is bucket and bucket.burst == 100 and bucket.delay(5.5) > 0
    assert retune(bucket, None, 6.0) is None
    assert retune(None, Rate(1, 1), 6.0).delay(6.0) == 0.0, "a new limit starts full"


def test_an_explicit_burst_stays_when_the_rate_changes():
    bucket = Throttle(Rate(1, 1), burst=3)
    bucket.set_rate(Rate(10, 1), 0.0)
    assert bucket.burst == 3
