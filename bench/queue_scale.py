#!/usr/bin/env python3
"""Queue scale: delivery rate with 1,000,000 messages queued for a slow site
versus with 1,000 queued, and RAM per queued message.

Each run is a fresh process running mta.Server in-process (no CLI), with two
static routes: slow.test -> a server on 127.0.0.1 that accepts connections
and never answers (so its messages stay queued: connection_limit of them in
flight, the rest in the ready queue and the scheduled queue's backlog), and
fast.test -> the counting sink (tools/sink.py). Phase 1 queues Q messages
for slow.test through Server.inject (the same spool + queue path as SMTP,
without the SMTP cost) and measures RSS before and after; phase 2 injects M
messages for fast.test and times them from first inject to last delivery.
One process measures both, so they share a warm state: the fast-site rate
with 1,000 queued (the reference, median of --rounds), then fills up to
1,000,000 and measures again; it prints both, their ratio (goal >= 0.9) and
RSS per queued message between the two fills (goal <= 256 B, limit 1 KiB).

    python3 bench/queue_scale.py                 # Q = 1e3 and 1e6, M = 20,000
    python3 bench/queue_scale.py --queued 200000 # a quicker look
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STATE = Path(os.environ.get("MTA_BENCH_STATE", "/var/tmp/mta-bench")) / "queue-scale"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _stall_server(port: int) -> asyncio.base_events.Server:
    held = []

    async def hold(reader, writer):   # accept and say nothing: an unresponsive MX
        held.append(writer)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            writer.close()
    return await asyncio.start_server(hold, "127.0.0.1", port)


async def _fill(server, start: int, stop: int, body: bytes, domain: str, prefix: str) -> None:
    batch = 2000
    for first in range(start, stop, batch):
        await asyncio.gather(*(server.inject(f"{prefix}@sender.test", [f"u{i}@{domain}"], body)
                               for i in range(first, min(stop, first + batch))))


async def _fast_rate(server, n: int, body: bytes, tag: str) -> float:
    outcomes = server.delivery.outcomes.counters
    before = outcomes["delivered"]
    t0 = time.perf_counter()
    await _fill(server, 0, n, body, "fast.test", tag)
    while outcomes["delivered"] - before < n:
        await asyncio.sleep(0.005)
    return n / (time.perf_counter() - t0)


async def run(reference: int, queued: int, fast: int, size: int, rounds: int) -> dict:
    import gc

    import mta
    from mta.config import parse_config

    work = STATE / "run"
    shutil.rmtree(work, ignore_errors=True)
    stall_port, sink_port = _free_port(), _free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), f"127.0.0.1:{sink_port}"],
                            stdout=subprocess.PIPE)
    sink.stdout.readline()
    stall = await _stall_server(stall_port)
    cfg = parse_config(
        f'[spool]\ndirectory = "{work}/spool"\nhot_cache = "16MiB"\n[log]\ndirectory = "{work}/log"\n'
        f'[admin]\nlisten = ""\n[dns]\nnameservers = ["127.0.0.1:9"]\n'
        f'[delivery]\nconnection_limit = 16\nconnect_timeout = "10m"\ncommand_timeout = "1h"\n'
        f'routes = {{"slow.test" = "127.0.0.1:{stall_port}", "fast.test" = "127.0.0.1:{sink_port}"}}\n'
        f'[[listener]]\nport = {_free_port()}\n')
    body = b"Subject: queue scale\r\n\r\n" + b"x" * max(0, size - 26) + b"\r\n"
    out: dict = {"reference": reference, "queued": queued, "fast": fast, "size": size}
    async with mta.Server(cfg) as server:
        await _fill(server, 0, reference, body, "slow.test", "bulk")
        await asyncio.sleep(0.5)
        gc.collect()
        rss_ref = _rss()
        ref_rates = [await _fast_rate(server, fast, body, f"ref{r}") for r in range(rounds)]
        t0 = time.perf_counter()
        await _fill(server, reference, queued, body, "slow.test", "bulk")
        out["fill_s"] = round(time.perf_counter() - t0, 1)
        await asyncio.sleep(0.5)
        gc.collect()
        rss_big = _rss()
        big_rates = [await _fast_rate(server, fast, body, f"big{r}") for r in range(rounds)]
        out["still_queued"] = sum(q.count for q in server.delivery.scheduler.queues.values())
        stall.close()
    sink.terminate()
    sink.wait()
    shutil.rmtree(work, ignore_errors=True)
    out["ref_per_s"] = [round(r) for r in ref_rates]
    out["big_per_s"] = [round(r) for r in big_rates]
    out["bytes_per_queued"] = round((rss_big - rss_ref) / (queued - reference))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--reference", type=int, default=1000)
    ap.add_argument("--fast", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=300)
    args = ap.parse_args()
    import statistics

    import uvloop
    r = uvloop.run(run(args.reference, args.queued, args.fast, args.size, args.rounds))
    ref, big = statistics.median(r["ref_per_s"]), statistics.median(r["big_per_s"])
    print(f"with {args.reference} queued for the slow site: {r['ref_per_s']} msg/s to the fast site")
    print(f"with {r['still_queued']} queued (filled in {r['fill_s']} s): {r['big_per_s']} msg/s; "
          f"RSS per queued message {r['bytes_per_queued']} B")
    print(f"RESULT queue_scale queued={args.queued} reference={args.reference} fast={args.fast} "
          f"size={args.size} ref_per_s={ref:.0f} big_per_s={big:.0f} ratio={big / ref:.2f} "
          f"bytes_per_queued={r['bytes_per_queued']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
