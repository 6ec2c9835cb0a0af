"""The `mta` command: serve, check-config, spool, queue, suspend/resume, shaping, dkim,
bounce parse, suppress.

Admin verbs that need the running daemon come with the HTTP API; `spool`
reads a stopped daemon's spool directory offline (the same scan as start-up).
"""
from __future__ import annotations

import argparse
import sys

import orjson

from mta.config import ConfigError, load_config


_OVERRIDES = ("listen", "spool_dir", "smarthost", "dns", "admin", "hold")


def _config(args: argparse.Namespace):
    return load_config(args.config, {k: getattr(args, k, None) for k in _OVERRIDES})


def _cmd_serve(args: argparse.Namespace) -> int:
    from mta.daemon import serve
    return serve(_config(args))


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    import dataclasses

    from mta.egress.pools import Egress, EgressError
    from mta.egress.shaping import Shaping, ShapingError
    try:       # the parts of the config that live in other files or modules
        Egress(cfg)
        Shaping.load(cfg.egress.shaping, dataclasses.asdict(cfg.delivery))
    except (EgressError, ShapingError) as exc:
        raise ConfigError([str(exc)], cfg.origin) from None
    from mta.daemon import connection_budget_problem, raise_nofile
    problem = connection_budget_problem(cfg, raise_nofile())
    if problem:
        print(f"{cfg.origin}: warning: {problem}", file=sys.stderr)
    print(f"{cfg.origin}: OK ({len(cfg.listener)} listener(s), spool {cfg.spool.directory})")
    return 0


def _cmd_spool(args: argparse.Namespace) -> int:
    from mta.spool.recovery import scan
    directory = args.spool_dir or str(_config(args).spool.directory)
    try:
        found = scan(directory)
    except OSError as exc:   # missing, unreadable, or read-only with records to quarantine
        print(f"mta: {exc.filename or directory}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.action == "ls":
        for msg_id, loc in found.messages.items():
            env = found.envelopes[msg_id]
            print(orjson.dumps({"id": env.id, "sender": env.sender,
                                "recipients": [r.address for r in env.recipients], "size": env.size,
                                "segment": loc.segment, "offset": loc.offset}).decode())
    for bad in found.corrupt:
        print(f"corrupt record: segment {bad.segment} offset {bad.offset}: {bad.reason} "
              f"(saved as {bad.saved_as})", file=sys.stderr)
    print(f"{len(found.messages)} messages queued in {len(found.segments)} segments; "
          f"{found.finished} finished; {len(found.corrupt)} corrupt; {len(found.torn)} torn tails",
          file=sys.stderr if args.action == "ls" else sys.stdout)
    return 0


def _admin_get(args: argparse.Namespace, path: str, body: dict | None = None) -> tuple[int, object]:
    """GET `path` from the daemon's admin API, or POST `body` as JSON to it."""
    import http.client
    target = _config(args).admin.listen
    if target is None:
        raise SystemExit("mta: the admin API is disabled ([admin] listen = \"\")")
    conn = http.client.HTTPConnection(*target, timeout=10)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    except OSError as exc:
        raise SystemExit(f"mta: cannot reach the daemon's admin API at {target[0]}:{target[1]}: {exc}")
    finally:
        conn.close()


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
    return _print_result(*_admin_get(args, f"/control/{args.command}", body))


def _cmd_shaping(args: argparse.Namespace) -> int:
    status, data = _admin_get(args, "/shaping")
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
        return _print_result(*_admin_get(args, "/control/rebind",
                                         {"queue": args.args[0], "pool": args.args[1]}))
    if args.action == "summary":
        status, data = _admin_get(args, "/queue/summary")
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
        status, data = _admin_get(args, "/queue/summary")
        print(QueueSummary.from_json(data).queued if status == 200 else -1)
        return 0 if status == 200 else 1
    if len(args.args) != 1:
        raise SystemExit("mta queue inspect needs a message id")
    status, data = _admin_get(args, f"/queue/messages/{args.args[0]}")
    if status == 200:   # parsed and written back: what the daemon sent is a message view
        data = MessageView.from_json(data).to_json()
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0 if status == 200 else 1


def _feedback_defaults(argv: list[str] | None) -> tuple[str | None, list[str], list[str]]:
    """(config path, suppression store and key defaults) for `suppress` and `bounce`: the
    subcommands are built before the arguments are parsed, so -c is looked for first."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.config is None:
        return None, [], []
    try:
        cfg = load_config(known.config)
    except ConfigError:
        return known.config, [], []   # reported when the command itself loads it
    return known.config, [str(cfg.suppression.store)], [str(cfg.suppression.key_file)]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta", description="high-volume MTA core")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", help="TOML config file (default: the built-in one)")
        sp.add_argument("--listen", metavar="HOST:PORT", help="override the first listener's address")
        sp.add_argument("--spool-dir", metavar="DIR", help="override spool.directory")
        sp.add_argument("--smarthost", metavar="HOST:PORT", help="relay everything to one next hop")
        sp.add_argument("--dns", metavar="IP:PORT", help="the DNS server to ask (dns.nameservers)")
        sp.add_argument("--admin", metavar="HOST:PORT", help="admin API address (\"\" disables)")
        sp.add_argument("--hold", action="store_true", default=None,
                        help="accept and queue but deliver nothing (delivery.hold)")

    sp = sub.add_parser("serve", help="run the daemon")
    with_config(sp)
    sp.set_defaults(func=_cmd_serve)
    sp = sub.add_parser("check-config", help="validate a config file and exit")
    with_config(sp)
    sp.set_defaults(func=_cmd_check_config)
    sp = sub.add_parser("spool", help="inspect a spool directory offline (daemon stopped)")
    sp.add_argument("action", choices=["ls", "stat"])
    with_config(sp)
    sp.set_defaults(func=_cmd_spool)
    sp = sub.add_parser("queue", help="ask the running daemon about its queues")
    sp.add_argument("action", choices=["summary", "inspect", "count", "rebind"])
    sp.add_argument("args", nargs="*", metavar="ARG",
                    help="inspect: message id; rebind: scheduled queue name and pool name")
    sp.add_argument("--json", action="store_true", help="raw JSON")
    with_config(sp)
    sp.set_defaults(func=_cmd_queue)
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
        sp.set_defaults(func=_cmd_control)
    sp = sub.add_parser("shaping", help="live shaping state per (source, site)")
    sp.add_argument("action", choices=["show"])
    sp.add_argument("--json", action="store_true", help="raw JSON")
    with_config(sp)
    sp.set_defaults(func=_cmd_shaping)
    from mta.dkim.cli import add_parser as add_dkim
    add_dkim(sub)
    from mta.feedback.bounce.cli import add_parser as add_bounce
    from mta.feedback.suppression.cli import add_parser as add_suppress
    _, store, key = _feedback_defaults(argv)
    sp = add_suppress(sub, *store, *key)
    sp.add_argument("-c", "--config", help="take --store and --key defaults from this config")
    sp = add_bounce(sub)
    sp.add_argument("-c", "--config", help="also use this config's [bounces] rules")
    return p


def _with_config_rules(args: argparse.Namespace) -> None:
    """`mta bounce -c FILE parse`: the operator's [bounces] rules go first."""
    if args.command == "bounce" and getattr(args, "config", None):
        args.rules = [*_config(args).bounces.rules, *args.rules]


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        _with_config_rules(args)
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
