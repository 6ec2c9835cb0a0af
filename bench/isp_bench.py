"""mta against the ISP simulator (issue 12 item 6): 3 major providers and a small ISP,
16 sources of which 4 are new (warming), a mixed tenant load over several simulated days.

    .venv/bin/python bench/isp_bench.py [--days 5] [--day-seconds 60] [--rate 40]
                                        [--volume-scale 0.001] [--out bench/out/isp]

Prints a table: per provider demand (injected), allowed (the simulator's `allowed` summed
over the 16 sources), accepted, ratio = accepted / min(demand, allowed), rejected, blocks,
deferred by reason; per warming source, provider and warm-up day the MTA's day and hour
caps against what the simulator accepted; totals with the lost-message check (every
injected message delivered, bounced or still in the spool, by id); `mta shaping show` and
`mta warmup show` mid-run and at the end. Writes bench/out/isp/plot.html (per source and
provider: allowed / accepted / deferred per simulated hour) and the simulator's stats.json
and events.jsonl. The rig is tests/scenarios/isp_rig.py (shared with the scenario test).
Needs root (the simulator's MX listen on port 25 of 127.0.50-53.x) and unbound.
Exit status 1 if a goal is missed (ratio < 0.9, a block, a lost message, a cap exceeded).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "scenarios"))
sys.path.insert(0, str(ROOT))

import isp_rig  # noqa: E402


def screenshot(page: Path) -> Path | None:
    """A PNG of the plot page with headless chromium, if installed (no matplotlib needed)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None
    png = page.with_suffix(".png")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,4000", f"--screenshot={png}", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=False)
    return png if png.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, default=5, help="simulated days of load")
    ap.add_argument("--day-seconds", type=float, default=60, help="wall seconds per simulated day")
    ap.add_argument("--rate", type=float, default=40, help="messages injected per wall second")
    ap.add_argument("--volume-scale", type=float, default=0.001, help="the simulator's volume_scale "
                    "(the MTA's warm-up schedules are scaled the same)")
    ap.add_argument("--drain-days", type=float, default=1.0, help="simulated days to wait for the queue to drain")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "isp"))
    a = ap.parse_args()
    res = isp_rig.run(Path(a.out), days=a.days, day_seconds=a.day_seconds, rate=a.rate,
                      volume_scale=a.volume_scale, drain_days=a.drain_days)
    for when, shaping, warmup in res.shows[1:]:
        print(f"==== mta shaping show ({when}) ====\n{shaping}")
        print(f"==== mta warmup show ({when}) ====\n{warmup}")
    print("==== result ====")
    print(res.table())
    print(f"plot: {Path(a.out) / 'plot.html'}")
    png = screenshot(Path(a.out) / "plot.html")
    if png:
        print(f"plot (PNG screenshot of the page): {png}")
    rows = res.providers()
    ok = (all(r["ratio"] >= 0.9 for r in rows.values()) and not any(r["blocks"] for r in rows.values())
          and not res.lost and not res.warmup_breaches)
    print("goals:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
