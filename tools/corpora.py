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

# Corpora deliberately not vendored: name -> why, and where upstream keeps them.
NOT_VENDORED = {
    "flufl-bounce": "LGPL-3/GPL-2 and un-anonymised addresses; upstream github.com/wRAR/flufl.bounce "
                    "flufl/bounce/tests/data (the expectations.tsv is the shared folder's)",
    "arf-fbl": "AbuseIO samples are GPL-2, Email-ARF samples Perl 5 terms; upstream "
               "github.com/AbuseIO/AbuseIO extra/notifier-samples/feedback-loop and "
               "github.com/rjbs/Email-ARF t/messages (the expectations.tsv is the shared folder's)",
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
    where = f"{VENDORED / name} nor {shared_dir() / 'corpus' / name}"
    if name not in NOT_VENDORED:
        return f"corpus {name!r} not found in {where}: it is vendored in tests/data; is the checkout complete?"
    return (f"corpus {name!r} not found in {where}; it is not in the repository ({NOT_VENDORED[name]}): "
            f"put the founders' shared folder at {ROOT.parent / 'shared'} or point MTA_SHARED_DIR at it")
