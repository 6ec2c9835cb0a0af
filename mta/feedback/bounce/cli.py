"""`mta bounce parse FILE...`: print one JSON line per recipient found in each returned message.

`-` or no FILE reads one message from stdin. Messages that are not bounces,
delays, feedback reports or auto-replies print nothing. A file that cannot be
read is reported on stderr (naming the file) and makes the exit status 1; the
other files are still processed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from .classify import Classifier, RulesError
from .parser import parse_message

__all__ = ["add_parser", "main", "run_parse"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bounce parse` on an argparse subparsers object; returns the `bounce` parser."""
    p = subparsers.add_parser("bounce", help="bounce and feedback-loop processing")
    sub = p.add_subparsers(dest="bounce_command", required=True)
    pp = sub.add_parser("parse", help="parse returned messages, print one JSON line per recipient")
    pp.add_argument("files", nargs="*", metavar="FILE", help="message files ('-' or none: stdin)")
    pp.add_argument("--rules", action="append", type=Path, default=[], metavar="TOML",
                    help="operator classification rules, tried before the shipped ones (repeatable)")
    pp.add_argument("--policy-hard", action="append", default=[], metavar="CATEGORY",
                    help="a policy category graded hard, as [bounces] policy_hard (repeatable)")
    pp.set_defaults(func=run_parse)
    return p


def run_parse(args: argparse.Namespace) -> int:
    try:
        classifier = Classifier(args.rules, getattr(args, "policy_hard", ()))
    except RulesError as e:
        print(f"mta bounce parse: {e}", file=sys.stderr)
        return 1
    files = args.files or ["-"]
    rc = 0
    out = sys.stdout.buffer
    for name in files:
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as e:
            print(f"mta bounce parse: cannot read {name}: {e.strerror or e}", file=sys.stderr)
            rc = 1
            continue
        rep = parse_message(data, classifier)
        if rep.kind == "none":
            continue
        for r in rep.recipients:
            out.write(orjson.dumps({
                "file": name, "recipient": r.recipient, "status": r.status, "status_derived": r.status_derived,
                "reply_code": r.reply_code, "category": r.category, "hard": r.hard, "action": r.action,
                "kind": rep.kind, "family": rep.family,
                "feedback_type": rep.feedback.feedback_type if rep.feedback else None,
                "reporting_mta": rep.reporting_mta, "message_id": rep.message_id,
            }) + b"\n")
    out.flush()
    return rc


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: main(["parse", "FILE", ...])."""
    ap = argparse.ArgumentParser(prog="mta")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["bounce", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
