"""The spool under faults, against a real daemon: a full disk and a read-only one.

A small tmpfs is mounted on the daemon's spool directory (the tests run as
root) and filled with a filler file while smtplib clients send and the daemon
delivers to a slow aiosmtpd sink. The disk runs full (ENOSPC in the native
writer): clients get 4xx, never a 250 for a message that is not durable, and
delivery holds (its tombstones could not be written). Deleting the filler
frees space: the same daemon accepts again by itself. Every message that got
a 250 reaches the sink exactly once, also across a kill -9 and a restart, and
no message that was refused is ever delivered.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import re
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from conftest import free_port
from tmpfs import fill, tmpfs

_LOADERS = itertools.count()
TAG_RE = re.compile(rb"Message-ID: <([^@>]+)@fault\.example>")


class SlowSink:
    """aiosmtpd handler: accepts everything, a little slowly, and counts Message-ID tags."""

    def __init__(self, delay: float):
        self.delay = delay
        self.tags: list[str] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        m = TAG_RE.search(envelope.original_content)
        with self.lock:
            self.tags.append(m.group(1).decode() if m else "?")
        return "250 2.0.0 OK"

    def count(self) -> int:
        with self.lock:
            return len(self.tags)


def _message(tag: str, size: int = 20_000) -> bytes:
    line = b"fill fill fill fill fill fill fill fill fill fill fill fill fill\r\n"
    return (f"From: loader@fault.example\r\nTo: r@dest.example\r\n"
            f"Message-ID: <{tag}@fault.example>\r\nSubject: {tag}\r\n\r\n").encode() \
        + line * (size // len(line))


class Loader:
    """smtplib clients in threads; a message is acked only on a 250 at end of data."""

    def __init__(self, port: int):
        self.port = port
        self.acked: set[str] = set()
        self.refused: list[tuple[str, int]] = []   # (stage, code) of every 4xx
        self.other: list[tuple[str, int]] = []     # anything else: must stay empty
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.n = 0
        self.name = f"l{next(_LOADERS)}"

    def _tag(self, cid: int) -> str:
        with self.lock:
            self.n += 1
            return f"{self.name}-c{cid}-m{self.n}"

    def _one(self, s: smtplib.SMTP, tag: str) -> None:
        code, _ = s.mail("loader@fault.example")
        stage = "MAIL"
        if code == 250:
            code, _ = s.rcpt("r@dest.example")
            stage = "RCPT"
        if code == 250:
            code, _ = s.docmd("DATA")
            stage = "DATA"
            if code == 354:
                s.send(_message(tag).replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
                code, _ = s.getreply()
                stage = "end of data"
        with self.lock:
            if stage == "end of data" and code == 250:
                self.acked.add(tag)
            elif 400 <= code < 500:
                self.refused.append((stage, code))
            else:
                self.other.append((stage, code))
        if code != 250:
            s.rset()

    def _client(self, cid: int, count: int | None) -> None:
        sent = 0
        while not self.stop.is_set() and (count is None or sent < count):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
                    s.ehlo("loader.fault.example")
                    while not self.stop.is_set() and (count is None or sent < count):
                        self._one(s, self._tag(cid))
                        sent += 1
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                time.sleep(0.05)   # a 421 or a closed session: connect again

    def run(self, clients: int, count: int | None = None) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(i, count), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        return threads


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _spool_settings(d, extra: str) -> None:
    """Add keys to the [spool] table the fixture wrote (a second [spool] is not TOML)."""
    text = d.config.read_text()
    line = f'directory = "{d.spool_dir}"\n'
    d.config.write_text(text.replace(line, line + extra, 1))


@pytest.fixture
def sink():
    handler = SlowSink(delay=0.2)
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield handler, ctl.port
    ctl.stop()


def _tmpfs_daemon(daemon_factory, sink_port: int, spool: str):
    d = daemon_factory(extra=f'[delivery]\nsmarthost = "127.0.0.1:{sink_port}"\n'
                             f'connection_limit = 1\nretry_initial = "1s"\nretry_max = "1s"\n',
                       start=False)
    # Free-space thresholds off: these tests are about the disk actually running full.
    _spool_settings(d, f'segment_size = "1MiB"\nmin_free_space = 0\nmin_free_percent = 0\n{spool}')
    return d


def _accepting_again(d, timeout: float) -> tuple[set[str], float]:
    """Send one message at a time until one gets a 250 -> (its tag, seconds it took)."""
    t0 = time.monotonic()
    probe = Loader(d.port)
    _wait(lambda: probe.run(clients=1, count=1)[0].join(30) or probe.acked, timeout,
          "a 250 from the same daemon")
    return probe.acked, time.monotonic() - t0


def _delivered_once_across_kill9(d, handler: SlowSink, acked: set[str]) -> list[str]:
    """Every accepted message reaches the sink exactly once, nothing else does, and a
    kill -9 plus restart (recovery scan) delivers none of them again."""
    handler.delay = 0.005
    _wait(lambda: handler.count() >= len(acked), 120, "every accepted message at the sink")
    time.sleep(2.0)                    # the last tombstones reach the disk
    delivered = list(handler.tags)
    assert set(delivered) == acked, \
        f"got {len(set(delivered) - acked)} delivered that were never accepted " \
        f"and {len(acked - set(delivered))} accepted that were not delivered"
    assert len(delivered) == len(set(delivered)), "got duplicate deliveries"
    d.kill()                           # kill -9, then a restart scans the spool
    d.start()
    time.sleep(4.0)                    # longer than retry_initial: anything recovered goes out
    assert handler.tags == delivered, \
        f"got {handler.tags[len(delivered):][:5]} delivered again after the restart, want none"
    assert d.stop() == 0
    left = d.spooled()
    assert not left.messages, f"got {len(left.messages)} messages still queued, want 0"
    return delivered


def _load_until_refused(d) -> Loader:
    load = Loader(d.port)
    threads = load.run(clients=4)
    _wait(lambda: len(load.refused) >= 30, 60, "4xx replies on a full spool")
    load.stop.set()
    for t in threads:
        t.join(30)
    assert load.acked, "want some messages accepted before the disk ran full"
    assert not load.other, f"got {load.other[:5]}, want only 250 or 4xx replies"
    return load


def test_full_disk_holds_delivery_and_recovers_when_space_returns(daemon_factory, sink):
    """Someone else fills the disk: 4xx, deliveries held (their tombstones could not be
    written), then the operator frees space and the same daemon goes on by itself."""
    handler, sink_port = sink
    d = _tmpfs_daemon(daemon_factory, sink_port, "reserve_space = 0\n")
    filler = d.spool_dir / "filler"
    with tmpfs(d.spool_dir, "8m"):
        _full_disk_scenario(d, handler, filler)


def _full_disk_scenario(d, handler: SlowSink, filler: Path) -> None:
    try:
        d.start()
        st = os.statvfs(d.spool_dir)
        with open(filler, "wb") as f:      # leave about 1.5 MiB for the spool
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (3 << 19)))
        load = _load_until_refused(d)
        late = [r for r in load.refused if r[0] == "end of data"]
        assert late, "want some messages refused at end of data: their write failed"
        fill(d.spool_dir)                  # not a byte left, not even for a tombstone
        last = [handler.count(), time.monotonic()]

        def stalled() -> bool:
            n = handler.count()
            if n != last[0]:
                last[:] = [n, time.monotonic()]
            return time.monotonic() - last[1] > 2.5
        _wait(stalled, 60, "deliveries to stop while the spool cannot write")
        assert handler.count() < len(load.acked), \
            "want accepted messages left undelivered while the spool cannot write"
        held = handler.count()

        filler.unlink()                    # space returns: no restart
        again, took = _accepting_again(d, 15)
        more = Loader(d.port)
        for t in more.run(clients=2, count=15):
            t.join(60)
        assert len(more.acked) == 30 and not more.refused, \
            f"got {len(more.acked)} of 30 accepted after space returned (refused " \
            f"{more.refused[:5]}), want all: the writer recovers by itself"
        delivered = _delivered_once_across_kill9(d, handler, load.acked | again | more.acked)
        print(f"{len(load.acked)} accepted, {len(load.refused)} refused ({len(late)} at end of "
              f"data); delivery held at {held}; accepting again {took:.2f}s after space "
              f"returned; {len(delivered)} delivered once each")
    finally:
        d.kill()


def test_queue_filling_its_own_disk_recovers_without_an_operator(daemon_factory, sink):
    """The queue itself fills the disk: the reserve is released so tombstones fit,
    deliveries free segments, and new mail is taken again, with nobody freeing space."""
    handler, sink_port = sink
    handler.delay = 0.02
    d = _tmpfs_daemon(daemon_factory, sink_port, 'reserve_space = "1MiB"\n')
    with tmpfs(d.spool_dir, "6m"):
        try:
            d.start()
            load = _load_until_refused(d)
            again, took = _accepting_again(d, 90)
            delivered = _delivered_once_across_kill9(d, handler, load.acked | again)
            print(f"{len(load.acked)} accepted, {len(load.refused)} refused; accepting again "
                  f"after {took:.2f}s; {len(delivered)} delivered once each")
        finally:
            d.kill()


def test_read_only_spool_is_one_line_and_exit_1(daemon_factory):
    d = daemon_factory(start=False)
    with tmpfs(d.spool_dir, "1m", "ro"):
        proc = subprocess.run([sys.executable, "-m", "mta", "serve", "-c", str(d.config)],
                              cwd=d.workdir, capture_output=True, text=True, timeout=60, check=False,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert proc.returncode == 1, f"got exit code {proc.returncode}, want 1"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"mta: {d.spool_dir}: Read-only file system", f"got {last!r}"
    assert "ready" not in proc.stdout


def test_offline_spool_scan_of_a_missing_directory_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "mta", "spool", "ls", "--spool-dir", str(missing)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"mta: {missing}: No such file or directory"


def test_no_bounce_is_decided_while_the_spool_cannot_write(daemon_factory, dns_server):
    """A permanent routing failure (NXDOMAIN) met while the spool cannot write waits:
    its bounce could not be tombstoned, nor its DSN stored. Once space returns it
    bounces once, and the DSN is queued."""
    dns = dns_server([])                   # every name is NXDOMAIN
    d = daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                             f'[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n', start=False)
    _spool_settings(d, 'min_free_space = 0\nmin_free_percent = 0\nreserve_space = 0\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with tmpfs(d.spool_dir, "4m"):
        _bounce_waits_for_the_spool(d, env)


def _bounce_waits_for_the_spool(d, env: dict) -> None:
    try:
        d.start()
        subprocess.run([sys.executable, "-m", "mta", "suspend", "queue", "nx.test", "--for", "3s",
                        "-c", str(d.config)], check=True, capture_output=True, env=env, timeout=30)
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
            s.sendmail("sender@sender.test", ["r@nx.test"], _message("nx-original"))
        filler = fill(d.spool_dir)
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:   # this write fails
            s.ehlo("loader.fault.example")
            codes = [s.mail("loader@fault.example")[0], s.rcpt("r@dest.example")[0]]
            if codes == [250, 250]:
                codes.append(s.data(_message("nx-filler"))[0])
        assert 400 <= codes[-1] < 500, f"got {codes}, want the spool write refused"
        time.sleep(5.0)                    # the suspension ends; the route fails for good
        assert not d.log_records("Bounce"), "got a bounce decided while the spool could not write"
        receptions = len(d.log_records("Reception"))
        filler.unlink()
        _wait(lambda: d.log_records("Bounce"), 20, "the bounce once space returned")
        _wait(lambda: len(d.log_records("Reception")) > receptions, 10, "the DSN queued")
        time.sleep(1.0)
        assert len([r for r in d.log_records("Bounce") if r["queue"] == "nx.test"]) == 1
    finally:
        d.kill()


class SlowRejecter(SlowSink):
    """Refuses bounce@ recipients with 550 after `delay` seconds; takes everything else."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self.dsns: list[bytes] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce@"):
            await asyncio.sleep(self.delay)
            return f"550 5.1.1 <{address}>: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if envelope.rcpt_tos == ["sender@sender.test"]:   # the DSN
            with self.lock:
                self.dsns.append(envelope.original_content)
        return "250 2.0.0 OK"


def test_dsn_made_while_the_spool_cannot_write_is_kept_until_it_can(daemon_factory):
    """A bounce arrives (a slow 550) just after the spool stopped writing: the message is
    finished, and its DSN, the only copy of that news, waits in memory and is stored
    and sent once space returns."""
    handler = SlowRejecter(delay=3.0)
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    d = _tmpfs_daemon(daemon_factory, ctl.port, "reserve_space = 0\n")
    try:
        with tmpfs(d.spool_dir, "4m"):
            try:
                d.start()
                with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
                    s.sendmail("sender@sender.test", ["bounce@dest.example"], _message("dsn-original"))
                time.sleep(0.5)            # delivery waits for the sink's RCPT reply
                filler = fill(d.spool_dir)
                with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:   # this write fails
                    s.ehlo("loader.fault.example")
                    code = s.mail("loader@fault.example")[0]
                    if code == 250 and s.rcpt("r@dest.example")[0] == 250:
                        code = s.data(_message("dsn-filler"))[0]
                assert 400 <= code < 500, f"got {code}, want the spool write refused"
                _wait(lambda: d.log_records("Bounce"), 10, "the 550")
                time.sleep(1.5)            # the DSN's store has failed by now
                assert not handler.dsns
                filler.unlink()
                _wait(lambda: handler.dsns, 20, "the DSN at the sink once space returned")
                assert b"dsn-original" in handler.dsns[0]
            finally:
                d.kill()
    finally:
        ctl.stop()
