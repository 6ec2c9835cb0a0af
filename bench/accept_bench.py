#!/usr/bin/env python3
"""Accept rate with fsync before every 250: mta versus Postfix, same harness, same run.

Drives ../shared/tools/peerbench (Postfix's smtp-source as the loader,
concurrency 50, one connection per message) in accept mode against the
private Postfix instance and against `mta serve`, alternating targets
(A, B, A, B, ...) because this 2-core VM is noisy, and prints both medians
and the ratio. From mta's own logs it adds accept latency (end of data ->
250, p50/p99, from Reception records) and records per fdatasync.

    python3 bench/accept_bench.py                 # 50 KB and 2 KB, 3 rounds each
    python3 bench/accept_bench.py -s 51200 -r 5 -n 20000
    python3 bench/accept_bench.py --against /tmp/base   # A/B: this tree vs another checkout

Needs root (smtp-sink/smtp-source) and peerbench's setup.sh (run once; this
script runs it when Postfix's tools are missing). Loopback only.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
PEERBENCH = ROOT.parent / "shared" / "tools" / "peerbench"
STATE = Path(os.environ.get("MTA_BENCH_STATE", "/var/tmp/mta-bench"))
PORT = 2525  # the private Postfix instance of peerbench listens here


def peerbench(name: str, size: int, n: int, extra: list[str], mode: str = "accept",
              port: int = PORT) -> dict[str, str]:
    cmd = [sys.executable, str(PEERBENCH / "bench.py"), "--name", name, "--mode", mode,
           "--port", str(port), "-n", str(n), "-s", str(size), "-c", "50", "--runs", "1", *extra]
    out = subprocess.run(cmd, cwd=PEERBENCH, capture_output=True, text=True)
    result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        sys.exit(f"peerbench failed for {name}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return dict(kv.split("=", 1) for kv in result.split()[1:])


def mta_target(python: str, root: Path = ROOT) -> list[str]:
    """peerbench target args for `mta serve --hold` from the tree at `root`."""
    work = STATE / "mta"   # cwd of the daemon: its logs go to ./var/log there
    start = (f"mkdir -p {work} && cd {work} && rm -rf spool && PYTHONPATH={root} exec {python} "
             f"-m mta serve --listen 127.0.0.1:{PORT} --spool-dir {work}/spool --hold "
             f"--dns 127.0.0.1:9 2>>{work}/daemon.err")   # accept only; nothing leaves loopback
    return ["--foreground", "--start", start]


def postfix_target() -> list[str]:
    adapter = PEERBENCH / "mta" / "postfix.sh"
    return ["--start", f"{adapter} start", "--stop", f"{adapter} stop",
            "--pid-cmd", f"{adapter} pid"]


def mta_log_stats(work: Path, since: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, records per fdatasync) from the runs after byte `since` of the logs."""
    log = work / "var" / "log" / "mta.jsonl"
    lat = []
    if log.exists():
        with open(log, "rb") as f:
            f.seek(since)
            for line in f:
                r = orjson.loads(line)
                if r.get("type") == "Reception" and "latency_ms" in r:
                    lat.append(r["latency_ms"])
    per_sync = [float(m) for m in re.findall(r"\(([\d.]+) records per sync\)",
                                             (work / "daemon.err").read_text())] if (work / "daemon.err").exists() else []
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return q(0.5), q(0.99), statistics.median(per_sync) if per_sync else float("nan")


def ensure_peerbench() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: smtp-source and the private Postfix need it")
    os.environ.setdefault("PEERBENCH_STATE", "/var/tmp/peerbench")  # setup.sh needs it set
    if not shutil.which("smtp-source") or not (Path(os.environ["PEERBENCH_STATE"]) / "postfix" / "etc").exists():
        subprocess.run(["bash", str(PEERBENCH / "setup.sh")], check=True)


def parse_args(doc: str, extra: list = ()) -> argparse.Namespace:
    """The options both peerbench drivers take; sizes default to 50 KB and 2 KB."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    for flag, kwargs in extra:
        ap.add_argument(flag, **kwargs)
    ap.add_argument("-s", "--size", type=int, action="append", help="payload bytes (repeatable)")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    args = ap.parse_args()
    args.size = args.size or [51200, 2048]
    ensure_peerbench()
    return args


def tree_runs(args) -> int:
    """This tree's mta versus another checkout's, alternating: the cost of a change."""
    for size in args.size:
        runs: tuple[list[float], list[float]] = ([], [])
        for rnd in range(args.rounds):
            for out, root in zip(runs, (args.against.resolve(), ROOT)):
                out.append(float(peerbench("mta", size, args.n, mta_target(sys.executable, root))["accept_per_s"]))
            print(f"size={size} round {rnd + 1}: base {runs[0][-1]:.0f}/s  this {runs[1][-1]:.0f}/s", flush=True)
        b, a = statistics.median(runs[0]), statistics.median(runs[1])
        print(f"RESULT accept_ab size={size} n={args.n} this_per_s={a:.0f} base_per_s={b:.0f} "
              f"ratio={a / b:.2f} base={args.against}", flush=True)
    return 0


def main() -> int:
    args = parse_args(__doc__, extra=[("--against", dict(type=Path, metavar="TREE",
                                                         help="A/B against mta from another checkout"))])
    if args.against:
        return tree_runs(args)
    sizes = args.size
    work = STATE / "mta"
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    for size in sizes:
        log = work / "var" / "log" / "mta.jsonl"
        since = log.stat().st_size if log.exists() else 0
        (work / "daemon.err").unlink(missing_ok=True)
        ours, theirs = [], []
        for rnd in range(args.rounds):
            theirs.append(float(peerbench("postfix", size, args.n, postfix_target())["accept_per_s"]))
            ours.append(float(peerbench("mta", size, args.n, mta_target(python))["accept_per_s"]))
            print(f"size={size} round {rnd + 1}: postfix {theirs[-1]:.0f}/s  mta {ours[-1]:.0f}/s", flush=True)
        p50, p99, per_sync = mta_log_stats(work, since)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"RESULT accept size={size} n={args.n} c=50 rounds={args.rounds} mta_per_s={a:.0f} "
              f"postfix_per_s={b:.0f} ratio={a / b:.2f} mta_p50_ms={p50:.2f} mta_p99_ms={p99:.2f} "
              f"records_per_fsync={per_sync:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
