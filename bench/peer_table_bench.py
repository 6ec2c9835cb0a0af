#!/usr/bin/env python3
"""What the node-wide per-IP counts (mta/ingest/peer_table.py) cost a connection.

Two PeerTable objects on one file stand for two workers; each admission of a new
connection is `connect` (hash, add, sum the columns) and its end `disconnect`. The
reference in the same run is the single-process path: a dict of counts per IP, as
mta/ingest/listener.py keeps with one worker. Prints microseconds per connect+disconnect
for both and their ratio.

    python3 bench/peer_table_bench.py [-n 200000] [--workers 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mta.ingest.peer_table import PeerTable  # noqa: E402
from mta.model.node import WorkerSlot  # noqa: E402


def _dict_path(ips: list[str], limit: int) -> float:
    per_ip: dict[str, int] = {}
    start = time.perf_counter()
    for ip in ips:
        if per_ip.get(ip, 0) < limit:
            per_ip[ip] = per_ip.get(ip, 0) + 1
        n = per_ip.get(ip, 1) - 1
        if n:
            per_ip[ip] = n
        else:
            per_ip.pop(ip, None)
    return time.perf_counter() - start


def _table_path(ips: list[str], limit: int, workers: int, where: Path) -> float:
    tables = [PeerTable(where / "shared-peers", WorkerSlot(i, workers, "bench"))
              for i in range(workers)]
    for t in tables:
        t.start()
    views = [t.view("127.0.0.1:25") for t in tables]
    start = time.perf_counter()
    for i, ip in enumerate(ips):
        v = views[i % workers]
        if v.connect(ip, limit):
            v.disconnect(ip)
    took = time.perf_counter() - start
    for t in tables:
        t.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200_000, help="connections")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    args = ap.parse_args()
    ips = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(args.n)]
    best_dict = best_table = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            d = _dict_path(ips, 200)
            t = _table_path(ips, 200, args.workers, Path(tmp))
            best_dict, best_table = min(best_dict, d), min(best_table, t)
            print(f"round {r + 1}: dict {d / args.n * 1e6:.2f} us  table {t / args.n * 1e6:.2f} us",
                  flush=True)
    print(f"RESULT connect+disconnect per connection: one worker (dict) "
          f"{best_dict / args.n * 1e6:.2f} us, {args.workers} workers (shared-peers) "
          f"{best_table / args.n * 1e6:.2f} us, ratio {best_table / best_dict:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
