"""mta against the ISP simulator (issue 12 item 6), short form of bench/isp_bench.py.

A real `mta serve` with 16 sources on 127.0.70.1-16 (4 warming from the simulator's
start), the simulator (tools/isp_sim, subprocess, shipped providers: Gmail, Yahoo/AOL,
Microsoft, a small ISP) with 24 s days and volume_scale 0.001, a mixed tenant load of
20 messages a second for 2 simulated days and one day's drain (tests/scenarios/isp_rig.py).
Goals of the issue: per provider, accepted >= 90 % of min(demand, allowed); no blocks; no
message lost (each injected id delivered, bounced or still in the spool); warm-up caps
never exceeded (simulator's accepted per warm-up day and hour against the MTA's caps);
`mta shaping show` and `mta warmup show` list the 16 sources and the warming ones.
"""
from __future__ import annotations

import shutil

import pytest

import isp_rig

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound (tools/dnsserver.py)")


def test_mta_meets_the_goals_against_the_simulator(tmp_path):
    res = isp_rig.run(tmp_path / "isp", days=2, day_seconds=24, rate=20, volume_scale=0.001,
                      drain_days=1.0, log=lambda *a: None)
    table = res.table()
    rows = res.providers()
    assert set(rows) == {"gmail", "yahoo", "microsoft", "smallisp"}, table
    for prov, r in rows.items():
        assert r["demand"] > 0 and r["ratio"] >= 0.9, f"{prov}\n{table}"
        assert r["blocks"] == 0, f"{prov}\n{table}"
        # the simulator's accepted and the MTA's Delivery records agree per provider
        assert r["accepted"] == res.mta_delivered.get(prov, 0), f"{prov}\n{table}"
    assert res.injected == 960 and not res.lost, f"{res.lost[:10]}\n{table}"
    assert res.delivered + res.bounced + res.expired + res.queued == res.injected, table
    assert not res.warmup_breaches, "\n".join(res.warmup_breaches) + "\n" + table
    # the warming sources did send (a cap that is never used proves nothing)
    assert sum(row[4] for row in res.warmup_rows) > 0, table
    assert (res.out / "plot.html").stat().st_size > 1000
    when = {w: (shaping, warmup) for w, shaping, warmup in res.shows}
    shaping, warmup = when["mid-run"]
    assert all(f"s{i:02d} " in shaping for i in range(1, 17)), shaping
    assert "mx.smallisp.test" in shaping and "gmail-smtp-in.l.google.com" in shaping
    for name in ("s13", "s14", "s15", "s16"):
        assert f"{name}: warm-up day" in warmup, warmup
    assert "s01:" not in warmup and "major" in warmup and "small" in warmup
