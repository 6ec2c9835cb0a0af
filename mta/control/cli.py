"""The `mta` commands that drive a running daemon through its admin API: queue
(summary [--ages], count, inspect, ls, rebind, and the surgery verbs flush, hold,
release, delete, bounce with one selector: --queue/--site/--domain/--tenant/
--campaign/--id/--all), suspend/resume, shaping show|set|clear. They parse the
daemon's JSON into the typed views (mta/control/views.py) and format from those.
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from typing import Callable

import orjson

from mta.config import Config
from mta.control.client import cli_request


def _request(args: argparse.Namespace, path: str, body: dict | None = None) -> tuple[int, object]:
    # args.load_config: the CLI's loader (config file plus command-line overrides);
    # args.node: every worker's config, when the command shows the whole node
    return cli_request(args, path, body)


def _print_result(status: int, data: object) -> int:
    if status != 200:
        print(f"mta: {data.get('error') if isinstance(data, dict) else data}", file=sys.stderr)
        return 1
    print(orjson.dumps(data).decode())
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from mta.config.values import Invalid, parse_duration
    if args.kind == "pair" and not args.site:
        raise SystemExit(f"mta {args.command} pair needs SOURCE and SITE")
    body = {"kind": args.kind, "name": args.name, "site": args.site or ""}
    if args.command == "suspend":
        try:
            body["duration"] = parse_duration(args.duration)
        except Invalid as exc:
            raise SystemExit(f"mta suspend --for: {exc}") from None
    return _print_result(*_request(args, f"/control/{args.command}", body))


def _parse_ttl(text: str | None, flag: str) -> float | None:
    from mta.config.values import Invalid, parse_duration
    if text is None:
        return None
    try:
        return parse_duration(text)
    except Invalid as exc:
        raise SystemExit(f"mta {flag}: {exc}") from None


def _shaping_scope(args: argparse.Namespace) -> dict:
    """SOURCE SITE (either may be "*": any) or --provider NAME -> the override's scope."""
    if args.provider:   # SOURCE and SITE were keys then
        args.values = [v for v in (args.source, args.site) if v] + list(args.values)
        args.source = args.site = None
        return {"kind": "provider", "name": args.provider, "site": ""}
    source, site = args.source, args.site
    if not source or not site or (source == "*" and site == "*"):
        raise SystemExit("mta shaping set|clear: SOURCE SITE (one may be \"*\"), or "
                         "--provider NAME")
    if source == "*":
        return {"kind": "site", "name": site, "site": ""}
    if site == "*":
        return {"kind": "source", "name": source, "site": ""}
    return {"kind": "pair", "name": source, "site": site}


def _cmd_shaping(args: argparse.Namespace) -> int:
    if args.action in ("set", "clear"):
        body = _shaping_scope(args)
        if args.action == "set":
            values = {}
            for item in args.values:
                key, eq, value = item.partition("=")
                if not eq or not key:
                    raise SystemExit(f"mta shaping set: {item!r} is not key=value")
                values[key.strip()] = _value(value.strip())
            if not values:
                raise SystemExit("mta shaping set: give at least one key=value")
            body.update(values=values, ttl=_parse_ttl(args.duration, "shaping set --for"),
                        reason=args.reason or "")
        else:
            body.update(clear=True, keys=list(args.values))
        return _print_result(*_request(args, "/control/limits", body))
    status, data = _request(args, "/shaping")
    if status != 200 or args.json:
        return _print_result(status, data)
    from mta.control.views import ShapingRow
    assert isinstance(data, list)
    print(f"{'source':<16} {'site':<40} {'conn':>5} {'limit':>5} {'peak':>5} {'rate':>8} "
          f"{'ready':>7} {'sent':>8}  state")
    for r in sorted(map(ShapingRow.from_json, data), key=lambda r: (r.site, r.source)):
        state = "paused" if r.paused_until else "running"
        print(f"{r.source:<16} {r.site[:40]:<40} {r.connections:>5} {r.connection_limit:>5} "
              f"{r.peak_connections:>5} {r.max_message_rate or '-':>8} {r.ready:>7} "
              f"{r.sent:>8}  {state}")
    status, actions = _request(args, "/adaptive")
    if status == 200 and actions:
        from mta.control.views import AdaptiveRow
        print("\nadaptive delivery, actions in force (automation rules and rates):")
        print(f"{'source':<16} {'provider':<24} {'rule':<24} {'action':<16} {'value':<30} "
              f"{'left':>9}  reason")
        for a in map(AdaptiveRow.from_json, actions):
            if a.action == "set":
                value = " ".join(f"{k}={v}" for k, v in (a.value or {}).items())
                value += f" (step {a.step}/{a.steps + 1})" if a.step else ""
            else:
                value = a.target or "-"
            left = int(a.left)
            print(f"{a.source:<16} {a.provider[:24]:<24} {a.rule[:24]:<24} {a.action:<16} "
                  f"{value[:30]:<30} {left // 3600:>3}h{left // 60 % 60:02d}m{left % 60:02d}s"
                  f"  {a.reason[:120]}")
    return 0


def _cmd_warmup(args: argparse.Namespace) -> int:
    status, data = _request(args, "/warmup")
    if status != 200 or args.json:
        return _print_result(status, data)
    from mta.control.views import WarmupRow
    assert isinstance(data, list)
    if not data:
        print("no source is warming up ([[source]] warmup_start)")
    for r in sorted(map(WarmupRow.from_json, data), key=lambda r: r.source):
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.start))
        print(f"{r.source}: warm-up day {r.day} (day 1 began {started})")
        print(f"  {'class':<8} {'step':>4} {'day cap':>9} {'hour cap':>9} {'tried':>7} "
              f"{'5xx':>6} {'4.7.x':>6} {'compl':>6}  tomorrow")
        for c in r.classes:
            if c.day_cap is None:
                tomorrow = "no cap (warm)"
            elif c.may_grow:
                tomorrow = "grows"
            else:
                tomorrow = f"held: {c.why_not}"
            print(f"  {c.klass:<8} {c.step:>4} {c.day_cap if c.day_cap is not None else '-':>9} "
                  f"{c.hour_cap if c.hour_cap is not None else '-':>9} {c.tried:>7} "
                  f"{c.bounced:>6} {c.deferred:>6} {c.complaints:>6}  {tomorrow}")
            if c.last:
                print(f"  {'':<8} last day: {c.last}")
        for u in r.use:
            print(f"  used today at {u.target} ({u.klass}): {u.day}, this hour {u.hour}")
    return 0


def _value(text: str) -> object:
    """A shaping value from the command line: numbers and booleans as such, else text
    (durations, sizes and rates are parsed by the daemon's checker)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


_SURGERY = ("flush", "hold", "release", "delete", "bounce")


def _selector(args: argparse.Namespace) -> dict:
    sel = {f: getattr(args, f) for f in ("queue", "site", "domain", "tenant", "campaign", "id")
           if getattr(args, f)}
    if args.all:
        sel["all"] = True
    if not sel:
        raise SystemExit(f"mta queue {args.action}: select with --queue, --site, --domain, "
                         "--tenant, --campaign, --id or --all")
    return sel


def _print_ages(data: dict) -> None:
    from mta.control.views import AgeTable
    table = AgeTable.from_json(data)
    head = f"{table.by:<50} {'total':>7}" + "".join(f" {b:>8}" for b in table.buckets)
    print(head)
    print(f"{'TOTAL':<50} {sum(table.total):>7}" + "".join(f" {n:>8}" for n in table.total))
    for name, row in sorted(table.rows.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name[:50]:<50} {sum(row):>7}" + "".join(f" {n:>8}" for n in row))


def _cmd_queue(args: argparse.Namespace) -> int:
    from mta.control.views import MessageView, QueueListing, QueueSummary
    if args.action in _SURGERY:
        if args.args:
            raise SystemExit(f"mta queue {args.action} takes options, not {args.args[0]!r} "
                             "(e.g. --queue NAME, --id ID)")
        body: dict = {"selector": _selector(args)}
        if args.action in ("delete", "bounce"):
            body["reason"] = args.reason or ""
        return _print_result(*_request(args, f"/control/{args.action}", body))
    if args.action == "holds":
        return _print_result(*_request(args, "/queue/holds"))
    if args.action == "ls":
        if len(args.args) != 1:
            raise SystemExit("usage: mta queue ls QUEUE [--limit N] [--after ID]")
        query = urllib.parse.urlencode({"limit": args.limit, **({"after": args.after}
                                                                 if args.after else {})})
        status, data = _request(args, "/queue/list/" + urllib.parse.quote(args.args[0], safe="")
                                + "?" + query)
        if status != 200 or args.json:
            return _print_result(status, data)
        listing = QueueListing.from_json(data)
        now = time.time()
        print(f"{'id':<32}  {'where':<9} {'rcpts':>5} {'tries':>5} {'age':>8}  next retry")
        for m in listing.messages:
            retry = f"in {m.next_retry - now:.0f}s" if m.next_retry else "now"
            print(f"{m.id:<32}  {m.where:<9} {m.rcpts:>5} {m.attempts:>5} {m.age:>7.0f}s  {retry}")
        if listing.next:
            print(f"more: --after {listing.next}")
        return 0
    if args.action == "rebind":
        if len(args.args) != 2:
            raise SystemExit("usage: mta queue rebind QUEUE POOL")
        return _print_result(*_request(args, "/control/rebind",
                                         {"queue": args.args[0], "pool": args.args[1]}))
    if args.action == "summary" and args.ages:
        status, data = _request(args, f"/queue/ages/{args.by}")
        if status != 200 or args.json:
            return _print_result(status, data)
        _print_ages(data)
        return 0
    if args.action == "summary":
        status, data = _request(args, "/queue/summary")
        if status != 200 or not isinstance(data, dict):
            print(f"mta: {data}", file=sys.stderr)
            return 1
        if args.json:
            print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return 0
        summary = QueueSummary.from_json(data)
        print(f"{'scheduled queue':<50} {'count':>8}  site")
        for name, q in sorted(summary.scheduled.items()):
            note = ("  (suspended)" if q.suspended else "") + (f"  (held {q.held})" if q.held else "")
            print(f"{name:<50} {q.count:>8}  {q.site or '-'}{note}")
        print(f"\n{'ready queue (source->site)':<50} {'count':>8}  connections  sent")
        for name, r in sorted(summary.ready.items()):
            print(f"{name:<50} {r.count:>8}  {r.connections:>11}  {r.sent}")
        print(f"\nwaiting in the timer wheel: {summary.wheel}; "
              f"outcomes since start: {summary.outcomes.to_json()}")
        return 0
    if args.action == "count":   # one number, for scripts (peerbench --queue-cmd)
        status, data = _request(args, "/queue/summary")
        print(QueueSummary.from_json(data).queued if status == 200 else -1)
        return 0 if status == 200 else 1
    if len(args.args) != 1:
        raise SystemExit("mta queue inspect needs a message id")
    status, data = _request(args, f"/queue/messages/{args.args[0]}")
    if status == 200:   # parsed and written back: what the daemon sent is a message view
        data = MessageView.from_json(data).to_json()
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0 if status == 200 else 1


def add_parser(sub, with_config: Callable[[argparse.ArgumentParser], None],
               load: Callable[[argparse.Namespace], Config]) -> None:
    sp = sub.add_parser("queue", help="ask the running daemon about its queues, or change them")
    sp.add_argument("action", choices=["summary", "inspect", "count", "ls", "rebind", "holds",
                                       *_SURGERY],
                    help="flush: deferred messages go now; hold/release: keep messages "
                         "queued (survives a restart); delete: drop without a DSN; bounce: "
                         "drop with a DSN to the sender")
    sp.add_argument("args", nargs="*", metavar="ARG",
                    help="inspect: message id; ls: scheduled queue name; rebind: scheduled "
                         "queue name and pool name")
    sp.add_argument("--json", action="store_true", help="raw JSON")
    sel = sp.add_argument_group("selection (flush, hold, release, delete, bounce); "
                                "options given together must all match")
    sel.add_argument("--queue", help="a scheduled queue name")
    sel.add_argument("--site", help="a site name (see `mta shaping show`)")
    sel.add_argument("--domain", help="a recipient domain")
    sel.add_argument("--tenant")
    sel.add_argument("--campaign")
    sel.add_argument("--id", help="one message id")
    sel.add_argument("--all", action="store_true", help="every queued message")
    sp.add_argument("--reason", help="delete, bounce: logged (and in the DSN of a bounce)")
    sp.add_argument("--ages", action="store_true",
                    help="summary: messages by age (0-5m ... 160m+), like qshape")
    sp.add_argument("--by", choices=["queue", "domain"], default="queue",
                    help="summary --ages: a row per scheduled queue or recipient domain")
    sp.add_argument("--limit", type=int, default=100, help="ls: messages per page")
    sp.add_argument("--after", help="ls: the cursor printed by the previous page")
    with_config(sp)
    sp.set_defaults(func=_cmd_queue, load_config=load)
    for verb, what in (("suspend", "stop delivering for a while"), ("resume", "undo a suspend")):
        sp = sub.add_parser(verb, help=f"{what}: a scheduled queue, a site, a source or a "
                                       "(source, site) pair")
        sp.add_argument("kind", choices=["queue", "site", "source", "pair"])
        sp.add_argument("name", help="queue name, site name, or source name (pair: the source)")
        sp.add_argument("site", nargs="?", help="pair only: the site")
        if verb == "suspend":
            sp.add_argument("--for", dest="duration", default="1h",
                            help="how long, e.g. 90s, 10m, 2h (default 1h)")
        with_config(sp)
        sp.set_defaults(func=_cmd_control, load_config=load)
    sp = sub.add_parser("shaping", help="live shaping state per (source, site), and run-time "
                                        "overrides (set/clear; kept across restarts)")
    sp.add_argument("action", choices=["show", "set", "clear"])
    sp.add_argument("source", nargs="?", help="set/clear: egress source name, or * for any")
    sp.add_argument("site", nargs="?", help="set/clear: site name, or * for any")
    sp.add_argument("values", nargs="*", metavar="KEY=VALUE",
                    help="set: shaping keys, e.g. connection_limit=2 max_message_rate=100/m; "
                         "clear: keys to drop (all when none)")
    sp.add_argument("--provider", help="set/clear: a provider from the shaping files instead")
    sp.add_argument("--for", dest="duration", help="set: how long, e.g. 1h (default: until "
                                                   "cleared)")
    sp.add_argument("--reason", help="set: shown with the override")
    sp.add_argument("--json", action="store_true", help="raw JSON")
    with_config(sp)
    sp.set_defaults(func=_cmd_shaping, load_config=load)
    from mta.control.top import add_parser as add_top
    add_top(sub, with_config, load)
    sp = sub.add_parser("warmup", help="IP warm-up: each warming source's day, caps per "
                                       "provider class, use today and whether it grows")
    sp.add_argument("action", choices=["show"])
    sp.add_argument("--json", action="store_true", help="raw JSON")
    with_config(sp)
    sp.set_defaults(func=_cmd_warmup, load_config=load)