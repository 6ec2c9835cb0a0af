"""The bounce parser against real corpora: sisimai (tests/data), flufl and ARF (../shared, GPL).

Scoring lives in tools/bounce_accuracy.py (the same numbers the tool prints);
here the goals are asserted: recipient >= 98 %, status (rows with a real DSN
status) >= 95 %, hard/soft >= 95 %, ARF fields 100 %, negative controls empty.
Plus a few direct checks: our message id recovery, garbage input, the CLI.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, corpus
from mta.feedback.bounce import Classifier, parse_message

import bounce_accuracy  # noqa: E402  (tools/ is on sys.path, conftest)

SISIMAI = corpus("sisimai-set-of-emails") / "maildir"


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier()


@pytest.fixture(scope="module")
def sisimai(classifier):
    return bounce_accuracy.run_sisimai(corpus("sisimai-set-of-emails"), classifier)


@pytest.fixture(scope="module")
def flufl(classifier):
    return bounce_accuracy.run_flufl(corpus("flufl-bounce"), classifier)


@pytest.fixture(scope="module")
def arf(classifier):
    return bounce_accuracy.run_arf(corpus("arf-fbl"), classifier)


def _pct(scores, name):
    t = scores.fields[name]
    assert t.total > 0, f"no {name} rows compared"
    return t.pct


def test_sisimai_recipient(sisimai):
    assert _pct(sisimai, "recipient") >= 98.0, bounce_accuracy.table("sisimai", sisimai)


def test_sisimai_status_on_dsn_rows(sisimai):
    assert _pct(sisimai, "status") >= 95.0, bounce_accuracy.table("sisimai", sisimai)


def test_sisimai_hard_soft(sisimai):
    # "hard" is graded only where sisimai's label is a fact about the address (user/domain
    # unknown, moved = hard; full, expired, rate, size, system = soft): blocked, filtered,
    # policy... are the operator's choice ([bounces] policy_hard). 97.4 % at issue 12.
    assert _pct(sisimai, "hard") >= 96.5, bounce_accuracy.table("sisimai", sisimai)
    # every row, sisimai's policy labels included (for information: 93 %)
    assert _pct(sisimai, "hard-all") >= 92.0, bounce_accuracy.table("sisimai", sisimai)


def test_held_out_families():
    """Leave-one-family-out (tools/bounce_accuracy.py --folds): the rule alternatives and
    text-scan patterns only the held-out family needs are dropped before it is scored."""
    bases = {t: corpus(t) for t in ("sisimai-set-of-emails", "flufl-bounce")}
    held, _, _ = bounce_accuracy.run_folds(bases, None)
    sis, flufl = held["sisimai-set-of-emails"], held["flufl-bounce"]
    assert _pct(sis, "recipient") >= 97.5 and _pct(sis, "hard") >= 93.5, bounce_accuracy.table("held out", sis)
    assert _pct(flufl, "recipient") >= 93.0, bounce_accuracy.table("held out", flufl)


def test_sisimai_reply_code_and_feedback_type(sisimai):
    assert _pct(sisimai, "feedback") == 100.0
    assert _pct(sisimai, "replycode") >= 85.0


def test_not_bounces_yield_nothing(classifier):
    for name in ("is-not-bounce-01.eml", "is-not-bounce-02.eml"):
        rep = parse_message((SISIMAI / "not" / name).read_bytes(), classifier)
        assert rep.kind == "none" and not rep.recipients, name


def test_not_bounce_rb_issue_368(classifier):
    # A postmaster notice "reject reason: Mailbox full / target mail address: x"; the corpus
    # files it under "not a bounce" (sisimai returns nothing for it). Nothing general sets it
    # apart from a real bounce: null Return-Path, From postmaster, Subject "email bounce
    # notification", "your message was rejected", the returned original attached. Telling
    # it apart would mean matching this one notice's wording, so it is read as what it
    # says: a soft (mailbox full) failure for the target address, never a hard one.
    rep = parse_message((SISIMAI / "not" / "rb-issue-368-bug.eml").read_bytes(), classifier)
    assert rep.kind == "bounce"
    assert [(r.recipient, r.category, r.hard) for r in rep.recipients] == [("xxxx@yyyyyy.net", "mailbox_full", False)]


def test_flufl_recipients(flufl):
    assert _pct(flufl, "recipient") >= 98.0, bounce_accuracy.table("flufl", flufl)


def test_flufl_delay_vs_bounce(flufl):
    assert _pct(flufl, "kind") >= 95.0, bounce_accuracy.table("flufl", flufl)


def test_arf_fields_all_exact(arf):
    bad = [f for f in arf.failures]
    assert all(t.pct == 100.0 for t in arf.fields.values()), bad
    assert sum(t.total for t in arf.fields.values()) > 200   # really compared the fields


OUR_ID = "0192a3b4c5d6e7f80123456789abcdef"


def _dsn(original_headers: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.net\nTo: bounces@example.com\nSubject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n"
        "--B\nContent-Type: text/plain\n\nI'm sorry.\n\n<u@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1 "
        "<u@example.net>: Recipient address rejected: User unknown (in reply to RCPT TO command)\n\n"
        "--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n"
        "Final-Recipient: rfc822; u@example.net\nAction: failed\nStatus: 5.1.1\nRemote-MTA: dns; mx.example.net\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <u@example.net>: Recipient address rejected: User\n unknown\n\n"
        "--B\nContent-Type: text/rfc822-headers\n\n" + original_headers + "\n--B--\n").encode()


def test_our_message_id_from_received():
    hdrs = (f"Received: from helo.example ([192.0.2.9])\n\tby out1.example.com (mta) with ESMTP id {OUR_ID}\n"
            f"\tfor <u@example.net>; Mon, 1 Jan 2024 00:00:00 +0000\nFrom: a@example.com\nTo: u@example.net\n")
    rep = parse_message(_dsn(hdrs).replace(b"\n", b"\r\n"))
    assert rep.kind == "bounce" and rep.family and rep.reporting_mta == "mx.example.net"
    (r,) = rep.recipients
    assert (r.recipient, r.status, r.reply_code, r.action, r.category, r.hard) == \
        ("u@example.net", "5.1.1", 550, "failed", "invalid_recipient", True)
    assert r.diagnostic.endswith("User unknown") and r.remote_mta == "mx.example.net"
    assert rep.message_id == OUR_ID
    assert rep.original_headers is not None and rep.original_headers["To"] == "u@example.net"


def test_our_message_id_from_x_mta_id():
    rep = parse_message(_dsn(f"X-Mta-Id: {OUR_ID}\nFrom: a@example.com\n"))
    assert rep.message_id == OUR_ID


@pytest.mark.parametrize("data", [b"", b"\x00\xff" * 500, b"From: x\n\n" + bytes(range(256)) * 20,
                                  b"Content-Type: multipart/report; boundary=\"\n\n--\n"])
def test_garbage_never_raises(data):
    rep = parse_message(data)
    assert rep.kind == "none" and rep.recipients == []


def test_cli(tmp_path):
    good = SISIMAI / "bsd" / "lhost-exim-02.eml"
    nob = SISIMAI / "not" / "is-not-bounce-01.eml"
    code = "import sys; from mta.feedback.bounce.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "parse", str(good), str(nob)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import orjson
    lines = [orjson.loads(l) for l in p.stdout.splitlines()]
    assert [l["recipient"] for l in lines] == ["kijitora@example.jp", "sabatora@example.jp"]
    assert {l["file"] for l in lines} == {str(good)} and lines[0]["kind"] == "bounce"
    assert set(lines[0]) >= {"file", "recipient", "status", "reply_code", "category", "hard", "action", "kind",
                             "family", "feedback_type", "reporting_mta", "message_id"}
    p = subprocess.run([sys.executable, "-c", code, "parse", "-"], cwd=ROOT, input=good.read_text(),
                       capture_output=True, text=True)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2
    missing = tmp_path / "nope.eml"
    p = subprocess.run([sys.executable, "-c", code, "parse", str(missing)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and str(missing) in p.stderr and p.stdout == ""


def test_speed(classifier):
    import time
    data = (SISIMAI / "bsd" / "lhost-postfix-01.eml").read_bytes()
    parse_message(data, classifier)
    t = time.perf_counter()
    for _ in range(50):
        parse_message(data, classifier)
    assert (time.perf_counter() - t) / 50 < 0.01   # a typical bounce parses in about a millisecond


def test_general_layouts():
    # A bounce forwarded by a person: the inner, quoted bounce is what counts.
    fwd = (b"From: Person <p@example.com>\nTo: admin@example.com\nSubject: Fwd: Returned mail: see transcript\n\n"
           b"FYI\n\nBegin forwarded message:\n\n> From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\n"
           b"> To: <p@example.com>\n> Subject: Returned mail: see transcript for details\n"
           b"> Message-Id: <1@mx.example.net>\n>\n>    ----- The following addresses had permanent fatal errors -----\n"
           b"> <gone@example.net>\n>     (reason: 550 5.1.1 <gone@example.net>... User unknown)\n")
    rep = parse_message(fwd)
    assert rep.kind == "bounce" and [(r.recipient, r.hard) for r in rep.recipients] == [("gone@example.net", True)]
    # Old AOL: screen names without a domain, completed with the reporter's.
    aol = (b"From: Mail Delivery Subsystem <MAILER-DAEMON@aol.example>\nTo: list@example.com\nSubject: Mail Delivery Problem\n\n"
           b"Your mail to the following recipients could not be delivered because they are not accepting mail from "
           b"list@example.com:\n\tscreenname\n")
    assert [r.recipient for r in parse_message(aol).recipients] == ["screenname@aol.example"]
    # Exchange X.400 form.
    x400 = (b"From: System Administrator <postmaster@corp.example>\nSubject: Undeliverable: hello\n\n"
            b"Your message\n  To:      list@example.com\n  Subject: hello\ndid not reach the following recipient(s):\n"
            b"c=US;a= ;p=CORP;o=Site;dda:SMTP=Someone@Corp.Example; on Fri, 4 Oct 2002 17:12:28 -0400\n"
            b"    The recipient name is not recognized\n")
    assert [r.recipient.lower() for r in parse_message(x400).recipients] == ["someone@corp.example"]
