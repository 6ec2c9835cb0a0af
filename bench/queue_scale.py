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
The script runs Q=1,000 (the reference) and Q=1,000,000 and prints both
rates and their ratio (goal >= 0.9) and bytes per queued message (goal
<= 256, hard limit 1 KiB).

    python3 bench/queue_scale.py                 # Q = 1e3 and 1e6, M = 20,000
    python3 bench/queue_scale.py --queued 200000 # a quicker look
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
        await asyncio.sleep(3600)
    return await asyncio.start_server(hold, "127.0.0.1", port)


async def run_one(queued: int, fast: int, size: int) -> dict:
    import uvloop  # noqa: F401
    import mta
    from mta.config import parse_config

    work = STATE / f"q{queued}"
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
    result: dict = {"queued": queued, "fast": fast, "size": size}
    async with mta.Server(cfg) as server:
        rss0 = _rss()
        t0 = time.perf_counter()
        batch = 2000
        for start in range(0, queued, batch):
            await asyncio.gather(*(server.inject("bulk@sender.test", [f"u{i}@slow.test"], body)
                                   for i in range(start, min(queued, start + batch))))
        await asyncio.sleep(1.0)
        import gc
        gc.collect()
        rss1 = _rss()
        result["fill_s"] = round(time.perf_counter() - t0, 1)
        result["rss_delta_mb"] = round((rss1 - rss0) / 2**20, 1)
        result["bytes_per_queued"] = round((rss1 - rss0) / max(queued, 1))
        outcomes = server.delivery.outcomes.counters
        before = outcomes["delivered"]
        t0 = time.perf_counter()
        for start in range(0, fast, batch):
            await asyncio.gather(*(server.inject("tx@sender.test", [f"r{i}@fast.test"], body)
                                   for i in range(start, min(fast, start + batch))))
        while outcomes["delivered"] - before < fast:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        result["fast_per_s"] = round(fast / elapsed, 1)
        result["still_queued"] = sum(q.count for q in server.delivery.scheduler.queues.values())
        stall.close()
    sink.terminate()
    sink.wait()
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--reference", type=int, default=1000)
    ap.add_argument("--fast", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        import uvloop
        print(json.dumps(uvloop.run(run_one(args.child, args.fast, args.size))), flush=True)
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results = []
    for q in (args.reference, args.queued):
        out = subprocess.run([sys.executable, __file__, "--child", str(q), "--fast", str(args.fast),
                              "--size", str(args.size)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"run with {q} queued failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"queued={r['queued']:>8}: fill {r['fill_s']} s, RSS +{r['rss_delta_mb']} MiB "
              f"({r['bytes_per_queued']} B/queued), then {r['fast']} messages to a fast site at "
              f"{r['fast_per_s']} msg/s (still queued for the slow site: {r['still_queued']})", flush=True)
    ref, big = results
    print(f"RESULT queue_scale queued={big['queued']} reference={ref['queued']} fast={args.fast} "
          f"size={args.size} ratio={big['fast_per_s'] / ref['fast_per_s']:.2f} "
          f"bytes_per_queued={big['bytes_per_queued']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
