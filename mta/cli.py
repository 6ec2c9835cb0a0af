"""The `mta` command: serve, workers, check-config, config show, spool, queue,
suspend/resume, shaping, dkim, bounce parse, suppress.

Conventions every subcommand follows:
- the common options (-c/--config and the overrides --listen, --spool-dir, --smarthost,
  --dns, --admin, --hold, and --worker I: with [server] workers > 1, worker I's admin API
  and spool shard) go anywhere on the line, before or after the subcommand;
- a user error (bad arguments, a bad config, a file that cannot be read, a daemon that
  does not answer) is one line on stderr and an exit status, never a traceback; a
  subcommand's own argument check raises SystemExit("text"), which exits 2 (usage);
- output into a closed pipe (`mta spool ls | head`) ends quietly with status 141;
- the exit statuses are in EPILOG (`mta --help`).

Admin verbs that need the running daemon go through its HTTP API (mta/control); `spool`
reads a stopped daemon's spool directory offline (the same scan as start-up).
"""
from __future__ import annotations

import argparse
import os
import sys

import orjson

from mta.config import ConfigError, load_config

_OVERRIDES = ("listen", "spool_dir", "smarthost", "dns", "admin", "hold")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PIPE = 0, 1, 2, 3, 141
EPILOG = """\
common options (-c/--config FILE and the overrides --listen, --spool-dir, --smarthost,
--dns, --admin, --hold, --worker) may be given before or after the subcommand.

exit status:
  0    success
  1    error: bad config, a file that cannot be read, check-config found problems,
       dkim verify failed, suppress check: not suppressed, the daemon refused a request
  2    usage: bad arguments
  3    daemon unreachable: the admin API is off, does not answer, or refuses this
       config's token ([admin] token_file: the command talks to the wrong daemon);
       with [server] workers > 1: a worker did not answer (named on stderr; the
       others are shown, so the view is not the whole node)
  141  the output pipe was closed (e.g. `mta spool ls | head`)
`mta suppress` works like grep: 0 suppressed / done, 1 not suppressed, 2 any error.
"""


def version() -> str:
    """The installed distribution's version, else mta.__version__."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            return dist_version("mta")
        except PackageNotFoundError:
            pass
    except ImportError:      # pragma: no cover
        pass
    import mta
    return getattr(mta, "__version__", "unknown")


def _config(args: argparse.Namespace):
    config = load_config(getattr(args, "config", None),
                         {k: getattr(args, k, None) for k in _OVERRIDES})
    worker = getattr(args, "worker", None)
    # --worker I (with [server] workers > 1): worker I's admin API and spool shard
    if worker is not None and args.command not in ("serve", "workers"):
        from mta.control.worker_config import slot_of, worker_config
        try:
            slot = slot_of(f"{worker}/{config.server.workers}", config)
        except ValueError as exc:
            raise SystemExit(f"mta --worker {worker}: {exc} ([server] workers = "
                             f"{config.server.workers})") from None
        config = worker_config(config, slot)
    return config


# A node with several worker processes is one node to its operator: each worker holds its
# own queues and limits, so an action is sent to every worker (a section per worker); a
# view that can be merged asks every worker and shows the node (mta/control/nodeview.py);
# a view of each worker's own live state and limits shows a section per worker.
_ACTIONS = {"suspend": None, "resume": None, "shaping": ("set", "clear"),
            "queue": ("rebind", "flush", "hold", "release", "delete", "bounce")}
_MERGED = {"queue": None, "top": None}     # the queue views (not its actions), mta top
_SECTIONS = {"shaping", "warmup"}          # per-worker live state: shaping show, warmup show


def _run_on_workers(args: argparse.Namespace) -> int:
    """args.func(args) for the node: with [server] workers > 1 and no --worker, a merged
    view gets every worker's config in args.node; an action and a per-worker view run once
    per worker under a `worker I:` heading. A worker that does not answer is named on
    stderr, the others are shown, and the exit status is EXIT_UNREACHABLE."""
    command = getattr(args, "command", None)
    if (command not in _ACTIONS and command not in _MERGED and command not in _SECTIONS) \
            or getattr(args, "worker", None) is not None:
        return args.func(args)
    config = load_config(getattr(args, "config", None),
                         {k: getattr(args, k, None) for k in _OVERRIDES})
    workers = config.server.workers
    if workers <= 1:
        return args.func(args)
    verbs = _ACTIONS.get(command, ())
    action = command in _ACTIONS and (verbs is None or getattr(args, "action", None) in verbs)
    if not action and command in _MERGED:
        from mta.control.worker_config import slot_of, worker_config
        args.node = [worker_config(config, slot_of(f"{i}/{workers}", config))
                     for i in range(workers)]
        rc = args.func(args)
        return max(rc, EXIT_UNREACHABLE) if getattr(args, "partial", False) else rc
    from mta.control.client import AdminUnreachable
    rc = 0
    for i in range(workers):
        args.worker = i
        print(f"worker {i}:", flush=True)
        try:
            rc = max(rc, args.func(args))
        except AdminUnreachable as exc:
            print(f"{exc.code} (worker {i})", file=sys.stderr, flush=True)
            rc = max(rc, EXIT_UNREACHABLE)
    return rc


def _cmd_serve(args: argparse.Namespace) -> int:
    from mta.daemon import serve
    config = _config(args)
    if args.worker:        # one worker process of several, started by the supervisor
        from mta.control.worker_config import slot_of, worker_config
        try:
            slot = slot_of(args.worker, config)
        except ValueError as exc:
            raise SystemExit(f"mta serve --worker {args.worker}: {exc}") from None
        return serve(worker_config(config, slot), worker=slot,
                     loader=lambda: worker_config(_config(args), slot))
    if config.server.workers > 1:
        from mta.supervisor import supervise
        return supervise(config, args.argv)
    return serve(config, loader=lambda: _config(args))


def _cmd_workers(args: argparse.Namespace) -> int:
    from mta.supervisor import workers_report
    rc, text = workers_report(_config(args), args.json)
    print(text, file=sys.stdout if rc == 0 or args.json else sys.stderr)
    return rc


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from mta.daemon import raise_nofile
    from mta.preflight import check
    report = check(cfg, raise_nofile())
    for line in report.warnings:
        print(line, file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)
    if report.errors:
        print(f"{cfg.origin}: {len(report.errors)} problem(s): mta serve would refuse this "
              "config", file=sys.stderr)
        return EXIT_ERROR
    print(f"{cfg.origin}: OK ({len(cfg.listener)} listener(s), spool {cfg.spool.directory}"
          f"{f', {len(report.warnings)} warning(s)' if report.warnings else ''})")
    return EXIT_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    from mta.config.show import render
    sys.stdout.write(render(_config(args), changed=args.changed))
    return EXIT_OK


def _cmd_spool(args: argparse.Namespace) -> int:
    from mta.spool.recovery import scan
    directory = args.spool_dir or str(_config(args).spool.directory)
    try:
        found = scan(directory)
    except OSError as exc:   # missing, unreadable, or read-only with records to quarantine
        print(f"mta: {exc.filename or directory}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
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
    return EXIT_OK


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


def _add_common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The common options. On a subcommand they default to SUPPRESS, so a value given
    before the subcommand is not overwritten by the subcommand's default; an option
    string the subcommand already has (dkim verify --dns) keeps its own definition."""
    taken = p._option_string_actions
    default: dict = {} if top else {"default": argparse.SUPPRESS}
    opts = [(("-c", "--config"), dict(metavar="FILE", help="TOML config file (default: the "
                                      "built-in one)")),
            (("--listen",), dict(metavar="HOST:PORT", help="override the first listener's "
                                 "address")),
            (("--spool-dir",), dict(metavar="DIR", help="override spool.directory")),
            (("--smarthost",), dict(metavar="HOST:PORT", help="relay everything to one next "
                                    "hop")),
            (("--dns",), dict(metavar="IP:PORT", help="the DNS server to ask (dns.nameservers)")),
            (("--admin",), dict(metavar="HOST:PORT", help="admin API address (\"\" disables)")),
            (("--hold",), dict(action="store_true", help="accept and queue but deliver nothing "
                               "(delivery.hold)")),
            (("--worker",), dict(metavar="I", type=int, help="with [server] workers > 1: "
                                 "worker process I's admin API and spool shard (default: "
                                 "views show the whole node, actions reach every worker)"))]
    group = p.add_argument_group("common options (anywhere on the line)")
    for flags, kw in opts:
        if any(f in taken for f in flags):
            continue
        if top and flags == ("--hold",):
            kw = {**kw, "default": None}
        group.add_argument(*flags, **{**default, **kw})


def _add_common_everywhere(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in dict.fromkeys(action.choices.values()):   # aliases share a parser
                if "--spool-dir" not in sp._option_string_actions:
                    _add_common(sp)
                _add_common_everywhere(sp)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta", description="high-volume MTA core", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mta {version()}")
    _add_common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        _add_common(sp)

    sp = sub.add_parser("serve", help="run the daemon (with [server] workers > 1: a "
                        "supervisor and its worker processes)")
    sp.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)   # the supervisor's
    sp.set_defaults(func=_cmd_serve)
    sp = sub.add_parser("workers", help="the worker processes of a daemon run with [server] "
                        "workers > 1: pid, state, uptime, restarts, last exit status, ready")
    sp.add_argument("--json", action="store_true", help="the status as JSON")
    sp.set_defaults(func=_cmd_workers)
    sp = sub.add_parser("check-config", help="check a config as serve would (keys, files, "
                        "addresses) and exit; exit 1 when serve would refuse it")
    sp.set_defaults(func=_cmd_check_config)
    sp = sub.add_parser("config", help="show the effective configuration")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="every key with the value in force, as TOML "
                           "(postconf -d); --changed: only what differs from the defaults "
                           "(postconf -n)")
    show.add_argument("--changed", action="store_true",
                      help="only the keys that differ from their defaults")
    show.set_defaults(func=_cmd_config_show)
    sp = sub.add_parser("spool", help="inspect a spool directory offline (daemon stopped)")
    sp.add_argument("action", choices=["ls", "stat"])
    sp.set_defaults(func=_cmd_spool)
    from mta.control.cli import add_parser as add_control
    add_control(sub, with_config, _config)
    from mta.control.drain import add_parser as add_drain
    add_drain(sub, with_config, _config)   # mta drain --to URL [--spool-dir DEAD]
    from mta.dkim.cli import add_parser as add_dkim
    add_dkim(sub)
    from mta.feedback.bounce.cli import add_parser as add_bounce
    from mta.feedback.suppression.cli import add_parser as add_suppress
    _, store, key = _feedback_defaults(argv)
    add_suppress(sub, *store, *key)   # -c: --store and --key defaults from that config
    add_bounce(sub)                   # -c: that config's [bounces] rules go first
    from mta.ingest.auth import add_parser as add_user
    add_user(sub)                     # mta user add|remove|list|passwd --file F
    from mta.config.keyring import add_parser as add_privacy
    add_privacy(sub)                  # mta privacy keygen|encrypt|decrypt --keyring F
    _add_common_everywhere(p)
    return p


def _with_config_rules(args: argparse.Namespace) -> None:
    """`mta bounce -c FILE parse`: the operator's [bounces] rules go first."""
    if args.command == "bounce" and getattr(args, "config", None):
        args.rules = [*_config(args).bounces.rules, *args.rules]


def _quiet_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so the flush at exit is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    from mta.control.client import AdminUnreachable
    try:
        args = build_parser(argv).parse_args(argv)   # usage errors: exit 2 (argparse)
        args.argv = list(sys.argv[1:] if argv is None else argv)   # serve: for the workers
        _with_config_rules(args)
        rc = _run_on_workers(args)
        sys.stdout.flush()      # a closed pipe shows here, not at interpreter exit
        return rc
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_ERROR
    except AdminUnreachable as exc:
        print(exc.code, file=sys.stderr)
        return EXIT_UNREACHABLE
    except SystemExit as exc:
        if not isinstance(exc.code, str):   # argparse (2, 0 for --help) and explicit codes
            raise
        print(exc.code, file=sys.stderr)    # a subcommand's own usage check: one line
        return EXIT_USAGE
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        return 130
    except OSError as exc:      # a file named on the command line or in the config
        where = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        print(f"mta: {where}", file=sys.stderr)
        return EXIT_ERROR
