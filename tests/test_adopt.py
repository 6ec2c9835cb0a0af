"""mta/control/adopt.py: which spools a worker count leaves unread, and that a spool a
running process holds is not taken (the moves themselves: tests/scenarios/
test_workers_adopt.py)."""
from __future__ import annotations

import subprocess
import sys

from mta.control.adopt import orphaned_spools
from mta.control.drain import spool_user


def _seg(d, n=1):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{n:08d}.seg").write_bytes(b"x")


def test_orphaned_spools_by_worker_count(tmp_path):
    root = tmp_path / "spool"
    _seg(root)                       # a single-process run's segments
    _seg(root / "w0")
    _seg(root / "w1")
    _seg(root / "w2")
    (root / "w3").mkdir()            # a shard with nothing in it
    (root / "wx").mkdir()            # not a shard
    _seg(root / "wx")
    assert orphaned_spools(root, 1) == [root / "w0", root / "w1", root / "w2"]
    assert orphaned_spools(root, 2) == [root, root / "w2"]
    assert orphaned_spools(root, 4) == [root]
    assert orphaned_spools(tmp_path / "none", 2) == []


class Holder:
    """Another process with a file open (spool_user never counts the process asking)."""

    def __init__(self, path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
             "print(1, flush=True); time.sleep(30)", str(path)], stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"1\n"

    def __enter__(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_root_is_in_use_only_through_its_own_segments(tmp_path):
    root = tmp_path / "spool"
    _seg(root / "w0")
    with Holder(root / "w0" / "00000001.seg") as worker:
        assert spool_user(str(root)) == worker                  # nested: the shard counts
        assert spool_user(str(root), nested=False) is None      # the root's own: none
        _seg(root)
        with Holder(root / "00000001.seg") as single:
            assert spool_user(str(root), nested=False) == single
