"""`mta top`: a live terminal view of the running daemon, like `kcli top`.

Polls GET /live (mta/control/views.py LiveView) every --interval seconds and turns the
difference of two snapshots into rates: delivered, deferred and bounced recipients per
second by provider and by source, with scheduled and ready queue depths, connections,
and the suspensions and throttles in force, then the last replies that deferred or
bounced.

    mta top                 full-screen (curses), refreshing; q or Ctrl-C quits and the
                            terminal is restored
    mta top --once          two snapshots an interval apart, one frame printed as plain
                            text (no escape codes): for pipes, scripts and tests
    mta top | less          stdout not a terminal: plain frames, one per interval

Every text from the daemon (site names, remote replies) is printed with control
characters replaced, so a hostile reply cannot drive the terminal.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from mta.config import Config
from mta.control.client import AdminUnreachable, cli_request
from mta.control.views import LiveView

_CONTROL = {c: "?" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)]}


def clean(text: str) -> str:
    """`text` without control characters (escape sequences from a remote reply)."""
    return text.translate(_CONTROL)


@dataclass(slots=True)
class Line:
    name: str
    delivered: float = 0.0      # per second
    deferred: float = 0.0
    bounced: float = 0.0
    scheduled: int = 0
    ready: int = 0
    connections: int = 0
    paused: bool = False


def fetch(args: argparse.Namespace) -> LiveView:
    """GET /live of the daemon, or of every worker of the node merged (cli_request)."""
    status, data = cli_request(args, "/live")
    if status != 200 or not isinstance(data, dict):
        error = data.get("error") if isinstance(data, dict) else data
        raise AdminUnreachable(f"mta top: GET /live answered HTTP {status}: {error}")
    return LiveView.from_json(data)


def _group(cur: LiveView, prev: LiveView | None, key: Callable) -> list[Line]:
    dt = cur.at - prev.at if prev is not None else 0.0
    before = {(r.source, r.site): r for r in prev.rows} if prev is not None else {}
    lines: dict[str, Line] = {}
    sites: dict[str, set[str]] = {}
    for r in cur.rows:
        name = key(r)
        ln = lines.get(name)
        if ln is None:
            ln = lines[name] = Line(name)
        b = before.get((r.source, r.site))
        if dt > 0 and b is not None:
            ln.delivered += max(0, r.delivered - b.delivered) / dt
            ln.deferred += max(0, r.deferred - b.deferred) / dt
            ln.bounced += max(0, r.bounced - b.bounced) / dt
        elif dt > 0:
            ln.delivered += r.delivered / dt   # a pair that appeared in between
            ln.deferred += r.deferred / dt
            ln.bounced += r.bounced / dt
        if r.site not in sites.setdefault(name, set()):   # a site's depth once per line
            sites[name].add(r.site)
            ln.scheduled += r.scheduled
        ln.ready += r.ready
        ln.connections += r.connections
        ln.paused = ln.paused or r.paused_until is not None
    return sorted(lines.values(), key=lambda ln: (-ln.delivered, -ln.scheduled - ln.ready,
                                                  ln.name))


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _left(until: float, now: float) -> str:
    s = max(0, int(until - now))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"


def frame(cur: LiveView, prev: LiveView | None, interval: float,
          rows: int | None = None) -> list[str]:
    """The lines of one screen. `rows`: at most that many lines per table (None: all)."""
    out = []
    dt = cur.at - prev.at if prev is not None else 0.0
    o, p = cur.outcomes, prev.outcomes if prev is not None else None
    if p is not None and dt > 0:
        rates = (f"delivered {_rate((o.delivered - p.delivered) / dt)}/s  "
                 f"deferred {_rate((o.deferred - p.deferred) / dt)}/s  "
                 f"bounced {_rate((o.bounced - p.bounced) / dt)}/s")
    else:
        rates = "rates after the next refresh"
    out.append(f"mta top  {time.strftime('%H:%M:%S', time.localtime(cur.at))}  every "
               f"{interval:g}s  {rates}")
    out.append(f"received {cur.received}  delivered {o.delivered}  deferred {o.deferred}  "
               f"bounced {o.bounced}  expired {o.expired}  |  scheduled {cur.scheduled}  "
               f"ready {cur.ready}  in flight {cur.in_flight}  connections {cur.connections}")
    head = (f"{'':<32} {'deliv/s':>8} {'defer/s':>8} {'bounce/s':>8} {'sched':>8} "
            f"{'ready':>7} {'conns':>5}  state")
    for title, key in (("PROVIDER", lambda r: r.provider), ("SOURCE", lambda r: r.source)):
        out.append("")
        out.append(title + head[len(title):])
        lines = _group(cur, prev, key)
        shown = lines if rows is None else lines[:rows]
        for ln in shown:
            out.append(f"{clean(ln.name)[:32]:<32} {_rate(ln.delivered):>8} "
                       f"{_rate(ln.deferred):>8} {_rate(ln.bounced):>8} {ln.scheduled:>8} "
                       f"{ln.ready:>7} {ln.connections:>5}  "
                       f"{'SUSPENDED' if ln.paused else 'running'}")
        if len(shown) < len(lines):
            out.append(f"... {len(lines) - len(shown)} more")
        if not lines:
            out.append("(nothing queued or sent yet)")
    out.append("")
    out.append(f"SUSPENSIONS AND THROTTLES ({len(cur.holds)})")
    for h in cur.holds if rows is None else cur.holds[:rows]:
        where = f" {h.site}" if h.site else ""
        out.append(f"{clean(h.kind):<20} {clean(h.name + where)[:44]:<44} "
                   f"{_left(h.until, cur.at):>10}  {clean(h.reason)[:80]}")
    out.append("")
    out.append("RECENT ERRORS")
    errors = cur.errors[-(rows or 10):]
    for e in reversed(errors):
        out.append(f"{time.strftime('%H:%M:%S', time.localtime(e.at))} {e.kind:<8} "
                   f"{clean(e.source)[:16]:<16} {clean(e.site)[:28]:<28} "
                   f"{clean(e.text)[:100]}")
    if not errors:
        out.append("(none)")
    return out


def run_once(args: argparse.Namespace, interval: float, out=sys.stdout) -> int:
    prev = fetch(args)
    time.sleep(interval)
    out.write("\n".join(frame(fetch(args), prev, interval)) + "\n")
    out.flush()
    return 0


def run_plain(args: argparse.Namespace, interval: float, out=sys.stdout) -> int:
    """Frames as plain text, one per interval, until interrupted (stdout is a pipe)."""
    prev = None
    try:
        while True:
            cur = fetch(args)
            out.write("\n".join(frame(cur, prev, interval)) + "\n\n")
            out.flush()
            prev = cur
            time.sleep(interval)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0


def run_screen(args: argparse.Namespace, interval: float) -> int:
    import curses

    def loop(scr) -> None:
        curses.curs_set(0)
        scr.timeout(100)
        prev = cur = None
        error = None
        due = 0.0
        while True:
            now = time.monotonic()
            if now >= due:
                due = now + interval
                try:
                    prev, cur, error = cur, fetch(args), None
                except AdminUnreachable as exc:
                    error = str(exc)
                height, width = scr.getmaxyx()
                lines = frame(cur, prev, interval, max(3, (height - 14) // 2)) \
                    if cur is not None else []
                if error:
                    lines = [clean(error)] + lines
                lines.append("")
                lines.append("q quits")
                scr.erase()
                for y, text in enumerate(lines[:height - 1]):
                    try:
                        bold = y == 0 or text.split(" ", 1)[0].isupper()
                        scr.addnstr(y, 0, text, width - 1, curses.A_BOLD if bold else 0)
                    except curses.error:
                        pass
                scr.refresh()
            key = scr.getch()
            if key in (ord("q"), ord("Q"), 27):
                return

    try:
        curses.wrapper(loop)   # restores the terminal however loop ends
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    if not 0.2 <= args.interval <= 3600:
        raise SystemExit("mta top --interval: 0.2 to 3600 seconds")
    if args.once:
        return run_once(args, args.interval)
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        return run_plain(args, args.interval)
    return run_screen(args, args.interval)


def add_parser(sub, with_config: Callable[[argparse.ArgumentParser], None],
               load: Callable[[argparse.Namespace], Config]) -> None:
    sp = sub.add_parser("top", help="live rates and queues by provider and source "
                                    "(q or Ctrl-C quits)")
    sp.add_argument("-i", "--interval", type=float, default=2.0,
                    help="seconds between refreshes (default 2)")
    sp.add_argument("--once", action="store_true",
                    help="print one frame as plain text (rates over one interval) and exit")
    with_config(sp)
    sp.set_defaults(func=_cmd_top, load_config=load)
