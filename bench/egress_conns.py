#!/usr/bin/env python3
"""Memory per idle outbound connection: 16,000 connections held open by one mta process.

Four stalling receivers (tools/sink.py --stall, separate processes, on
127.0.9.1-4:2525) accept TCP connections and never send a greeting. The
daemon gets 16 egress sources (127.1.1.1-16) and static routes for four
domains, one per receiver, with connection_limit 1,000 per (source, site);
every queued message makes its dispatcher open one connection, which then
waits for the greeting (command_timeout 10m). Messages are injected in steps
of 4,000 (smtp-source); after each step the script waits until the receivers
report the connections open and reads the daemon's VmRSS from /proc.

The reference, in the same run: the same daemon with --hold (accepts and
queues, opens no connection) given the same messages. Printed: RSS at each
step for both, and the per-connection cost = (RSS with n connections - RSS
of the held daemon with the same n messages queued) / n, i.e. what holding
a connection open costs on top of having its message queued. The gross slope
(including the message) is printed too.

    python3 bench/egress_conns.py            # 16,000 connections in 4 steps
    python3 bench/egress_conns.py -n 8000
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECEIVERS = [f"127.0.9.{i}" for i in range(1, 5)]
PORT = 2525


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_connections(sinks: list[tuple[subprocess.Popen, Path]]) -> int:
    total = 0
    for proc, stats in sinks:
        before = stats.stat().st_mtime_ns if stats.exists() else 0
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not stats.exists() or stats.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                raise RuntimeError("a receiver wrote no statistics")
            time.sleep(0.02)
        total += json.loads(stats.read_text())["open"]
    return total


def config(work: Path, port: int, admin: int) -> Path:
    parts = [f'[server]\nhostname = "bench.test"\n[spool]\ndirectory = "{work}/spool"\n',
             f'[log]\ndirectory = "{work}/log"\nreception_log = false\n',
             '[dns]\nnameservers = ["127.0.0.1:9"]\n', f'[admin]\nlisten = "127.0.0.1:{admin}"\n']
    routes = ", ".join(f'"d{i}.test" = "{ip}:{PORT}"' for i, ip in enumerate(RECEIVERS))
    parts.append(f'[delivery]\nroutes = {{{routes}}}\ncommand_timeout = "10m"\n'
                 f'connection_limit = 1000\nready_queue_size = 100000\n')
    parts.append(f'[egress]\nmax_connections = 16500\ndefault_pool = "all"\n'
                 f'shaping = ["{work}/shaping.toml"]\n')
    (work / "shaping.toml").write_text('["default"]\nconnection_limit = 1000\n')
    names = []
    for i in range(16):
        parts.append(f'[[source]]\nname = "s{i}"\naddress = "127.1.1.{i + 1}"\n')
        names.append(f'"s{i}"')
    parts.append(f'[[pool]]\nname = "all"\nsources = [{", ".join(names)}]\n')
    parts.append(f'[[listener]]\naddress = "127.0.0.1"\nport = {port}\nmax_connections = 200\n'
                 f'max_messages_per_session = 1000000\n')
    path = work / "mta.toml"
    path.write_text("\n".join(parts))
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_daemon(work: Path, sinks: list, total: int, procs: list, hold: bool) -> list:
    """Start a daemon, inject `total` messages in steps; [(connections, RSS KiB)] per step."""
    work.mkdir()
    port, admin = free_port(), free_port()
    conf = config(work, port, admin)
    daemon = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c", str(conf)]
                              + (["--hold"] if hold else []),
                              stdout=subprocess.PIPE, stderr=open(work / "daemon.err", "wb"),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=work)
    procs.append(daemon)
    assert daemon.stdout is not None and daemon.stdout.readline().startswith(b"mta: ready")
    label = "held (reference)" if hold else "live"
    time.sleep(1)
    points = [(0, rss_kib(daemon.pid))]
    print(f"{label}: idle daemon RSS {points[0][1] / 1024:.1f} MiB", flush=True)
    msg = work / "msg.eml"
    msg.write_text("From: <bench@x.test>\nSubject: idle connection\n\nhello\n")
    already = open_connections(sinks)
    step = 4000
    for done in range(step, total + 1, step):
        for i in range(len(RECEIVERS)):
            subprocess.run(["smtp-source", "-d", "-s", "10", "-m", str(step // len(RECEIVERS)),
                            "-f", "bench@x.test", "-t", f"user@d{i}.test", "-F", str(msg),
                            f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + 120
        n = 0
        while not hold and (n := open_connections(sinks) - already) < done \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)      # let the loop settle (allocator, pending callbacks)
        rss = rss_kib(daemon.pid)
        points.append((done if hold else n, rss))
        print(f"{label}: {done:>6} messages queued, {n:>6} connections open: RSS "
              f"{rss / 1024:.1f} MiB", flush=True)
    daemon.terminate()
    daemon.communicate(timeout=60)
    procs.remove(daemon)
    return points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=16000, help="connections to hold (multiple of 4,000)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"open files hard limit {hard}; the daemon raises its soft limit to it", flush=True)
    work = Path(tempfile.mkdtemp(prefix="mta-conns-"))
    sinks = []
    procs = []
    try:
        for ip in RECEIVERS:
            stats = work / f"sink-{ip}.json"
            p = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), f"{ip}:{PORT}",
                                  "--stall", "--stats-file", str(stats)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert p.stdout is not None and b"ready" in p.stdout.readline()
            sinks.append((p, stats))
            procs.append(p)
        held = run_daemon(work / "held", sinks, args.n, procs, hold=True)
        live = run_daemon(work / "live", sinks, args.n, procs, hold=False)
        (n, rss), (_, base) = live[-1], live[0]
        held_rss = held[-1][1]
        per_conn = (rss - held_rss) * 1024 / max(n, 1)
        gross = (rss - base) * 1024 / max(n, 1)
        print(f"RESULT egress_conns connections={n} rss_idle_kib={base} rss_held_kib={held_rss} "
              f"rss_kib={rss} bytes_per_connection={per_conn:.0f} "
              f"bytes_per_connection_with_message={gross:.0f} goal_bytes=10240 "
              f"ratio_to_goal={per_conn / 10240:.2f}", flush=True)
        if n < args.n:
            print(f"WARNING: only {n} of {args.n} connections opened; see {work}/live/daemon.err",
                  flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
