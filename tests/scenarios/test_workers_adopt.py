"""Changing [server] workers leaves no mail behind (mta/control/adopt.py): `mta serve`
restarted with another worker count moves the queue of the spools no process reads any
more into worker 0 (or the single process) through its admin API, exactly once, and
delivers it to tools/sink.py on 127.0.123.2.

- 1 -> 2 workers: the single-process spool (segments in the spool root) is moved in;
- 2 -> 1 worker: both shards w0 and w1 are moved into the single process's spool root.
Before, both cases only warned (1 -> 2) or said nothing (2 -> 1): the messages stayed
undelivered.
"""
from __future__ import annotations

import smtplib
import time
from collections import Counter

import orjson

from test_workers import Sink

LISTEN = "127.0.123.1"
SINK = "127.0.123.2"


def _config(d, workers: int, sink_port: int, hold: bool) -> None:
    text = d.base_config
    server = f"[server]\nworkers = {workers}\nnode = \"n1\"\n"
    text = text.replace("[server]\n", server, 1)
    text = text.replace('address = "127.0.0.1"\nport', f'address = "{LISTEN}"\nport', 1)
    text = text.replace("[delivery]\n", f"[delivery]\nsmarthost = \"{SINK}:{sink_port}\"\n"
                        f"hold = {'true' if hold else 'false'}\n", 1)
    d.config.write_text(text)


def _send(port: int, rcpts: list[str]) -> None:
    for i in range(0, len(rcpts), 5):        # a new session every 5: both workers take some
        with smtplib.SMTP(LISTEN, port, timeout=20) as s:
            for r in rcpts[i:i + 5]:
                s.sendmail("a@sender.test", [r], f"Subject: {r}\r\n\r\nbody\r\n".encode())


def _records(d, rtype: str) -> list[dict]:
    out = []
    for path in d.log_dir.glob("mta*.jsonl"):
        out += [r for r in (orjson.loads(line) for line in path.read_bytes().splitlines() if line)
                if r["type"] == rtype]
    return out


def _daemon(daemon_factory, tmp_path):
    d = daemon_factory(extra="[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\n",
                       start=False)
    d.base_config = d.config.read_text()
    return d


def _segments(where) -> list[str]:
    return sorted(p.name for p in where.glob("*.seg"))


def _restart_and_check(d, sink: Sink, workers: int, rcpts: list[str]) -> None:
    _config(d, workers, sink.port, hold=False)
    d.start(timeout=40)
    got = sink.wait_for(set(rcpts), timeout=60)
    counts = Counter(got)
    assert set(counts) == set(rcpts), sorted(set(rcpts) - set(counts))[:5]
    assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1][:5]
    # the log writer flushes on its own time: the sink may have the mail first
    deadline = time.monotonic() + 10
    while True:
        moved = [r for r in _records(d, "Transfer") if r.get("direction") == "in"]
        if len(moved) >= len(rcpts) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(moved) == len(rcpts), len(moved)


def test_one_worker_to_two_moves_the_single_process_queue_in(daemon_factory, tmp_path):
    sink = Sink(tmp_path, SINK)
    try:
        d = _daemon(daemon_factory, tmp_path)
        _config(d, 1, sink.port, hold=True)
        d.start()
        rcpts = [f"one{i}@relay.test" for i in range(30)]
        _send(d.port, rcpts)
        assert d.stop() == 0
        assert _segments(d.spool_dir)            # the single-process spool: in the root
        _restart_and_check(d, sink, 2, rcpts)
        deadline = time.monotonic() + 10
        while _segments(d.spool_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _segments(d.spool_dir)        # moved: nothing left to move next time
    finally:
        sink.stop()


def test_two_workers_to_one_moves_both_shards_in(daemon_factory, tmp_path):
    sink = Sink(tmp_path, SINK)
    try:
        d = _daemon(daemon_factory, tmp_path)
        _config(d, 2, sink.port, hold=True)
        d.start(timeout=40)
        rcpts = [f"two{i}@relay.test" for i in range(40)]
        _send(d.port, rcpts)
        assert d.stop() == 0
        assert _segments(d.spool_dir / "w0") and _segments(d.spool_dir / "w1")
        _restart_and_check(d, sink, 1, rcpts)
        deadline = time.monotonic() + 10
        while (_segments(d.spool_dir / "w0") or _segments(d.spool_dir / "w1")) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _segments(d.spool_dir / "w0") and not _segments(d.spool_dir / "w1")
    finally:
        sink.stop()
