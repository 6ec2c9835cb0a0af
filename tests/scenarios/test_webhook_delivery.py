"""Scenario: event webhooks (issue 14 item 6) on a real `mta serve` relaying to a sink.

A real HTTP receiver (tests/test_webhooks.HookReceiver: http.server, HTTP/1.1) refuses
with 500 for a while, then takes batches; meanwhile the daemon is killed and started
again, and the log is renamed logrotate-style followed by SIGUSR1. Every Reception and
Delivery record of tenant "acme" that the daemon wrote (read back from the log files)
arrives exactly once after dedupe by X-MTA-Batch-Id, in file order (so per message:
Reception before Delivery); other tenants' and other types' records never arrive. A hook
that never answers does not slow mail: the same load is relayed with and without it
(loosely compared: no tight wall-clock ratio on a shared box).

(Not named tests/scenarios/test_webhooks.py: pytest's default import mode needs test file
basenames to be unique across tests/ and tests/scenarios/.)
"""
from __future__ import annotations

import signal
import smtplib
import threading
import time

import orjson
import pytest
from test_reload_drain import Sink
from test_webhooks import HookReceiver

TYPES = ("Reception", "Delivery")


@pytest.fixture
def hook_receiver():
    made: list[HookReceiver] = []

    def make() -> HookReceiver:
        made.append(HookReceiver())
        return made[-1]
    yield make
    for r in made:
        r.hang.clear()
        r.close()


def _send(port: int, i: int, tenant: str) -> None:
    msg = (f"From: <a@sender.test>\r\nTo: <b@dest.test>\r\nSubject: t\r\nX-Tenant: {tenant}\r\n"
           f"Message-ID: <w{i}@sender.test>\r\n\r\nbody {i}\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("a@sender.test", ["b@dest.test"], msg)


def _load(port: int, start: int, n: int, threads: int = 3) -> None:
    """n messages from `threads` clients at once; tenants alternate acme / other."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        for i in range(start + k, start + n, threads):
            try:
                _send(port, i, "acme" if i % 2 == 0 else "other")
            except BaseException as exc:   # noqa: BLE001
                errors.append(exc)
                return

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors[:3]


def _daemon(daemon_factory, sink: Sink, url: str, hook: str = ""):
    extra = (f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\nretry_initial = "1s"\n'
             f'retry_max = "1s"\n')
    if url:
        extra += (f'[[webhook]]\nname = "ops"\nurl = "{url}"\nrecord_types = ["Reception", '
                  f'"Delivery"]\ntenants = ["acme"]\nbatch_size = 25\nbatch_interval = "100ms"\n'
                  f'max_retry_interval = "500ms"\n{hook}\n')
    return daemon_factory(extra=extra)


def _wait(pred, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _written(d, *names: str) -> list[dict]:
    """The records of the filtered types and tenant in the log files, in file order."""
    out = []
    for name in names:
        for line in (d.log_dir / name).read_bytes().splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:   # a line torn by the SIGKILL: the hook skips it too
                continue
            if rec["type"] in TYPES and rec.get("tenant") == "acme":
                out.append(rec)
    return out


def _key(rec: dict) -> tuple:
    return (rec["type"], rec["id"], rec["time"], rec.get("recipient"))


def test_failing_receiver_restart_and_logrotate_lose_nothing(daemon_factory, hook_receiver, tmp_path):
    r: HookReceiver = hook_receiver()
    r.status = 500                                   # the receiver is down at first
    sink = Sink()
    try:
        d = _daemon(daemon_factory, sink, r.url)
        _load(d.port, 0, 40)
        sink.wait(40)
        _wait(lambda: r.requests >= 3, "refused tries")
        assert not r.batches
        r.status = 200                               # ... and recovers
        _wait(lambda: len(r.records()) >= 10, "the first batches")
        _load(d.port, 40, 20)

        d.kill()                                     # a crash mid-way ...
        d.start()                                    # ... resumes from the cursor
        _load(d.port, 60, 30)
        sink.wait(90)

        log = d.log_dir / "mta.jsonl"
        log.rename(d.log_dir / "mta.jsonl.1")        # logrotate's rename ...
        _load(d.port, 90, 20)                        # (still written to the renamed file)
        d.proc.send_signal(signal.SIGUSR1)           # ... and its postrotate
        _wait(log.exists, "the new log file")
        _load(d.port, 110, 30)
        sink.wait(140)
        _wait(lambda: sum(rec["type"] == "Delivery" for rec in _written(d, "mta.jsonl")) >= 15,
              "Delivery records in the new file")
        # the daemon is idle now: what its files hold must reach the receiver, and no more
        _wait(lambda: len(r.records()) >= len(_written(d, "mta.jsonl.1", "mta.jsonl")),
              "every record at the receiver")
        time.sleep(1.0)
        want = _written(d, "mta.jsonl.1", "mta.jsonl")
        assert d.stop() == 0
    finally:
        sink.close()

    got = r.records()                                # deduped by batch id
    keys = [_key(x) for x in got]
    assert len(keys) == len(set(keys)), "a record arrived twice under two batch ids"
    assert [_key(x) for x in got] == [_key(x) for x in want]          # once each, file order
    # 70 acme messages; a SIGKILL loses the records still in the writer's buffer (the
    # spool, not the log, is the durable record), which then never reach the file either
    assert sum(x["type"] == "Delivery" for x in got) >= 50
    assert all(x["tenant"] == "acme" and x["type"] in TYPES for x in r.records(dedupe=False))
    first: dict[str, int] = {}
    for i, x in enumerate(got):                      # per message: Reception, then Delivery
        first.setdefault(x["id"] + x["type"], i)
    for i, x in enumerate(got):                      # (a SIGKILL may have lost a Reception)
        if x["type"] == "Delivery" and x["id"] + "Reception" in first:
            assert first[x["id"] + "Reception"] < i, x
    assert sum(x["id"] + "Reception" in first for x in got if x["type"] == "Delivery") >= 50
    dupes = len(r.records(dedupe=False)) - len(got)
    ids = [bid for bid, _, _ in r.batches]
    assert dupes == 0 or len(ids) > len(set(ids))    # duplicates only as a repeated batch


def test_a_dead_hook_does_not_slow_mail(daemon_factory, hook_receiver, tmp_path):
    hung: HookReceiver = hook_receiver()
    hung.hang.set()                                  # takes the POST, never answers
    timings = {}
    for label, url in (("without", ""), ("with", hung.url), ("without again", "")):
        sink = Sink()
        try:
            d = _daemon(daemon_factory, sink, url, hook='timeout = "2s"\n')
            started = time.monotonic()
            _load(d.port, 0, 120, threads=4)
            sink.wait(120, timeout=120)
            timings[label] = time.monotonic() - started
            if url:
                _wait(lambda: "no reply within 2s" in (d.workdir / "daemon.err").read_text(),
                      "the hook's timeout in the daemon's log")
                assert hung.requests >= 1
            assert d.stop() == 0
        finally:
            sink.close()
    base = max(timings["without"], timings["without again"])
    assert timings["with"] < 3 * base + 5, timings   # loose: the hook takes no share of mail
