"""The listener as an attacker and a failing disk see it (issue 10): suppression probes
from outsiders, a full log disk, file modes. Real daemon, raw sockets and smtplib."""
from __future__ import annotations

import os
import smtplib
import stat
import subprocess
import sys
import time

from conftest import ROOT, smtp_exchange
from tmpfs import fill, tmpfs

from mta.model.replies import reply


def _suppress(d, address: str) -> None:
    got = subprocess.run([sys.executable, "-m", "mta", "suppress", "-c", str(d.config), "add",
                          address, "--reason", "complaint"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stderr


def test_outsider_cannot_probe_the_suppression_list_and_is_disconnected(daemon_factory):
    d = daemon_factory(extra='[bounces]\ndomain = "bounces.test"\n',
                       listener='relay_cidrs = ["192.0.2.0/24"]\nmax_errors = 3\n', start=False)
    _suppress(d, "gone@example.test")
    d.start()
    out = smtp_exchange(d.port, b"EHLO probe\r\nMAIL FROM:<x@attacker.test>\r\n"
                                b"RCPT TO:<x@bounces.test>\r\n"       # open to anyone
                                b"RCPT TO:<gone@example.test>\r\n"    # suppressed
                                b"RCPT TO:<here@example.test>\r\n"    # not suppressed
                                b"RCPT TO:<gone@example.test>\r\n"
                                b"RCPT TO:<after@example.test>\r\n")
    rcpt = out.split(b"Sender OK\r\n", 1)[1].split(b"\r\n")
    assert rcpt[0].startswith(b"250 2.1.5")
    denied = reply("RELAY_DENIED").rstrip(b"\r\n")
    assert rcpt[1] == rcpt[2] == denied, "a suppressed address looks like any other"
    assert rcpt[3].startswith(b"421 4.7.0"), "the third refusal ends the session"
    assert b"suppressed" not in out
    assert rcpt[4:] == [b""], "nothing is read after the disconnect"


def test_full_log_disk_does_not_hold_back_the_250_and_records_follow(daemon_factory, tmp_path):
    d = daemon_factory(start=False)
    with tmpfs(d.log_dir, "1m"):
        d.start()
        filler = fill(d.log_dir)
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
            for i in range(20):
                t0 = time.monotonic()
                s.sendmail("a@sender.test", [f"r{i}@example.test"], b"Subject: x\r\n\r\nhi\r\n")
                assert time.monotonic() - t0 < 5, "the 250 came promptly"
        time.sleep(1.5)                       # retries fail meanwhile; nothing is lost
        filler.unlink()
        deadline = time.monotonic() + 15
        while len(d.log_records("Reception")) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        got = [r["recipients"][0] for r in d.log_records("Reception")]
        assert sorted(got) == sorted(f"r{i}@example.test" for i in range(20)), "each once"
        assert d.stop() == 0
        assert len(d.spooled().messages) == 20, "no duplicate"


def test_files_are_private(daemon_factory):
    d = daemon_factory(extra='[bounces]\ndomain = "bounces.test"\n', start=False)
    _suppress(d, "gone@example.test")
    d.start()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["r@example.test"], b"Subject: x\r\n\r\nhi\r\n")
    store = d.workdir / "var" / "suppression"
    dbs = [p for p in store.iterdir() if ".sqlite" in p.name]
    assert {p.name.rsplit("-", 1)[-1] for p in dbs} >= {"wal", "shm"}, dbs
    for p in dbs:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    log_file = d.log_dir / "mta.jsonl"
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o640
    spool_files = [p for p in d.spool_dir.rglob("*") if p.is_file()]
    assert spool_files and all(os.stat(p).st_mode & 0o077 == 0 for p in spool_files), \
        "the daemon's umask keeps message content private"
    assert d.stop() == 0


def test_full_queue_refuses_at_mail_not_counted_as_client_errors(daemon_factory):
    d = daemon_factory(extra='[delivery]\nhold = true\n', listener="max_errors = 2\n",
                       start=False)
    d.config.write_text(d.config.read_text().replace(
        "[spool]\n", "[spool]\nmax_queued_messages = 2\n", 1))
    d.start()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
        for i in range(2):
            s.sendmail("a@sender.test", [f"r{i}@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        code, text = s.mail("a@sender.test")
        assert (code, text[:5]) == (451, b"4.3.2"), "the spool's admission answers MAIL"
        for _ in range(2):
            assert s.mail("a@sender.test")[0] == 451
        assert s.noop()[0] == 250, "our refusals are not client errors (max_errors = 2)"
