"""The example configurations in docs/examples/ load, and mean what their comments say."""
from __future__ import annotations

import dataclasses

from conftest import ROOT
from mta.config import load_config
from mta.egress.pools import Egress
from mta.egress.shaping import Shaping
from mta.model.envelope import Envelope

EXAMPLES = ROOT / "docs" / "examples"


def test_sender_example_loads_and_resolves():
    cfg = load_config(EXAMPLES / "sender.toml")
    eg = Egress(cfg)
    assert eg.select(Envelope("", "app@example.com", [], headers={"X-Mail-Kind": "transactional"})) \
        == ("transactional", "transactional")
    assert eg.select(Envelope("", "news@example.com", [])) == ("bulk", "bulk")
    picks = [eg.pools["bulk"].next().name for _ in range(21)]
    assert picks.count("warm-1") == 1 and picks.count("bulk-1") == 10
    shaping = Shaping.load(cfg.egress.shaping, dataclasses.asdict(cfg.delivery))
    gmail = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"]
    warm = shaping.limits("warm-1", "gmail.com", gmail)
    assert warm.connection_limit == 2 and str(warm.max_message_rate) == "100/h", warm
    assert shaping.limits("bulk-1", "gmail.com", gmail).connection_limit != 2
    small = shaping.limits("bulk-1", "example.net", ["mx.example.net"])
    assert small.connection_limit == 1 and small.max_deliveries_per_connection == 200
    assert cfg.bounces.domain == "bounces.example.com"
    assert cfg.unsubscribe.add_headers
