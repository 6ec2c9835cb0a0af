"""Hostile returned mail: inputs shaped to find super-linear regexes and scans in mta.feedback.bounce.

Each shape is a function (size in bytes) -> a message of about that size. They
target what an attacker controls in mail to the bounce domain: HTML parts with
tags that never close, long runs of white space or separator characters next
to optional or repeated groups, thousands of addresses (one per line or all on
one line), DSNs with thousands of groups or endless continuation lines, deep
MIME nesting, many parts, huge header counts. Used by tests/test_bounce_linear.py
(no input of 1 MB takes more than a second) and by the daemon scenario.
"""
from __future__ import annotations

import os
from typing import Callable

# An operator rule no parser budget foresees: (a|aa)+$ backtracks exponentially on a
# long run of a's that does not end the text. Only the process boundary bounds it.
SLOW_RULE = '[[rule]]\nname = "slow"\ntext = [\'(a|aa)+$\']\ncategory = "policy"\n'


def dsn(diagnostic: str, original_body: str = "hello\r\n") -> bytes:
    """An RFC 3464 DSN for user@remote.test with this Diagnostic-Code, the original attached."""
    return (
        "From: MAILER-DAEMON@mx.remote.test\r\nTo: b-x@bounces.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\r\n\r\n'
        "--BB\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n"
        "--BB\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\n\r\n"
        "Final-Recipient: rfc822; user@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        "--BB\r\nContent-Type: message/rfc822\r\n\r\n"
        "Return-Path: <b-token@bounces.test>\r\nFrom: sender@example.com\r\nTo: user@remote.test\r\n"
        f"Subject: hi\r\n\r\n{original_body}\r\n--BB--\r\n").encode()


SLOW = dsn("550 " + "a" * 80 + "!")               # runs SLOW_RULE for ever


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (parser processes of a daemon or of this test)."""
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(p))
            except (OSError, ValueError):
                pass
    return out


def _bounce(body: str, *, ctype: str = "text/plain", subject: str = "Undelivered Mail Returned to Sender",
            extra: str = "") -> bytes:
    head = ("From: MAILER-DAEMON@mx.example.net\r\nTo: b-abc@bounces.example.com\r\n"
            f"Subject: {subject}\r\nMIME-Version: 1.0\r\n{extra}Content-Type: {ctype}\r\n\r\n")
    return (head + body).encode("utf-8", "surrogateescape")


def _fill(unit: str, size: int) -> str:
    return unit * max(1, size // len(unit))


def _report(human: str, status: str, *, html: bool = False) -> bytes:
    b = "==b1=="
    kind = "text/html" if html else "text/plain"
    body = (f"--{b}\r\nContent-Type: {kind}\r\n\r\n{human}\r\n"
            f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\n{status}\r\n--{b}--\r\n")
    return _bounce(body, ctype=f'multipart/report; report-type=delivery-status; boundary="{b}"')


def html_open_tags(size: int) -> bytes:
    return _bounce(_fill("<a href=x ", size), ctype="text/html")


def html_open_script(size: int) -> bytes:
    return _bounce(_fill("<script>x", size), ctype="text/html")


def html_many_tags(size: int) -> bytes:
    return _bounce(_fill("<p><b>user unknown</b></p><br>", size), ctype="text/html")


def html_open_break(size: int) -> bytes:
    return _bounce(_fill("<br ", size), ctype="text/html")


def spaces_line(size: int) -> bytes:
    return _bounce("Delivery failed.\r\n" + " " * size + "x\r\n")


def spaces_after_words(size: int) -> bytes:
    # "to", "for", "recipient", a code and a status each followed by a long blank run
    return _bounce("Delivery to the following recipient failed permanently:\r\n"
                   + _fill("to" + " \t" * 400 + ":" + " " * 400 + "\r\n", size))


def spaces_in_lines(size: int) -> bytes:
    return _bounce("This is the mail system.\r\n" + _fill(" \t" * 300 + "-" * 50 + " \t" * 300 + "\r\n", size))


def separator_run(size: int) -> bytes:
    return _bounce("Your message could not be delivered.\r\n" + "-" * size + "\r\n")


def code_runs(size: int) -> bytes:
    return _bounce("Delivery failed: user@example.org\r\n" + _fill("550 " + " " * 200 + "5.1.1" + ".1" * 100 + " ", size))


def dotted_numbers(size: int) -> bytes:
    return _bounce("failed: user@example.org said: " + _fill("5.5.5.", size))


def addresses_per_line(size: int) -> bytes:
    lines = "".join(f"user{i}@example.org\r\n" for i in range(size // 22))
    return _bounce("The following addresses had permanent fatal errors:\r\n" + lines)


def addresses_one_line(size: int) -> bytes:
    line = " ".join(f"<user{i}@example.org>:" for i in range(size // 24))
    return _bounce("Delivery to the following recipients failed:\r\n" + line + "\r\n")


def addresses_with_diagnostics(size: int) -> bytes:
    block = "<user{i}@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1 user unknown (in reply to RCPT TO command)\r\n"
    return _bounce("This is the mail system at host mx.example.net.\r\n\r\n"
                   + "".join(block.format(i=i) for i in range(size // len(block))))


def local_part_runs(size: int) -> bytes:
    return _bounce("undeliverable to " + _fill("a.", size // 2) + " " + _fill("a-", size // 2) + "@")


def domain_runs(size: int) -> bytes:
    return _bounce("undeliverable to user@" + _fill("a-a.", size))


def dsn_many_groups(size: int) -> bytes:
    group = "Final-Recipient: rfc822; user{i}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n" \
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
    status = "Reporting-MTA: dns; mx.example.net\r\n\r\n" + "".join(
        group.format(i=i) for i in range(size // len(group)))
    return _report("Delivery failed.", status)


def dsn_continuation(size: int) -> bytes:
    status = ("Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; user@example.org\r\n"
              "Action: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550\r\n" + _fill(" user unknown\r\n", size))
    return _report("Delivery failed.", status)


def dsn_repeated_diagnostic(size: int) -> bytes:
    status = ("Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; user@example.org\r\n"
              "Action: failed\r\nStatus: 5.1.1\r\n" + _fill("Diagnostic-Code: smtp; 550 user unknown\r\n", size))
    return _report("Delivery failed.", status)


def dsn_html_notice(size: int) -> bytes:
    status = "Final-Recipient: rfc822; user@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    return _report(_fill("<td ", size), status, html=True)


def deep_mime(size: int) -> bytes:
    depth = size // 60
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    return _bounce("--top\r\n" + head + "Content-Type: text/plain\r\n\r\nuser@example.org: 550 user unknown\r\n",
                   ctype='multipart/mixed; boundary="top"')


def nested_lines(size: int) -> bytes:
    # as deep as the loader allows, then short lines: each is checked against every boundary
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(7))
    return _bounce("--top\r\n" + head + "Content-Type: text/plain\r\n\r\nuser@example.org: 550 user unknown\r\n"
                   + "x\r\n" * (size // 3), ctype='multipart/mixed; boundary="top"')


def many_parts(size: int) -> bytes:
    part = "--p\r\nContent-Type: text/plain\r\n\r\nuser@example.org: 550 user unknown\r\n"
    return _bounce(_fill(part, size) + "--p--\r\n", ctype='multipart/mixed; boundary="p"')


def many_headers(size: int) -> bytes:
    extra = "".join(f"X-H{i}: v\r\n" for i in range(size // 12))
    return _bounce("user@example.org: 550 user unknown\r\n", extra=extra)


def many_received(size: int) -> bytes:
    extra = _fill("Received: from a by b (mta) with ESMTP id <x>\r\n", size)
    return _bounce("user@example.org: 550 user unknown\r\n", extra=extra)


def long_subject(size: int) -> bytes:
    return _bounce("user@example.org: 550 user unknown\r\n", subject=_fill("undeliverable ", size))


def inline_headers(size: int) -> bytes:
    return _bounce("Delivery failed for user@example.org\r\n\r\n" + _fill("X-A: 1\r\n X-B: 2\r\n", size))


def quoted_forward(size: int) -> bytes:
    return _bounce("---------- Forwarded message ----------\r\n" + _fill("> user@example.org: 550 user unknown\r\n", size),
                   subject="Fwd: Returned mail")


def ses_json(size: int) -> bytes:
    return _bounce('{"notificationType": "Bounce", "x": ' + "[" * (size // 2) + "]" * (size // 2) + "}")


def bare_local_list(size: int) -> bytes:
    return _bounce("Mail could not be delivered to the following recipients:\r\n" + _fill("   name\r\n", size))


def transcript(size: int) -> bytes:
    return _bounce("----- Transcript of session follows -----\r\n"
                   + _fill(">>> RCPT TO:<user@example.org>\r\n", size) + "<<< 550 user unknown\r\n")


def stage_words(size: int) -> bytes:
    return _bounce("user@example.org: 550 user unknown " + _fill("after     in reply to   ", size))


def arf_many_fields(size: int) -> bytes:
    b = "arf"
    fields = "Feedback-Type: abuse\r\nUser-Agent: x/1\r\nVersion: 1\r\n" + _fill("Original-Rcpt-To: a@example.org\r\n", size)
    body = (f"--{b}\r\nContent-Type: text/plain\r\n\r\ncomplaint\r\n--{b}\r\n"
            f"Content-Type: message/feedback-report\r\n\r\n{fields}\r\n--{b}--\r\n")
    return _bounce(body, ctype=f'multipart/report; report-type=feedback-report; boundary="{b}"')


def base64_garbage(size: int) -> bytes:
    return _bounce(_fill("////", size), extra="Content-Transfer-Encoding: base64\r\n")


SHAPES: dict[str, Callable[[int], bytes]] = {f.__name__: f for f in (
    html_open_tags, html_open_script, html_many_tags, html_open_break, spaces_line, spaces_after_words,
    spaces_in_lines, separator_run, code_runs, dotted_numbers, addresses_per_line, addresses_one_line,
    addresses_with_diagnostics, local_part_runs, domain_runs, dsn_many_groups, dsn_continuation,
    dsn_repeated_diagnostic, dsn_html_notice, deep_mime, nested_lines, many_parts, many_headers, many_received,
    long_subject, inline_headers, quoted_forward, ses_json, bare_local_list, transcript, stage_words,
    arf_many_fields, base64_garbage,
)}
