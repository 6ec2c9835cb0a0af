"""The suppression store's writer thread (mta/feedback/suppression/writer.py, issue 15):
batches, a bounded queue, retry while another process holds the write lock, close."""
from __future__ import annotations

import sqlite3
import threading
import time

from mta.feedback.suppression import SuppressionList, load_or_create_key
from mta.feedback.suppression.writer import SuppressionWriter


def _setup(tmp_path, **kw):
    key = load_or_create_key(tmp_path / "k")
    reader = SuppressionList(tmp_path / "s.sqlite", key, refresh_interval=3600)
    commits: list[tuple[int, int, list[bytes]]] = []
    done = threading.Condition()

    def on_commit(ticket, seq, hashes):
        with done:
            commits.append((ticket, seq, hashes))
            done.notify_all()

    w = SuppressionWriter(tmp_path / "s.sqlite", key, on_commit=on_commit, **kw)
    w.start()
    return reader, w, commits, done


def _wait(done, commits, ticket, timeout=20.0):
    deadline = time.monotonic() + timeout
    with done:
        while not commits or commits[-1][0] < ticket:
            assert done.wait(max(0.0, deadline - time.monotonic())), f"no commit of ticket {ticket}"


def test_entries_are_committed_in_batches_and_learned_by_the_reader(tmp_path):
    reader, w, commits, done = _setup(tmp_path, batch=100)
    try:
        tickets = [w.submit((f"a{i}@example.test", "global", "hard_bounce", None, "")) for i in range(250)]
        assert tickets == list(range(1, 251))
        _wait(done, commits, 250)
        assert len(commits) >= 3, "at most `batch` entries per transaction"
        # the reader's filter has not refreshed (refresh_interval): learn() makes them visible
        for _, seq, hashes in commits:
            reader.learn(seq, hashes)
        assert all(reader.check(f"a{i}@example.test") for i in range(250))
        assert w.written == 250 and w.pending == 0
    finally:
        assert w.close() == 0
        reader.close()


def test_full_queue_refuses_and_a_locked_store_is_retried_without_loss(tmp_path):
    reader, w, commits, done = _setup(tmp_path, max_pending=10, retry=0.2)
    lock = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None, timeout=10)
    lock.execute("PRAGMA busy_timeout = 100")
    w_store_timeout = 5.0     # SuppressionList's busy_timeout: the first try waits it out
    lock.execute("BEGIN IMMEDIATE")
    try:
        got = [w.submit((f"b{i}@example.test", "global", "complaint", None, "")) for i in range(15)]
        assert got[:10] == list(range(1, 11)) and got[10:] == [None] * 5, "bounded: the rest refused"
        time.sleep(0.5)
        assert not commits, "nothing commits while another process holds the write lock"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    _wait(done, commits, 10, timeout=w_store_timeout + 20)
    with SuppressionList(tmp_path / "s.sqlite", load_or_create_key(tmp_path / "k"),
                         private=False) as fresh:
        assert fresh.count() == 10
    assert w.close() == 0
    reader.close()


def test_close_writes_what_is_queued(tmp_path):
    reader, w, commits, done = _setup(tmp_path)
    for i in range(50):
        w.submit((f"c{i}@example.test", "global", "manual", None, ""))
    assert w.close() == 0
    assert w.submit(("late@example.test", "global", "manual", None, "")) is None
    with SuppressionList(tmp_path / "s.sqlite", load_or_create_key(tmp_path / "k"),
                         private=False) as fresh:
        assert fresh.count() == 50
    reader.close()


def test_other_processes_entries_reach_the_reader_as_a_filter_built_in_the_thread(tmp_path):
    key = load_or_create_key(tmp_path / "k")
    reader = SuppressionList(tmp_path / "s.sqlite", key)
    reader.refresh_elsewhere()
    filters: list = []
    got = threading.Event()

    def on_filter(prefixes, seq, whole):
        filters.append((prefixes, seq, whole))
        got.set()

    w = SuppressionWriter(tmp_path / "s.sqlite", key, on_commit=lambda *a: None,
                          on_filter=on_filter, refresh_interval=0.1)
    w.start()
    try:
        # `mta suppress import` in another connection (another process in real life)
        with SuppressionList(tmp_path / "s.sqlite", key, private=False) as cli:
            cli.import_lines(f"imp{i}@example.test" for i in range(20_000))
        assert got.wait(20), "no filter handed over"
        assert reader.check("imp7@example.test") is None, "the reader never reads others' entries itself"
        prefixes, seq, whole = filters[-1]
        assert whole, "20,000 new entries: the whole filter"
        reader.adopt(prefixes, seq)
        assert all(reader.check(f"imp{i}@example.test") for i in (0, 7, 19_999))
        assert reader.check("other@example.test") is None
        # a few more (another worker's bounces): only those are handed over
        got.clear()
        with SuppressionList(tmp_path / "s.sqlite", key, private=False) as cli:
            cli.add("few@example.test")
        assert got.wait(20)
        prefixes, seq, whole = filters[-1]
        assert not whole and len(prefixes) == 1
        reader.learn_prefixes(prefixes, seq)
        assert reader.check("few@example.test")
    finally:
        w.close()
        reader.close()


def _open_at(path, key, barrier, errors):
    barrier.wait()
    try:
        SuppressionList(path, key).close()
    except sqlite3.Error as exc:
        errors.put(repr(exc))


def test_processes_opening_a_new_store_together_all_succeed(tmp_path):
    """Worker processes start together and open the same new store: switching the file to
    WAL answers "database is locked" at once (no busy handler) to all but one of them, and
    a worker died at start with it (seen in test_workers); the switch is retried."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    key = b"k" * 32
    for attempt in range(5):
        path = tmp_path / f"s{attempt}.sqlite"
        barrier, errors = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_at, args=(path, key, barrier, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert errors.empty(), errors.get()
