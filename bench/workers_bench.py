#!/usr/bin/env python3
"""Relay throughput and CPU per delivered message with 1, 2, ... worker processes.

The relay harness of bench/relay_bench.py (peerbench: smtp-source, concurrency 50 ->
mta on 127.0.0.1:2525 -> smtp-sink on 127.0.0.1:2526), with `[server] workers = N`
for each N of --workers (default 1, 2 and every power of two up to os.cpu_count()),
alternating N within each round on the same machine. Per run: deliveries per second
(first accept to last delivery) and the daemon's CPU seconds (supervisor and workers,
from /proc, peerbench's mta_cpu_s) per delivered message. RESULT lines give the medians,
each N's ratios to one worker, and the throughput expected on 32 cores from the CPU per
message (cores / CPU seconds per message: the loader and sink elsewhere, the disk not
the limit).

    python3 bench/workers_bench.py                         # 50 KB and 2 KB, 3 rounds
    python3 bench/workers_bench.py -s 51200 -r 5 --workers 1,2
    # on a big machine (loader and sink still share it: keep an eye on host_busy):
    python3 bench/workers_bench.py -s 51200 -n 200000 --workers 1,2,4,8,16

Here (2 cores) the loader and sink take about half the CPU, so more workers cannot add
throughput; the goals are CPU per message with N workers within 10 % of one worker's and
throughput with 2 workers not below 0.95 x one worker's.

--cotenant adds, in each round, a run of one worker while another process shares the
cores the way a second worker would (bursts of work over a few MB of Python objects
and short sleeps, about half a core): what time-slicing and cold caches alone add to
one worker's CPU per message, with the daemon's own work unchanged.

    python3 bench/workers_bench.py -s 51200 --workers 1,2 --cotenant
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept_bench import STATE, parse_args, peerbench  # noqa: E402
from relay_bench import mta_target  # noqa: E402

CORES_TARGET = 32
COTENANT = 0   # the key of the co-tenant runs (one worker beside a busy process)

# a process that competes the way a second worker does: ~0.4 ms bursts over ~4 MB of
# Python objects, ~0.4 ms sleeps (about half a core), until killed
_COTENANT_CODE = """
import random, time
data = [dict(a=i, b=str(i), c=[i] * 4) for i in range(40000)]
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.0004:
        for d in random.sample(data, 200):
            d["a"] += 1
    time.sleep(0.0004)
"""


def default_workers() -> str:
    counts, n = [1, 2], 4
    while n <= (os.cpu_count() or 1):
        counts.append(n)
        n *= 2
    return ",".join(map(str, counts))


def workers_config(n: int) -> Path:
    """A config with `[server] workers = n` (the rest from relay_bench's command line)."""
    work = STATE / "mta-relay"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / f"workers-{n}.toml"
    conf.write_text(f"[server]\nworkers = {n}\n")
    return conf


def main() -> int:
    args = parse_args(__doc__, extra=[("--workers", dict(
        default=default_workers(), metavar="N,N,...",
        help="worker counts to compare (default: 1, 2 and powers of two up to the cores)")),
        ("--cotenant", dict(action="store_true",
                            help="also one worker beside a busy process (see above)"))])
    counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    if not counts or counts[0] < 1:
        sys.exit("--workers: positive integers, e.g. 1,2,4")
    runs = [*counts, COTENANT] if args.cotenant else counts
    # 3 s between the port opening and the load: every worker started (not only the first
    # to bind), so start-up CPU stays out of the measure; the same for every N
    targets = {n: [*mta_target(sys.executable, workers_config(max(n, 1))), "--settle", "3"]
               for n in runs}
    for size in args.size:
        rate: dict[int, list[float]] = {n: [] for n in runs}
        cpu: dict[int, list[float]] = {n: [] for n in runs}
        for rnd in range(args.rounds):
            line = []
            for n in runs:
                busy = (subprocess.Popen([sys.executable, "-c", _COTENANT_CODE])
                        if n == COTENANT else None)
                try:
                    r = peerbench(f"mta-workers{n}", size, args.n, targets[n], mode="relay")
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                rate[n].append(float(r["deliver_per_s"]))
                cpu[n].append(float(r["mta_cpu_s"]) / args.n)
                label = "w1+cotenant" if n == COTENANT else f"w{n}"
                line.append(f"{label} {rate[n][-1]:.0f}/s {cpu[n][-1] * 1e3:.3f} ms cpu/msg"
                            f"{' (contended)' if r.get('contended_runs') not in ('0', None) else ''}")
            print(f"size={size} round {rnd + 1}: " + "  ".join(line), flush=True)
        per_s = {n: statistics.median(v) for n, v in rate.items()}
        cpu_msg = {n: statistics.median(v) for n, v in cpu.items()}
        one = counts[0]
        if args.cotenant:
            print(f"RESULT workers_cotenant size={size} n={args.n} rounds={args.rounds} "
                  f"cpu_ms_per_msg={cpu_msg[COTENANT] * 1e3:.3f} "
                  f"cpu_ratio={cpu_msg[COTENANT] / cpu_msg[one]:.2f} (one worker beside a busy "
                  f"process, against one worker alone)", flush=True)
        for n in counts:
            print(f"RESULT workers size={size} n={args.n} rounds={args.rounds} workers={n} "
                  f"per_s={per_s[n]:.0f} cpu_ms_per_msg={cpu_msg[n] * 1e3:.3f} "
                  f"ratio={per_s[n] / per_s[one]:.2f} cpu_ratio={cpu_msg[n] / cpu_msg[one]:.2f}",
                  flush=True)
        most = counts[-1]
        print(f"RESULT workers_expected size={size} cores={CORES_TARGET} workers={most} "
              f"cpu_ms_per_msg={cpu_msg[most] * 1e3:.3f} "
              f"expected_per_s={CORES_TARGET / cpu_msg[most]:.0f} "
              f"(cores / cpu per message; loader and sink on other machines, the disk not the "
              f"limit)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
