"""Scenario: an operable daemon (issue 13, items 1 and 3) against a real `mta serve`.

SIGHUP reload: a shaping change (connection_limit) reaches an existing (source, site)
at once; a bad shaping file is refused and the old limits stay; reloads under load lose
and refuse nothing; a restart-only key keeps its running value. SIGUSR1 reopens the log
after a logrotate-style rename. SIGTERM drains: a delivery whose end-of-data reply is
slow finishes, is recorded and is not delivered again after a restart, and new
connections get 421 4.3.2 meanwhile.

The next hop is `Sink`, a small SMTP server on a loopback port (smarthost) that counts
open connections and can hold its reply to the end of data.
"""
from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import socket
import threading
import time

import orjson
import pytest

HOST = "mx.test.example"   # conftest's [server] hostname


class Sink:
    """SMTP receiver in a thread: messages by Message-ID, connections open now and at most."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay               # seconds before the reply to the end of data
        self.messages: list[bytes] = []
        self.open = 0
        self.peak = 0
        self.in_data = 0                 # transactions waiting for our end-of-data reply
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.open

    def ids(self) -> list[str]:
        with self.lock:
            return [m.group(1).decode() for m in
                    (re.search(rb"Message-ID: <([^>]+)>", msg) for msg in self.messages) if m]

    def wait(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"got {len(self.messages)} messages at the sink, want {n}")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
        try:
            writer.write(b"220 sink ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 60)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    data = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 60)
                    with self.lock:
                        self.in_data += 1
                    await asyncio.sleep(self.delay)
                    with self.lock:
                        self.in_data -= 1
                        self.messages.append(data)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.CancelledError):
            pass
        finally:
            with self.lock:
                self.open -= 1
            writer.close()


@pytest.fixture
def sink():
    made: list[Sink] = []

    def make(**kw) -> Sink:
        s = Sink(**kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def _msg(i: int, tag: str = "r") -> bytes:
    return (b"From: <a@sender.test>\r\nTo: <b@dest.test>\r\nSubject: t\r\n"
            b"Message-ID: <%s%d@sender.test>\r\n\r\nbody %d\r\n" % (tag.encode(), i, i))


def _send(port: int, i: int, tag: str = "r") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("a@sender.test", ["b@dest.test"], _msg(i, tag))


def _daemon(daemon_factory, sink: Sink, tmp_path, shaping: str, extra: str = ""):
    path = tmp_path / "shaping.toml"
    path.write_text(shaping)
    d = daemon_factory(extra=f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\n'
                             f'retry_initial = "1s"\nretry_max = "1s"\n{extra}\n'
                             f'[egress]\nshaping = ["{path}"]\n')
    return d, path


def _err(d) -> str:
    return (d.workdir / "daemon.err").read_text(errors="replace")


def _wait_for(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _shaping(d) -> dict:
    """GET /shaping through `mta shaping show --json` (the operator's view)."""
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-m", "mta", "shaping", "show", "--json", "-c",
                          str(d.config)], capture_output=True, cwd=d.workdir,
                         env={"PYTHONPATH": str(ROOT)}, timeout=30)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return orjson.loads(out.stdout)


def test_reload_applies_connection_limit_live_and_refuses_a_bad_file(daemon_factory, sink, tmp_path):
    s = sink(delay=0.4)
    d, shaping = _daemon(daemon_factory, s, tmp_path, '["default"]\nconnection_limit = 1\n')
    for i in range(16):
        _send(d.port, i)
    s.wait(3)
    assert s.peak == 1                       # the (source, site) exists, at its limit of 1

    # a bad shaping file: refused whole, the old limit stays in force
    shaping.write_text('["default"]\nconnection_limit = "lots"\n')
    d.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "reload refused" in _err(d), "the refusal in the daemon's log")
    assert "connection_limit" in _err(d).split("reload refused")[1]
    time.sleep(1.0)
    assert s.peak == 1, "a refused reload changed the limits"
    assert [r["connection_limit"] for r in _shaping(d)] == [1]   # GET /shaping
    _wait_for(lambda: d.log_records("Reload"), "a Reload record")
    rec = d.log_records("Reload")[0]
    assert rec["applied"] is False and "connection_limit" in rec["problems"][0]

    # a good one: the live dispatcher opens more connections for what waits
    shaping.write_text('["default"]\nconnection_limit = 4\n')
    d.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "reload: applied" in _err(d), "the reload")
    _wait_for(lambda: s.peak >= 2, "a second connection after the limit was raised")
    assert [r["connection_limit"] for r in _shaping(d)] == [4]
    _wait_for(lambda: len(d.log_records("Reload")) == 2, "a second Reload record")
    assert d.log_records("Reload")[1]["applied"] is True
    s.wait(16)
    assert sorted(s.ids()) == sorted(f"r{i}@sender.test" for i in range(16))
    assert d.stop() == 0


def test_reload_under_load_loses_and_refuses_nothing(daemon_factory, sink, tmp_path):
    s = sink()
    d, shaping = _daemon(daemon_factory, s, tmp_path, '["default"]\nconnection_limit = 2\n')
    sent: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            n = worker * 100000 + i
            try:
                _send(d.port, n, "load")
                sent.append(n)
            except BaseException as exc:   # noqa: BLE001  (a refusal fails the test)
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        for limit in (3, 1, 4):
            time.sleep(0.7)
            shaping.write_text(f'["default"]\nconnection_limit = {limit}\n')
            d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.7)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert len(sent) > 10
    assert _err(d).count("reload: applied") == 3
    s.wait(len(sent))
    assert sorted(s.ids()) == sorted(f"load{n}@sender.test" for n in sent)
    assert d.stop() == 0


def test_reload_keeps_restart_only_keys(daemon_factory, sink, tmp_path):
    s = sink()
    d, _ = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    text = d.config.read_text()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    new_port = other.getsockname()[1]
    other.close()
    d.config.write_text(text.replace(f"port = {d.port}\n", f"port = {new_port}\n")
                        .replace('[spool]\ndirectory = "', '[spool]\ndirectory = "/nonexistent'))
    d.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "reload: applied" in _err(d), "the reload")
    err = _err(d)
    assert "listener[0].port changed; it needs a restart" in err
    assert "spool.directory changed; it needs a restart" in err
    _send(d.port, 1)                          # still listening where it was
    s.wait(1)
    assert d.stop() == 0


def test_sigusr1_reopens_the_log_after_a_rename(daemon_factory, sink, tmp_path):
    s = sink()
    d, _ = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    for i in range(5):
        _send(d.port, i)
    s.wait(5)
    log = d.log_dir / "mta.jsonl"
    _wait_for(lambda: log.exists() and log.read_bytes().count(b'"Delivery"') >= 5, "records")
    rotated = d.log_dir / "mta.jsonl.1"
    log.rename(rotated)                       # logrotate's rename ...
    for i in range(5, 8):                     # ... records logged meanwhile go to the old file
        _send(d.port, i)
    d.proc.send_signal(signal.SIGUSR1)        # ... then its postrotate
    _wait_for(log.exists, "a new log file")
    for i in range(8, 12):
        _send(d.port, i)
    s.wait(12)
    assert d.stop() == 0
    lines = rotated.read_bytes().splitlines() + log.read_bytes().splitlines()
    recs = [orjson.loads(line) for line in lines]          # every line whole
    assert sum(r["type"] == "Reception" for r in recs) == 12
    assert any(r["type"] == "Reception" for r in map(orjson.loads, log.read_bytes().splitlines()))


def test_sigterm_drains_a_slow_delivery_once(daemon_factory, sink, tmp_path):
    s = sink(delay=4.0)
    d, _ = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    _send(d.port, 1, "slow")
    _wait_for(lambda: s.in_data == 1, "the sink holding its end-of-data reply")
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # draining: a new connection gets 421 4.3.2 and is closed
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as c:
        c.settimeout(10)
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = c.recv(1024)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"421 4.3.2 " + HOST.encode()) and b"shutting down" in got, got
        assert c.recv(1024) == b""            # and closed
    rc = d.proc.wait(30)
    d.proc = None
    assert rc == 0
    assert time.monotonic() - started >= 3.0  # it waited for the end-of-data reply
    assert s.ids() == ["slow1@sender.test"]
    assert len(d.log_records("Delivery")) == 1    # recorded before the exit
    # after a restart nothing is delivered again
    found = d.spooled()
    assert not found.messages, "the delivered message is still live in the spool"
    d.start()
    time.sleep(3)
    assert s.ids() == ["slow1@sender.test"]
    assert d.stop() == 0


class Raw:
    """A raw SMTP client: send bytes, read whole replies, see EOF."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply, or b"" on EOF."""
        while True:
            end = re.search(rb"(?m)^\d{3} .*\r\n", self.buf)
            if end:
                out, self.buf = self.buf[:end.end()], self.buf[end.end():]
                return out
            chunk = self.sock.recv(4096)
            if not chunk:
                return b""
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def test_drain_ends_idle_sessions_and_lets_a_message_in_data_finish(daemon_factory, sink, tmp_path):
    s = sink(delay=3.0)
    d, _ = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    _send(d.port, 1, "held")                  # keeps the drain open for a few seconds
    _wait_for(lambda: s.in_data == 1, "the sink holding its end-of-data reply")
    idle, busy = Raw(d.port), Raw(d.port)
    for c in (idle, busy):
        assert c.reply().startswith(b"220")
        c.send(b"EHLO client.test\r\n")
        assert c.reply().startswith(b"250")
    busy.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    assert busy.reply().startswith(b"250") and busy.reply().startswith(b"250")
    assert busy.reply().startswith(b"354")
    busy.send(b"From: <a@sender.test>\r\nMessage-ID: <indata1@sender.test>\r\n\r\nfirst half\r\n")
    d.proc.send_signal(signal.SIGTERM)
    got = idle.reply()                         # the idle session: 421 at once, then EOF
    assert got.startswith(b"421 4.3.2 " + HOST.encode()), got
    assert idle.reply() == b""
    busy.send(b"second half\r\n.\r\n")      # the session in DATA finishes its message
    assert busy.reply().startswith(b"250"), "the message in DATA was not taken"
    assert busy.reply().startswith(b"421 4.3.2")
    assert busy.reply() == b""
    idle.close()
    busy.close()
    assert d.proc.wait(30) == 0
    d.proc = None
    assert s.ids() == ["held1@sender.test"]
    # the message taken during the drain is queued; it goes out after the restart
    d.start()
    s.wait(2)
    assert sorted(s.ids()) == ["held1@sender.test", "indata1@sender.test"]
    assert d.stop() == 0


def test_admin_reload_action(daemon_factory, sink, tmp_path):
    from mta.config import load_config
    from mta.control.client import admin_request
    s = sink()
    d, shaping = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    cfg = load_config(d.config)
    shaping.write_text('["default"]\nconnection_limit = "many"\n')
    status, body = admin_request(cfg, "/control/reload", {})
    assert status == 200 and body["applied"] is False and "connection_limit" in body["problems"][0]
    shaping.write_text('["default"]\nconnection_limit = 3\n')
    status, body = admin_request(cfg, "/control/reload", {})
    assert status == 200 and body == {"applied": True, "problems": [], "restart": []}
    assert d.stop() == 0


def test_second_sigterm_stops_at_once(daemon_factory, sink, tmp_path):
    s = sink(delay=20.0)
    d, _ = _daemon(daemon_factory, s, tmp_path, '["default"]\n')
    _send(d.port, 1, "stuck")
    _wait_for(lambda: s.in_data == 1, "the sink holding its end-of-data reply")
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(15)
    d.proc = None
    assert rc == 0 and time.monotonic() - started < 10
    assert len(d.spooled().messages) == 1     # not recorded as delivered: it goes again
