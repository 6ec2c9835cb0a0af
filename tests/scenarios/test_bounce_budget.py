"""Returned mail under a budget, against the real daemon (issue 10, item 2).

Attacks first: on the old code returned mail was parsed on the event loop, so a
hostile message froze every SMTP session, and after a kill the recovered
message was parsed again before the listeners opened (the daemon never came
back). A parse that runs forever is made here the way an operator can: a rule
file with a catastrophic regex; the hostile 200 KB message is one of the shapes
the parser used to be quadratic on.
"""
from __future__ import annotations

import os
import smtplib
import stat
import time

import pytest

from hostile_bounces import SHAPES, SLOW, SLOW_RULE, children, dsn
from peers import _records

BOUNCE = "bounces.test"
def _daemon(daemon_factory, tmp_path, rules: str, extra: str = ""):
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    return daemon_factory(extra=f'[bounces]\ndomain = "{BOUNCE}"\nrules = ["{path}"]\n{extra}\n'), path


def _send(port: int, rcpt: str, data: bytes, timeout: float = 30.0) -> float:
    """One transaction; returns the seconds from connect to the 250 after the data."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
        s.sendmail("sender@remote.test", [rcpt], data)
    return time.monotonic() - started


def _wait(cond, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_hostile_returned_mail_does_not_stall_other_sessions(daemon_factory, tmp_path):
    d, _ = _daemon(daemon_factory, tmp_path, SLOW_RULE, 'parse_timeout = "3s"')
    hostile = SHAPES["spaces_in_lines"](200_000)   # 7 s of loop time on the old parser
    assert 150_000 < len(hostile) < 250_000
    _send(d.port, f"b-1@{BOUNCE}", SLOW)
    # while the slow parse runs, another client's transaction is answered promptly
    assert _send(d.port, "rcpt@example.com", b"Subject: hi\r\n\r\nhello\r\n") < 1.5
    _send(d.port, f"b-2@{BOUNCE}", hostile)
    assert _send(d.port, "rcpt@example.com", b"Subject: hi\r\n\r\nhello\r\n") < 1.5

    oob = _records(d, "OOB", 2, timeout=30)
    by_reason = {r.get("reason") for r in oob}
    assert "time" in by_reason                     # the slow one: over its time budget...
    unparsed = next(r for r in oob if r["kind"] == "unparsed")
    saved = unparsed["saved_as"]
    assert os.path.dirname(saved) == str(d.spool_dir / "unparsed")
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600    # ...kept for the operator
    assert open(saved, "rb").read().endswith(SLOW)
    hostile_rec = next(r for r in oob if r is not unparsed)
    assert hostile_rec["kind"] != "unparsed"       # the hostile one got its verdict in time
    d.stop()
    live = {e.id for e in d.spooled().envelopes.values()}
    assert not live & {r["bounce_id"] for r in oob}   # both finished: never retried


def test_kill_during_slow_parse_restart_answers_at_once_and_processes_once(daemon_factory, tmp_path):
    d, rules = _daemon(daemon_factory, tmp_path, SLOW_RULE, 'parse_timeout = "5m"\nparse_attempts = 3')
    ledger = d.spool_dir / "intake"
    _send(d.port, f"b-1@{BOUNCE}", SLOW)
    entry = _wait(lambda: list(ledger.glob("*")) if ledger.exists() else [], what="a parse to begin")[0]
    assert entry.read_text() == "1"
    workers = children(d.proc.pid)
    assert workers
    d.kill()                                         # kill -9 mid-parse
    _wait(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 5, "the parser child to die with it")

    # the recovered message is queued for parsing; the listeners do not wait for it
    started = time.monotonic()
    d.start()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=5) as s:
        assert s.noop()[0] == 250
    assert time.monotonic() - started < 10
    _wait(lambda: entry.exists() and entry.read_text() == "2", what="the second parse to begin")
    assert _send(d.port, "rcpt@example.com", b"Subject: hi\r\n\r\nhello\r\n") < 1.5
    d.kill()

    rules.write_text("")                            # the operator fixes the rule
    d.start()
    oob = _records(d, "OOB", 1, timeout=30)
    assert [(r["kind"], r["recipient"], r["status"]) for r in oob] == [("bounce", "user@remote.test", "5.1.1")]
    d.stop()
    d.start()                                       # finished: a later start does not parse it again
    time.sleep(2)
    assert len(d.log_records("OOB")) == 1
    assert not ledger.exists() or not list(ledger.glob("*"))
    d.stop()
    live = {e.id for e in d.spooled().envelopes.values()}
    assert oob[0]["bounce_id"] not in live          # (the mail to example.com waits for DNS)


def test_crash_loop_ends_unparsed_without_parsing_again(daemon_factory, tmp_path):
    d, _ = _daemon(daemon_factory, tmp_path, SLOW_RULE, 'parse_timeout = "5m"\nparse_attempts = 1')
    ledger = d.spool_dir / "intake"
    _send(d.port, f"b-1@{BOUNCE}", SLOW)
    _wait(lambda: list(ledger.glob("*")) if ledger.exists() else [], what="a parse to begin")
    d.kill()
    d.start()                                       # the slow rule is still there
    rec = _records(d, "OOB", 1, timeout=15)[0]
    assert (rec["kind"], rec["reason"], rec["attempts"]) == ("unparsed", "attempts", 2)
    assert os.path.exists(rec["saved_as"])
    d.stop()
    assert not d.spooled().messages


def test_unparsed_message_that_cannot_be_copied_stays_in_the_spool(daemon_factory, tmp_path):
    d, _ = _daemon(daemon_factory, tmp_path, SLOW_RULE, 'parse_timeout = "1s"')
    (d.spool_dir / "unparsed").write_text("in the way")   # the quarantine cannot be created
    _send(d.port, f"b-1@{BOUNCE}", SLOW)
    _wait(lambda: b"not copied" in (d.workdir / "daemon.err").read_bytes(), what="the copy to fail")
    d.stop()
    assert not d.log_records("OOB")
    assert len(d.spooled().messages) == 1           # not finished: nothing is lost


def test_full_backlog_defers_new_returned_mail_at_rcpt(daemon_factory, tmp_path):
    d, _ = _daemon(daemon_factory, tmp_path, SLOW_RULE, 'parse_timeout = "5m"\nparse_backlog = 1')
    ledger = d.spool_dir / "intake"
    _send(d.port, f"b-1@{BOUNCE}", SLOW)            # being parsed (for ever)
    _wait(lambda: list(ledger.glob("*")) if ledger.exists() else [], what="a parse to begin")
    _send(d.port, f"b-2@{BOUNCE}", SLOW)            # waits: the backlog is full
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        assert s.rcpt(f"b-3@{BOUNCE}")[0] == 451    # the sender keeps it and retries
        assert s.rcpt("rcpt@example.com")[0] == 250  # other mail is not held up
    d.kill()
    assert len(d.spooled().messages) == 2           # both accepted ones kept for the next start


def test_other_recipients_wait_for_the_intake_and_it_is_not_repeated(daemon_factory, tmp_path):
    # a message for the bounce domain and for a normal recipient: the intake's verdict is
    # recorded (RCPTS_DONE) before delivery may finish the message, and a restart does
    # not parse it again while the normal recipient still waits
    d, _ = _daemon(daemon_factory, tmp_path, "")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.sendmail("sender@remote.test", [f"b-1@{BOUNCE}", "rcpt@example.com"], dsn("550 5.1.1 user unknown"))
    oob = _records(d, "OOB", 1)
    assert oob[0]["recipient"] == "user@remote.test"
    d.stop()
    found = d.spooled()
    (raw, env), = [(k, e) for k, e in found.envelopes.items() if e.id == oob[0]["bounce_id"]]
    assert found.done_rcpts.get(raw) == {0}          # the bounce recipient is done, the other is not
    d.start()
    time.sleep(2)
    assert len(d.log_records("OOB")) == 1


@pytest.fixture(autouse=True)
def _no_stray_parsers():
    before = children(os.getpid())
    yield
    # daemons are killed by the fixture; their parser children must not outlive them
    time.sleep(0.2)
    assert children(os.getpid()) <= before
