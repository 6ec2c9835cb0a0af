"""`mta suppress add | remove | check | import | export | purge`: the operator's view of
the suppression list (mta/feedback/suppression/store.py), safe to run while the daemon is up.

add     ADDRESS [--scope S] [--reason R] [--expires 30d|12h|UNIXTIME|never] [--note TEXT]
remove  ADDRESS [--scope S]            (every scope when --scope is not given)
check   ADDRESS [--tenant T] [--sender-domain D]
        exit 0 and the entry as JSON when suppressed, exit 1 when not
import  FILE|-  [--scope S] [--reason R] [--expires ...]
        one address, exported hash (hmac-sha256:<hex>) or export JSON line per line
export  [--scope S]                    JSON lines with the hash, never the address
purge                                   delete expired entries

Every action takes --store PATH and --key PATH. `add` and `import` create the key file
(32 random bytes, mode 0600) when it does not exist; the others need it to exist, since
a new key would silently match nothing. Addresses given on the command line are never
printed back. Diagnostics: exit 2 with one line naming the problem (bad key file, bad
address/scope/expiry, database locked); 2 also for usage errors (argparse).

Standalone:  python -c "import sys; from mta.feedback.suppression.cli import main; sys.exit(main(sys.argv[1:]))" add x@y.com
"""
from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time

import orjson

from mta.feedback.suppression.store import (KeyFileError, SuppressionList, load_key,
                                   load_or_create_key)

DEFAULT_STORE = "./var/suppression/suppression.sqlite"
DEFAULT_KEY = "./var/suppression/suppression.key"
_DURATION = re.compile(r"(\d+)([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expires(text: str | None, now: float | None = None) -> int | None:
    """"30d", "12h", "90m", "3600s", "2w" from now; a bare number is a unix time;
    "never" (or nothing) is None."""
    if text is None or text.strip().lower() in ("", "never"):
        return None
    t = text.strip().lower()
    if t.isdigit():
        return int(t)
    m = _DURATION.match(t)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"bad expiry {text!r}: want e.g. 30d, 12h, 90m, a unix time or never")
    return int((time.time() if now is None else now) + int(m.group(1)) * _UNITS[m.group(2)])


def add_parser(subparsers: argparse._SubParsersAction, store_default: str = DEFAULT_STORE,
               key_default: str = DEFAULT_KEY) -> argparse.ArgumentParser:
    """Register `suppress` with its actions under an existing `mta` subparsers object."""
    p = subparsers.add_parser("suppress", help="the suppression list: add, remove, check, "
                              "import, export, purge")
    _add_actions(p, store_default, key_default)
    return p


def _add_actions(p: argparse.ArgumentParser, store_default: str, key_default: str) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=store_default,
                        help=f"SQLite suppression store (default: {store_default})")
    common.add_argument("--key", default=key_default,
                        help=f"key file for the address hashes (default: {key_default})")
    sub = p.add_subparsers(dest="suppress_command", required=True)

    a = sub.add_parser("add", parents=[common], help="suppress an address")
    a.add_argument("address")
    a.add_argument("--scope", default="global", help="global, tenant:NAME or domain:SENDER_DOMAIN")
    a.add_argument("--reason", default="manual", help="hard_bounce, complaint, unsubscribe, manual ...")
    a.add_argument("--expires", help="30d, 12h, 90m, a unix time, or never (default)")
    a.add_argument("--note", default="", help="source text (no addresses; they are redacted)")
    a.set_defaults(func=_guarded(_add))

    r = sub.add_parser("remove", parents=[common], help="lift a suppression")
    r.add_argument("address")
    r.add_argument("--scope", help="only this scope (default: every scope)")
    r.set_defaults(func=_guarded(_remove))

    c = sub.add_parser("check", parents=[common],
                       help="exit 0 and print the entry when suppressed, 1 when not")
    c.add_argument("address")
    c.add_argument("--tenant")
    c.add_argument("--sender-domain")
    c.set_defaults(func=_guarded(_check))

    i = sub.add_parser("import", parents=[common], help="add addresses or hashes from FILE or -")
    i.add_argument("file")
    i.add_argument("--scope", default="global")
    i.add_argument("--reason", default="import")
    i.add_argument("--expires")
    i.set_defaults(func=_guarded(_import))

    e = sub.add_parser("export", parents=[common], help="print every entry as a JSON line")
    e.add_argument("--scope", help="only this scope")
    e.set_defaults(func=_guarded(_export))

    g = sub.add_parser("purge", parents=[common], help="delete expired entries")
    g.set_defaults(func=_guarded(_purge))


def _open(args: argparse.Namespace, create_key: bool) -> SuppressionList:
    key = load_or_create_key(args.key) if create_key else load_key(args.key)
    return SuppressionList(args.store, key)


def _add(args: argparse.Namespace) -> int:
    with _open(args, True) as s:
        e = s.add(args.address, args.scope, args.reason, parse_expires(args.expires), args.note)
    print(orjson.dumps(e.to_dict()).decode())
    return 0


def _remove(args: argparse.Namespace) -> int:
    with _open(args, False) as s:
        n = s.remove(args.address, args.scope)
    print(f"removed {n} entr{'y' if n == 1 else 'ies'}")
    return 0


def _check(args: argparse.Namespace) -> int:
    with _open(args, False) as s:
        e = s.check(args.address, args.tenant, args.sender_domain)
    if e is None:
        print("not suppressed")
        return 1
    print(orjson.dumps(e.to_dict()).decode())
    return 0


def _import(args: argparse.Namespace) -> int:
    expires = parse_expires(args.expires)
    with _open(args, True) as s:
        if args.file == "-":
            counts = s.import_lines(sys.stdin, args.scope, args.reason, expires)
        else:
            with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
                counts = s.import_lines(f, args.scope, args.reason, expires)
        total = s.count()
    print(f"imported {counts['addresses']} addresses, {counts['hashes']} hashes, "
          f"{counts['entries']} exported entries; {counts['invalid']} invalid lines skipped; "
          f"{total} entries in the store")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open(args, False) as s:
        out = sys.stdout.buffer
        for e in s.export(args.scope):
            out.write(orjson.dumps(e.to_dict()) + b"\n")
    return 0


def _purge(args: argparse.Namespace) -> int:
    with _open(args, False) as s:
        n = s.purge_expired()
        left = s.count()
    print(f"purged {n} expired entr{'y' if n == 1 else 'ies'}; {left} left")
    return 0


def _guarded(action):
    """Errors become one line on stderr and exit 2, whoever calls args.func(args)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except (KeyFileError, ValueError, OSError, sqlite3.Error) as exc:
            # ValueError texts from store.py never contain the address.
            print(f"mta suppress {args.suppress_command}: {exc}", file=sys.stderr)
            return 2
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mta suppress", description=__doc__.split("\n\n")[0])
    _add_actions(p, DEFAULT_STORE, DEFAULT_KEY)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
