"""Traffic shaping rules (mta.egress.shaping) and the token bucket (mta.egress.throttle):
file checks and their messages, layering of files, resolution by domain, site, MX suffix
and source, the cache, the shipped provider rules, and rate accuracy on a fake clock."""
from __future__ import annotations

import dataclasses
import random
import tomllib

import pytest

from mta.config.load import parse_config
from mta.config.values import parse_rate
from mta.egress.shaping import KEYS, SHIPPED, Limits, Shaping, ShapingError
from mta.egress.throttle import Throttle
from mta.model.rate import Rate

DELIVERY = dataclasses.asdict(parse_config("").delivery)

GMAIL_MX = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"]
WORKSPACE_MX = ["aspmx.l.google.com", "alt1.aspmx.l.google.com", "alt2.aspmx.l.google.com"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, *texts, shipped=False, **kw):
    files = [write(tmp_path, f"s{i}.toml", t) for i, t in enumerate(texts)]
    return Shaping.load(files, DELIVERY, shipped=shipped, **kw)


# --- rates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rate", [
    ("10/s", Rate(10, 1)), ("600/m", Rate(600, 60)), ("5000/h", Rate(5000, 3600)),
    ("100/min", Rate(100, 60)), ("2/day", Rate(2, 86400)), ("100/5m", Rate(100, 300)),
    (" 1.5 / hour ", Rate(1.5, 3600)), ("unlimited", None),
])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


def test_rate_per_second_and_str():
    assert Rate(600, 60).per_second == 10
    assert str(Rate(600, 60)) == "600/m"
    assert str(Rate(100, 300)) == "100/300s"


# --- file checks ---------------------------------------------------------------------------


def test_unknown_key_names_file_table_and_allowed(tmp_path):
    with pytest.raises(ShapingError) as e:
        load(tmp_path, '[provider.google]\nmatch = ["*.google.com"]\nmax_conection_rate = "1/s"\n')
    text = str(e.value)
    assert "s0.toml" in text and "[provider.google]" in text
    assert "max_conection_rate: unknown key" in text
    assert "max_connection_rate" in text and "connection_limit" in text   # the allowed ones


def test_unknown_key_in_source_table(tmp_path):
    with pytest.raises(ShapingError, match=r's0.toml: \["gmail.com".sources.ip-1\]: bogus'):
        load(tmp_path, '["gmail.com".sources."ip-1"]\nbogus = 1\n')


@pytest.mark.parametrize("value", ['"10 per second"', '"10/fortnight"', '"0/s"', "10"])
def test_bad_rate(tmp_path, value):
    with pytest.raises(ShapingError) as e:
        load(tmp_path, f'["default"]\nmax_message_rate = {value}\n')
    assert 's0.toml: [default]: max_message_rate:' in str(e.value)
    assert "rate" in str(e.value)


@pytest.mark.parametrize("text, problem", [
    ('["default"]\nconnection_limit = "ten"\n', "expected an integer"),
    ('["default"]\nconnection_limit = 0\n', "out of range"),
    ('["default"]\ntls = "maybe"\n', "not one of"),
    ('["default"]\nidle_timeout = "soon"\n', "not a duration"),
    ('["default"]\nsources = 3\n', "expected a table"),
    ('[provider.x]\nmatch = "*.x.com"\n', "expected an array"),
    ('[provider.x]\nmatch = ["*.x..com"]\n', "match[0]"),
    ('[".google.com"]\nconnection_limit = 1\n', "[provider.NAME] match"),
    ('["default".sources.a]\nsite_connection_limit = 3\n', "not inside a sources table"),
    ('["gmail.com"]\nmatch = ["*.google.com"]\n', "unknown key"),
])
def test_bad_values(tmp_path, text, problem):
    with pytest.raises(ShapingError) as e:
        load(tmp_path, text)
    assert "s0.toml" in str(e.value) and problem in str(e.value)


def test_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ShapingError, match="s0.toml: TOML syntax error"):
        load(tmp_path, "[default\n")
    with pytest.raises(ShapingError, match="nope.toml: cannot read"):
        Shaping.load([tmp_path / "nope.toml"], DELIVERY, shipped=False)


def test_pattern_belongs_to_one_provider(tmp_path):
    with pytest.raises(ShapingError, match=r"\[provider.b\]: match: \"\*.x.com\" is also"):
        load(tmp_path, '[provider.a]\nmatch = ["*.x.com"]\n[provider.b]\nmatch = ["*.X.com."]\n')


def test_provider_without_match_is_an_error(tmp_path):
    with pytest.raises(ShapingError, match=r"s1.toml: \[provider.gogle\]: no match"):
        load(tmp_path, BASE, "[provider.gogle]\nconnection_limit = 1\n")
    disabled = load(tmp_path, BASE, "[provider.google]\nmatch = []\n")
    assert disabled.limits("a", "gmail.com", GMAIL_MX).matched == ("default",)


def test_delivery_defaults_required():
    partial = dict(DELIVERY)
    del partial["retry_max"]
    with pytest.raises(ShapingError, match="retry_max: required"):
        Shaping.load([], partial, shipped=False)


# --- layering and resolution ---------------------------------------------------------------

BASE = """
["default"]
max_message_rate = "100/s"

[provider.google]
match = ["*.google.com", "*.googlemail.com"]
connection_limit = 10
max_deliveries_per_connection = 100

[provider.google.sources."ip-1"]
connection_limit = 2
"""


def test_no_tables_gives_delivery_values(tmp_path):
    limits = load(tmp_path, "").limits("ip-1", "example.org", ["mx.example.org"])
    assert limits.connection_limit == DELIVERY["connection_limit"]
    assert limits.tls == DELIVERY["tls"] and limits.retry_max == DELIVERY["retry_max"]
    assert limits.max_message_rate is None and limits.site_connection_limit is None
    assert limits.scope == "source" and limits.matched == ("default",)


def test_domain_with_google_mx_gets_google_limits(tmp_path):
    shaping = load(tmp_path, BASE)
    limits = shaping.limits("ip-9", "customer.example", WORKSPACE_MX)
    assert limits.connection_limit == 10 and limits.max_deliveries_per_connection == 100
    assert limits.max_message_rate == Rate(100, 1)                      # from default
    assert limits.matched == ("default", "provider:google")
    other = shaping.limits("ip-9", "customer.example", ["mx.elsewhere.example"])
    assert other.connection_limit == DELIVERY["connection_limit"]


def test_mixed_mx_set_is_not_the_provider(tmp_path):
    limits = load(tmp_path, BASE).limits("ip-9", "d.example",
                                         ["aspmx.l.google.com", "backup.d.example"])
    assert limits.matched == ("default",)


def test_operator_file_overrides_provider_key(tmp_path):
    shaping = load(tmp_path, BASE, '[provider.google]\nconnection_limit = 4\n')
    limits = shaping.limits("ip-9", "gmail.com", GMAIL_MX)
    assert limits.connection_limit == 4                       # overridden
    assert limits.max_deliveries_per_connection == 100        # merged key by key
    assert shaping.describe()["providers"]["google"]["match"] == ["*.google.com",
                                                                  "*.googlemail.com"]


def test_per_source_override(tmp_path):
    shaping = load(tmp_path, BASE)
    assert shaping.limits("ip-1", "gmail.com", GMAIL_MX).connection_limit == 2
    assert shaping.limits("ip-2", "gmail.com", GMAIL_MX).connection_limit == 10
    assert shaping.limits("ip-1", "gmail.com", GMAIL_MX).matched == (
        "default", "provider:google", "provider:google/source:ip-1")


def test_resolution_order(tmp_path):
    shaping = load(tmp_path, BASE, """
["default".sources."ip-1"]
max_recipients_per_transaction = 7
idle_timeout = "1s"

[site."alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"]
connection_limit = 6
max_deliveries_per_connection = 60
retry_initial = "1m"

["gmail.com"]
connection_limit = 8
tls = "required"

["gmail.com".sources."ip-1"]
idle_timeout = "3s"
""")
    limits = shaping.limits("ip-1", "GMAIL.com.", list(reversed(GMAIL_MX)))
    assert limits.connection_limit == 2            # provider source beats domain
    assert limits.max_deliveries_per_connection == 60   # site beats provider
    assert limits.retry_initial == 60
    assert limits.tls == "required"                # domain
    assert limits.max_recipients_per_transaction == 7   # default's source table
    assert limits.idle_timeout == 3                # domain source beats default source
    site = "site:alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
    assert limits.matched == ("default", "provider:google", site, "domain:gmail.com",
                              "default/source:ip-1", "provider:google/source:ip-1",
                              "domain:gmail.com/source:ip-1")
    # Another domain on the same MX set: site and provider, not gmail.com's table.
    other = shaping.limits("ip-2", "googlemail.com", GMAIL_MX)
    assert other.connection_limit == 6 and other.tls == DELIVERY["tls"]


def test_most_specific_provider_wins(tmp_path):
    shaping = load(tmp_path, """
[provider.microsoft]
match = ["*.protection.outlook.com"]
connection_limit = 10
[provider.consumer]
match = ["*.olc.protection.outlook.com"]
connection_limit = 5
[provider.one]
match = ["mx.one.example", "*.example"]
connection_limit = 1
""")
    assert shaping.limits("s", "hotmail.com", ["hotmail-com.olc.protection.outlook.com"]
                          ).connection_limit == 5
    assert shaping.limits("s", "corp.example", ["corp-example.mail.protection.outlook.com"]
                          ).connection_limit == 10
    assert shaping.provider_for(["mx.one.example"]) == "one"


def test_site_wide_limits_and_scope(tmp_path):
    shaping = load(tmp_path, """
[site."mx.big.example"]
site_connection_limit = 20
site_max_message_rate = "50/s"
scope = "site"
[site."mx.big.example".sources.a]
max_connection_rate = "10/m"
""")
    limits = shaping.limits("a", "big.example", ["mx.big.example"])
    assert limits.site_connection_limit == 20 and limits.site_max_message_rate == Rate(50, 1)
    assert limits.scope == "site" and limits.max_connection_rate == Rate(10, 60)
    relaxed = load(tmp_path, '[site."mx.big.example"]\nsite_connection_limit = "unlimited"\n')
    assert relaxed.limits("a", "big.example", ["mx.big.example"]).site_connection_limit is None


def test_static_route_site_name(tmp_path):
    shaping = load(tmp_path, '[site."[relay.example]:2525"]\nconnection_limit = 3\n')
    assert shaping.limits("a", "any.example", ["relay.example"],
                          site="[relay.example]:2525").connection_limit == 3


def test_cache_returns_the_same_object(tmp_path):
    shaping = load(tmp_path, BASE, cache_size=2)
    first = shaping.limits("ip-1", "gmail.com", GMAIL_MX)
    assert shaping.limits("ip-1", "gmail.com", GMAIL_MX) is first
    assert shaping.limits("ip-1", "gmail.com", tuple(GMAIL_MX)) is first
    # Identical limits are one shared object across keys; eviction only costs a recompute.
    assert shaping.limits("ip-1", "googlemail.com", GMAIL_MX) is first
    for i in range(5):
        shaping.limits("ip-3", f"d{i}.example", [f"mx.d{i}.example"])
    assert len(shaping._cache) == 2
    assert shaping.limits("ip-1", "gmail.com", GMAIL_MX) == first


def test_limits_fields_cover_every_key():
    fields = [f.name for f in dataclasses.fields(Limits)]
    assert fields == [*KEYS, "automation", "matched"]


# --- shipped rules -------------------------------------------------------------------------


def test_shipped_file_loads_and_every_provider_has_values():
    raw = tomllib.loads(SHIPPED.read_text())
    shaping = Shaping.load([], DELIVERY)
    described = shaping.describe()
    assert described["files"] == [str(SHIPPED)]
    assert set(described["providers"]) == set(raw["provider"])
    for name, table in described["providers"].items():
        assert table["match"], name
        assert set(table) - {"match"}, f"provider {name} sets no limit"
    for name in ("google", "yahoo", "outlook", "office365", "apple", "united-internet",
                 "orange", "yandex", "mailru", "t-online", "qq"):
        assert name in described["providers"]
    assert described["domains"]["comcast.net"]["connection_limit"] == 25


@pytest.mark.parametrize("domain, mx, provider", [
    ("gmail.com", GMAIL_MX, "google"),
    ("workspace.example", ["smtp.google.com"], "google"),
    ("yahoo.com", ["mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net"], "yahoo"),
    ("aol.com", ["mx-aol.mail.gm0.yahoodns.net"], "yahoo"),
    ("hotmail.com", ["hotmail-com.olc.protection.outlook.com"], "outlook"),
    ("tenant.example", ["tenant-example.mail.protection.outlook.com"], "office365"),
    ("icloud.com", ["mx01.mail.icloud.com", "mx02.mail.icloud.com"], "apple"),
    ("web.de", ["mx-ha02.web.de", "mx-ha03.web.de"], "united-internet"),
    ("orange.fr", ["smtp-in.orange.fr"], "orange"),
    ("yandex.ru", ["mx.yandex.ru"], "yandex"),
    ("mail.ru", ["mxs.mail.ru"], "mailru"),
    ("t-online.de", ["mx00.t-online.de", "mx01.t-online.de"], "t-online"),
    ("qq.com", ["mx1.qq.com", "mx2.qq.com", "mx3.qq.com"], "qq"),
])
def test_shipped_providers_match_their_mx(domain, mx, provider):
    limits = Shaping.load([], DELIVERY).limits("ip-1", domain, mx)
    assert f"provider:{provider}" in limits.matched


def test_operator_file_over_shipped(tmp_path):
    path = write(tmp_path, "ops.toml", '[provider.google]\nconnection_limit = 3\n'
                 '[provider.google.sources."warm-1"]\nmax_message_rate = "500/h"\n')
    shaping = Shaping.load([path], DELIVERY)
    limits = shaping.limits("warm-1", "gmail.com", GMAIL_MX)
    assert limits.connection_limit == 3 and limits.tls == "required"
    assert limits.max_message_rate == Rate(500, 3600)


# --- throttle --------------------------------------------------------------------------------


def greedy(throttle, start, seconds):
    """Take tokens as fast as the throttle allows; returns the count taken."""
    now, taken = start, 0
    while True:
        wait = throttle.delay(now)
        if wait == 0:
            taken += 1
            continue
        assert wait > 0
        now += wait
        if now > start + seconds:
            return taken


@pytest.mark.parametrize("rate", [Rate(10, 1), Rate(600, 60), Rate(5000, 3600), Rate(3, 1)])
def test_throttle_holds_rate_over_30s(rate):
    throttle = Throttle(rate)
    greedy(throttle, 0.0, 5.0)                            # drain the initial burst
    taken = greedy(throttle, 5.0, 30.0)
    want = rate.per_second * 30
    assert abs(taken - want) <= max(0.05 * want, 1), (taken, want)


def test_throttle_bursty_arrivals():
    rng = random.Random(6)
    rate = Rate(20, 1)
    throttle = Throttle(rate, burst=15)
    now, taken, waiting = 0.0, 0, 0
    while now < 30.0:
        if rng.random() < 0.1:
            waiting += rng.randint(20, 200)               # a burst of messages arrives
        while waiting:
            wait = throttle.delay(now)
            if wait:
                break
            waiting -= 1
            taken += 1
        now += rng.uniform(0.001, 0.2)
    want = rate.per_second * now
    # Demand exceeds the rate, so the bucket never idles long: within 5 %, never above
    # rate * T + burst.
    assert taken <= want + 15
    assert abs(taken - want) <= 0.05 * want, (taken, want)


def test_throttle_burst_after_idle_and_clock_step_back():
    throttle = Throttle(Rate(1, 1), burst=3)
    assert [throttle.delay(100.0) for _ in range(3)] == [0, 0, 0]
    assert throttle.delay(100.0) == pytest.approx(1.0)
    assert throttle.delay(50.0) == pytest.approx(1.0)       # backwards: no refill
    assert throttle.delay(101.0) == 0
    assert throttle.delay(1000.0) == 0                      # refilled, capped at burst
    assert [throttle.delay(1000.0) for _ in range(3)] == [0, 0, pytest.approx(1.0)]
    with pytest.raises(ValueError):
        Throttle(Rate(1, 1), burst=0.5)
