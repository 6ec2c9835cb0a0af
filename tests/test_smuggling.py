"""SMTP smuggling (CVE-2023-51764/5/6): every end-of-data sequence of the public tools.

Rows come from tests/data/smtp-smuggling/sequences.tsv. Each row runs on a
real daemon in both bare_newline modes, the way the SEC Consult scanner does
it: a message line, then SEQ, then a complete second transaction ("MAIL
FROM:<smuggled@...>" ... "Smuggled: yes"), then a proper <CRLF>.<CRLF> and
QUIT, all in one write. Checked after the daemon stops, on the replies, the
Reception/Rejection log records and the spool itself:

- SEQ is not a terminator (RFC 5321 4.1.1.4): the smuggled MAIL is never
  answered, at most one message exists, and either the message is refused 550
  5.6.0 (reject mode, bare CR/LF present) or it is stored with the smuggled
  lines as content and without any bare CR or bare LF (normalize mode; NUL
  octets are kept as content).
- SEQ holds a valid <CRLF>.<CRLF>: the data ends exactly there. What follows is
  then really the client's next command: a line starting with NUL is a syntax
  error and never runs; otherwise the second transaction is a legitimate
  pipelined one and is accepted as such (the only case with two messages, and
  its content is just "Smuggled: yes" and the empty line before the dot).
"""
from __future__ import annotations

import csv
import re

import pytest

from conftest import corpus, smtp_exchange
from mta.model.replies import REPLIES, reply
from mta.spool import records as rec

ROWS = list(csv.DictReader((corpus("smtp-smuggling") / "sequences.tsv").open(newline=""),
                           delimiter="\t"))

COMMANDS = (b"EHLO client.example\r\nMAIL FROM:<sender@example.org>\r\n"
            b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n")
BODY = b"Subject: t\r\n\r\nline\r\n"
SMUGGLED_MAIL = b"MAIL FROM:<smuggled@evil.example>\r\n"
SMUGGLED = SMUGGLED_MAIL + b"RCPT TO:<victim@x.example>\r\nDATA\r\nSmuggled: yes\r\n"
END = b"\r\n.\r\n"
SENDER_OK = REPLIES["SENDER_OK"].line()
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")   # a CR not before LF, or an LF not after CR


def _valid_end(row: dict) -> bool:
    handling = row["correct_receiver_handling_rfc5321"]
    return handling.startswith("END OF DATA") or "Contains a VALID CRLF.CRLF" in handling


def _normalized(content: bytes) -> bytes:
    """bare LF -> CRLF, bare CR -> SP (what normalize mode stores; no dot lines here)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", re.sub(rb"\r(?!\n)", b" ", content))


def _stored_contents(daemon) -> list[bytes]:
    """Every spooled message's content without our Received header (daemon stopped)."""
    found = daemon.spooled()
    out = []
    for loc in found.messages.values():
        seg = (daemon.spool_dir / f"{loc.segment:08d}.seg").read_bytes()
        _, _, start = rec.parse_message(seg, loc.offset, loc.length)
        content = seg[start:loc.offset + loc.length]
        assert content.startswith(b"Received: "), f"no trace header: {content[:80]!r}"
        trace_end = re.search(rb"\r\n(?![ \t])", content).end()
        out.append(content[trace_end:])
    return out


CASES = [pytest.param(row, mode, id=f"{row['sequence_escaped']} {mode}")
         for row in ROWS for mode in ("reject", "normalize")]


def test_corpus_shape():
    valid = [r["sequence_escaped"] for r in ROWS if _valid_end(r)]
    assert len(ROWS) == 18, f"got {len(ROWS)} rows, want 18"
    assert len(valid) == 4, f"rows with a valid terminator: got {valid}, want 4"


@pytest.mark.parametrize("row, mode", CASES)
def test_smuggling_sequence(daemon_factory, row, mode):
    seq = bytes.fromhex(row["hex"])
    d = daemon_factory(listener=f'bare_newline = "{mode}"\n')
    out = smtp_exchange(d.port, COMMANDS + BODY + seq + SMUGGLED + END + b"QUIT\r\n")
    assert d.stop() == 0, "daemon exit status"
    replies = out.split(b"\r\n")
    answered = out.count(SENDER_OK)
    contents = _stored_contents(d)
    receptions = d.log_records("Reception")
    assert len(receptions) == len(contents), \
        f"Reception records: got {len(receptions)}, want {len(contents)} (one per spooled message)"
    assert out.endswith(REPLIES["BYE"].line()), f"session did not end with QUIT: {out[-200:]!r}"

    if not _valid_end(row):
        assert answered == 1, f"'Sender OK' answers: got {answered}, want 1 (smuggled MAIL ran)"
        assert len(contents) <= 1, f"got {len(contents)} messages, want at most 1"
        after_data = replies[replies.index(REPLIES["DATA_GO"].line()[:-2]) + 1] + b"\r\n"
        bare = BARE.search(BODY + seq + SMUGGLED) is not None
        if mode == "reject" and bare:
            assert after_data == REPLIES["BARE_NEWLINE"].line(), \
                f"end of data: got {after_data!r}, want {REPLIES['BARE_NEWLINE'].line()!r}"
            assert contents == [], f"got {len(contents)} messages, want none"
            rejections = [(r["code"], r["status"], r["reason"]) for r in d.log_records("Rejection")]
            assert rejections == [(550, "5.6.0", "bare_newline")], \
                f"Rejection records: got {rejections}, want one bare_newline"
            return
        assert after_data.startswith(b"250 2.0.0 Ok: queued as "), \
            f"end of data: got {after_data!r}, want 250 queued"
        assert len(contents) == 1, f"got {len(contents)} messages, want 1"
        content = contents[0]
        assert SMUGGLED in content or _normalized(SMUGGLED) in content, \
            f"smuggled lines not kept as content: {content!r}"
        assert BARE.search(content) is None, f"bare CR or LF stored: {content!r}"
        if b"\x00" in seq:
            assert b"\x00" in content, f"NUL dropped from the content: {content!r}"
        return

    # a valid <CRLF>.<CRLF> inside SEQ: the data ends exactly there
    cut = seq.index(END) + 2
    first, rest = BODY + seq[:cut], seq[cut + 3:]
    bare = BARE.search(first) is not None
    want_contents = [] if (mode == "reject" and bare) else [_normalized(first)]
    if rest.startswith(b"\x00"):
        # "\x00MAIL FROM:..." is an unknown command, never a MAIL
        assert answered == 1, f"'Sender OK' answers: got {answered}, want 1 (NUL line ran)"
        assert REPLIES["UNKNOWN_COMMAND"].line() in out, f"NUL line not refused: {out!r}"
    else:
        # the client really ended the data and pipelined a second transaction
        assert answered == 2, f"'Sender OK' answers: got {answered}, want 2"
        want_contents.append(b"Smuggled: yes\r\n\r\n")   # END starts with an empty line
    assert sorted(contents) == sorted(want_contents), \
        f"stored: got {contents!r}, want {want_contents!r}"
    if mode == "reject" and bare:
        assert REPLIES["BARE_NEWLINE"].line() in out, f"no 550 for the bare CR: {out!r}"
    assert out.count(b"250 2.0.0 Ok: queued as ") == len(want_contents), \
        f"queued replies: got {out.count(b'250 2.0.0 Ok: queued as ')}, want {len(want_contents)}"


def test_queued_reply_prefix_matches_table():
    """The test above matches the 250 by prefix; keep that prefix tied to the table."""
    assert reply("QUEUED", "X").startswith(b"250 2.0.0 Ok: queued as "), reply("QUEUED", "X")
