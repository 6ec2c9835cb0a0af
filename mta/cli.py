"""The `mta` command: serve, check-config, spool, demo.

Admin verbs that need the running daemon come with the HTTP API; `spool`
reads a stopped daemon's spool directory offline (the same scan as start-up).
"""
from __future__ import annotations

import argparse
import sys

import orjson

from mta.config import ConfigError, load_config


def _config(args: argparse.Namespace):
    overrides = {"listen": getattr(args, "listen", None), "spool_dir": getattr(args, "spool_dir", None)}
    return load_config(args.config, overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from mta.daemon import serve
    return serve(_config(args))


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"{cfg.source}: OK ({len(cfg.listener)} listener(s), spool {cfg.spool.directory})")
    return 0


def _cmd_spool(args: argparse.Namespace) -> int:
    from mta.spool.recovery import scan
    directory = args.spool_dir or str(_config(args).spool.directory)
    found = scan(directory)
    if args.action == "ls":
        for msg_id, loc in found.messages.items():
            env = found.envelopes[msg_id]
            print(orjson.dumps({"id": env["id"], "sender": env["sender"],
                                "recipients": [r[0] for r in env["rcpts"]], "size": env["size"],
                                "segment": loc.segment, "offset": loc.offset}).decode())
    for bad in found.corrupt:
        print(f"corrupt record: segment {bad.segment} offset {bad.offset}: {bad.reason} "
              f"(saved as {bad.saved_as})", file=sys.stderr)
    print(f"{len(found.messages)} messages queued in {len(found.segments)} segments; "
          f"{found.finished} finished; {len(found.corrupt)} corrupt; {len(found.torn)} torn tails",
          file=sys.stderr if args.action == "ls" else sys.stdout)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mta.demo import run_demo
    return run_demo(count=args.count, size=args.size, concurrency=args.concurrency)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta", description="high-volume MTA core")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", help="TOML config file (default: the built-in one)")
        sp.add_argument("--listen", metavar="HOST:PORT", help="override the first listener's address")
        sp.add_argument("--spool-dir", metavar="DIR", help="override spool.directory")

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
    sp = sub.add_parser("demo", help="start the daemon, inject a demo batch, show it spooled")
    sp.add_argument("-n", "--count", type=int, default=2000)
    sp.add_argument("-s", "--size", type=int, default=2048, help="message size in bytes")
    sp.add_argument("-C", "--concurrency", type=int, default=20)
    sp.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
