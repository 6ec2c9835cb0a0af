"""The bounce parser stays linear: no returned message of 1 MB or less costs more than a second.

Hostile shapes (tests/hostile_bounces.py) each took seconds to minutes before
the parser's regexes and scans were made linear or bounded (unclosed HTML tags,
blank runs beside optional groups, thousands of addresses, endless DSN
continuation lines, deep MIME nesting...). Time is CPU time of this process, so
other work on the machine does not count against the parser.
"""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hostile_bounces import SHAPES
from mta.feedback.bounce import Classifier, parse_message
from mta.feedback.bounce.report import MAX_RECIPIENTS

LIMIT = 1.0        # seconds of CPU per message, the bound
MB = 1_000_000

_classifier = Classifier()


def _cpu_seconds(data: bytes) -> float:
    started = time.process_time()
    parse_message(data, _classifier)
    return time.process_time() - started


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hostile_shape_of_1mb_parses_within_a_second(shape):
    data = SHAPES[shape](MB)[:MB]
    assert len(data) > MB * 0.9
    assert _cpu_seconds(data) < LIMIT, f"{shape}: {len(data)} bytes"


def test_cost_grows_linearly():
    # 10x the input must not cost much more than 10x the time (a quadratic scan costs 100x)
    for shape in ("addresses_per_line", "spaces_after_words", "dsn_continuation", "html_open_tags"):
        small = min(_cpu_seconds(SHAPES[shape](50_000)) for _ in range(3))
        large = _cpu_seconds(SHAPES[shape](500_000))
        assert large < max(small * 25, 0.05), (shape, small, large)


def test_recipients_are_bounded_per_report():
    rep = parse_message(SHAPES["addresses_per_line"](MB)[:MB], _classifier)
    assert rep.kind == "bounce" and len(rep.recipients) == MAX_RECIPIENTS
    rep = parse_message(SHAPES["dsn_many_groups"](MB)[:MB], _classifier)
    assert len(rep.recipients) == MAX_RECIPIENTS


def test_real_bounce_still_parsed_next_to_hostile_html():
    # the HTML fix must keep reading the notice: a real text and address survive unclosed tags
    data = SHAPES["html_open_tags"](200_000).replace(
        b"<a href=x ", b"<p>user@example.org: 550 5.1.1 user unknown</p><br>", 1)
    rep = parse_message(data, _classifier)
    assert [r.recipient for r in rep.recipients] == ["user@example.org"]
    assert rep.recipients[0].status == "5.1.1" and rep.recipients[0].hard


# Fragments an attacker combines: openers of every construct the parser looks for,
# blank and separator runs, addresses, codes, MIME and DSN field lines.
_FRAGMENTS = [
    "<", "<a ", "<script>", "<br", ">", " ", "\t", "\r\n", "\n", "-", "=", ">", ":", ";", ".", "@",
    "user@example.org", "<user@example.org>", "a.", "a-", "550 ", "5.1.1", "to ", "for: ", "RCPT TO:",
    "following recipients:\n", "   name\n", "Final-Recipient: rfc822; a@example.org\n",
    "Diagnostic-Code: smtp; 550\n", " continued\n", "Content-Type: multipart/mixed; boundary=x\n\n--x\n",
    "--x\n", "Received: from a by b (mta) with ESMTP id <1>\n", "> ", "original message", "delay",
    "=?utf-8?q?", "?=", '"', "(", "[", "after RCPT TO", "said:", "host mx.example.org ",
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_FRAGMENTS), st.integers(1, 60_000)), min_size=1, max_size=6),
       st.sampled_from(["text/plain", "text/html", "multipart/report; boundary=x",
                        "message/delivery-status"]))
def test_generated_hostile_messages_parse_within_a_second(pieces, ctype):
    body = "".join(frag * count for frag, count in pieces)[:MB - 300]
    data = (f"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n"
            f"Content-Type: {ctype}\r\n\r\n{body}").encode("utf-8")[:MB]
    assert _cpu_seconds(data) < LIMIT


def test_many_short_lines_under_deep_nesting_are_cut_after_the_notice():
    """1 MB of 3-byte lines under 8 boundaries costs the email package a check per line
    per boundary: the loader keeps MAX_LINE_CHECKS of them (mime._cut_lines). The notice
    before them is still read."""
    from mta.feedback.bounce import mime
    data = SHAPES["nested_lines"](MB)[:MB]
    msg = mime.load(data)
    kept = sum(len(p.get_payload()) for p in msg.walk() if not p.is_multipart())
    assert kept < MB // 2
    rep = parse_message(data, _classifier)
    assert [r.recipient for r in rep.recipients] == ["user@example.org"]
    assert mime._cut_lines(b"a\nb\nc\n", 2) == b"a\nb\n" and mime._cut_lines(b"a\nb", 5) == b"a\nb"
