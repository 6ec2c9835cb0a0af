"""LogWriter under a full disk, a slow disk and a bounded buffer (real tmpfs, no mocks of
the file system: the disk really fills up)."""
from __future__ import annotations

import asyncio
import os
import stat
import time

import orjson
import pytest
from tmpfs import fill, tmpfs

from mta.logs import writer as writer_module
from mta.logs.writer import LogWriter
from mta.model.log_records import RecordType


def _lines(path) -> list[dict]:
    return [orjson.loads(line) for line in open(path, "rb").read().splitlines()]


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_full_disk_keeps_records_and_writes_them_when_space_returns(tmp_path):
    async def run():
        with tmpfs(tmp_path / "log") as d:
            w = LogWriter(str(d), flush_interval=0.01, retry_interval=0.05)
            filler = fill(d)
            for i in range(2000):
                w.log(RecordType.RECEPTION, id=i)    # never raises, never blocks
            await _until(lambda: w.stats()["write_errors"] >= 2)
            s = w.stats()
            assert s["failing"] and "errno 28" in s["last_error"] and s["buffered_bytes"] > 0
            assert s["dropped_records"] == 0
            filler.unlink()
            await _until(lambda: not w.stats()["failing"] and not w.stats()["buffered_bytes"])
            w.log(RecordType.RECEPTION, id=2000)
            w.close()
            ids = [r["id"] for r in _lines(w.path)]
            assert ids == list(range(2001))          # all of them, once, in order
    asyncio.run(run())


def test_past_the_bound_the_oldest_are_dropped_and_a_logloss_record_counts_them(tmp_path):
    async def run():
        with tmpfs(tmp_path / "log") as d:
            w = LogWriter(str(d), flush_interval=0.01, retry_interval=0.05, max_buffer=1 << 20)
            filler = fill(d)
            w.log(RecordType.RECEPTION, id=-1, pad="x")
            await _until(lambda: w.stats()["failing"])
            n = 30_000                               # ~3 MiB of records, bound 1 MiB
            for i in range(n):
                w.log(RecordType.RECEPTION, id=i, pad="x" * 64)
            s = w.stats()
            assert s["buffered_bytes"] <= 1 << 20
            dropped = s["dropped_records"]
            assert dropped > n // 2
            filler.unlink()
            await _until(lambda: not w.stats()["failing"] and not w.stats()["buffered_bytes"])
            w.close()
            records = _lines(w.path)                 # every line is whole JSON
            loss = [r for r in records if r["type"] == "LogLoss"]
            assert [r["lost"] for r in loss] == [dropped]
            ids = [r["id"] for r in records if r["type"] == "Reception"]
            assert len(ids) + dropped == n + 1
            assert ids == list(range(n - len(ids), n))   # the newest were kept, in order
    asyncio.run(run())


def test_a_slow_log_disk_does_not_block_the_loop(tmp_path, monkeypatch):
    real = writer_module._write_all

    def slow(fd, data):
        time.sleep(0.5)                              # a write held by dirty-page throttling
        return real(fd, data)

    monkeypatch.setattr(writer_module, "_write_all", slow)

    async def run():
        w = LogWriter(str(tmp_path), flush_interval=0.01)
        t0 = time.monotonic()
        for i in range(3):
            w.log(RecordType.RECEPTION, id=i)
            w.flush()
            await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 0.4          # the loop never waited for the disk
        w.close()                                    # waits for the write in flight
        assert [r["id"] for r in _lines(w.path)] == [0, 1, 2]
    asyncio.run(run())


def test_without_a_loop_a_failing_write_is_kept_not_raised(tmp_path):
    with tmpfs(tmp_path / "log") as d:
        w = LogWriter(str(d))
        filler = fill(d)
        w.log(RecordType.RECEPTION, id=1)            # written at once: no loop
        assert w.stats()["write_errors"] == 1 and w.stats()["buffered_bytes"] > 0
        filler.unlink()
        w.close()
        assert [r["id"] for r in _lines(w.path)] == [1]


@pytest.mark.parametrize("mode", [0o640, 0o600])
def test_log_file_mode_is_the_configured_one_whatever_the_umask(tmp_path, mode):
    old = os.umask(0o077)
    try:
        w = LogWriter(str(tmp_path), mode=mode)
    finally:
        os.umask(old)
    w.close()
    assert stat.S_IMODE(os.stat(w.path).st_mode) == mode


def test_records_carry_host_and_iso_time_and_follow_the_privacy_settings(tmp_path):
    """Without a loop the writer writes at once: every record gets `ts` (ISO 8601 UTC,
    the same instant as `time`) and `host`; recipients hashed with the given function,
    senders cut to their domain; the null sender and absent fields stay as they are."""
    from mta.logs.privacy import Privacy

    privacy = Privacy.make("hashed", "domain", lambda a: "h:" + a.lower())
    w = LogWriter(str(tmp_path), host="mx1.example", privacy=privacy)
    w.log(RecordType.DELIVERY, recipient="Bob@x.test", sender="alice@sender.test",
          time=1764637401.25)
    w.log(RecordType.RECEPTION, recipients=["a@x.test", "b@y.test"], sender="")
    w.log(RecordType.BACKOFF, site="x.test")
    w.flush()
    d, r, b = _lines(tmp_path / "mta.jsonl")
    assert (d["ts"], d["host"]) == ("2025-12-02T01:03:21.250Z", "mx1.example")
    assert (d["recipient"], d["sender"]) == ("h:bob@x.test", "sender.test")
    assert (r["recipients"], r["sender"]) == (["h:a@x.test", "h:b@y.test"], "")
    assert "recipient" not in b and b["host"] == "mx1.example"
    assert Privacy.make("clear", "clear", None) is None, "clear costs nothing per record"
    with pytest.raises(ValueError, match="suppression key"):
        Privacy.make("hashed", "clear", None)
