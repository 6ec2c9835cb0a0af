"""The `mta` commands that drive a running daemon through its admin API: queue
(summary, count, inspect, rebind), suspend/resume, shaping show. They parse the
daemon's JSON into the typed views (mta/control/views.py) and format from those.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import orjson

from mta.config import Config
from mta.control.client import admin_request


def _request(args: argparse.Namespace, path: str, body: dict | None = None) -> tuple[int, object]:
    # args.load_config: the CLI's loader (config file plus command-line overrides)
    return admin_request(args.load_config(args), path, body)


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


def _cmd_shaping(args: argparse.Namespace) -> int:
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
    return 0


def _cmd_queue(args: argparse.Namespace) -> int:
    from mta.control.views import MessageView, QueueSummary
    if args.action == "rebind":
        if len(args.args) != 2:
            raise SystemExit("usage: mta queue rebind QUEUE POOL")
        return _print_result(*_request(args, "/control/rebind",
                                         {"queue": args.args[0], "pool": args.args[1]}))
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
            print(f"{name:<50} {q.count:>8}  {q.site or '-'}{'  (suspended)' if q.suspended else ''}")
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
    sp = sub.add_parser("queue", help="ask the running daemon about its queues")
    sp.add_argument("action", choices=["summary", "inspect", "count", "rebind"])
    sp.add_argument("args", nargs="*", metavar="ARG",
                    help="inspect: message id; rebind: scheduled queue name and pool name")
    sp.add_argument("--json", action="store_true", help="raw JSON")
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
    sp = sub.add_parser("shaping", help="live shaping state per (source, site)")
    sp.add_argument("action", choices=["show"])
    sp.add_argument("--json", action="store_true", help="raw JSON")
    with_config(sp)
    sp.set_defaults(func=_cmd_shaping, load_config=load)