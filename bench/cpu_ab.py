#!/usr/bin/env python3
"""Daemon CPU per relayed message: this tree against another checkout, alternating.

Throughput ratios swing by +-10 % on this shared 2-core VM whenever anything else runs;
the CPU a daemon spends per message is much steadier, so a hot-path change is judged
here too. Each run starts `mta serve --smarthost` from the tree under test (its own
PYTHONPATH, an empty spool, the admin API on, as relay_bench runs it), relays N
messages from Postfix's smtp-source (50 sessions, one message per connection) to
smtp-sink, waits until the daemon is idle, and reads the daemon's utime + stime from
/proc before and after: microseconds of CPU per message. Medians of the rounds and
their ratio (this / base: above 1 costs more).

    .venv/bin/python bench/cpu_ab.py --against /tmp/base            # 2 KB and 50 KB, 3 rounds
    .venv/bin/python bench/cpu_ab.py --against /tmp/base -s 2048 -r 5 -n 20000

Needs smtp-source/smtp-sink (peerbench's setup installs them) and root (smtp-sink
drops to `nobody`). Ports 127.0.0.1:2725-2727. Loopback only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTEN, SINK, ADMIN = "127.0.0.1:2725", "127.0.0.1:2726", "127.0.0.1:2727"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def run(tree: Path, size: int, n: int) -> float:
    """One relay of `n` messages of `size` bytes through the daemon of `tree`: us/msg."""
    work = Path(tempfile.mkdtemp(prefix="mta-cpu-ab."))
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", SINK, "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(work / "daemon.err", "wb") as err:   # the child keeps its own descriptor
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mta", "serve", "--admin", ADMIN, "--dns", "127.0.0.1:9",
             "--listen", LISTEN, "--smarthost", SINK, "--spool-dir", str(work / "spool")],
            cwd=work, env=dict(os.environ, PYTHONPATH=str(tree)),
            stdout=subprocess.PIPE, stderr=err)
    try:
        if not daemon.stdout.readline().startswith(b"mta: ready"):
            raise RuntimeError(f"{tree}: the daemon did not start: "
                               f"{(work / 'daemon.err').read_text()[-500:]}")
        time.sleep(1.0)   # what start left to do (the admin app, timers) settles
        before = cpu_seconds(daemon.pid)
        subprocess.run(["smtp-source", "-l", str(size), "-m", str(n), "-s", "50", LISTEN],
                       check=True, stdout=subprocess.DEVNULL)
        last = cpu_seconds(daemon.pid)
        while True:            # delivery ends when the daemon stops spending CPU
            time.sleep(1.0)
            now = cpu_seconds(daemon.pid)
            if now - last < 0.05:
                break
            last = now
        return (now - before) / n * 1e6
    finally:
        daemon.terminate()
        daemon.wait(30)
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", type=Path, required=True, help="the other checkout (built)")
    ap.add_argument("-s", "--size", type=int, action="append", help="payload bytes (repeatable)")
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    args = ap.parse_args()
    for size in args.size or [2048, 51200]:
        runs: tuple[list[float], list[float]] = ([], [])
        for rnd in range(args.rounds):
            for out, tree in zip(runs, (args.against.resolve(), ROOT)):
                out.append(run(tree, size, args.n))
            print(f"size={size} round {rnd + 1}: base {runs[0][-1]:.0f} us/msg  "
                  f"this {runs[1][-1]:.0f} us/msg", flush=True)
        b, a = statistics.median(runs[0]), statistics.median(runs[1])
        print(f"RESULT cpu_ab size={size} n={args.n} this_us_per_msg={a:.0f} "
              f"base_us_per_msg={b:.0f} ratio={a / b:.2f} base={args.against}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
