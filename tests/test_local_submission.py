"""Local submission (mta/ingest/local.py) over a real Reception and spool: a DSN handed
over while the spool cannot write is stored once it can, and given up, logged, only
at stop; submit() waits for durability and queues the message."""
from __future__ import annotations

import asyncio
import logging

import pytest

import mta
from mta.ingest.local import LocalSubmission
from mta.ingest.reception import Reception
from mta.spool import Spool, SpoolError

DSN = b"From: MAILER-DAEMON@mx.test\r\nSubject: Delivery Status Notification\r\n\r\nfailed\r\n"


def _setup(tmp_path, loop):
    config = mta.config.parse_config(
        f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = "{tmp_path}/log"\n'
        f'[dns]\nnameservers = ["127.0.0.1:9"]\n')
    spool = Spool(str(config.spool.directory))
    spool.open(loop)
    reception = Reception(config, spool, None)
    queued: list[bytes] = []
    reception.on_stored = lambda raw_id, envelope: queued.append(raw_id)
    return spool, reception, queued


def _failing_writes(spool: Spool, failures: list[int]) -> None:
    """The next failures[0] stores fail as a full disk would (the spool's own error)."""
    real = spool.store

    def store(*args):
        if failures[0] > 0:
            failures[0] -= 1
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(SpoolError("no space left on device"))
            return fut
        return real(*args)
    spool.store = store


def test_submit_returns_the_id_once_durable_and_queues_it(tmp_path):
    async def run() -> None:
        spool, reception, queued = _setup(tmp_path, asyncio.get_running_loop())
        local = LocalSubmission(reception)
        msg_id = await local.submit("a@example.com", ["b@example.org"], DSN)
        assert [q.hex() for q in queued] == [msg_id]
        assert spool.ids() == queued
        await local.stop()
        await spool.close()
    asyncio.run(run())


def test_kept_dsn_is_stored_once_the_spool_can_write_again(tmp_path):
    async def run() -> None:
        spool, reception, queued = _setup(tmp_path, asyncio.get_running_loop())
        failures = [3]
        _failing_writes(spool, failures)
        local = LocalSubmission(reception, retry=0.01)
        local.submit_kept("", ["sender@example.com"], DSN)
        for _ in range(500):   # generous: a loaded box
            if queued:
                break
            await asyncio.sleep(0.01)
        assert failures == [0], "every failed write was retried"
        assert len(queued) == 1, "the DSN was stored once the spool could write"
        await local.stop()
        await spool.close()
    asyncio.run(run())


def test_stop_gives_up_a_dsn_the_spool_still_cannot_write(tmp_path, caplog):
    async def run() -> None:
        spool, reception, queued = _setup(tmp_path, asyncio.get_running_loop())
        _failing_writes(spool, [10 ** 9])
        local = LocalSubmission(reception, retry=0.01)
        local.submit_kept("", ["sender@example.com"], DSN)
        await asyncio.sleep(0.05)          # failed and waiting to try again
        await asyncio.wait_for(local.stop(), 10)
        assert queued == []
        await spool.close()
    with caplog.at_level(logging.ERROR, logger="mta.server"):
        asyncio.run(run())
    lost = [r.getMessage() for r in caplog.records if "lost at stop" in r.getMessage()]
    assert lost == [f"a DSN ({len(DSN)} bytes) was lost at stop: the spool cannot write: "
                    "no space left on device"]


def test_submit_without_recipients_is_refused(tmp_path):
    async def run() -> None:
        spool, reception, _ = _setup(tmp_path, asyncio.get_running_loop())
        with pytest.raises(ValueError, match="at least one recipient"):
            await LocalSubmission(reception).submit("a@example.com", [], DSN)
        await spool.close()
    asyncio.run(run())
