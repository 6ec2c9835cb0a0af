"""Fuzz target: the returned-mail parser, mta.feedback.bounce.parse_message(bytes, classifier).

Returned mail comes from anyone who can reach the bounce domain's MX, so the parser
gets arbitrary bytes. Invariants:
  - it never raises, and returns a Report of a known kind;
  - it stays within BUDGET seconds per input (MTA_FUZZ_BOUNCE_BUDGET, default 1 s;
    libFuzzer's -timeout catches a parse that never returns);
  - an exception that parse_message swallows (logged at debug level, then kind
    "none") hides a returned message: each new site (type, file, line) is written to
    the findings directory (swallowed-<hash>: the input; .txt: the traceback) and
    fuzzing goes on; with MTA_FUZZ_STRICT=1 it is a crash (to replay or minimise).
Seeds: every message of the bounce and ARF corpora, each where tools/corpora.py finds
it (sisimai is in tests/data; the GPL flufl and ARF sets only in ../shared: without
them the run starts from fewer seeds and says so on stderr).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import traceback

import corpora
from mta.feedback.bounce import Classifier, parse_message

MAX_LEN = 64 << 10
TIMEOUT = 20
BUDGET = float(os.environ.get("MTA_FUZZ_BOUNCE_BUDGET", "1.0"))
STRICT = os.environ.get("MTA_FUZZ_STRICT") == "1"
KINDS = {"bounce", "delay", "delivery", "autoreply", "feedback", "none"}   # report.py; "delivery": success DSNs
SEED_DIRS = {"flufl-bounce": ("data",), "sisimai-set-of-emails": ("maildir/bsd", "maildir/not"),
             "arf-fbl": ("abuseio", "email-arf")}

classifier = Classifier()


class _Swallowed(logging.Handler):
    """Catches the exception parse_message logs before it answers kind 'none'."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.last: BaseException | None = None
        self.sites: set[tuple] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.last = record.exc_info[1]

    def record(self, data: bytes) -> None:
        exc = self.last
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        site = (type(exc).__name__, frame.filename, frame.lineno)
        if site in self.sites:
            return
        self.sites.add(site)
        text = "".join(traceback.format_exception(exc))
        print(f"[fuzz] swallowed {site[0]} at {site[1]}:{site[2]}", file=sys.stderr)
        findings = os.environ.get("MTA_FUZZ_FINDINGS")
        if findings:
            name = os.path.join(findings, "swallowed-" + hashlib.sha1(data).hexdigest())
            with open(name, "wb") as f:
                f.write(data)
            with open(name + ".txt", "w") as f:
                f.write(text)


swallowed = _Swallowed()
parser_log = logging.getLogger("mta.feedback.bounce.parser")
parser_log.setLevel(logging.DEBUG)
parser_log.addHandler(swallowed)
parser_log.propagate = False


def test_one_input(data: bytes) -> None:
    swallowed.last = None
    start = time.perf_counter()
    report = parse_message(data, classifier)
    took = time.perf_counter() - start
    assert took <= BUDGET, f"parse_message took {took:.2f} s for {len(data)} bytes (budget {BUDGET} s)"
    assert report.kind in KINDS, f"unknown report kind {report.kind!r}"
    if swallowed.last is not None:
        if STRICT:
            raise AssertionError(f"parse_message swallowed {swallowed.last!r}") from swallowed.last
        swallowed.record(data)


def seeds():
    for name, subdirs in SEED_DIRS.items():
        base = corpora.find(name)
        if base is None:
            print(f"[fuzz] fewer seeds: {corpora.missing(name)}", file=sys.stderr)
            continue
        for d in subdirs:
            for path in sorted((base / d).iterdir()):
                if path.is_file():
                    yield path.read_bytes()
