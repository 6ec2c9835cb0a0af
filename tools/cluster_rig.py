#!/usr/bin/env python3
"""A cluster on loopback: N mta nodes, one redis-server, one counting sink (issue 15).

    python3 tools/cluster_rig.py [--nodes 3] [--workers 2] [--dir /tmp/rig]
                                 [--connections 6] [--rate 100/s] [--delay-ms 40]

starts, on 127.0.110.0/24 .. 127.0.119.0/24 only:
- redis-server on 127.0.110.1 (own port, own directory, no persistence: --save '');
- tools/sink.py on 127.0.110.2 (--times: it records every arrival and the peak of
  concurrent connections), the one site every node delivers to (smarthost);
- node i (1..N): `mta serve` with [server] node = "n<i>" and `workers` worker processes,
  listening on 127.0.111.<i>, sending from the source "n<i>" = 127.0.112.<i>, with
  [cluster] backend = "redis" and a shaping file holding site_connection_limit and
  site_max_message_rate for every site (so for the sink, cluster-wide).
It prints the addresses and waits for Ctrl-C (then stops everything it started, by PID).
Tests use `ClusterRig` (tests/scenarios/test_cluster.py): `start()`, `inject()`,
`kill_node()` (SIGKILL to the node's whole process group: supervisor and workers, so
nothing is given back and leases must expire), `start_node()`, `sink_stats()`, `stop()`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_IP, SINK_IP = "127.0.110.1", "127.0.110.2"


def listen_ip(i: int) -> str:
    return f"127.0.111.{i}"


def source_ip(i: int) -> str:
    return f"127.0.112.{i}"


def free_port(host: str) -> int:
    """A port free on `host`, below the ephemeral range where possible (see conftest)."""
    import random
    for _ in range(200):
        port = random.randrange(11000, 28000)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server: own port, own directory, no persistence, loopback only."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", self.host, "--port", str(self.port), "--dir",
             str(self.workdir), "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on {self.host}:{self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class Node:
    """One `mta serve` (a supervisor with `workers` worker processes when more than 1)."""

    def __init__(self, workdir: Path, index: int, *, workers: int, redis_url: str,
                 sink: tuple[str, int], shaping: Path, lease_ttl: str, extra: str = "",
                 backend: str = "redis") -> None:
        self.index = index
        self.name = f"n{index}"
        self.workdir = workdir
        self.host = listen_ip(index)
        self.port = free_port(self.host)
        self.workers = workers
        self.spool = workdir / "spool"
        self.log_dir = workdir / "log"
        self.config = workdir / "mta.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""[server]
hostname = "{self.name}.rig.test"
node = "{self.name}"
workers = {workers}
[spool]
directory = "{self.spool}"
[log]
directory = "{self.log_dir}"
[[listener]]
address = "{self.host}"
port = {self.port}
relay_cidrs = ["127.0.0.0/8"]
[admin]
listen = ""
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
[delivery]
smarthost = "{sink[0]}:{sink[1]}"
retry_initial = "2s"
retry_max = "10s"
[egress]
shaping = ["{shaping}"]
[[source]]
name = "{self.name}"
address = "{source_ip(index)}"
[cluster]
backend = "{backend}"
redis_url = "{redis_url}"
lease_ttl = "{lease_ttl}"
{extra}
""")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Node:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        err = open(self.workdir / "daemon.err", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "serve", "-c", str(self.config)],
            stdout=subprocess.PIPE, stderr=err, env=env, cwd=self.workdir,
            start_new_session=True)      # its own process group: kill_node reaches workers
        err.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"mta: ready"):
            self.kill()
            raise RuntimeError(f"node {self.name} did not start: {line!r}; stderr: "
                               f"{(self.workdir / 'daemon.err').read_text()[-3000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL to the node's process group: supervisor and every worker at once."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
            self.proc = None

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        self.proc = None
        return rc

    def records(self, rtype: str) -> list[dict]:
        out = []
        for path in sorted(self.log_dir.glob("mta*.jsonl")):
            for line in path.read_bytes().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue       # a line cut by SIGKILL
                if r.get("type") == rtype:
                    out.append(r)
        return out


class ClusterRig:
    def __init__(self, workdir: Path, *, nodes: int = 3, workers: int = 1,
                 connections: int = 6, rate: str = "100/s", delay_ms: float = 0,
                 lease_ttl: str = "3s", max_deliveries: int = 100, extra: str = "",
                 backend: str = "redis") -> None:
        if not 1 <= nodes <= 254:
            raise ValueError("nodes: 1..254")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(workdir / "redis", REDIS_IP)
        self.sink_port = free_port(SINK_IP)
        self.sink_stats_file = workdir / "sink.json"
        self.delay_ms = delay_ms
        self.sink: subprocess.Popen | None = None
        self.shaping = workdir / "shaping.toml"
        self.shaping.write_text(f"""["default"]
site_connection_limit = {connections}
site_max_message_rate = "{rate}"
max_deliveries_per_connection = {max_deliveries}
""")
        self.nodes = [Node(workdir / f"n{i}", i, workers=workers, redis_url=self.redis.url,
                           sink=(SINK_IP, self.sink_port), shaping=self.shaping,
                           lease_ttl=lease_ttl, extra=extra, backend=backend)
                      for i in range(1, nodes + 1)]
        self.backend = backend

    @property
    def site(self) -> str:
        """The sink's site name, as every node names it (a smarthost: "[host]:port")."""
        return f"[{SINK_IP}]:{self.sink_port}"

    def start(self) -> ClusterRig:
        try:
            if self.backend == "redis":
                self.redis.start()
            self.start_sink()
            for n in self.nodes:
                n.start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_sink(self) -> None:
        args = [sys.executable, str(ROOT / "tools" / "sink.py"), f"{SINK_IP}:{self.sink_port}",
                "--times", "--stats-file", str(self.sink_stats_file)]
        if self.delay_ms:
            args += ["--delay-ms", str(self.delay_ms)]
        self.sink = subprocess.Popen(args, stdout=subprocess.PIPE,
                                     stderr=open(self.workdir / "sink.err", "ab"))
        assert self.sink.stdout is not None
        line = self.sink.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"sink did not start: {line!r}")

    def sink_stats(self, timeout: float = 10.0) -> dict:
        """The sink's statistics so far (SIGUSR1 makes it write them)."""
        assert self.sink is not None
        before = self.sink_stats_file.stat().st_mtime_ns if self.sink_stats_file.exists() else 0
        self.sink.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sink_stats_file.exists() and self.sink_stats_file.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.sink_stats_file.read_text())
                except ValueError:
                    pass
            time.sleep(0.05)
        raise TimeoutError("sink wrote no statistics")

    def inject(self, node: Node, rcpts: list[str], per_connection: int = 50,
               sender: str = "rig@sender.test") -> None:
        """One message per recipient into `node`, a new SMTP connection every
        `per_connection` messages (SO_REUSEPORT spreads connections over its workers)."""
        for start in range(0, len(rcpts), per_connection):
            with smtplib.SMTP(node.host, node.port, timeout=60) as s:
                for r in rcpts[start:start + per_connection]:
                    s.sendmail(sender, [r], f"From: {sender}\r\nTo: {r}\r\n"
                               f"Subject: rig {r}\r\n\r\nhello {r}\r\n")

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
        if self.sink is not None:
            self.sink.kill()
            self.sink.wait(10)
            self.sink = None
        self.redis.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/mta-cluster-rig")
    ap.add_argument("--connections", type=int, default=6, help="site_connection_limit")
    ap.add_argument("--rate", default="100/s", help="site_max_message_rate")
    ap.add_argument("--delay-ms", type=float, default=0, help="the sink's delay per message")
    ap.add_argument("--lease-ttl", default="3s")
    ap.add_argument("--backend", default="redis", choices=("redis", "host", "local"),
                    help="[cluster] backend of every node (host: for --nodes 1 with workers)")
    a = ap.parse_args()
    rig = ClusterRig(Path(a.dir), nodes=a.nodes, workers=a.workers, connections=a.connections,
                     rate=a.rate, delay_ms=a.delay_ms, lease_ttl=a.lease_ttl, backend=a.backend)
    rig.start()
    print(json.dumps({"redis": rig.redis.url, "sink": f"{SINK_IP}:{rig.sink_port}",
                      "site": rig.site, "sink_stats": str(rig.sink_stats_file),
                      "nodes": {n.name: f"{n.host}:{n.port}" for n in rig.nodes}}), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        rig.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
