"""A real DNS server on loopback for tests and demos: unbound, authoritative only.

`DnsServer(records)` writes an unbound config whose root zone is `static`: the
given records (zone-file lines such as "example.test. 300 IN MX 10 mx.example.test.")
are answered and every other name is NXDOMAIN, so nothing ever leaves
127.0.0.1 (outgoing queries are also pinned to 127.0.0.1 as a second belt).
Extra zones select other unbound behaviour, e.g. {"broken.test.": "refuse"}
answers REFUSED for every name below broken.test.

The server runs in the foreground (no daemonizing, no chroot, no privilege drop,
no remote control, no DNSSEC), on a free UDP+TCP port, as the current user:
root is not needed. Use it as a context manager, or through the `dns_server`
fixture factory, which stops every server at the end of the test:

    with DnsServer(["a.test. IN MX 10 mx.a.test.", "mx.a.test. IN A 127.0.0.2"]) as dns:
        resolver = SiteResolver(nameservers=dns.nameservers)

`silent_nameserver()` gives a UDP port that never answers, for timeout tests.
Needs the Debian package `unbound` (tools/dns-packages.txt).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

# unbound local-zone types a test may ask for (unbound.conf(5), "local-zone:").
ZONE_TYPES = {"static", "refuse", "deny", "always_nxdomain", "always_refuse",
              "transparent", "redirect", "inform", "nodefault"}


def _unbound() -> str:
    path = shutil.which("unbound") or ("/usr/sbin/unbound" if os.access(
        "/usr/sbin/unbound", os.X_OK) else None)
    if path is None:
        raise RuntimeError("unbound not found: install the Debian package 'unbound' "
                           "(tools/dns-packages.txt)")
    return path


def _free_port(address: str) -> int:
    """A port free for both UDP and TCP on `address` (DNS needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def _quote(text: str, what: str) -> str:
    if '"' in text or "\n" in text or "\\" in text:
        raise ValueError(f"{what} {text!r}: quotes, backslashes and newlines are not allowed")
    return f'"{text}"'


class DnsServer:
    """unbound serving `zone_records` on 127.0.0.1:`port`."""

    def __init__(self, zone_records: list[str], *, zones: dict[str, str] | None = None,
                 address: str = "127.0.0.1") -> None:
        self.records = list(zone_records)     # zone-file lines, one RR each
        self.zones = {".": "static"}          # zone (absolute name) -> unbound local-zone type
        for zone, kind in (zones or {}).items():
            if not zone.endswith(".") or kind not in ZONE_TYPES:
                raise ValueError(f"zone {zone!r}: want an absolute name and one of "
                                 f"{sorted(ZONE_TYPES)}, got {kind!r}")
            self.zones[zone] = kind
        self.address = address                # loopback address the server listens on
        self.port = 0                         # UDP+TCP port, set by start()
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """[(address, port)], as SiteResolver(nameservers=...) takes it."""
        return [(self.address, self.port)]

    def config(self) -> str:
        """The unbound.conf text for the current port and work directory."""
        lines = [
            "server:",
            f"    interface: {self.address}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    do-daemonize: no",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{self._dir}"',
            '    pidfile: ""',
            "    use-syslog: no",
            '    logfile: ""',
            "    verbosity: 1",
            "    num-threads: 1",
            "    so-reuseport: no",
            '    module-config: "iterator"',       # no validator: no trust anchors
            f"    outgoing-interface: {self.address}",
            f"    access-control: {self.address}/32 allow",
        ]
        for zone, kind in self.zones.items():
            lines.append(f"    local-zone: {_quote(zone, 'zone')} {kind}")
        for record in self.records:
            lines.append(f"    local-data: {_quote(record, 'record')}")
        lines += ["remote-control:", "    control-enable: no", ""]
        return "\n".join(lines)

    def start(self, timeout: float = 10.0) -> DnsServer:
        unbound = _unbound()
        self._dir = Path(tempfile.mkdtemp(prefix="mta-dns-"))
        for _ in range(5):      # the port can be taken between probe and bind: retry
            self.port = _free_port(self.address)
            conf = self._dir / "unbound.conf"
            conf.write_text(self.config())
            log = open(self._dir / "unbound.log", "wb")
            self._proc = subprocess.Popen([unbound, "-d", "-c", str(conf)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            if self._wait_ready(timeout):
                return self
            self._proc.kill()
            self._proc.wait()
            if "bind" not in self.log():
                break
        text = self.log()
        self.stop()
        raise RuntimeError(f"unbound did not answer on {self.address}:{self.port}: {text[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        probe = dns.message.make_query("ready.probe.", "A")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                dns.query.udp(probe, self.address, port=self.port, timeout=0.2)
                return True
            except (dns.exception.Timeout, OSError):
                time.sleep(0.02)
        return False

    def log(self) -> str:
        """What unbound wrote to stderr so far."""
        if self._dir is None or not (self._dir / "unbound.log").exists():
            return ""
        return (self._dir / "unbound.log").read_text(errors="replace")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def silent_nameserver(address: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """(address, port) of a bound UDP socket that reads nothing and answers nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        yield sock.getsockname()


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DnsServer]]:
    """Factory: dns_server(records, zones=...) -> a started DnsServer, stopped after the test."""
    servers: list[DnsServer] = []

    def make(records: list[str], **kwargs: object) -> DnsServer:
        server = DnsServer(records, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


if __name__ == "__main__":
    # Demo use: python3 tests/dnsserver.py RECORDS_FILE  (one zone-file line each)
    lines = [ln.strip() for ln in Path(sys.argv[1]).read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith(";")]
    with DnsServer(lines) as server:
        print(f"dns: ready 127.0.0.1:{server.port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server._proc is not None and server._proc.poll() is None:
                time.sleep(1)
