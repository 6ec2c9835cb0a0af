"""Where a test corpus lives: tests/data/<name> in the tree, else the founders' shared folder.

Corpora under permissive licences are vendored in tests/data (each folder with its
README and licence; tests/data/README.md lists them), so a clean clone tests with them.
The GPL and un-anonymised sets stay outside the repository, in <shared>/corpus/<name>,
where <shared> is $MTA_SHARED_DIR or, by default, ../shared beside the checkout (CI has
it). `find` returns None for a corpus in neither place and `missing` says which one
it is and where to get it; what a missing corpus means (a failure in CI, a skip on a
laptop, a shorter report) is the caller's decision. Used by tests/conftest.py,
tests/fuzz/ seed lists and tools/bounce_accuracy.py.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "tests" / "data"

# Corpora deliberately not vendored: name -> (why not, where upstream keeps the messages).
# Their expectations.tsv was written for the shared folder and exists only there.
NOT_VENDORED = {
    "flufl-bounce": ("LGPL-3/GPL-2 messages with un-anonymised addresses",
                     "github.com/wRAR/flufl.bounce flufl/bounce/tests/data"),
    "arf-fbl": ("AbuseIO samples are GPL-2, Email-ARF samples under Perl 5 terms",
                "github.com/AbuseIO/AbuseIO extra/notifier-samples/feedback-loop, github.com/rjbs/Email-ARF t/messages"),
}


def shared_dir() -> Path:
    """The founders' shared folder: $MTA_SHARED_DIR, else ../shared beside the checkout."""
    return Path(os.environ.get("MTA_SHARED_DIR") or ROOT.parent / "shared")


def find(name: str) -> Path | None:
    """The folder of corpus `name`: the vendored copy first, then the shared one."""
    for path in (VENDORED / name, shared_dir() / "corpus" / name):
        if path.is_dir():
            return path
    return None


def missing(name: str) -> str:
    """What to tell someone whose checkout lacks corpus `name`: which one, and where to get it."""
    looked = f"looked in {VENDORED / name} and {shared_dir() / 'corpus' / name}"
    if name not in NOT_VENDORED:
        return f"corpus {name!r} is missing ({looked}); it is vendored in tests/data: is the checkout complete?"
    why, upstream = NOT_VENDORED[name]
    return (f"corpus {name!r} is missing ({looked}). It is not in the repository ({why}): put the "
            f"founders' shared folder at {ROOT.parent / 'shared'} (CI has it) or set MTA_SHARED_DIR to it. "
            f"Upstream messages: {upstream}; the expectations exist only in the shared folder.")
