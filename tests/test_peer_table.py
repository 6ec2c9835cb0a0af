"""mta/ingest/peer_table.py: per-client-IP connections and AUTH failures held for the node,
over the worker processes' columns of one mapped file (two PeerTable objects on one file
stand for two workers; the scenario with real worker processes is
tests/scenarios/test_workers_per_ip.py)."""
from __future__ import annotations

from mta.ingest.peer_table import BUCKETS, PeerTable
from mta.model.node import WorkerSlot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tables(tmp_path, n=2):
    out = []
    for i in range(n):
        t = PeerTable(tmp_path / "shared-peers", WorkerSlot(i, n, "n1"))
        t.start()
        out.append(t)
    return out


def test_a_client_gets_the_node_limit_not_the_limit_per_worker(tmp_path):
    w0, w1 = (t.view("127.0.0.1:25") for t in _tables(tmp_path))
    admitted = [w.connect("192.0.2.7", 4) for w in (w0, w1) * 4]
    assert admitted == [True] * 4 + [False] * 4
    assert w0.connections("192.0.2.7") == w1.connections("192.0.2.7") == 4
    w1.disconnect("192.0.2.7")
    assert w0.connect("192.0.2.7", 4) and not w1.connect("192.0.2.7", 4)
    # another address, another listener: their own counts
    assert w0.connect("192.0.2.8", 4)
    other = _tables(tmp_path / "x")[0].view("127.0.0.1:587")
    assert other.connect("192.0.2.7", 4)


def test_a_restarted_worker_starts_with_its_column_cleared(tmp_path):
    t0, t1 = _tables(tmp_path)
    v0, v1 = t0.view("L"), t1.view("L")
    for _ in range(3):
        assert v1.connect("198.51.100.1", 5)
    assert v0.connect("198.51.100.1", 5) and v0.connections("198.51.100.1") == 4
    t1.close()        # killed: its connections died with it; the supervisor starts index 1
    again = PeerTable(tmp_path / "shared-peers", WorkerSlot(1, 2, "n1"))
    again.start()
    assert again.view("L").connections("198.51.100.1") == 1     # worker 0's only
    assert again.secret == t0.secret


def test_another_worker_count_makes_the_table_anew(tmp_path):
    t0, _ = _tables(tmp_path)
    assert t0.view("L").connect("203.0.113.9", 9)
    three = _tables(tmp_path, 3)
    assert three[0].view("L").connections("203.0.113.9") == 0
    assert three[0].secret != t0.secret


def test_auth_failures_lock_the_address_out_on_every_worker(tmp_path):
    clock = Clock()
    w0, w1 = (t.view("L") for t in _tables(tmp_path))
    ip = "192.0.2.50"
    for i in range(4):                  # alternating workers, as SO_REUSEPORT spreads them
        (w0, w1)[i % 2].failed(ip, clock.now, 60)
    assert not w0.locked(ip, clock.now, 5) and not w1.locked(ip, clock.now, 5)
    w1.failed(ip, clock.now, 60)
    assert w0.locked(ip, clock.now, 5) and w1.locked(ip, clock.now, 5)
    assert not w0.locked("192.0.2.51", clock.now, 5)
    clock.now += 30
    w0.failed(ip, clock.now, 60)        # extends worker 0's window only
    clock.now += 35                     # worker 1's window (ended at +60) is over
    assert w0.live(ip, clock.now) == 3 and not w0.locked(ip, clock.now, 5)
    clock.now += 60
    assert not w0.locked(ip, clock.now, 1)
    w0.failed(ip, clock.now, 60)        # a failure after the window counts from 1
    assert w0.live(ip, clock.now) == 1
    w0.succeeded(ip)
    assert w0.live(ip, clock.now) == 0


def test_the_buckets_are_keyed_by_the_table_secret(tmp_path):
    """An outsider cannot compute which addresses share a counter: the same address lands
    in other buckets in another table."""
    a = _tables(tmp_path / "a")[0]
    b = _tables(tmp_path / "b")[0]
    cells = [(a.cells(f"L|10.0.{i}.1"), b.cells(f"L|10.0.{i}.1")) for i in range(50)]
    assert sum(x == y for x, y in cells) == 0
    assert all(0 <= c < BUCKETS and BUCKETS <= d < 2 * BUCKETS for (c, d), _ in cells)


def test_many_addresses_stay_bounded_and_fast(tmp_path):
    """20,000 connections from distinct addresses (ten times the default max_connections):
    the file does not grow, and a new address is not refused for its counters' neighbours
    (bench/peer_table_bench.py times an admission)."""
    t0, t1 = _tables(tmp_path)
    size = (tmp_path / "shared-peers").stat().st_size
    v0, v1 = t0.view("L"), t1.view("L")
    # an address whose two counters already hold 3 others' connections is refused early:
    # about 0.07 of the 20,000 per run (1 run in 15 has one), so a few are allowed
    early = sum(not (v0, v1)[i & 1].connect(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 3)
                for i in range(20_000))
    assert early <= 3, early
    assert (tmp_path / "shared-peers").stat().st_size == size
    refused = sum(not v0.connect(f"172.16.{i >> 8}.{i & 255}", 3) for i in range(2000))
    assert refused <= 3, refused          # both of its counters at 3 by chance: ~1.5e-5 each
