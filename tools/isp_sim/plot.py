"""Accepted volume against the allowance, per source and provider, as one HTML page of SVG.

    python -m tools.isp_sim.plot stats.json out.html [--title TEXT]

Reads the simulator's /stats JSON (or --stats-file) and draws, for every provider, one
small chart per source: recipients allowed per simulated hour (grey), accepted (blue) and
deferred (orange), with simulated days marked, plus a table of the totals. No
dependencies: the page is static HTML with inline SVG.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

W, H, PAD = 360, 120, 28
SERIES = (("allowed", 1, "#999", "4 2"), ("accepted", 2, "#1f77b4", ""), ("deferred", 3, "#ff7f0e", ""))


def chart(hourly: list[list[int]], first: int, last: int) -> str:
    """One SVG: hours first..last on x, recipients per hour on y."""
    by_hour = {row[0]: row for row in hourly}
    top = max([max(row[1], row[2], row[3]) for row in hourly] + [1])
    span = max(last - first, 1)

    def xy(h: int, v: int) -> str:
        return f"{PAD + (h - first) * (W - PAD - 4) / span:.1f},{H - PAD + 8 - v * (H - PAD) / top:.1f}"

    parts = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" font-size="9">',
             f'<text x="2" y="10">{top}/h</text><text x="2" y="{H - PAD + 8}">0</text>']
    for day in range(first // 24 + 1, last // 24 + 1):
        x = xy(day * 24, 0).split(",")[0]
        parts.append(f'<line x1="{x}" x2="{x}" y1="8" y2="{H - PAD + 8}" stroke="#ddd"/>'
                     f'<text x="{x}" y="{H - 4}" text-anchor="middle">d{day}</text>')
    for _, col, color, dash in SERIES:
        points = " ".join(xy(h, by_hour[h][col] if h in by_hour else 0) for h in range(first, last + 1))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" '
                     f'stroke-dasharray="{dash}" points="{points}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render(stats: dict, title: str = "ISP simulator") -> str:
    rows = [r for p in stats["providers"].values() for s in p.values() for r in s["hourly"]]
    first = min((r[0] for r in rows), default=0)
    last = max([r[0] for r in rows] + [stats.get("hour", 0)])
    out = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;font-size:13px} .c{display:inline-block;margin:4px} "
           "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p>simulated day {stats['day']} (day_seconds {stats['day_seconds']}); per simulated hour: "
           '<span style="color:#999">allowed (dashed)</span>, <span style="color:#1f77b4">accepted</span>, '
           '<span style="color:#ff7f0e">deferred</span></p>',
           "<table><tr><th>provider</th><th>source</th><th>allowed</th><th>accepted</th><th>%</th>"
           "<th>deferred</th><th>rejected</th><th>blocks</th></tr>"]
    for name, sources in sorted(stats["providers"].items()):
        for src, s in sorted(sources.items()):
            pct = f"{100 * s['accepted'] / s['allowed']:.1f}" if s["allowed"] else "-"
            out.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(src)}</td><td>{s['allowed']}</td>"
                       f"<td>{s['accepted']}</td><td>{pct}</td><td>{s['deferred']}</td><td>{s['rejected']}</td>"
                       f"<td>{len(s['blocks'])}</td></tr>")
    out.append("</table>")
    for name, sources in sorted(stats["providers"].items()):
        out.append(f"<h2>{html.escape(name)}</h2>")
        for src, s in sorted(sources.items()):
            out.append(f'<div class="c"><div>{html.escape(src)} (age {s["age_days"]} d, '
                       f'rep {s["reputation"]})</div>{chart(s["hourly"], first, last)}</div>')
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.isp_sim.plot", description=__doc__.splitlines()[0])
    ap.add_argument("stats", help="the simulator's /stats JSON (a file)")
    ap.add_argument("out", help="the HTML file to write")
    ap.add_argument("--title", default="ISP simulator: accepted against allowed")
    args = ap.parse_args(argv)
    Path(args.out).write_text(render(json.loads(Path(args.stats).read_text()), args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
