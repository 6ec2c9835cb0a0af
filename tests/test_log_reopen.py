"""LogWriter.reopen(): logrotate-style renames while records keep coming lose and split
nothing; the new file gets the configured mode; a failed open keeps the old file."""
from __future__ import annotations

import asyncio
import os
import stat

import orjson

from mta.logs.writer import LogWriter
from mta.model.log_records import RecordType


def _lines(*paths) -> list[dict]:
    out = []
    for p in paths:
        out += [orjson.loads(line) for line in p.read_bytes().splitlines()]   # whole lines only
    return out


def test_reopen_after_renames_under_load(tmp_path):
    async def main() -> LogWriter:
        w = LogWriter(str(tmp_path), flush_interval=0.001, mode=0o600)
        path = tmp_path / "mta.jsonl"
        n = 0
        for round_ in range(3):
            for _ in range(2000):
                w.log(RecordType.RECEPTION, n=n, pad="x" * 200)
                n += 1
                if n % 100 == 0:
                    await asyncio.sleep(0)          # let writes run in the writer thread
            path.rename(tmp_path / f"mta.jsonl.{round_}")
            w.reopen(mode=0o640)
            for _ in range(500):                    # records while the open is on its way
                w.log(RecordType.RECEPTION, n=n, pad="y" * 200)
                n += 1
            await asyncio.sleep(0.05)
        w.log(RecordType.RECEPTION, n=n, pad="z")
        w.close()
        return w

    w = asyncio.run(main())
    files = [tmp_path / f"mta.jsonl.{i}" for i in range(3)] + [tmp_path / "mta.jsonl"]
    recs = _lines(*files)
    assert sorted(r["n"] for r in recs) == list(range(3 * 2500 + 1))
    assert w.reopened == 3
    assert stat.S_IMODE(os.stat(tmp_path / "mta.jsonl").st_mode) == 0o640
    assert _lines(tmp_path / "mta.jsonl")            # the last file got records


def test_reopen_failure_keeps_the_old_file(tmp_path):
    w = LogWriter(str(tmp_path))
    w.log(RecordType.RECEPTION, n=1)
    os.rename(tmp_path / "mta.jsonl", tmp_path / "moved.jsonl")
    os.mkdir(tmp_path / "mta.jsonl")                 # the path cannot be opened for writing
    w.reopen()
    w.log(RecordType.RECEPTION, n=2)
    w.close()
    assert w.reopened == 0
    assert [r["n"] for r in _lines(tmp_path / "moved.jsonl")] == [1, 2]
