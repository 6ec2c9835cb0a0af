"""Tests for mta._native.wire.ClientCore and the outbound stuffing in stuff.c, without sockets.

Replies go in through feed(), commands and content come out; every case is
a script of server replies and the exact octets the client must answer.
Covers the greeting/EHLO/HELO/STARTTLS negotiation (RFC 5321 3.1-3.2, RFC
3207), PIPELINING groups (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), CHUNKING (RFC 3030), DSN parameters (RFC 3461), reply
parsing with enhanced codes (RFC 2034), and the session failures. Stuffing
is checked against a plain Python reference and, for CRLF content, against
the server core's own DATA scanner (stuff then unstuff is the identity).
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta._native.wire import (
    CLIENT_LOCAL_REPLIES,
    CLIENT_PHASES,
    CLIENT_STATES,
    EV_CLOSED,
    EV_DONE,
    EV_FAILED,
    EV_MESSAGE,
    EV_READY,
    EV_STARTTLS,
    PHASE_LOCAL,
    ClientCore,
    InternalError,
    ServerCore,
    content_needs_8bit,
    dot_stuff,
)
from mta.ingest.settings import server_settings

NAME = b"client.example"
GREETING = b"220 mx.example ESMTP\r\n"
OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
CONTENT = b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n"
STUFFED = b"Subject: test\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
MAIL = b"MAIL FROM:<s@example.org>"
RCPTS = [("a@example.net", None, None), ("b@example.net", None, None),
         ("c@example.net", None, None)]
RCPT_CMDS = [b"RCPT TO:<a@example.net>\r\n", b"RCPT TO:<b@example.net>\r\n",
             b"RCPT TO:<c@example.net>\r\n"]


# -- helpers --------------------------------------------------------------------------

def ehlo(*keywords: str) -> bytes:
    lines = ["mx.example Hello"] + list(keywords)
    return "".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
                   for i, line in enumerate(lines)).encode()


def ready(*keywords: str, tls: str = "off") -> ClientCore:
    """A core past greeting and EHLO with the given EHLO keywords."""
    core = ClientCore(NAME.decode(), tls)
    out, ev = core.feed(GREETING)
    assert out == b"EHLO " + NAME + b"\r\n", f"got {out!r}, want EHLO"
    out, ev = core.feed(ehlo(*keywords))
    assert ev & EV_READY and out == b"", f"got {out!r} {ev}, want ready"
    return core


def converse(core: ClientCore, script: list[tuple[bytes, bytes]]) -> int:
    """Feed each reply and check the client's exact answer; returns all events."""
    events = 0
    for i, (server, want) in enumerate(script):
        out, ev = core.feed(server)
        events |= ev
        assert out == want, f"step {i} ({server!r}): got {out!r}, want {want!r}"
    return events


def reference_stuff(data: bytes, dots: bool = True, terminate: bool = True) -> bytes:
    """What stuff.c must produce, the slow obvious way: CRLF is a line end, a
    bare LF is one too, a bare CR is a space; lines starting with '.' get
    another; a last line without an end gets CRLF; then '.' CRLF."""
    lines, cur, i, n = [], bytearray(), 0, len(data)
    while i < n:
        c = data[i]
        if c == 13 and i + 1 < n and data[i + 1] == 10:
            lines.append(bytes(cur))
            cur.clear()
            i += 2
            continue
        if c == 10:
            lines.append(bytes(cur))
            cur.clear()
        else:
            cur.append(32 if c == 13 else c)
        i += 1
    if cur:
        lines.append(bytes(cur))
    out = b"".join((b"." + line if dots and line.startswith(b".") else line) + b"\r\n"
                   for line in lines)
    return out + (b".\r\n" if terminate else b"")


def server_unstuff(wire: bytes) -> bytes:
    """Feed DATA content to our server core; returns the message it stores."""
    core = ServerCore(server_settings("mx.test", "t", bare_newline="reject"), True)
    core.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    out, ev = core.feed(wire)
    assert ev == EV_MESSAGE, f"server saw no end of data: got {out!r}"
    return bytes(core.transaction().data)


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

# -- stuffing (stuff.c) -----------------------------------------------------------------

STUFF_CASES = [
    ("empty", b"", b".\r\n"),
    ("no final CRLF", b"a", b"a\r\n.\r\n"),
    ("one line", b"a\r\n", b"a\r\n.\r\n"),
    ("dot line", b".\r\n", b"..\r\n.\r\n"),
    ("leading dot first line", b".a\r\nb\r\n", b"..a\r\nb\r\n.\r\n"),
    ("dots inside a line stay", b"a.b\r\n..\r\n", b"a.b\r\n...\r\n.\r\n"),
    ("embedded terminator", b"x\r\n.\r\nMAIL FROM:<e@vil>\r\n",
     b"x\r\n..\r\nMAIL FROM:<e@vil>\r\n.\r\n"),
    ("bare LF becomes CRLF", b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    ("dot after bare LF is stuffed", b"a\n.\n", b"a\r\n..\r\n.\r\n"),
    ("smuggling LF.LF", b"x\n.\nDATA\n", b"x\r\n..\r\nDATA\r\n.\r\n"),
    ("smuggling LF.CRLF", b"x\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
    ("smuggling CRLF.LF", b"x\r\n.\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
    ("bare CR becomes space", b"a\rb\r\n", b"a b\r\n.\r\n"),
    ("bare CR at end", b"a\r", b"a \r\n.\r\n"),
    ("CR CR LF", b"\r\r\n", b" \r\n.\r\n"),
    ("CR dot CR", b"x\r.\r\n", b"x .\r\n.\r\n"),
    ("only LF", b"\n", b"\r\n.\r\n"),
    ("8-bit passes", b"caf\xc3\xa9\r\n", b"caf\xc3\xa9\r\n.\r\n"),
    ("NUL passes", b"a\x00b\r\n", b"a\x00b\r\n.\r\n"),
]


@pytest.mark.parametrize("name,data,want", STUFF_CASES, ids=[c[0] for c in STUFF_CASES])
def test_dot_stuff_table(name, data, want):
    got = dot_stuff(data)
    assert got == want, f"{name}: got {got!r}, want {want!r}"
    assert got == reference_stuff(data), f"{name}: reference disagrees"


def test_dot_stuff_accepts_buffers():
    for buf in (bytearray(CONTENT), memoryview(CONTENT)):
        assert dot_stuff(buf) == STUFFED, f"{type(buf).__name__}: got {dot_stuff(buf)!r}"


def test_dot_stuff_block_boundaries():
    # the SIMD loop takes 64 octets per step with 2 of look-ahead: put each
    # special sequence at every offset around the first two block edges
    specials = [b"\r\n.", b"\r\n", b"\n.", b"\n", b"\r", b"\r.", b"\r\n\r\n.."]
    for special in specials:
        for pos in range(0, 140):
            data = b"a" * pos + special + b"b" * (150 - pos)
            got, want = dot_stuff(data), reference_stuff(data)
            assert got == want, f"{special!r} at {pos}: got {got!r}, want {want!r}"


ALPHABET = st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\x80", b" "])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ALPHABET, max_size=400).map(b"".join))
def test_dot_stuff_matches_reference(data):
    got = dot_stuff(data)
    assert got == reference_stuff(data), f"got {got!r}, want {reference_stuff(data)!r}"
    assert not BARE.search(got), f"bare CR or LF on the wire: {got!r}"


LINE = st.binary(max_size=90).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(LINE, st.sampled_from([b".", b"..", b".x", b""])), max_size=60))
def test_stuff_then_server_unstuff_is_identity(lines):
    content = b"".join(line + b"\r\n" for line in lines)
    got = server_unstuff(dot_stuff(content))
    assert got == content, f"got {got!r}, want {content!r}"


NEEDS_8BIT_CASES = [(n, pos) for n in (0, 1, 7, 8, 9, 31, 32, 33, 64, 100) for pos in
                    [None] + list(range(n))]


@pytest.mark.parametrize("n,pos", NEEDS_8BIT_CASES)
def test_content_needs_8bit(n, pos):
    data = bytearray(b"x" * n)
    if pos is not None:
        data[pos] = 0x80 if pos % 2 else 0xff
    assert content_needs_8bit(bytes(data)) is (pos is not None), f"len {n}, high octet at {pos}"


# -- negotiation ----------------------------------------------------------------------

def test_greeting_ehlo_capabilities():
    core = ready("PIPELINING", "SIZE 1000", "8BITMIME", "smtputf8", "DSN", "AUTH PLAIN LOGIN")
    assert core.capabilities == {"PIPELINING": "", "SIZE": "1000", "8BITMIME": "",
                                 "SMTPUTF8": "", "DSN": "", "AUTH": "PLAIN LOGIN"}
    assert core.size_limit == 1000 and core.esmtp and core.reusable
    assert CLIENT_STATES[core.state] == "ready" and core.timeout_name is None


def test_smtp_sink_empty_last_ehlo_line():
    # Postfix's smtp-sink ends its EHLO reply with "250 " and no keyword
    core = ClientCore("c.example", "off")
    core.feed(GREETING)
    out, ev = core.feed(b"250-smtp-sink\r\n250-PIPELINING\r\n250 \r\n")
    assert ev & EV_READY and core.capabilities == {"PIPELINING": ""}


def test_ehlo_refused_falls_back_to_helo():
    core = ClientCore("c.example", "off")
    ev = converse(core, [(GREETING, b"EHLO c.example\r\n"),
                         (b"502 5.5.2 what\r\n", b"HELO c.example\r\n"),
                         (b"250 mx.example\r\n", b"")])
    assert ev & EV_READY and not core.esmtp and core.capabilities == {}


FAIL_CASES = [
    # name, replies, client's last output, permanent, phase, reason
    ("greeting 554", [b"554 5.7.1 go away\r\n"], b"QUIT\r\n", True,
     "receiving the initial server greeting", "greeting refused"),
    ("greeting 421", [b"421 4.3.2 busy\r\n"], b"", False,
     "receiving the initial server greeting", "service not available"),
    ("greeting 450", [b"450 later\r\n"], b"QUIT\r\n", False,
     "receiving the initial server greeting", "greeting refused"),
    ("EHLO 4xx", [GREETING, b"451 4.3.0 try later\r\n"], b"QUIT\r\n", False,
     "performing the EHLO handshake", "EHLO refused"),
    ("EHLO and HELO 5xx", [GREETING, b"500 no\r\n", b"550 5.7.1 no\r\n"], b"QUIT\r\n", True,
     "performing the HELO handshake", "EHLO and HELO refused"),
    ("malformed reply", [b"hello there\r\n"], b"", False,
     "receiving the initial server greeting", "malformed reply: hello there"),
    ("1yz code", [b"199 x\r\n"], b"", False,
     "receiving the initial server greeting", "malformed reply: 199 x"),
    ("no separator", [b"220x\r\n"], b"", False,
     "receiving the initial server greeting", "malformed reply: 220x"),
    ("mixed codes", [b"220-a\r\n250 b\r\n"], b"", False,
     "receiving the initial server greeting", "reply lines with different codes"),
    ("unexpected reply when idle", [GREETING, ehlo(), b"250 surprise\r\n"], b"QUIT\r\n", False,
     "waiting for the next message", "unexpected reply"),
    ("421 when idle", [GREETING, ehlo(), b"421 4.4.2 idle timeout\r\n"], b"", False,
     "waiting for the next message", "service not available"),
]


@pytest.mark.parametrize("name,replies,last,permanent,phase,reason", FAIL_CASES,
                         ids=[c[0] for c in FAIL_CASES])
def test_session_failures(name, replies, last, permanent, phase, reason):
    core = ClientCore("c.example", "off")
    for r in replies:
        out, ev = core.feed(r)
    assert ev & EV_FAILED, f"{name}: got events {ev}, want EV_FAILED"
    assert out == last, f"{name}: got {out!r}, want {last!r}"
    got = core.failure
    assert (got[1], got[2], got[3]) == (phase, permanent, reason), f"{name}: got {got}"
    assert core.feed(b"250 more\r\n") == (b"", 0), "a failed core takes nothing more"
    assert not core.reusable and core.closing


def test_reply_too_long_fails():
    core = ClientCore("c.example", "off")
    core.feed(GREETING)
    out, ev = core.feed(b"250-" + b"x" * 1000 + b"\r\n")
    for _ in range(70):
        out, ev = core.feed(b"250-" + b"x" * 1000 + b"\r\n")
        if ev:
            break
    assert ev & EV_FAILED and core.failure[3] == "reply too long"
    core = ClientCore("c.example", "off")
    out, ev = core.feed(b"2" * 70000)   # no line end at all
    assert ev & EV_FAILED and core.failure[3] == "reply too long"


def test_reply_parsing():
    core = ready("PIPELINING", "ENHANCEDSTATUSCODES")
    core.start("s@example.org", RCPTS, CONTENT)
    core.feed(b"250 2.1.0 Ok\n")      # bare LF line ends are accepted from servers
    core.feed(b"550-5.1.1 No such\r\n550-5.1.1 user\there\r\n550 5.1.1 \x1b[31mred\r\n")
    core.feed(b"250\r\n")              # a code alone
    core.feed(b"452 4.5.3 2.0.0 is not a status here\r\n")
    out, ev = core.feed(b"554 5.5.1 no valid recipients\r\n")
    rcpts, data, phase = core.take_result()
    assert rcpts == [(550, "5.1.1", "No such user here ?[31mred"), (250, "", ""),
                     (452, "4.5.3", "2.0.0 is not a status here")]
    core = ready()
    core.start("s@example.org", RCPTS[:1], CONTENT)
    core.feed(b"250 5.1.0 wrong class is not a status\r\n")
    core.feed(b"550 5.1.10 ok\r\n")
    rcpts, data, phase = core.take_result()
    assert rcpts == [(550, "5.1.10", "ok")], f"got {rcpts}"


def test_starttls_negotiation():
    core = ClientCore("c.example")     # opportunistic by default
    ev = converse(core, [(GREETING, b"EHLO c.example\r\n"),
                         (ehlo("STARTTLS", "PIPELINING"), b"STARTTLS\r\n"),
                         (b"220 2.0.0 Ready to start TLS\r\n", b"")])
    assert ev & EV_STARTTLS and CLIENT_STATES[core.state] == "tls"
    assert core.phase == "performing the TLS handshake"
    assert core.tls_started() == b"EHLO c.example\r\n" and core.capabilities == {}
    out, ev = core.feed(ehlo("STARTTLS", "PIPELINING"))   # no second STARTTLS
    assert out == b"" and ev & EV_READY and core.tls_active and "PIPELINING" in core.capabilities


def test_starttls_reply_injection_fails():
    core = ClientCore("c.example")
    core.feed(GREETING)
    core.feed(ehlo("STARTTLS"))
    out, ev = core.feed(b"220 go ahead\r\n250 injected\r\n")
    assert ev & EV_FAILED and core.failure[3] == "data received after the STARTTLS reply"


def test_starttls_refused_goes_on_in_plaintext():
    core = ClientCore("c.example")
    core.feed(GREETING)
    core.feed(ehlo("STARTTLS"))
    out, ev = core.feed(b"454 4.7.0 TLS not available\r\n")
    assert ev & EV_READY and not core.tls_active


def test_tls_off_never_starttls():
    core = ready("STARTTLS", tls="off")
    assert not core.tls_active


# -- transactions ---------------------------------------------------------------------

TXN_CASES = [
    # name, EHLO keywords, start() kwargs, script [(reply, client output)],
    # want (recipient codes, data code or None), final state
    ("pipelined DATA", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + OK_RCPT * 3 + b"354 go\r\n", STUFFED), (QUEUED, b"")],
     ([250, 250, 250], 250), "ready"),
    ("one command at a time", [], {},
     [(b"", MAIL + b"\r\n"), (OK_MAIL, RCPT_CMDS[0]), (OK_RCPT, RCPT_CMDS[1]),
      (b"550 5.1.1 unknown\r\n", RCPT_CMDS[2]), (OK_RCPT, b"DATA\r\n"),
      (b"354 go\r\n", STUFFED), (QUEUED, b"")],
     ([250, 550, 250], 250), "ready"),
    ("pipelined, some refused, 452", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + b"550 5.1.1 unknown\r\n" + OK_RCPT + b"452 4.5.3 too many\r\n354 go\r\n",
       STUFFED), (QUEUED, b"")],
     ([550, 250, 452], 250), "ready"),
    ("pipelined, all refused: DATA 554, then RSET", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + b"550 a\r\n550 b\r\n550 c\r\n554 5.5.1 no valid recipients\r\n",
       b"RSET\r\n"), (b"250 2.0.0 Ok\r\n", b"")],
     ([550, 550, 550], None), "ready"),
    ("pipelined, all refused, DATA 354 anyway: empty end of data", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + b"550 a\r\n550 b\r\n550 c\r\n354 go\r\n", b".\r\n"),
      (b"554 no recipients\r\n", b"")],
     ([550, 550, 550], None), "ready"),
    ("serial, all refused: no DATA, RSET", [], {},
     [(b"", MAIL + b"\r\n"), (OK_MAIL, RCPT_CMDS[0]), (b"550 a\r\n", RCPT_CMDS[1]),
      (b"550 b\r\n", RCPT_CMDS[2]), (b"550 c\r\n", b"RSET\r\n"), (b"250 Ok\r\n", b"")],
     ([550, 550, 550], None), "ready"),
    ("MAIL refused: every recipient gets its reply", [], {},
     [(b"", MAIL + b"\r\n"), (b"553 5.1.8 bad sender\r\n", b"")],
     ([553, 553, 553], None), "ready"),
    ("pipelined MAIL refused", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (b"451 4.3.0 later\r\n503 a\r\n503 b\r\n503 c\r\n503 d\r\n", b"")],
     ([451, 451, 451], None), "ready"),
    ("DATA refused: RSET", [], {},
     [(b"", MAIL + b"\r\n"), (OK_MAIL, RCPT_CMDS[0]), (OK_RCPT, RCPT_CMDS[1]),
      (OK_RCPT, RCPT_CMDS[2]), (OK_RCPT, b"DATA\r\n"), (b"451 4.3.0 later\r\n", b"RSET\r\n"),
      (b"250 Ok\r\n", b"")],
     ([250, 250, 250], 451), "ready"),
    ("4xx at end of data", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + OK_RCPT * 3 + b"354 go\r\n", STUFFED), (b"451 4.7.1 greylisted\r\n", b"")],
     ([250, 250, 250], 451), "ready"),
    ("BDAT pipelined", ["PIPELINING", "CHUNKING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"BDAT %d LAST\r\n" % len(CONTENT)
       + CONTENT), (OK_MAIL + OK_RCPT * 3 + QUEUED, b"")],
     ([250, 250, 250], 250), "ready"),
    ("BDAT all refused: chunk reply consumed, RSET", ["PIPELINING", "CHUNKING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"BDAT %d LAST\r\n" % len(CONTENT)
       + CONTENT), (OK_MAIL + b"550 a\r\n550 b\r\n550 c\r\n503 5.5.1 no rcpt\r\n",
                    b"RSET\r\n"), (b"250 Ok\r\n", b"")],
     ([550, 550, 550], None), "ready"),
    ("BDAT LAST refused: RSET", ["PIPELINING", "CHUNKING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"BDAT %d LAST\r\n" % len(CONTENT)
       + CONTENT), (OK_MAIL + OK_RCPT * 3 + b"554 5.7.1 spam\r\n", b"RSET\r\n"),
                    (b"250 Ok\r\n", b"")],
     ([250, 250, 250], 554), "ready"),
    ("BDAT without PIPELINING", ["CHUNKING"], {},
     [(b"", MAIL + b"\r\n"), (OK_MAIL, RCPT_CMDS[0]), (OK_RCPT, RCPT_CMDS[1]),
      (OK_RCPT, RCPT_CMDS[2]), (OK_RCPT, b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT),
      (QUEUED, b"")],
     ([250, 250, 250], 250), "ready"),
    ("RSET refused fails the session after the result", ["PIPELINING"], {},
     [(b"", MAIL + b"\r\n" + b"".join(RCPT_CMDS) + b"DATA\r\n"),
      (OK_MAIL + b"550 a\r\n550 b\r\n550 c\r\n554 no\r\n", b"RSET\r\n"),
      (b"500 what\r\n", b"QUIT\r\n")],
     ([550, 550, 550], None), "closed"),
]


@pytest.mark.parametrize("name,keywords,kwargs,script,want,final", TXN_CASES,
                         ids=[c[0] for c in TXN_CASES])
def test_transactions(name, keywords, kwargs, script, want, final):
    core = ready(*keywords)
    out, ev = core.start("s@example.org", RCPTS, CONTENT, **kwargs)
    assert out == script[0][1], f"{name} start: got {out!r}, want {script[0][1]!r}"
    events = ev | converse(core, script[1:])
    assert events & EV_DONE, f"{name}: no EV_DONE"
    rcpts, data, phase = core.take_result()
    got = ([r[0] for r in rcpts], data and data[0])
    assert got == want, f"{name}: got {got}, want {want}"
    assert CLIENT_STATES[core.state] == final, f"{name}: got state {CLIENT_STATES[core.state]}"
    assert core.take_result() is None


def test_mail_parameters():
    core = ready("PIPELINING", "SIZE 100000", "8BITMIME", "SMTPUTF8", "DSN")
    out, _ = core.start("s@example.org",
                        [("a@example.net", "SUCCESS,FAILURE", "rfc822;a@example.net"),
                         ("b@example.net", None, None)],
                        b"x\xe9", body_8bit=False, ret="HDRS", envid="id+2B1")
    assert out == (b"MAIL FROM:<s@example.org> SIZE=4 BODY=8BITMIME RET=HDRS ENVID=id+2B1\r\n"
                   b"RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.net\r\n"
                   b"RCPT TO:<b@example.net>\r\nDATA\r\n"), f"got {out!r}"
    core = ready("PIPELINING", "SMTPUTF8", "8BITMIME")    # no DSN: no DSN parameters
    out, _ = core.start("", [("ü@example.net", "NEVER", "rfc822;x")], b"a\r\n", ret="FULL",
                        envid="e", body_8bit=True)
    assert out == ("MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\n"
                   "DATA\r\n").encode(), f"got {out!r}"


LOCAL_CASES = [
    ("8-bit, no 8BITMIME", ["PIPELINING"], b"caf\xe9\r\n", {}, "NEED_8BITMIME"),
    ("SMTPUTF8 asked, not offered", ["8BITMIME"], b"a\r\n", {"smtputf8": True}, "NEED_SMTPUTF8"),
    ("UTF-8 address, not offered", ["8BITMIME"], b"a\r\n", {"rcpt": "ü@example.net"},
     "NEED_SMTPUTF8"),
    ("over SIZE", ["SIZE 10"], b"0123456789", {}, "TOO_BIG"),
]


@pytest.mark.parametrize("name,keywords,content,kwargs,reason", LOCAL_CASES,
                         ids=[c[0] for c in LOCAL_CASES])
def test_local_refusals_send_nothing(name, keywords, content, kwargs, reason):
    core = ready(*keywords)
    rcpt = kwargs.pop("rcpt", "a@example.net")
    out, ev = core.start("s@example.org", [(rcpt, None, None), ("b@example.net", None, None)],
                         content, **kwargs)
    assert out == b"" and ev & EV_DONE and ev & EV_READY, f"{name}: got {out!r} {ev}"
    want = CLIENT_LOCAL_REPLIES[reason]
    assert core.take_result() == ([want, want], None, PHASE_LOCAL)
    assert core.reusable


def test_declared_8bit_but_7bit_content_is_sent():
    core = ready("PIPELINING")
    out, ev = core.start("s@example.org", RCPTS[:1], b"plain\r\n", body_8bit=True)
    assert out.startswith(MAIL + b"\r\n") and not ev, f"got {out!r}"


def test_size_counts_the_added_crlf():
    core = ready("SIZE 5")
    out, ev = core.start("s@example.org", RCPTS[:1], b"abcd")     # 4 + CRLF = 6 > 5
    assert ev & EV_DONE and core.take_result()[0][0][0] == 552


@pytest.mark.parametrize("bad", ["a\r\nRSET@example.org", "a\nb@example.org", "a\x00@x"])
def test_command_injection_refused(bad):
    core = ready("PIPELINING", "DSN")
    with pytest.raises(ValueError):
        core.start(bad, RCPTS[:1], CONTENT)
    with pytest.raises(ValueError):
        core.start("s@example.org", [(bad, None, None)], CONTENT)
    with pytest.raises(ValueError):
        core.start("s@example.org", [("a@example.net", "SUCCESS FAILURE", None)], CONTENT)
    assert core.reusable, "a refused start() leaves the core as it was"


def test_bdat_content_is_normalized_and_counted():
    core = ready("PIPELINING", "CHUNKING")
    content = b".a\nb\rc"
    out, _ = core.start("s@example.org", RCPTS[:1], content)
    body = reference_stuff(content, dots=False, terminate=False)
    assert out.endswith(b"BDAT %d LAST\r\n" % len(body) + body), f"got {out!r}"


def test_421_mid_transaction_keeps_partial_replies():
    core = ready("PIPELINING")
    core.start("s@example.org", RCPTS, CONTENT)
    out, ev = core.feed(OK_MAIL + b"550 5.1.1 unknown\r\n421 4.3.2 shutting down\r\n")
    assert ev & EV_FAILED and not ev & EV_DONE
    reply, phase, permanent, reason, partial = core.failure
    assert reply == (421, "4.3.2", "shutting down") and phase == "sending RCPT TO"
    assert partial == [(550, "5.1.1", "unknown"), None, None] and not permanent


def test_phases_and_timeouts_follow_the_transaction():
    core = ready()
    core.start("s@example.org", RCPTS[:1], CONTENT)
    seen = [(core.phase, core.timeout_name)]
    for r in (OK_MAIL, OK_RCPT, b"354 go\r\n"):
        core.feed(r)
        seen.append((core.phase, core.timeout_name))
    core.body_sent()
    seen.append((core.phase, core.timeout_name))
    assert seen == [("sending MAIL FROM", "mail"), ("sending RCPT TO", "rcpt"),
                    ("sending DATA command", "data"), ("sending message body", "body"),
                    ("sending end of data -- message may be sent more than once",
                     "end_of_data")]
    assert core.lost("timeout") and core.failure[1] == seen[-1][0]
    assert set(CLIENT_PHASES) == set(CLIENT_STATES)


def test_reuse_and_quit():
    core = ready("PIPELINING")
    for _ in range(3):
        core.start("s@example.org", RCPTS[:1], CONTENT)
        converse(core, [(OK_MAIL + OK_RCPT + b"354 go\r\n", STUFFED), (QUEUED, b"")])
        assert core.take_result()[1][0] == 250 and core.reusable
    assert core.messages_sent == 3
    assert core.quit() == b"QUIT\r\n" and core.closing
    out, ev = core.feed(b"221 2.0.0 Bye\r\n")
    assert ev & EV_CLOSED and not core.lost("eof")


def test_quit_waits_for_pending_rset():
    core = ready()
    core.start("s@example.org", RCPTS[:1], CONTENT)
    converse(core, [(OK_MAIL, RCPT_CMDS[0]), (b"550 no\r\n", b"RSET\r\n")])
    assert core.quit() == b"" and core.closing
    out, ev = core.feed(b"250 Ok\r\n")
    assert out == b"QUIT\r\n" and not ev & EV_READY


def test_calls_in_the_wrong_state_are_bugs():
    core = ClientCore("c.example")
    with pytest.raises(InternalError):
        core.start("s@example.org", RCPTS, CONTENT)
    with pytest.raises(InternalError):
        core.tls_started()
    core = ready()
    core.start("s@example.org", RCPTS, CONTENT)
    with pytest.raises(InternalError):
        core.quit()
    with pytest.raises(ValueError):
        ClientCore("bad name")


HANDSHAKE = GREETING + ehlo("PIPELINING", "ENHANCEDSTATUSCODES")
TXN_REPLIES = (OK_MAIL + b"250-2.1.5 first\r\n250 2.1.5 Ok\r\n550 5.1.1 x\r\n" + OK_RCPT
               + b"354 go\r\n" + QUEUED)


def _run_split(handshake: list[bytes], replies: list[bytes]):
    """Output, result and state of one session fed in the given pieces."""
    core = ClientCore("c.example", "off")
    out = bytearray()
    for piece in handshake:
        out += core.feed(piece)[0]
    out += core.start("s@example.org", RCPTS, CONTENT)[0]
    for piece in replies:
        out += core.feed(piece)[0]
    return bytes(out), core.take_result(), core.state


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)], strict=True)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=500), max_size=15),
       st.lists(st.integers(min_value=0, max_value=500), max_size=15))
def test_replies_split_anywhere_change_nothing(cuts1, cuts2):
    want = _run_split([HANDSHAKE], [TXN_REPLIES])
    got = _run_split(_split(HANDSHAKE, cuts1), _split(TXN_REPLIES, cuts2))
    assert got == want, f"got {got}, want {want}"
    assert want[1][0][0] == (250, "2.1.5", "first Ok"), f"got {want[1]}"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=12), st.sampled_from(["off", "opportunistic"]))
def test_arbitrary_replies_never_raise(chunks, tls):
    core = ClientCore("c.example", tls)
    for chunk in chunks:
        out, ev = core.feed(chunk)
        assert isinstance(out, bytes) and not BARE.search(out)
        if ev & EV_READY and core.reusable:
            core.start("s@example.org", RCPTS, CONTENT)
        if ev & EV_STARTTLS:
            core.tls_started()
