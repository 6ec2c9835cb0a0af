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
    from mta.control.cli import add_parser as add_control
    add_control(sub, with_config, _config)
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
