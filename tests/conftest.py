"""Shared fixtures: a real `mta serve` daemon in a subprocess, on a free loopback port.

Tests talk to it with real clients (smtplib, swaks, raw sockets) exactly as
operators' injectors would. Everything binds to 127.0.0.1.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))   # test peers that also serve the demo: dnsserver, sink; corpora

import corpora  # noqa: E402
from dnsserver import DnsServer, dns_server, silent_nameserver  # noqa: E402,F401  (fixtures)

sys.path.insert(0, str(ROOT / "tests" / "scenarios"))
from peers import receivers  # noqa: E402,F401  (fixture: aiosmtpd receivers on port 25)


def corpus(name: str) -> Path:
    """The folder of test corpus `name`: tests/data, then the shared folder (tools/corpora.py).

    A missing corpus fails the test under CI (CI=true: CI has the shared folder, so it is a
    broken setup, not a reason to test less); elsewhere it skips the test, or the module when
    called at import. Either way the message names the corpus and where to get it.
    """
    path = corpora.find(name)
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(corpora.missing(name), pytrace=False)
    pytest.skip(corpora.missing(name), allow_module_level=True)


def missing_tool(what: str) -> None:
    """A system tool a test needs is not here: fail under CI (tools/dev.sh installs it
    there, so its absence is a broken install), skip elsewhere, naming it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (required under CI=true)", pytrace=False)
    pytest.skip(what)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range: a port the kernel
    handed out (bind to 0) can be taken by any outgoing connection of the daemons and
    peers before the test's daemon binds it (seen in CI: EADDRINUSE at start)."""
    if _EPHEMERAL_LOW > 12000:
        for _ in range(100):
            port = random.randrange(10000, _EPHEMERAL_LOW)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:   # an odd port range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m mta serve` with a generated config under `workdir`."""

    def __init__(self, workdir: Path, listener: str = "", extra: str = ""):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.spool_dir = workdir / "spool"
        self.log_dir = workdir / "log"
        self.config = workdir / "mta.toml"
        self.admin_port = free_port()
        # Tests never reach outside 127.0.0.0/8: unless a test routes delivery itself,
        # DNS goes to a loopback port where nothing answers (lookups fail at once, the
        # messages wait for a retry), and the admin API gets its own free port.
        if "[dns]" not in extra:
            extra += '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
        if "[admin]" not in extra:
            extra += f'\n[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'
        self.config.write_text(
            f'[server]\nhostname = "mx.test.example"\n'
            f'[spool]\ndirectory = "{self.spool_dir}"\n'
            f'[log]\ndirectory = "{self.log_dir}"\n{extra}\n'
            f'[[listener]]\naddress = "127.0.0.1"\nport = {self.port}\n{listener}\n')
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Daemon":
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "serve", "-c", str(self.config)],
            stdout=subprocess.PIPE, stderr=open(self.workdir / "daemon.err", "ab"),
            env=env, cwd=self.workdir)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line.startswith(b"mta: ready"):
            self.proc.kill()
            raise RuntimeError(f"daemon did not start: {line!r}; stderr: "
                               f"{(self.workdir / 'daemon.err').read_text()[-2000:]}")
        assert time.monotonic() < deadline
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None

    def log_records(self, rtype: str | None = None) -> list[dict]:
        path = self.log_dir / "mta.jsonl"
        if not path.exists():
            return []
        out = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
        return [r for r in out if rtype is None or r["type"] == rtype]

    def spooled(self):
        """Offline scan of the spool (call after stop())."""
        from mta.spool.recovery import scan
        return scan(str(self.spool_dir))


@pytest.fixture
def daemon_factory(tmp_path):
    """Start daemons with custom listener settings; all are stopped at the end."""
    started: list[Daemon] = []

    def make(listener: str = "", extra: str = "", start: bool = True) -> Daemon:
        d = Daemon(tmp_path / f"d{len(started)}", listener, extra)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory()


def smtp_exchange(port: int, script: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes (after the greeting), return everything the server sent until it
    closes or goes quiet for read_timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        out = s.recv(4096)
        s.sendall(script)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
    return out


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of the test's own (tools/cluster_rig.py), stopped afterwards."""
    from cluster_rig import RedisServer
    if not RedisServer.available():
        missing_tool("redis-server (apt install redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def move_rig(monkeypatch, redis: str, sink: str, listen: str, source: str) -> None:
    """tools/cluster_rig.py on a test's own addresses: node i listens on `listen` + i and
    sends from `source` + i (the last octet added: "127.0.151.0" -> 127.0.151.i)."""
    import cluster_rig
    monkeypatch.setattr(cluster_rig, "REDIS_IP", redis)
    monkeypatch.setattr(cluster_rig, "SINK_IP", sink)
    for name, base in (("listen_ip", listen), ("source_ip", source)):
        prefix, _, last = base.rpartition(".")
        monkeypatch.setattr(cluster_rig, name, lambda i, p=prefix, n=int(last): f"{p}.{n + i}")


def host_stores(tmp_path, n: int = 2) -> list:
    """`n` workers' HostLimits (mta/egress/shared/host_table.py) on one table file, started."""
    from mta.egress.shared.host_table import HostLimits
    from mta.model.node import WorkerSlot
    stores = [HostLimits(tmp_path / "shared-limits", worker=WorkerSlot(i, n, "n"),
                         member=f"n/w{i}") for i in range(n)]
    for s in stores:
        s.start()
    return stores
