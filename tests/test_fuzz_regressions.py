"""Findings of the fuzz targets (tests/fuzz/, docs/fuzzing.md), one test each.

Each input is the fuzzer's finding reduced by hand to the bytes that matter; the
docstring names the target and what it saw.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mta.feedback.bounce import parse_message
from mta.model.ids import new_id
from mta.spool import records as rec
from mta.spool.recovery import scan, segment_path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from v1_segment import v1_message


def _dsn(notice: bytes, status_tail: bytes = b"") -> bytes:
    """A one-recipient DSN (user@example.net, 5.1.1) around the part under test:
    `notice` is the human-readable part (its header fields and text), `status_tail`
    goes at the end of the delivery-status part."""
    return (b"From: MAILER-DAEMON@mx.example\r\nTo: bounces@sender.example\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
            b"--B\r\n" + notice +
            b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
            b"Final-Recipient: rfc822; user@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n" + status_tail + b"--B--\r\n")


def test_feedback_report_with_8bit_content_type_is_read():
    """bounce_parser: an 8-bit byte in the report's Content-Type made email return a
    Header object, `.lower()` raised AttributeError in arf.find_feedback, and the
    complaint came out as kind "none" (the exception was swallowed)."""
    data = (b"From: fbl@isp.example\r\nTo: fbl@bounce.example\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=feedback-report; boundary=\"B\"; x-note=\"caf\xc3\xa9\"\r\n"
            b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
            b"Original-Rcpt-To: user@example.net\r\n"
            b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@sender.example\r\nTo: user@example.net\r\n"
            b"\r\n--B--\r\n")
    report = parse_message(data)
    assert report.kind == "feedback", f"got kind {report.kind!r}, want the complaint read"
    assert report.feedback.feedback_type == "abuse"


def test_dsn_with_nul_in_charset_is_read():
    """bounce_parser: a NUL inside a part's charset made bytes.decode raise ValueError
    ("embedded null character", not a LookupError) in mime._decode; the whole DSN
    came out as kind "none"."""
    data = _dsn(b"Content-Type: text/plain; charset=\"utf\x00-8\"\r\n\r\nI could not deliver your mail.\r\n")
    report = parse_message(data)
    assert report.kind == "bounce", f"got kind {report.kind!r}, want the DSN read"
    assert [r.recipient for r in report.recipients] == ["user@example.net"]


def test_dsn_with_8bit_content_disposition_is_read():
    """bounce_parser: the same Header-object failure as above, in mime.text_parts,
    for an 8-bit byte in a text part's Content-Disposition (a filename)."""
    data = _dsn(b"Content-Type: text/plain\r\nContent-Disposition: inline; filename=\"caf\xc3\xa9.txt\"\r\n"
                b"\r\nI could not deliver your mail.\r\n")
    report = parse_message(data)
    assert report.kind == "bounce", f"got kind {report.kind!r}, want the DSN read"
    assert [r.recipient for r in report.recipients] == ["user@example.net"]


def test_feedback_report_with_nul_in_charset_is_read():
    """bounce_parser: the report part's fields carry a charset with a NUL and an 8-bit
    byte follows: email's as_string() raises, and the fallback in mime.raw_text called
    get_payload(), which decodes with that charset and raises ValueError as well."""
    data = (b"From: fbl@isp.example\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=feedback-report; boundary=\"B\"\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
            b"--B\r\nContent-Type: message/feedback-report\r\n\r\n"
            b"Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
            b"Original-Rcpt-To: user@example.net\r\n"
            b"Content-Type: text/plain; charset=\"iso-\x002022-jp\"\r\n\r\nd\xe9tails\r\n--B--\r\n")
    report = parse_message(data)
    assert report.kind == "feedback", f"got kind {report.kind!r}, want the complaint read"
    assert report.feedback.original_rcpt_to == "user@example.net"


def test_dsn_field_group_with_nul_in_charset_is_read():
    """bounce_parser (second 5-minute run): the same NUL charset inside a delivery-status
    field group that has a body (a line that is not a field ends its header block):
    dsn.fields_text (then _fields_text) called get_payload(), which raised ValueError."""
    data = _dsn(b"Content-Type: text/plain\r\n\r\nI could not deliver your mail.\r\n",
                b"Content-Type: text/plain; charset=\"utf\x00-8\"\r\nno such \xe9user\r\n")
    report = parse_message(data)
    assert report.kind == "bounce", f"got kind {report.kind!r}, want the DSN read"
    assert [r.recipient for r in report.recipients] == ["user@example.net"]


def test_v1_segment_damaged_length_does_not_resync_into_content(tmp_path):
    """spool_recovery: in a version 1 segment (no nonce) a damaged record's length
    field, which the CRC does not cover, is trusted as the place to go on when a
    valid record is there, and that can be one crafted inside the damaged record's
    own content: the crafted message is queued."""
    crafted_id, carrier_id, after_id = new_id(), new_id(), new_id()
    crafted = v1_message(crafted_id, b"Subject: crafted\r\n\r\nnot ours\r\n")
    carrier = bytearray(v1_message(carrier_id, b"Subject: carrier\r\n\r\n" + crafted + b"\r\n"))
    inside = carrier.index(crafted)
    rec.HEADER_V1.pack_into(carrier, 0, rec.MAGIC, rec.V1, rec.RecordType.MESSAGE, 0, inside,
                            rec.HEADER_V1.unpack_from(carrier, 0)[5])   # one damaged field: total_len
    with open(segment_path(str(tmp_path), 1), "wb") as f:
        f.write(bytes(carrier) + v1_message(after_id, b"Subject: after\r\n\r\nx\r\n"))
    found = scan(str(tmp_path))
    assert crafted_id not in found.messages, "a record crafted inside message content was queued"
    assert carrier_id not in found.messages, "the damaged record was queued"
