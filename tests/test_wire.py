"""Tests for mta._native.wire.ServerCore: the SMTP server state machine without sockets.

Bytes go in through feed(), replies and events come out; every expected reply
is taken from mta.model.replies (the one reply table), never retyped. Covers command
syntax and sequence (RFC 5321 4.1, 4.3.2), paths (4.1.2), SIZE (RFC 1870), DSN
parameters (RFC 3461), PIPELINING (RFC 2920), CHUNKING (RFC 3030), transparency
(4.5.2), the per-session limits, and bare CR/LF handling in both modes (SMTP
smuggling). Two hypothesis properties: feeding a session in arbitrary pieces
changes nothing, and arbitrary bytes never make feed() raise.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta._native.wire import EV_CLOSE, EV_MESSAGE, EV_NONE, ServerCore
from mta.ingest.settings import server_settings
from mta.model.replies import REPLIES, ehlo_lines, reply

HOST = "mx.wire.test"
CLIENT = "client.example"
EHLO = b"EHLO " + CLIENT.encode() + b"\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
QUEUED = reply("QUEUED", "TESTID")   # the verdict resume() gets for a stored message


def want(name: str, *args: object) -> bytes:
    """The line the core sends for reply `name`: slots are our hostname unless given."""
    r = REPLIES[name]
    if not args and "{}" in r.text:
        args = (HOST,) * r.text.count("{}")
    return r.line(*args)


def new_core(relay: bool = True, **limits) -> ServerCore:
    return ServerCore(server_settings(HOST, "ESMTP wire test", **limits), relay)


def snapshot(t) -> dict:
    """A transaction's fields as plain values (the object dies at resume())."""
    return {"helo": t.helo, "esmtp": t.esmtp, "mail_from": t.mail_from,
            "size_hint": t.size_hint, "body_type": t.body_type, "smtputf8": t.smtputf8,
            "ret": t.ret, "envid": t.envid, "rcpts": list(t.rcpts), "data": bytes(t.data),
            "chunked": t.chunked}


def drive(core: ServerCore, chunks, verdict: bytes = QUEUED):
    """Feed `chunks` one by one, answering every EV_MESSAGE with `verdict` at once.

    Returns (all output, the event of every feed/resume call, snapshots of the
    messages handed over)."""
    out = bytearray()
    events: list[int] = []
    messages: list[dict] = []
    for chunk in chunks:
        o, ev = core.feed(chunk)
        out += o
        events.append(ev)
        while ev == EV_MESSAGE:
            messages.append(snapshot(core.transaction()))
            o, ev = core.resume(verdict)
            out += o
            events.append(ev)
    return bytes(out), events, messages


def session(*chunks: bytes, relay: bool = True, verdict: bytes = QUEUED, **limits):
    """A fresh core driven through `chunks`: (output after EHLO, events, messages)."""
    core = new_core(relay, **limits)
    out, events, messages = drive(core, [EHLO, *chunks], verdict)
    ehlo = ehlo_lines(HOST, CLIENT, limits.get("max_message_size", 50 << 20))
    assert out.startswith(ehlo), f"EHLO reply: got {out[:200]!r}, want {ehlo!r}"
    return out[len(ehlo):], events, messages


def lines(out: bytes) -> list[bytes]:
    return [ln + b"\r\n" for ln in out.split(b"\r\n") if ln]


# --- command syntax and sequence ----------------------------------------------------------

# (setup commands, the command, reply name). Setup replies are not checked here.
SEQUENCE_CASES = [
    pytest.param([], b"MAIL FROM:<a@b.example>", "NEED_HELO", id="MAIL before HELO"),
    pytest.param([], b"RCPT TO:<a@b.example>", "NEED_HELO", id="RCPT before HELO"),
    pytest.param([], b"DATA", "NEED_HELO", id="DATA before HELO"),
    pytest.param([], b"NOOP", "OK", id="NOOP before HELO"),
    pytest.param([], b"RSET", "RESET_OK", id="RSET before HELO"),
    pytest.param([b"RSET"], b"MAIL FROM:<a@b.example>", "NEED_HELO",
                 id="RSET before HELO does not count as HELO"),
    pytest.param([], b"HELO", "SYNTAX_HELO", id="HELO without a name"),
    pytest.param([], b"EHLO   ", "SYNTAX_HELO", id="EHLO with only spaces"),
    pytest.param([], b" HELO x", "UNKNOWN_COMMAND", id="leading space before the verb"),
    pytest.param([], b"", "UNKNOWN_COMMAND", id="empty line"),
    pytest.param([], b"FOO bar", "UNKNOWN_COMMAND", id="unknown verb"),
    pytest.param([], b"MAILFROM:<a@b.example>", "UNKNOWN_COMMAND", id="verb glued to argument"),
    pytest.param([], b"EXPN list", "NOT_IMPLEMENTED", id="EXPN"),
    pytest.param([], b"ETRN example.org", "NOT_IMPLEMENTED", id="ETRN"),
    pytest.param([], b"STARTTLS", "NOT_IMPLEMENTED", id="STARTTLS not offered yet"),
    pytest.param([], b"AUTH PLAIN AAAA", "NOT_IMPLEMENTED", id="AUTH not offered yet"),
    pytest.param([], b"VRFY", "SYNTAX_NOARGS", id="VRFY without argument"),
    pytest.param([], b"VRFY postmaster", "VRFY", id="VRFY"),
    pytest.param([], b"HELP", "HELP", id="HELP"),
    pytest.param([EHLO], b"RSET now", "SYNTAX_NOARGS", id="RSET with an argument"),
    pytest.param([EHLO], b"RCPT TO:<a@b.example>", "NEED_MAIL", id="RCPT without MAIL"),
    pytest.param([EHLO], b"DATA", "NEED_MAIL", id="DATA without MAIL"),
    pytest.param([EHLO, MAIL], b"DATA", "NEED_RCPT", id="DATA without RCPT"),
    pytest.param([EHLO, MAIL, RCPT], b"DATA now", "SYNTAX_NOARGS", id="DATA with an argument"),
    pytest.param([EHLO, MAIL], b"MAIL FROM:<a@b.example>", "NESTED_MAIL", id="nested MAIL"),
    pytest.param([EHLO, MAIL, RCPT], b"RSET", "RESET_OK", id="RSET in a transaction"),
    pytest.param([EHLO, MAIL, RCPT, b"RSET\r\n"], b"DATA", "NEED_MAIL", id="DATA after RSET"),
    pytest.param([EHLO, MAIL, RCPT, b"EHLO again\r\n"], b"DATA", "NEED_MAIL",
                 id="EHLO resets the transaction"),
    pytest.param([EHLO], b"MAIL TO:<a@b.example>", "SYNTAX_MAIL", id="MAIL without FROM:"),
    pytest.param([EHLO], b"MAIL FROM", "SYNTAX_MAIL", id="MAIL FROM without colon"),
    pytest.param([EHLO], b"MAIL FROM:", "SYNTAX_MAIL", id="MAIL FROM: without a path"),
    pytest.param([EHLO], b"MAIL FROM:a@b.example", "SYNTAX_MAIL", id="MAIL path without <>"),
    pytest.param([EHLO], b"MAIL FROM:<a@b.example", "SYNTAX_MAIL", id="MAIL path unterminated"),
    pytest.param([EHLO], b"MAIL FROM:<a@b.example>SIZE=1", "SYNTAX_MAIL",
                 id="MAIL parameter glued to the path"),
    pytest.param([EHLO, MAIL], b"RCPT FROM:<a@b.example>", "SYNTAX_RCPT", id="RCPT without TO:"),
    pytest.param([EHLO, MAIL], b"RCPT TO:", "SYNTAX_RCPT", id="RCPT TO: without a path"),
    pytest.param([EHLO], b"mail from:<a@b.example>", "SENDER_OK",
                 id="verbs are case-insensitive (RFC 5321 2.4)"),
    pytest.param([EHLO], b"MAIL FROM: <a@b.example>", "SENDER_OK",
                 id="space after the colon is tolerated"),
    pytest.param([], b"BDAT", "SYNTAX_BDAT", id="BDAT without a size"),
    pytest.param([], b"BDAT x LAST", "SYNTAX_BDAT", id="BDAT with a bad size"),
    pytest.param([], b"BDAT 10 FIRST", "SYNTAX_BDAT", id="BDAT with a bad keyword"),
]


@pytest.mark.parametrize("setup, command, name", SEQUENCE_CASES)
def test_command_replies(setup, command, name):
    core = new_core()
    drive(core, [s if s.endswith(b"\r\n") else s + b"\r\n" for s in setup])
    out, events, _ = drive(core, [command + b"\r\n"])
    assert out == want(name), f"{command!r}: got {out!r}, want {want(name)!r}"


@pytest.mark.parametrize("command, want_event", [
    pytest.param(b"QUIT", EV_CLOSE, id="QUIT closes"),
    # without a valid size the octets that follow cannot be skipped (RFC 3030 3)
    pytest.param(b"BDAT many", EV_CLOSE, id="BDAT syntax error closes"),
    pytest.param(b"NOOP", EV_NONE, id="NOOP keeps the session"),
])
def test_command_events(command, want_event):
    core = new_core()
    _, events, _ = drive(core, [command + b"\r\n"])
    assert events == [want_event], f"{command!r}: got events {events}, want [{want_event}]"
    if want_event == EV_CLOSE:
        got = core.feed(b"NOOP\r\n")
        assert got == (b"", EV_CLOSE), f"feed after close: got {got!r}, want (b'', EV_CLOSE)"


@pytest.mark.parametrize("command, want_out, want_helo, want_esmtp", [
    pytest.param(b"HELO client.example", reply("HELO_OK", HOST, CLIENT), CLIENT, False,
                 id="HELO"),
    pytest.param(b"EHLO client.example", ehlo_lines(HOST, CLIENT, 50 << 20), CLIENT, True,
                 id="EHLO lists the extensions"),
    pytest.param(b"EHLO client.example trailing words", ehlo_lines(HOST, CLIENT, 50 << 20),
                 CLIENT, True, id="EHLO keeps only the first word"),
    pytest.param(b"EHLO bad\x01\x7fname", ehlo_lines(HOST, "bad??name", 50 << 20), "bad??name",
                 True, id="EHLO name made printable before it is echoed"),
])
def test_helo(command, want_out, want_helo, want_esmtp):
    core = new_core()
    out, _, _ = drive(core, [command + b"\r\n"])
    assert out == want_out, f"got {out!r}, want {want_out!r}"
    _, _, msgs = drive(core, [MAIL, RCPT, b"DATA\r\nx\r\n.\r\n"])
    got = (msgs[0]["helo"], msgs[0]["esmtp"])
    assert got == (want_helo, want_esmtp), f"transaction helo/esmtp: got {got}, want " \
                                           f"{(want_helo, want_esmtp)}"


# --- MAIL and RCPT paths ------------------------------------------------------------------

# (path argument after "MAIL FROM:", reply name, stored reverse-path when accepted)
MAIL_PATH_CASES = [
    pytest.param(b"<>", "SENDER_OK", "", id="null sender"),
    pytest.param(b"<user@example.org>", "SENDER_OK", "user@example.org", id="plain"),
    pytest.param(b"<first.last+tag@sub.example.org>", "SENDER_OK",
                 "first.last+tag@sub.example.org", id="dots and plus"),
    pytest.param(b'<"john doe"@example.org>', "SENDER_OK", '"john doe"@example.org',
                 id="quoted local part"),
    pytest.param(b'<"a\\"b"@example.org>', "SENDER_OK", '"a\\"b"@example.org',
                 id="quoted-pair in the local part"),
    pytest.param(b"<user@[192.0.2.1]>", "SENDER_OK", "user@[192.0.2.1]", id="address literal"),
    pytest.param(b"<user@[IPv6:2001:db8::1]>", "SENDER_OK", "user@[IPv6:2001:db8::1]",
                 id="IPv6 address literal"),
    pytest.param(b"<@relay.example,@b.example:user@example.org>", "SENDER_OK",
                 "user@example.org", id="source route stripped (RFC 5321 C)"),
    pytest.param(b"<@[IPv6:2001:db8::2]:user@[IPv6:2001:db8::1]>", "SENDER_OK",
                 "user@[IPv6:2001:db8::1]", id="source route via an IPv6 literal stripped"),
    pytest.param(b"<user@[192.0.2.\xff]> SMTPUTF8", "BAD_SENDER", None,
                 id="8-bit octet in an address literal"),
    pytest.param(b"<" + b"v" * 100 + b"@example.org>", "SENDER_OK", "v" * 100 + "@example.org",
                 id="long VERP local part allowed"),
    pytest.param(b"<a>", "BAD_SENDER", None, id="no @"),
    pytest.param(b"<@>", "BAD_SENDER", None, id="lone @"),
    pytest.param(b"<@example.org>", "BAD_SENDER", None, id="empty local part"),
    pytest.param(b"<user@>", "BAD_SENDER", None, id="empty domain"),
    pytest.param(b"<a:@example.org>", "BAD_SENDER", None, id="empty local after source route"),
    pytest.param(b"< @example.org>", "BAD_SENDER", None, id="space as local part"),
    pytest.param(b"<user@ >", "BAD_SENDER", None, id="space as domain"),
    pytest.param(b"<us(er@example.org>", "BAD_SENDER", None, id="specials in the local part"),
    pytest.param(b"<user@exa..mple.org>", "BAD_SENDER", None, id="empty domain label"),
    pytest.param(b"<user@" + b"d" * 64 + b".example>", "BAD_SENDER", None,
                 id="domain label over 63 octets"),
    pytest.param(b"<user@exa!mple.org>", "BAD_SENDER", None, id="bad domain character"),
    pytest.param(b"<" + b"v" * 257 + b"@example.org>", "BAD_SENDER", None,
                 id="local part over 256 octets"),
    pytest.param(b'<"unterminated@example.org>', "SYNTAX_MAIL", None, id="open quote"),
    pytest.param(b"<user@[192.0.2.1>", "BAD_SENDER", None, id="unterminated address literal"),
    pytest.param("<jürgen@example.org>".encode(), "NEED_SMTPUTF8", None,
                 id="UTF-8 without SMTPUTF8"),
    pytest.param("<jürgen@bücher.example> SMTPUTF8".encode(), "SENDER_OK",
                 "jürgen@bücher.example", id="UTF-8 with SMTPUTF8 (RFC 6531)"),
    pytest.param(b"<j\xfc\xffrgen@example.org> SMTPUTF8", "BAD_SENDER", None,
                 id="invalid UTF-8 with SMTPUTF8"),
]


@pytest.mark.parametrize("path, name, stored", MAIL_PATH_CASES)
def test_mail_path(path, name, stored):
    out, _, msgs = session(b"MAIL FROM:" + path + b"\r\n", RCPT, b"DATA\r\nx\r\n.\r\n")
    first = lines(out)[0]
    assert first == want(name), f"MAIL FROM:{path!r}: got {first!r}, want {want(name)!r}"
    if stored is None:
        assert msgs == [], f"got {len(msgs)} messages after a refused MAIL, want none"
    else:
        assert msgs[0]["mail_from"] == stored, \
            f"reverse-path: got {msgs[0]['mail_from']!r}, want {stored!r}"


# (MAIL line, RCPT path argument after "RCPT TO:", reply name, stored forward-path)
RCPT_PATH_CASES = [
    pytest.param(MAIL, b"<user@example.net>", "RCPT_OK", "user@example.net", id="plain"),
    pytest.param(MAIL, b"<postmaster>", "RCPT_OK", "postmaster",
                 id="bare postmaster (RFC 5321 4.5.1)"),
    pytest.param(MAIL, b"<PostMaster>", "RCPT_OK", "postmaster", id="bare postmaster any case"),
    pytest.param(MAIL, b"<abuse>", "BAD_RECIPIENT", None, id="other bare local part"),
    pytest.param(MAIL, b"<>", "BAD_RECIPIENT", None, id="empty path"),
    pytest.param(MAIL, b"<@>", "BAD_RECIPIENT", None, id="lone @"),
    pytest.param(MAIL, b"<whatever:a@example.net>", "RCPT_OK", "a@example.net",
                 id="source route stripped"),
    pytest.param(MAIL, b"<a@>", "BAD_RECIPIENT", None, id="empty domain"),
    pytest.param(MAIL, "<müller@example.net>".encode(), "NEED_SMTPUTF8", None,
                 id="UTF-8 without SMTPUTF8 on MAIL"),
    pytest.param(b"MAIL FROM:<s@example.org> SMTPUTF8\r\n", "<müller@exämple.net>".encode(),
                 "RCPT_OK", "müller@exämple.net", id="UTF-8 with SMTPUTF8 on MAIL"),
]


@pytest.mark.parametrize("mail, path, name, stored", RCPT_PATH_CASES)
def test_rcpt_path(mail, path, name, stored):
    out, _, msgs = session(mail, b"RCPT TO:" + path + b"\r\n", RCPT, b"DATA\r\nx\r\n.\r\n")
    got = lines(out)[1]
    assert got == want(name), f"RCPT TO:{path!r}: got {got!r}, want {want(name)!r}"
    rcpts = [r[0] for r in msgs[0]["rcpts"]]
    want_rcpts = ([stored] if stored is not None else []) + ["rcpt@example.net"]
    assert rcpts == want_rcpts, f"recipients: got {rcpts}, want {want_rcpts}"


# --- MAIL and RCPT parameters (SIZE, BODY, SMTPUTF8, DSN) -----------------------------------

# (parameters after the MAIL path, reply name, transaction field, stored value)
MAIL_PARAM_CASES = [
    pytest.param(b" SIZE=1000", "SENDER_OK", "size_hint", 1000, id="SIZE"),
    pytest.param(b"", "SENDER_OK", "size_hint", -1, id="no SIZE"),
    pytest.param(b" SIZE=12k", "PARAM_BAD", None, None, id="SIZE not a number"),
    pytest.param(b" SIZE=", "PARAM_BAD", None, None, id="SIZE empty"),
    pytest.param(b" SIZE=" + b"9" * 19, "PARAM_BAD", None, None, id="SIZE absurdly long"),
    pytest.param(b" SIZE=52428801", "SIZE_TOO_BIG", None, None, id="SIZE over the limit"),
    pytest.param(b" SIZE=52428800", "SENDER_OK", "size_hint", 52428800, id="SIZE at the limit"),
    pytest.param(b" BODY=8BITMIME", "SENDER_OK", "body_type", "8BITMIME", id="BODY=8BITMIME"),
    pytest.param(b" body=7bit", "SENDER_OK", "body_type", "7BIT", id="BODY=7BIT any case"),
    pytest.param(b" BODY=BINARYMIME", "PARAM_UNKNOWN", None, None,
                 id="BODY=BINARYMIME not offered"),
    pytest.param(b" BODY=9BIT", "PARAM_BAD", None, None, id="BODY bad value"),
    pytest.param(b" SMTPUTF8", "SENDER_OK", "smtputf8", True, id="SMTPUTF8"),
    pytest.param(b" SMTPUTF8=yes", "PARAM_BAD", None, None, id="SMTPUTF8 with a value"),
    pytest.param(b" RET=FULL", "SENDER_OK", "ret", "FULL", id="RET=FULL"),
    pytest.param(b" RET=hdrs", "SENDER_OK", "ret", "HDRS", id="RET=HDRS any case"),
    pytest.param(b"", "SENDER_OK", "ret", None, id="no RET"),
    pytest.param(b" RET=ALL", "PARAM_BAD", None, None, id="RET bad value"),
    pytest.param(b" ENVID=QQ314159", "SENDER_OK", "envid", "QQ314159", id="ENVID"),
    pytest.param(b" ENVID=a+2Bb+3Dc", "SENDER_OK", "envid", "a+2Bb+3Dc",
                 id="ENVID with xtext escapes kept encoded"),
    pytest.param(b" ENVID=" + b"e" * 100, "SENDER_OK", "envid", "e" * 100, id="ENVID at 100"),
    pytest.param(b" ENVID=" + b"e" * 101, "PARAM_BAD", None, None, id="ENVID over 100"),
    pytest.param(b" ENVID=a+2", "PARAM_BAD", None, None, id="ENVID truncated escape"),
    pytest.param(b" ENVID=a+2b", "PARAM_BAD", None, None, id="ENVID lowercase hex"),
    pytest.param(b" ENVID=a=b", "PARAM_BAD", None, None, id="ENVID with '='"),
    pytest.param(b" ENVID=caf\xc3\xa9", "PARAM_BAD", None, None, id="ENVID non-ASCII"),
    pytest.param(b" AUTH=<>", "SENDER_OK", "mail_from", "sender@example.org",
                 id="AUTH= ignored (RFC 4954 5)"),
    pytest.param(b" FOO=1", "PARAM_UNKNOWN", None, None, id="unknown parameter"),
    pytest.param(b" OPT", "PARAM_UNKNOWN", None, None, id="unknown keyword"),
    pytest.param(b" NOTIFY=NEVER", "PARAM_UNKNOWN", None, None, id="RCPT parameter on MAIL"),
    pytest.param(b" RET=FULL RET=HDRS", "PARAM_REPEATED", None, None, id="RET twice"),
    pytest.param(b" =x", "PARAM_BAD", None, None, id="parameter without a keyword"),
    pytest.param(b"  SIZE=10   BODY=8BITMIME ", "SENDER_OK", "size_hint", 10,
                 id="extra spaces between parameters"),
]


@pytest.mark.parametrize("params, name, field, value", MAIL_PARAM_CASES)
def test_mail_parameters(params, name, field, value):
    out, _, msgs = session(b"MAIL FROM:<sender@example.org>" + params + b"\r\n", RCPT,
                           b"DATA\r\nx\r\n.\r\n")
    first = lines(out)[0]
    assert first == want(name), f"MAIL ...{params!r}: got {first!r}, want {want(name)!r}"
    if field is not None:
        assert msgs[0][field] == value, f"{field}: got {msgs[0][field]!r}, want {value!r}"
    else:
        assert msgs == [], f"got {len(msgs)} messages after a refused MAIL, want none"


# (parameters after the RCPT path, reply name, stored (notify, orcpt))
RCPT_PARAM_CASES = [
    pytest.param(b"", "RCPT_OK", (None, None), id="no DSN parameters"),
    pytest.param(b" NOTIFY=SUCCESS,FAILURE", "RCPT_OK", ("SUCCESS,FAILURE", None),
                 id="NOTIFY list"),
    pytest.param(b" NOTIFY=delay", "RCPT_OK", ("DELAY", None), id="NOTIFY any case"),
    pytest.param(b" NOTIFY=NEVER", "RCPT_OK", ("NEVER", None), id="NOTIFY=NEVER"),
    pytest.param(b" NOTIFY=NEVER,SUCCESS", "PARAM_BAD", None,
                 id="NEVER with others (RFC 3461 4.1)"),
    pytest.param(b" NOTIFY=SUCCESS,SUCCESS", "PARAM_BAD", None, id="NOTIFY repeated item"),
    pytest.param(b" NOTIFY=SUCCESS,,FAILURE", "PARAM_BAD", None, id="NOTIFY empty item"),
    pytest.param(b" NOTIFY=ALWAYS", "PARAM_BAD", None, id="NOTIFY unknown item"),
    pytest.param(b" NOTIFY=", "PARAM_BAD", None, id="NOTIFY empty"),
    pytest.param(b" ORCPT=rfc822;user@example.net", "RCPT_OK",
                 (None, "rfc822;user@example.net"), id="ORCPT"),
    pytest.param(b" ORCPT=rfc822;a+2Bb@example.net NOTIFY=FAILURE", "RCPT_OK",
                 ("FAILURE", "rfc822;a+2Bb@example.net"), id="ORCPT with xtext and NOTIFY"),
    pytest.param(b" ORCPT=user@example.net", "PARAM_BAD", None, id="ORCPT without addr-type"),
    pytest.param(b" ORCPT=;user@example.net", "PARAM_BAD", None, id="ORCPT empty addr-type"),
    pytest.param(b" ORCPT=rfc822;", "PARAM_BAD", None, id="ORCPT empty address"),
    pytest.param(b" ORCPT=rfc822;a+zzb@example.net", "PARAM_BAD", None,
                 id="ORCPT bad xtext escape"),
    pytest.param(b" ORCPT=rfc\x01822;a@example.net", "PARAM_BAD", None,
                 id="ORCPT control character in addr-type"),
    pytest.param(b" ORCPT=rfc(822);a@example.net", "PARAM_BAD", None,
                 id="ORCPT specials in addr-type (RFC 3461 4.2: atom)"),
    pytest.param(b" ORCPT=rfc\xc3\xa9;a@example.net", "PARAM_BAD", None,
                 id="ORCPT non-ASCII addr-type"),
    pytest.param(b" SIZE=3005", "PARAM_UNKNOWN", None, id="SIZE on RCPT"),
    pytest.param(b" BODY=8BITMIME", "PARAM_UNKNOWN", None, id="BODY on RCPT"),
    pytest.param(b" AUTH=WHATEVER", "PARAM_UNKNOWN", None, id="AUTH on RCPT"),
    pytest.param(b" NOTIFY=NEVER NOTIFY=NEVER", "PARAM_REPEATED", None, id="NOTIFY twice"),
]


@pytest.mark.parametrize("params, name, stored", RCPT_PARAM_CASES)
def test_rcpt_parameters(params, name, stored):
    out, _, msgs = session(MAIL, b"RCPT TO:<user@example.net>" + params + b"\r\n", RCPT,
                           b"DATA\r\nx\r\n.\r\n")
    got = lines(out)[1]
    assert got == want(name), f"RCPT ...{params!r}: got {got!r}, want {want(name)!r}"
    want_rcpts = ([("user@example.net", *stored)] if stored is not None else []) + \
        [("rcpt@example.net", None, None)]
    assert msgs[0]["rcpts"] == want_rcpts, f"rcpts: got {msgs[0]['rcpts']}, want {want_rcpts}"


# --- session limits -------------------------------------------------------------------------

def test_size_limit_at_mail_advertised_in_ehlo():
    out, _, _ = session(b"MAIL FROM:<a@b.example> SIZE=2049\r\n",
                        b"MAIL FROM:<a@b.example> SIZE=2048\r\n", max_message_size=2048)
    got = lines(out)
    assert got == [want("SIZE_TOO_BIG"), want("SENDER_OK")], \
        f"got {got}, want [SIZE_TOO_BIG, SENDER_OK]"


def test_max_recipients_gives_452_and_keeps_the_first():
    rcpts = [b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5)]
    out, _, msgs = session(MAIL, *rcpts, b"DATA\r\nx\r\n.\r\n", max_recipients=3, max_errors=2)
    got = lines(out)
    want_lines = [want("SENDER_OK")] + [want("RCPT_OK")] * 3 + [want("TOO_MANY_RCPTS")] * 2 + \
        [want("DATA_GO"), QUEUED]
    # 452 is a normal "try the rest later" answer, not an error: with max_errors=2 the
    # two 452s must not end the session
    assert got == want_lines, f"got {got}, want {want_lines}"
    stored = [r[0] for r in msgs[0]["rcpts"]]
    assert stored == ["r0@example.net", "r1@example.net", "r2@example.net"], \
        f"recipients: got {stored}, want the first three"


@pytest.mark.parametrize("errors, want_tail, want_event", [
    pytest.param([b"FOO\r\n"] * 2, [want("UNKNOWN_COMMAND")] * 2, EV_NONE, id="below the limit"),
    pytest.param([b"FOO\r\n"] * 3, [want("UNKNOWN_COMMAND")] * 2 + [want("TOO_MANY_ERRORS")],
                 EV_CLOSE, id="third error closes"),
    pytest.param([b"FOO\r\n", b"RCPT TO:<a@b.example>\r\n", b"MAIL FROM:<a>\r\n"],
                 [want("UNKNOWN_COMMAND"), want("NEED_MAIL"), want("TOO_MANY_ERRORS")], EV_CLOSE,
                 id="every kind of error counts"),
])
def test_max_errors(errors, want_tail, want_event):
    out, events, _ = session(*errors, max_errors=3)
    assert lines(out) == want_tail, f"got {lines(out)}, want {want_tail}"
    assert events[-1] == want_event, f"last event: got {events[-1]}, want {want_event}"


@pytest.mark.parametrize("commands, want_tail, want_event", [
    pytest.param([b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n"],
                 [want("OK"), want("RESET_OK"), want("VRFY")], EV_NONE, id="at the limit"),
    pytest.param([b"NOOP\r\n", b"HELP\r\n", b"NOOP\r\n", b"NOOP\r\n"],
                 [want("OK"), want("HELP"), want("OK"), want("TOO_MANY_COMMANDS")], EV_CLOSE,
                 id="one over the limit"),
    pytest.param([b"NOOP\r\n"] * 3 + [MAIL] + [b"NOOP\r\n"] * 3,
                 [want("OK")] * 3 + [want("SENDER_OK")] + [want("OK")] * 3, EV_NONE,
                 id="MAIL resets the count"),
])
def test_max_junk_commands(commands, want_tail, want_event):
    out, events, _ = session(*commands, max_junk_commands=3)
    assert lines(out) == want_tail, f"got {lines(out)}, want {want_tail}"
    assert events[-1] == want_event, f"last event: got {events[-1]}, want {want_event}"


@pytest.mark.parametrize("verdict, want_third", [
    pytest.param(QUEUED, want("TOO_MANY_MESSAGES"), id="accepted messages count"),
    pytest.param(reply("SPOOL_ERROR"), want("SENDER_OK"), id="refused messages do not count"),
])
def test_max_messages_per_session(verdict, want_third):
    one = MAIL + RCPT + b"DATA\r\nx\r\n.\r\n"
    out, events, msgs = session(one, one, MAIL, verdict=verdict, max_messages_per_session=2)
    got = lines(out)
    want_lines = [want("SENDER_OK"), want("RCPT_OK"), want("DATA_GO"), verdict] * 2 + [want_third]
    assert got == want_lines, f"got {got}, want {want_lines}"
    assert len(msgs) == 2, f"messages handed over: got {len(msgs)}, want 2"
    want_event = EV_CLOSE if want_third == want("TOO_MANY_MESSAGES") else EV_NONE
    assert events[-1] == want_event, f"last event: got {events[-1]}, want {want_event}"


@pytest.mark.parametrize("chunks, want_lines", [
    pytest.param([b"NOOP " + b"x" * 57 + b"\r\n"], [want("OK")], id="exactly the limit"),
    pytest.param([b"NOOP " + b"x" * 58 + b"\r\n", b"NOOP\r\n"],
                 [want("LINE_TOO_LONG"), want("OK")], id="one octet over"),
    pytest.param([b"NOOP " + b"x" * 30, b"x" * 30, b"x" * 30 + b"\r\nNOOP\r\n"],
                 [want("LINE_TOO_LONG"), want("OK")], id="over the limit across feeds"),
    pytest.param([b"x" * 100] * 50 + [b"\r\nNOOP\r\n"], [want("LINE_TOO_LONG"), want("OK")],
                 id="endless line answered once"),
    pytest.param([b"MAIL FROM:<" + b"a" * 100 + b"@b.example>\r\n"], [want("LINE_TOO_LONG")],
                 id="MAIL over the limit is not executed"),
])
def test_line_too_long(chunks, want_lines):
    out, _, _ = session(*chunks, max_line_length=64)
    assert lines(out) == want_lines, f"got {lines(out)}, want {want_lines}"


def test_relay_denied_is_logged_as_rejection():
    core = new_core(relay=False)
    out, _, msgs = drive(core, [EHLO, MAIL, b"RCPT TO:<victim@example.net>\r\n", b"DATA\r\n"])
    got = lines(out)[-3:]
    want_lines = [want("SENDER_OK"), want("RELAY_DENIED"), want("NEED_RCPT")]
    assert got == want_lines, f"got {got}, want {want_lines}"
    assert msgs == [], f"got {len(msgs)} messages, want none"
    want_rej = [("RELAY_DENIED", "sender@example.org", ["victim@example.net"])]
    assert core.rejections == want_rej, f"rejections: got {core.rejections}, want {want_rej}"


def test_relay_check_comes_after_syntax():
    """A malformed RCPT is a syntax error even from a non-relay client, not a relay denial."""
    core = new_core(relay=False)
    out, _, _ = drive(core, [EHLO, MAIL, b"RCPT TO:<a@>\r\n"])
    assert lines(out)[-1] == want("BAD_RECIPIENT"), \
        f"got {lines(out)[-1]!r}, want {want('BAD_RECIPIENT')!r}"
    assert core.rejections == [], f"rejections: got {core.rejections}, want none"


# --- PIPELINING, DATA and transparency ------------------------------------------------------

def test_pipelining_whole_session_in_one_feed():
    core = new_core()
    stream = (EHLO + MAIL + RCPT + b"RCPT TO:<second@example.net>\r\nDATA\r\n"
              b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    out, ev = core.feed(stream)
    want_out = (ehlo_lines(HOST, CLIENT, 50 << 20) + want("SENDER_OK") + want("RCPT_OK") * 2
                + want("DATA_GO"))
    assert (out, ev) == (want_out, EV_MESSAGE), f"got {(out, ev)}, want {(want_out, EV_MESSAGE)}"
    # pipelined commands after the data wait until the spool's verdict is sent
    out, ev = core.feed(b"NOOP\r\n")
    assert (out, ev) == (b"", EV_NONE), f"feed while pending: got {(out, ev)}, want (b'', 0)"
    assert bytes(core.transaction().data) == b"Subject: x\r\n\r\nbody\r\n"
    out, ev = core.resume(QUEUED)
    want_out = QUEUED + want("BYE")
    assert (out, ev) == (want_out, EV_CLOSE), f"got {(out, ev)}, want {(want_out, EV_CLOSE)}"


# (octets between the 354 and the final ".\r\n", stored content)
@pytest.mark.parametrize("content, want_data", [
    pytest.param(b"..leading dot\r\n", b".leading dot\r\n", id="stuffed dot removed"),
    pytest.param(b"...\r\n", b"..\r\n", id="only the first dot removed"),
    pytest.param(b"..\r\n", b".\r\n", id="stuffed lone dot"),
    pytest.param(b"a.b\r\n.x\r\n", b"a.b\r\nx\r\n", id="dot inside a line kept"),
    pytest.param(b"", b"", id="empty message"),
    pytest.param(b"\r\n", b"\r\n", id="one empty line"),
    pytest.param(b"line\r\n\r\n", b"line\r\n\r\n", id="empty last line"),
    pytest.param(b"a\x00b\r\n", b"a\x00b\r\n", id="NUL kept as content"),
    pytest.param("ü 8bit\r\n".encode(), "ü 8bit\r\n".encode(), id="8-bit content"),
])
def test_dot_unstuffing(content, want_data):
    _, _, msgs = session(MAIL, RCPT, b"DATA\r\n" + content + b".\r\n")
    assert msgs and msgs[0]["data"] == want_data, \
        f"got {msgs[0]['data'] if msgs else None!r}, want {want_data!r}"


@pytest.mark.parametrize("body_len, want_reply", [
    pytest.param(100, "QUEUED", id="exactly the limit"),
    pytest.param(101, "SIZE_TOO_BIG", id="one octet over"),
    pytest.param(100_000, "SIZE_TOO_BIG", id="far over"),
])
def test_data_size_limit(body_len, want_reply):
    body = b"x" * (body_len - 2) + b"\r\n"
    core = new_core(max_message_size=100)
    out, _, msgs = drive(core, [EHLO, MAIL, RCPT, b"DATA\r\n"])
    # nothing is answered before the end of data (RFC 1870 6.1: the 552 follows the dot)
    out, _, msgs = drive(core, [body[i:i + 4096] for i in range(0, len(body), 4096)])
    assert out == b"", f"reply before end of data: got {out!r}, want none"
    out, _, msgs = drive(core, [b".\r\nNOOP\r\n"])
    want_first = QUEUED if want_reply == "QUEUED" else want(want_reply)
    assert lines(out) == [want_first, want("OK")], f"got {lines(out)}, want [{want_first!r}, OK]"
    if want_reply == "QUEUED":
        assert msgs[0]["data"] == body, f"stored {len(msgs[0]['data'])} octets, want {body_len}"
    else:
        assert msgs == [], f"got {len(msgs)} messages, want none"
        want_rej = [("SIZE_TOO_BIG", "sender@example.org", ["rcpt@example.net"])]
        assert core.rejections == want_rej, f"rejections: got {core.rejections}, want {want_rej}"


# --- bare CR / bare LF ------------------------------------------------------------------------

# (content before the terminator, stored content in normalize mode)
BARE_CASES = [
    pytest.param(b"a\nb\r\n", b"a\r\nb\r\n", id="bare LF"),
    pytest.param(b"a\rb\r\n", b"a b\r\n", id="bare CR"),
    pytest.param(b"a\r\r\n", b"a \r\n", id="CR CR LF"),
    pytest.param(b"a\n\r\n", b"a\r\n\r\n", id="LF CR LF"),
    pytest.param(b"a\r\n.\n", b"a\r\n.\r\n", id="dot bare LF is not the end"),
    pytest.param(b"a\n.\r\n", b"a\r\n.\r\n", id="bare LF dot CRLF is not the end"),
    pytest.param(b"a\r\n.\rX\r\n", b"a\r\n X\r\n", id="dot bare CR is not the end"),
    pytest.param(b"a\r\n.\r\r\n", b"a\r\n \r\n", id="dot CR CR LF is not the end"),
    pytest.param(b"a\r", b"a ", id="bare CR just before the terminator"),
]


@pytest.mark.parametrize("content, normalized", BARE_CASES)
def test_bare_newline_in_data_rejected(content, normalized):
    core = new_core(bare_newline="reject")
    drive(core, [EHLO, MAIL, RCPT])
    out, _, msgs = drive(core, [b"DATA\r\n" + content + b"\r\n.\r\nNOOP\r\n"])
    want_lines = [want("DATA_GO"), want("BARE_NEWLINE"), want("OK")]
    assert lines(out) == want_lines, f"got {lines(out)}, want {want_lines}"
    assert msgs == [], f"got {len(msgs)} messages, want none"
    want_rej = [("BARE_NEWLINE", "sender@example.org", ["rcpt@example.net"])]
    assert core.rejections == want_rej, f"rejections: got {core.rejections}, want {want_rej}"


@pytest.mark.parametrize("content, normalized", BARE_CASES)
def test_bare_newline_in_data_normalized(content, normalized):
    out, _, msgs = session(MAIL, RCPT, b"DATA\r\n" + content + b"\r\n.\r\n",
                           bare_newline="normalize")
    assert lines(out)[-1] == QUEUED, f"got {lines(out)[-1]!r}, want {QUEUED!r}"
    want_data = normalized + b"\r\n"
    assert msgs[0]["data"] == want_data, f"got {msgs[0]['data']!r}, want {want_data!r}"


@pytest.mark.parametrize("mode, want_lines", [
    pytest.param("reject", [want("BARE_LF_COMMAND"), want("OK")], id="reject"),
    pytest.param("normalize", [want("OK"), want("OK")], id="normalize"),
])
def test_bare_lf_command(mode, want_lines):
    out, _, _ = session(b"NOOP\n", b"NOOP\r\n", bare_newline=mode)
    assert lines(out) == want_lines, f"got {lines(out)}, want {want_lines}"


# --- BDAT (RFC 3030) ---------------------------------------------------------------------------

def chunk(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


@pytest.mark.parametrize("chunks, want_lines, want_data", [
    pytest.param([chunk(b"hello "), chunk(b"world\r\n", last=True)],
                 [reply("CHUNK_OK", 6), QUEUED], b"hello world\r\n", id="two chunks"),
    pytest.param([chunk(b"all\r\n", last=True)], [QUEUED], b"all\r\n", id="one LAST chunk"),
    pytest.param([chunk(b"part\r\n"), b"BDAT 0 LAST\r\n"], [reply("CHUNK_OK", 6), QUEUED],
                 b"part\r\n", id="empty LAST chunk"),
    pytest.param([chunk(b".\r\n..x\r\n", last=True)], [QUEUED], b".\r\n..x\r\n",
                 id="no dot-stuffing or terminator in chunks"),
    pytest.param([chunk(b"a\r"), chunk(b"\nb\r\n", last=True)], [reply("CHUNK_OK", 2), QUEUED],
                 b"a\r\nb\r\n", id="CRLF split across chunks"),
    pytest.param([b"bdat 3 last\r\nabc"], [QUEUED], b"abc", id="keywords any case"),
])
def test_bdat(chunks, want_lines, want_data):
    out, _, msgs = session(MAIL, RCPT, *chunks)
    got = lines(out)[2:]
    assert got == want_lines, f"got {got}, want {want_lines}"
    assert msgs[0]["data"] == want_data and msgs[0]["chunked"], \
        f"got {msgs[0]['data']!r} chunked={msgs[0]['chunked']}, want {want_data!r} chunked"


@pytest.mark.parametrize("setup", [
    pytest.param([], id="before HELO"),
    pytest.param([EHLO], id="without MAIL"),
    pytest.param([EHLO, MAIL], id="without RCPT"),
])
def test_bdat_without_transaction_discards_octets(setup):
    core = new_core()
    drive(core, setup)
    # the chunk's octets look like commands; they must be skipped, not run
    payload = b"MAIL FROM:<x@y.example>\r\nRCPT TO:<z@y.example>\r\n"
    out, _, msgs = drive(core, [b"BDAT %d\r\n" % len(payload) + payload[:20],
                                payload[20:] + b"NOOP\r\n"])
    assert lines(out) == [want("BDAT_DISCARDED"), want("OK")], \
        f"got {lines(out)}, want [BDAT_DISCARDED, OK]"
    out, _, msgs = drive(core, [b"BDAT 0 LAST\r\nNOOP\r\n"])
    assert lines(out) == [want("BDAT_DISCARDED"), want("OK")], \
        f"zero-size chunk: got {lines(out)}, want [BDAT_DISCARDED, OK]"
    assert msgs == [], f"got {len(msgs)} messages, want none"


def test_data_after_bdat_refused():
    out, _, msgs = session(MAIL, RCPT, chunk(b"abc"), b"DATA\r\n", chunk(b"def\r\n", last=True))
    want_lines = [want("SENDER_OK"), want("RCPT_OK"), reply("CHUNK_OK", 3),
                  want("DATA_AFTER_BDAT"), QUEUED]
    assert lines(out) == want_lines, f"got {lines(out)}, want {want_lines}"
    assert msgs[0]["data"] == b"abcdef\r\n", f"got {msgs[0]['data']!r}, want b'abcdef\\r\\n'"


@pytest.mark.parametrize("chunks, want_lines", [
    pytest.param([chunk(b"x" * 60), chunk(b"y" * 60, last=True), b"NOOP\r\n"],
                 [reply("CHUNK_OK", 60), want("SIZE_TOO_BIG"), want("OK")],
                 id="overflow in the LAST chunk"),
    pytest.param([chunk(b"x" * 150), chunk(b"y" * 10, last=True), b"NOOP\r\n"],
                 [want("SIZE_TOO_BIG"), want("BDAT_DISCARDED"), want("OK")],
                 id="overflow in a middle chunk ends the transaction"),
    pytest.param([chunk(b"x" * 100, last=True)], [QUEUED], id="exactly the limit"),
])
def test_bdat_size_limit(chunks, want_lines):
    core = new_core(max_message_size=100)
    drive(core, [EHLO, MAIL, RCPT])
    out, _, msgs = drive(core, chunks)
    assert lines(out) == want_lines, f"got {lines(out)}, want {want_lines}"
    if want_lines[-1] != QUEUED:
        assert msgs == [], f"got {len(msgs)} messages, want none"
        want_rej = [("SIZE_TOO_BIG", "sender@example.org", ["rcpt@example.net"])]
        assert core.rejections == want_rej, f"rejections: got {core.rejections}, want {want_rej}"


@pytest.mark.parametrize("chunks, normalized", [
    pytest.param([chunk(b"a\nb\r\n", last=True)], b"a\r\nb\r\n", id="bare LF"),
    pytest.param([chunk(b"a\rb\r\n", last=True)], b"a b\r\n", id="bare CR"),
    pytest.param([chunk(b"a\r"), chunk(b"b\r\n", last=True)], b"a b\r\n",
                 id="bare CR at a chunk end"),
    pytest.param([chunk(b"a\r", last=True)], b"a ", id="bare CR ends the message"),
])
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_bdat_bare_newline(chunks, normalized, mode):
    core = new_core(bare_newline=mode)
    drive(core, [EHLO, MAIL, RCPT])
    out, _, msgs = drive(core, chunks)
    if mode == "reject":
        assert lines(out)[-1] == want("BARE_NEWLINE"), \
            f"got {lines(out)[-1]!r}, want {want('BARE_NEWLINE')!r}"
        assert msgs == [], f"got {len(msgs)} messages, want none"
    else:
        assert lines(out)[-1] == QUEUED, f"got {lines(out)[-1]!r}, want {QUEUED!r}"
        assert msgs[0]["data"] == normalized, f"got {msgs[0]['data']!r}, want {normalized!r}"


# --- properties ---------------------------------------------------------------------------------

# Content built from the characters that matter to the scanner, plus ordinary text.
CONTENT_PARTS = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"x", b"Subject: y",
                                 b" ", "é".encode(), b"\r\n.", b"\r\n.\r", b"\n.\n"])
contents = st.lists(CONTENT_PARTS, max_size=40).map(b"".join)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=contents, body2=contents, cuts=st.lists(st.integers(min_value=0), max_size=30),
       mode=st.sampled_from(["reject", "normalize"]), bdat=st.booleans())
def test_split_feeds_change_nothing(body, body2, cuts, mode, bdat):
    """The same session fed whole or cut at arbitrary points: same replies, same data."""
    if bdat:
        content = chunk(body) + chunk(body2, last=True)
    else:
        content = b"DATA\r\n" + body + b"\r\n.\r\n"
    stream = EHLO + MAIL + RCPT + content + MAIL + RCPT + b"DATA\r\n" + body2 + b"\r\n.\r\nQUIT\r\n"
    whole = drive(new_core(bare_newline=mode), [stream])
    pieces = drive(new_core(bare_newline=mode), _split(stream, cuts))
    assert pieces[0] == whole[0], f"replies: got {pieces[0]!r}, want {whole[0]!r}"
    assert pieces[2] == whole[2], f"messages: got {pieces[2]!r}, want {whole[2]!r}"
    assert pieces[1][-1] == whole[1][-1] == EV_CLOSE, \
        f"last event: got {pieces[1][-1]} (whole {whole[1][-1]}), want EV_CLOSE"


REPLY_LINE = re.compile(rb"\A[2-5][0-9][0-9][ -][\x20-\x7e]*\Z")
SMTP_WORDS = st.sampled_from([EHLO, b"HELO x\r\n", MAIL, RCPT, b"DATA\r\n", b"BDAT 3\r\n",
                              b"BDAT 2 LAST\r\n", b"BDAT 0 LAST\r\n", b"\r\n.\r\n", b"RSET\r\n",
                              b"NOOP\r\n", b"QUIT\r\n", b"\n", b"\r", b".", b"MAIL FROM:<>"
                              b" SMTPUTF8 RET=FULL ENVID=x\r\n",
                              b"RCPT TO:<a@b.c> NOTIFY=NEVER\r\n",
                              b"BDAT 99999999999999999999\r\n"])
# Where the garbage starts: from the greeting, or deep inside a transaction.
PREFIXES = st.sampled_from([b"", EHLO, EHLO + MAIL, EHLO + MAIL + RCPT,
                            EHLO + MAIL + RCPT + b"DATA\r\n", EHLO + MAIL + RCPT + b"BDAT 40\r\n"])
garbage = st.lists(st.one_of(SMTP_WORDS, st.binary(max_size=64),
                             st.binary(max_size=64).map(lambda b: b + b"\r\n")), max_size=40)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=PREFIXES, chunks=garbage, mode=st.sampled_from(["reject", "normalize"]),
       relay=st.booleans(), verdict=st.sampled_from([QUEUED, reply("SPOOL_ERROR")]))
def test_garbage_never_raises(prefix, chunks, mode, relay, verdict):
    """Arbitrary bytes only ever produce well-formed reply lines and events."""
    core = new_core(relay, bare_newline=mode, max_message_size=1024, max_line_length=128,
                    max_errors=1000, max_junk_commands=1000)
    out, events, _ = drive(core, [prefix, *chunks], verdict)
    assert set(events) <= {EV_NONE, EV_MESSAGE, EV_CLOSE}, f"events: got {events}"
    assert out == b"" or out.endswith(b"\r\n"), f"output not CRLF-terminated: {out[-40:]!r}"
    for ln in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(ln), f"malformed reply line: got {ln!r}"
