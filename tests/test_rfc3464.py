"""Tests for mta/feedback/dsn_builder.py: every DSN is parsed back with the stdlib email parser
and checked field by field (RFC 3464, 3461, 6522, 6533)."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any

import pytest

from mta.feedback.dsn_builder import RecipientStatus, build_dsn, should_notify

ARRIVAL = 1_700_000_000.0
ORIGINAL = (b"Return-Path: <alice@example.org>\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@example.net\r\n"
            b"Subject: lunch\r\n"
            b"Message-ID: <m1@example.org>\r\n"
            b"\r\n"
            b"See you at noon.\r\n"
            b"--\r\n"
            b"Alice\r\n")
BODY = ORIGINAL[ORIGINAL.index(b"\r\n\r\n") + 4:]
HEADERS = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]

FAILED = RecipientStatus(
    address="bob@example.net", orcpt="rfc822;bob@example.net", action="failed", status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.net>: user unknown", remote_mta="mx1.example.net",
    last_attempt=ARRIVAL + 60, will_retry_until=None)
DELAYED = dataclasses.replace(
    FAILED, action="delayed", status="4.4.1", diagnostic="421 4.4.1 try later",
    will_retry_until=ARRIVAL + 5 * 86400)
DELIVERED = dataclasses.replace(FAILED, action="delivered", status="2.0.0",
                                diagnostic="250 2.0.0 Ok: queued as X1")


def _dsn(**kw: Any) -> bytes:
    args: dict[str, Any] = dict(
        reporting_mta="mta.example.org", original_envelope_id=None, sender="alice@example.org",
        recipients=[FAILED], original_content=ORIGINAL, ret=None, arrival_date=ARRIVAL,
        queue_id="0123456789abcdef")
    args.update(kw)
    return build_dsn(**args)


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(header block, body) of each top-level part, straight from the bytes."""
    boundary = _parse(raw).get_boundary()
    assert boundary, f"got no boundary in {raw[:400]!r}"
    chunks = raw.split(b"\r\n--" + boundary.encode())
    out = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n"), f"got {chunk[:20]!r} after a delimiter, want CRLF"
        head, sep, body = chunk[2:].partition(b"\r\n\r\n")
        assert sep, f"got a part without a blank line: {chunk[:200]!r}"
        out.append((head + b"\r\n", body))
    assert chunks[-1] == b"--\r\n", f"got {chunks[-1]!r} after the last delimiter, want '--' CRLF"
    return out


def _status(raw: bytes) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(per-message fields, [per-recipient fields]) of the delivery-status part."""
    part = list(_parse(raw).iter_parts())[1]
    if part.get_content_type() == "message/delivery-status":
        blocks = [{k: str(v) for k, v in b.items()} for b in part.get_payload()]
    else:   # message/global-delivery-status: the stdlib reads it as one message; split it
        body = _raw_parts(raw)[1][1]
        blocks = [{k: str(v) for k, v in _parse(b + b"\r\n").items()}
                  for b in body.split(b"\r\n\r\n")]
    return blocks[0], blocks[1:]


# --- structure -----------------------------------------------------------------------------


def test_multipart_report_structure() -> None:
    msg = _parse(_dsn())
    checks = [
        ("content type", msg.get_content_type(), "multipart/report"),
        ("report-type", msg.get_param("report-type"), "delivery-status"),
        ("part types", [p.get_content_type() for p in msg.iter_parts()],
         ["text/plain", "message/delivery-status", "message/rfc822"]),
        ("From", str(msg["From"]), "Mail Delivery System <MAILER-DAEMON@mta.example.org>"),
        ("To", str(msg["To"]), "alice@example.org"),
        ("Auto-Submitted", str(msg["Auto-Submitted"]), "auto-replied"),
        ("MIME-Version", str(msg["MIME-Version"]), "1.0"),
        ("In-Reply-To", str(msg["In-Reply-To"]), "<m1@example.org>"),
        ("8-bit", msg["Content-Transfer-Encoding"], None),
        ("defects", [str(d) for p in msg.walk() for d in p.defects], []),
    ]
    for what, got, want in checks:
        assert got == want, f"{what}: got {got!r}, want {want!r}"
    for name in ("Date", "Message-ID"):
        assert msg[name] is not None, f"{name}: got none, want one"
    assert str(msg["Message-ID"]).endswith("@mta.example.org>"), \
        f"Message-ID: got {msg['Message-ID']}, want one in the reporting MTA's domain"


@pytest.mark.parametrize("name, recipients, want", [
    ("failed", [FAILED], "Undelivered Mail Returned to Sender"),
    ("delayed", [DELAYED], "Delayed Mail (still being retried)"),
    ("delivered", [DELIVERED], "Successful Mail Delivery Report"),
    ("relayed", [dataclasses.replace(DELIVERED, action="relayed")], "Successful Mail Delivery Report"),
    ("expanded", [dataclasses.replace(DELIVERED, action="expanded")], "Successful Mail Delivery Report"),
    ("failed wins over delayed", [DELAYED, FAILED], "Undelivered Mail Returned to Sender"),
    ("delayed wins over delivered", [DELIVERED, DELAYED], "Delayed Mail (still being retried)"),
])
def test_subject_per_kind(name: str, recipients: list[RecipientStatus], want: str) -> None:
    got = str(_parse(_dsn(recipients=recipients))["Subject"])
    assert got == want, f"{name}: got {got!r}, want {want!r}"


def test_human_part_names_each_recipient_and_reply() -> None:
    other = dataclasses.replace(FAILED, address="carol@example.net", orcpt=None,
                                diagnostic="552 5.2.2 mailbox full", remote_mta="mx2.example.net")
    text = list(_parse(_dsn(recipients=[FAILED, other])).iter_parts())[0].get_content()
    unwrapped = re.sub(r"\s+", " ", text)
    for want in ("<bob@example.net>", "mx1.example.net said: 550 5.1.1 <bob@example.net>: user unknown",
                 "<carol@example.net>", "mx2.example.net said: 552 5.2.2 mailbox full"):
        assert want in unwrapped, f"got human part {text!r}, want it to contain {want!r}"


# --- delivery-status fields ----------------------------------------------------------------


@pytest.mark.parametrize("name, kw, want", [
    ("reporting MTA", {}, {"Reporting-MTA": "dns; mta.example.org",
                           "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
                           "X-Mta-Queue-ID": "0123456789abcdef"}),
    ("no ENVID, no Original-Envelope-Id", {}, {"Original-Envelope-Id": None}),
    ("ENVID", {"original_envelope_id": "QQ314159"}, {"Original-Envelope-Id": "QQ314159"}),
    ("ENVID decoded from xtext", {"original_envelope_id": "a+2Bb+3Dc"},
     {"Original-Envelope-Id": "a+b=c"}),
    ("ENVID with encoded CRLF stays one field", {"original_envelope_id": "x+0D+0AX-Evil:+201"},
     {"Original-Envelope-Id": "x??X-Evil: 1", "X-Evil": None}),
])
def test_per_message_fields(name: str, kw: dict[str, Any], want: dict[str, str | None]) -> None:
    fields, _ = _status(_dsn(**kw))
    for field, value in want.items():
        got = fields.get(field)
        assert got == value, f"{name}: {field}: got {got!r}, want {value!r}"


_R = FAILED


@pytest.mark.parametrize("name, rcpt, want", [
    ("failed", _R, {
        "Original-Recipient": "rfc822; bob@example.net", "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed", "Status": "5.1.1", "Remote-MTA": "dns; mx1.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: user unknown",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:14:20 +0000", "Will-Retry-Until": None}),
    ("ORCPT decoded from xtext", dataclasses.replace(_R, orcpt="rfc822;b+2Bo+3Db@example.net"),
     {"Original-Recipient": "rfc822; b+o=b@example.net"}),
    ("ORCPT of another type", dataclasses.replace(_R, orcpt="x400;c=us+3Ba=att"),
     {"Original-Recipient": "x400; c=us;a=att"}),
    ("no ORCPT", dataclasses.replace(_R, orcpt=None), {"Original-Recipient": None}),
    ("no remote MTA", dataclasses.replace(_R, remote_mta=None, diagnostic=None),
     {"Remote-MTA": None, "Diagnostic-Code": None}),
    ("no last attempt", dataclasses.replace(_R, last_attempt=None), {"Last-Attempt-Date": None}),
    ("local diagnostic", dataclasses.replace(_R, remote_mta=None, diagnostic="connection refused"),
     {"Diagnostic-Code": "x-mta; connection refused"}),
    ("multi-line reply joined", dataclasses.replace(
        _R, diagnostic="550-5.1.1 no such user\r\n550-5.1.1 check the address\r\n550 5.1.1 bye"),
     {"Diagnostic-Code": "smtp; 550-5.1.1 no such user 550-5.1.1 check the address 550 5.1.1 bye"}),
    ("reply cannot add a field", dataclasses.replace(_R, diagnostic="550 no\r\nX-Evil: 1\r\n"),
     {"Diagnostic-Code": "smtp; 550 no X-Evil: 1", "X-Evil": None}),
    ("8-bit reply in an ASCII report", dataclasses.replace(_R, diagnostic="550 nö"),
     {"Diagnostic-Code": "smtp; 550 n?"}),
    ("control octets masked", dataclasses.replace(_R, remote_mta="mx\x00.example\x1b.net"),
     {"Remote-MTA": "dns; mx?.example?.net"}),
    ("delayed", DELAYED, {"Action": "delayed", "Status": "4.4.1",
                          "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 +0000"}),
    ("Will-Retry-Until only for delayed", dataclasses.replace(DELIVERED, will_retry_until=ARRIVAL),
     {"Action": "delivered", "Will-Retry-Until": None}),
    ("expired with a temporary status", dataclasses.replace(_R, status="4.4.7"),
     {"Action": "failed", "Status": "4.4.7"}),
])
def test_recipient_fields(name: str, rcpt: RecipientStatus, want: dict[str, str | None]) -> None:
    _, groups = _status(_dsn(recipients=[rcpt]))
    assert len(groups) == 1, f"{name}: got {len(groups)} recipient groups, want 1"
    for field, value in want.items():
        got = groups[0].get(field)
        assert got == value, f"{name}: {field}: got {got!r}, want {value!r}"


def test_field_order_follows_rfc3464_abnf() -> None:
    fields, groups = _status(_dsn(original_envelope_id="E1", recipients=[DELAYED]))
    got = (list(fields), list(groups[0]))
    want = (["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Mta-Queue-ID"],
            ["Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
             "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"])
    assert got == want, f"got {got}, want {want}"


def test_three_recipients_only_the_failed_one_is_listed() -> None:
    # (status, NOTIFY as received): the caller picks the recipients with should_notify.
    outcome = [
        (dataclasses.replace(DELIVERED, address="a@example.net", orcpt=None), None),
        (dataclasses.replace(FAILED, address="b@example.net", orcpt=None), None),
        (dataclasses.replace(DELIVERED, address="c@example.net", orcpt=None), "FAILURE,DELAY"),
    ]
    chosen = [r for r, notify in outcome if should_notify(r.action, notify)]
    raw = _dsn(recipients=chosen)
    _, groups = _status(raw)
    got = [(g["Final-Recipient"], g["Action"]) for g in groups]
    want = [("rfc822; b@example.net", "failed")]
    assert got == want, f"got {got}, want {want}"
    text = list(_parse(raw).iter_parts())[0].get_content()
    for absent in ("a@example.net", "c@example.net"):
        assert absent not in text, f"got {absent} in the human part {text!r}, want only b@"


def test_delayed_dsn() -> None:
    raw = _dsn(recipients=[DELAYED])
    msg = _parse(raw)
    _, groups = _status(raw)
    checks = [
        ("Subject", str(msg["Subject"]), "Delayed Mail (still being retried)"),
        ("Action", groups[0]["Action"], "delayed"),
        ("Will-Retry-Until", groups[0].get("Will-Retry-Until"), "Sun, 19 Nov 2023 22:13:20 +0000"),
        ("Content-Description", str(list(msg.iter_parts())[2]["Content-Description"]),
         "Undelivered Message"),
    ]
    for what, got, want in checks:
        assert got == want, f"{what}: got {got!r}, want {want!r}"
    text = re.sub(r"\s+", " ", list(msg.iter_parts())[0].get_content())
    assert "retried until Sun, 19 Nov 2023" in text, f"got {text!r}, want the retry limit in it"


def test_utf8_recipient() -> None:
    rcpt = dataclasses.replace(FAILED, address="用户@例子.广告", orcpt="utf-8;\\x{7528}\\x{6237}@例子.广告",
                               diagnostic="550 5.1.1 用户不存在")
    raw = _dsn(recipients=[rcpt, DELIVERED])
    msg = _parse(raw)
    fields, groups = _status(raw)
    status_head = _raw_parts(raw)[1][0]
    checks = [
        ("status part type", list(msg.iter_parts())[1].get_content_type(),
         "message/global-delivery-status"),
        ("status part CTE", b"Content-Transfer-Encoding: 8bit\r\n" in status_head, True),
        ("outer CTE", msg["Content-Transfer-Encoding"], "8bit"),
        ("report-type", msg.get_param("report-type"), "delivery-status"),
        ("Reporting-MTA", fields["Reporting-MTA"], "dns; mta.example.org"),
        ("Final-Recipient", groups[0]["Final-Recipient"], "utf-8; 用户@例子.广告"),
        ("Original-Recipient", groups[0]["Original-Recipient"], "utf-8; 用户@例子.广告"),
        ("Diagnostic-Code", groups[0]["Diagnostic-Code"], "smtp; 550 5.1.1 用户不存在"),
        ("ASCII neighbour stays rfc822", groups[1]["Final-Recipient"], "rfc822; bob@example.net"),
    ]
    for what, got, want in checks:
        assert got == want, f"{what}: got {got!r}, want {want!r}"


# --- the returned original -----------------------------------------------------------------


_UTF8_HEADERS = "From: Jörg <jörg@example.de>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
_8BIT_BODY = b"From: a@example.org\r\nSubject: x\r\n\r\ncaf\xc3\xa9\r\n"
_LONG_LINE = b"From: a@example.org\r\n\r\n" + b"x" * 1200 + b"\r\n"


@pytest.mark.parametrize("name, content, kw, want_type, want_cte, want_body", [
    ("no RET: whole message", ORIGINAL, {}, "message/rfc822", None, ORIGINAL),
    ("RET=FULL: whole message", ORIGINAL, {"ret": "FULL"}, "message/rfc822", None, ORIGINAL),
    ("ret is case-blind", ORIGINAL, {"ret": "full"}, "message/rfc822", None, ORIGINAL),
    ("RET=HDRS: headers only", ORIGINAL, {"ret": "HDRS"}, "text/rfc822-headers", None, HEADERS),
    ("too large: headers only", ORIGINAL, {"max_returned": len(ORIGINAL) - 1},
     "text/rfc822-headers", None, HEADERS),
    ("exactly the limit: whole", ORIGINAL, {"max_returned": len(ORIGINAL)},
     "message/rfc822", None, ORIGINAL),
    ("bare LF normalised to CRLF", ORIGINAL.replace(b"\r\n", b"\n"), {}, "message/rfc822", None,
     ORIGINAL),
    ("no final line end", ORIGINAL[:-2], {}, "message/rfc822", None, ORIGINAL),
    ("8-bit body", _8BIT_BODY, {}, "message/rfc822", "8bit", _8BIT_BODY),
    ("UTF-8 headers", _UTF8_HEADERS, {}, "message/global", "8bit", _UTF8_HEADERS),
    ("UTF-8 headers, RET=HDRS", _UTF8_HEADERS, {"ret": "HDRS"}, "message/global-headers", "8bit",
     _UTF8_HEADERS[:_UTF8_HEADERS.index(b"\r\n\r\n") + 2]),
    ("line over 998 octets: headers only", _LONG_LINE, {}, "text/rfc822-headers", None,
     b"From: a@example.org\r\n"),
    ("delimiter-like lines stay content", ORIGINAL + b"--0123456789abcdef\r\n", {},
     "message/rfc822", None, ORIGINAL + b"--0123456789abcdef\r\n"),
])
def test_returned_original(name: str, content: bytes, kw: dict[str, Any], want_type: str,
                           want_cte: str | None, want_body: bytes) -> None:
    raw = _dsn(original_content=content, **kw)
    part = list(_parse(raw).iter_parts())[2]
    head, body = _raw_parts(raw)[2]
    cte = re.search(rb"(?im)^Content-Transfer-Encoding: (\S+)", head)
    checks = [
        ("type", part.get_content_type(), want_type),
        ("CTE", cte.group(1).decode() if cte else None, want_cte),
        ("bytes", body, want_body),
        ("part count", len(list(_parse(raw).iter_parts())), 3),
    ]
    for what, got, want in checks:
        assert got == want, f"{name}: {what}: got {got!r}, want {want!r}"


def test_full_original_parses_back_as_the_same_message() -> None:
    sub = list(_parse(_dsn(ret="FULL")).iter_parts())[2].get_content()
    want = _parse(ORIGINAL)
    for name in ("From", "To", "Subject", "Message-ID"):
        assert str(sub[name]) == str(want[name]), f"{name}: got {sub[name]}, want {want[name]}"
    got_body = sub.get_content().replace("\r\n", "\n")
    assert got_body == BODY.decode().replace("\r\n", "\n"), f"body: got {got_body!r}, want {BODY!r}"


def test_headers_only_cut_at_a_whole_field() -> None:
    raw = _dsn(ret="HDRS", max_returned=len(b"Return-Path: <alice@example.org>\r\n") + 5)
    got = _raw_parts(raw)[2][1]
    want = b"Return-Path: <alice@example.org>\r\n"
    assert got == want, f"got {got!r}, want {want!r}"


# --- line discipline -----------------------------------------------------------------------


_HUGE = dataclasses.replace(
    FAILED, address="x" * 1500 + "@example.net", diagnostic="550 " + "y" * 3000 + " " + "z " * 900,
    remote_mta="m" * 1200)


@pytest.mark.parametrize("name, kw", [
    ("plain", {}),
    ("huge recipient fields", {"recipients": [_HUGE]}),
    ("huge UTF-8 diagnostic", {"recipients": [dataclasses.replace(
        FAILED, address="ü@example.net", diagnostic="550 " + "ü" * 2000)]}),
    ("long header in original, RET=HDRS", {"ret": "HDRS", "original_content":
                                           b"Subject: " + b"s" * 3000 + b"\r\n\r\nbody\r\n"}),
    ("long ENVID", {"original_envelope_id": "e" * 1500}),
    ("many recipients", {"recipients": [dataclasses.replace(FAILED, address=f"u{i}@example.net")
                                        for i in range(50)]}),
])
def test_lines_at_most_998_octets_and_crlf(name: str, kw: dict[str, Any]) -> None:
    raw = _dsn(**kw)
    assert raw.endswith(b"\r\n"), f"{name}: got {raw[-10:]!r} at the end, want CRLF"
    lines = raw[:-2].split(b"\r\n")
    for i, line in enumerate(lines):
        assert len(line) <= 998, f"{name}: line {i}: got {len(line)} octets, want <= 998"
        assert b"\r" not in line and b"\n" not in line, \
            f"{name}: line {i}: got a bare CR or LF in {line[:60]!r}, want CRLF only"
    assert len(_status(raw)[1]) == len(kw.get("recipients", [FAILED])), f"{name}: recipient groups"


def test_long_field_is_folded_and_unfolds_to_the_value() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
    raw = _dsn(recipients=[dataclasses.replace(FAILED, diagnostic=reply)])
    head = _raw_parts(raw)[1][1]
    m = re.search(rb"Diagnostic-Code:.*?\r\n(?=\S)", head, re.S)
    assert m, f"got no Diagnostic-Code in {head!r}"
    physical = m.group(0).split(b"\r\n")[:-1]
    assert len(physical) > 1 and all(len(p) <= 78 for p in physical), \
        f"got lines of {[len(p) for p in physical]} octets, want several of <= 78"
    got = _status(raw)[1][0]["Diagnostic-Code"]
    assert got == "smtp; " + reply, f"got {got!r}, want {'smtp; ' + reply!r}"


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw, want", [
    ("null sender", {"sender": ""}, "null sender"),
    ("null sender in brackets", {"sender": "<>"}, "null sender"),
    ("sender with CRLF", {"sender": "a@example.org\r\nBcc: x@example.com"}, "return path"),
    ("no recipients", {"recipients": []}, "at least one recipient"),
    ("unknown action", {"recipients": [dataclasses.replace(FAILED, action="bounced")]}, "action"),
    ("malformed status", {"recipients": [dataclasses.replace(FAILED, status="5.1")]}, "status"),
    ("status class for action", {"recipients": [dataclasses.replace(DELIVERED, status="5.0.0")]},
     "status"),
    ("delayed with 5.x.x", {"recipients": [dataclasses.replace(DELAYED, status="5.4.1")]}, "status"),
    ("bad RET", {"ret": "BODY"}, "RET"),
    ("reporting MTA not a host name", {"reporting_mta": "mta.example.org\r\nX: y"}, "host name"),
])
def test_refused(name: str, kw: dict[str, Any], want: str) -> None:
    with pytest.raises(ValueError) as e:
        _dsn(**kw)
    assert want in str(e.value), f"{name}: got {e.value}, want a message about {want!r}"


# --- should_notify -------------------------------------------------------------------------


@pytest.mark.parametrize("notify, failed, delayed, delivered", [
    (None, True, True, False),
    ("NEVER", False, False, False),
    ("SUCCESS", False, False, True),
    ("FAILURE", True, False, False),
    ("DELAY", False, True, False),
    ("SUCCESS,FAILURE", True, False, True),
    ("FAILURE,DELAY", True, True, False),
    ("SUCCESS,DELAY", False, True, True),
    ("SUCCESS,FAILURE,DELAY", True, True, True),
    ("delay, failure", True, True, False),
])
def test_should_notify(notify: str | None, failed: bool, delayed: bool, delivered: bool) -> None:
    for kind, want in (("failed", failed), ("delayed", delayed), ("delivered", delivered),
                       ("relayed", delivered), ("expanded", delivered)):
        got = should_notify(kind, notify)
        assert got == want, f"should_notify({kind!r}, {notify!r}): got {got}, want {want}"


@pytest.mark.parametrize("kind, notify", [
    ("failed", "NEVER,FAILURE"),   # RFC 3461 4.1: NEVER stands alone
    ("failed", ""),
    ("failed", "FAILURE,,DELAY"),
    ("failed", "BOUNCE"),
    ("bounced", None),
])
def test_should_notify_refuses(kind: str, notify: str | None) -> None:
    with pytest.raises(ValueError):
        should_notify(kind, notify)
