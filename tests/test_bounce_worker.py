"""The bounce parser's child processes: time, memory and size budgets; a crash costs one message.

Real child processes (mta/feedback/bounce/worker.py). The slow parse is an operator rule
with a catastrophic regex: the parser's own scans are linear, and the process
boundary is what bounds everything else.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from conftest import corpus
from hostile_bounces import SLOW, SLOW_RULE, children, dsn
from mta.feedback.bounce import Classifier, parse_message
from mta.feedback.bounce.worker import ParserPool

SISIMAI = corpus("sisimai-set-of-emails") / "maildir" / "bsd"
NORMAL = dsn("550 5.1.1 <user@remote.test>: Recipient address rejected: User unknown")


def _run(coro):
    return asyncio.run(coro)


def _children() -> set[int]:
    return children(os.getpid())


@pytest.mark.parametrize("name", ["rfc3464-01.eml", "lhost-postfix-01.eml", "arf-01.eml", "lhost-exim-02.eml"])
def test_child_report_equals_in_process_report(name):
    data = (SISIMAI / name).read_bytes()
    here = parse_message(data, Classifier())

    async def run():
        pool = ParserPool()
        try:
            return await pool.parse(data)
        finally:
            await pool.close()

    got = _run(run())
    assert got.unparsed is None and not got.truncated
    rep = got.report
    assert (rep.kind, rep.family, rep.reporting_mta, rep.message_id) == \
        (here.kind, here.family, here.reporting_mta, here.message_id)
    assert rep.recipients == here.recipients
    assert rep.feedback == here.feedback
    assert (rep.original_headers is None) == (here.original_headers is None)
    if here.original_headers is not None:
        assert rep.original_headers.get_all("Return-Path") == here.original_headers.get_all("Return-Path")
        assert rep.original_headers.get("Message-ID") == here.original_headers.get("Message-ID")


def test_overrun_is_killed_and_replaced_while_the_loop_keeps_running(tmp_path):
    rules = tmp_path / "slow.toml"
    rules.write_text(SLOW_RULE)

    async def run():
        pool = ParserPool([rules], timeout=1.0)
        lags = []

        async def ticker():
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - t - 0.01)

        tick = asyncio.get_running_loop().create_task(ticker())
        started = time.monotonic()
        slow = await pool.parse(SLOW)
        took = time.monotonic() - started
        kids = _children()
        normal = await pool.parse(dsn("550 5.1.1 user unknown"))
        tick.cancel()
        await pool.close()
        return slow, took, normal, lags, kids, pool.replaced

    slow, took, normal, lags, kids, replaced = _run(run())
    assert slow.report is None and slow.unparsed == "time"
    assert 0.9 < took < 5.0
    assert max(lags) < 0.5            # the loop kept running meanwhile (generous: a loaded box)
    assert kids == set()              # the overrunning child is gone...
    assert replaced == 1              # ...and the next message got a new one
    assert normal.report is not None and normal.report.recipients[0].recipient == "user@remote.test"


def test_child_killed_mid_parse_costs_that_message_only(tmp_path):
    rules = tmp_path / "slow.toml"
    rules.write_text(SLOW_RULE)

    async def run():
        pool = ParserPool([rules], timeout=30.0)
        task = asyncio.get_running_loop().create_task(pool.parse(SLOW))
        while not _children():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)      # parsing now
        for pid in _children():
            os.kill(pid, signal.SIGKILL)
        crashed = await asyncio.wait_for(task, 10)
        after = await pool.parse(NORMAL)
        await pool.close()
        return crashed, after

    crashed, after = _run(run())
    assert crashed.report is None and crashed.unparsed == "crash"
    assert after.report is not None and after.report.kind == "bounce"


def test_memory_budget():
    # a 40 MB notice: the parse needs several copies of it, far above a 96 MiB address space
    big = (b"From: MAILER-DAEMON@mx.remote.test\r\nSubject: Undelivered\r\n\r\n"
           + b"user@remote.test: 550 user unknown\r\n" * ((40 << 20) // 36))

    async def run():
        pool = ParserPool(memory=96 << 20, max_size=64 << 20, timeout=60)
        try:
            over = await pool.parse(big)
            after = await pool.parse(NORMAL)
        finally:
            await pool.close()
        return over, after

    over, after = _run(run())
    assert over.report is None and over.unparsed == "memory"
    assert after.report is not None and after.report.kind == "bounce"   # the child lives on


def test_size_budget_parses_the_head_of_a_long_message():
    data = dsn("550 5.1.1 user unknown")
    long = dsn("550 5.1.1 user unknown", original_body=("x" * 998 + "\r\n") * 2000)   # a 2 MB original

    async def run():
        pool = ParserPool(max_size=64 << 10)
        try:
            return await pool.parse(data), await pool.parse(long)
        finally:
            await pool.close()

    short, cut = _run(run())
    assert not short.truncated and cut.truncated
    assert [r.recipient for r in cut.report.recipients] == ["user@remote.test"]
    assert cut.report.recipients[0].status == "5.1.1" and cut.report.recipients[0].hard
    assert cut.report.original_headers.get("Return-Path") == "<b-token@bounces.test>"
