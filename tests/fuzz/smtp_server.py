"""Fuzz target: the SMTP server core (mta._native.wire.ServerCore) on arbitrary client bytes.

Input: 4 header bytes, then the client's byte stream.
  [0] bit 0 bare_newline=normalize, bit 1 the client may relay, bit 2 an RCPT policy
      hook is set, bits 3-4 the spool's verdict (250 queued, 451, 554), bit 5 a MAIL
      admission hook is set (spool or memory backpressure), bit 6 the listener offers
      STARTTLS and AUTH PLAIN LOGIN (after TLS), bit 7 it requires TLS before MAIL
  [1] limits: bits 0-1 message size, 2-3 line length, then one bit each for
      tight recipient, error, junk-command and per-session message limits
  [2:4] seed of the pseudo-random split points
The stream is cut into segments at HANDSHAKE (the first bytes of a TLS record): at a
segment boundary a session that said 220 to STARTTLS gets its handshake
(tls_started()), so what follows is what the client sends inside TLS; a boundary
without a STARTTLS pending means nothing. An AUTH exchange (EV_AUTH) is judged by the
real decoder (mta.ingest.auth.decode_sasl) against one known user, "good"/"pw", and
answered with auth_done(); SCRAM gets one server challenge (auth_continue) and is then
refused.
Every input runs three times: one feed() per segment, one byte per feed(), split at
random points. Invariants (any break raises AssertionError, any other exception is a bug:
the core documents none, and InternalError is an illegal state transition):
  - the three runs send the same replies and hand over the same messages;
  - replies are well-formed: CRLF-terminated "ddd" SP/"-" printable-ASCII lines,
    multi-line replies keep their code, codes 2xx-5xx;
  - DATA content ends only on <CR><LF>.<CR><LF>, exactly where the first one is,
    and the message (or its refusal) agrees with the reference model of
    unstuffing in tests/test_wire_data.py (size limit, bare CR/LF rule);
  - a session never holds more client input (ServerCore.held, the memory governor's
    measure) than its caps allow: the content limit (doubled in normalize mode for
    BDAT) plus one command line;
  - a closed session stays closed;
  - STARTTLS (CVE-2011-0411 class): once the core said 220 to STARTTLS, every byte the
    client pipelined behind it is dropped unanswered (feed() gives (b"", EV_NONE) until
    the handshake), and the reply that carried the 220 ends with it; after the
    handshake EHLO is forgotten and the core knows it is TLS;
  - AUTH: an exchange completes (EV_AUTH) only over TLS on a listener offering it, its
    responses are single lines within the line limit; a transaction is `authed` only
    after a successful AUTH and always `tls` then; with require_tls no transaction is
    handed over without TLS.
"""
from __future__ import annotations

import csv
import random
import re
from functools import cache

import corpora
from test_wire_data import reference

from mta._native.wire import EV_AUTH, EV_CLOSE, EV_MESSAGE, EV_NONE, EV_STARTTLS, STATES, ServerCore
from mta.ingest.auth import decode_sasl
from mta.ingest.settings import server_settings
from mta.model.replies import reply

MAX_LEN = 4096
TIMEOUT = 10

ST = {name: number for number, name in STATES.items()}
VERDICTS = (reply("QUEUED", "FUZZ0001"), reply("SPOOL_ERROR"), reply("RELAY_DENIED"), reply("QUEUED", "FUZZ0002"))
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[\x20-\x7e]*\Z")
SUPPRESSED = ("SUPPRESSED", reply("SUPPRESSED", "x", "fuzz"))
SPOOL_FULL = ("SPOOL_FULL", reply("SPOOL_FULL"))
HANDSHAKE = b"\x16\x03\x01"      # a TLS handshake record's header: the handshake happens here
TLS_READY = reply("TLS_READY")
B64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def _rcpt_check(address: str, sender: str, relay: bool):
    """A policy hook with all three answers, chosen by the address so runs agree."""
    if address.startswith("s"):
        return SUPPRESSED
    if address.startswith("b"):
        return True
    return None


def _mail_check(sender: str):
    """Backpressure at MAIL, chosen by the sender so runs agree."""
    return SPOOL_FULL if sender.startswith("f") else None


@cache
def settings_for(flags: int, limits: int):
    s = server_settings(
        "mx.fuzz.test", "fuzz", bare_newline="normalize" if flags & 1 else "reject",
        max_message_size=(16, 300, 4096, 50 << 20)[limits & 3],
        max_line_length=(24, 100, 512, 2048)[(limits >> 2) & 3],
        max_recipients=2 if limits & 0x10 else 1000,
        max_errors=3 if limits & 0x20 else 10,
        max_junk_commands=4 if limits & 0x40 else 100,
        max_messages_per_session=2 if limits & 0x80 else 1000,
        starttls=bool(flags & 0x40), auth=bool(flags & 0x40), require_tls=bool(flags & 0x80))
    if flags & 4:
        s.rcpt_check = _rcpt_check
    if flags & 0x20:
        s.mail_check = _mail_check
    return s


def check_replies(out: bytes) -> None:
    if not out:
        return
    assert out.endswith(b"\r\n"), f"output does not end with CRLF: {out[-80:]!r}"
    group = None
    for line in out[:-2].split(b"\r\n"):
        m = REPLY_LINE.match(line)
        assert m, f"malformed reply line {line!r}"
        if group is not None:
            assert m.group(1) == group, f"multi-line reply changes code: {line!r}"
        group = m.group(1) if m.group(2) == b"-" else None
    assert group is None, "output ends inside a multi-line reply"


class Session:
    """One core driven through chunks, answering each message at once with `verdict`."""

    def __init__(self, settings, relay: bool, verdict: bytes, stream: bytes):
        self.core = ServerCore(settings, relay)
        self.verdict = verdict
        self.stream = stream
        self.out = bytearray(self.core.greeting())
        self.messages: list[tuple] = []
        self.fed = 0
        self.data_start = -1      # stream offset where the current DATA content begins
        self.max_size = settings.max_message_size
        self.max_held = 2 * settings.max_message_size + 2 + settings.max_line_length
        self.normalize = settings.bare_mode == 1
        self.settings = settings
        self.starttls = False     # 220 to STARTTLS said, handshake not yet done
        self.auth_ok = False      # an AUTH exchange succeeded

    def feed(self, chunk: bytes, exact: bool) -> None:
        """`exact`: chunk is one byte, so state changes can be pinned to a stream offset."""
        before = self.core.state
        out, ev = self.core.feed(chunk)
        self.fed += len(chunk)
        if self.starttls:
            # CVE-2011-0411: nothing pipelined after STARTTLS is executed or answered
            assert (out, ev) == (b"", EV_NONE), f"input after STARTTLS was answered: {out[:200]!r}"
            return
        self.out += out
        if exact:
            self._check_data_boundary(before, ev)
            assert self.core.held <= self.max_held, f"session holds {self.core.held} bytes"
        while ev in (EV_MESSAGE, EV_AUTH):
            if ev == EV_AUTH:
                out, ev = self._auth()
            else:
                out, ev = self._message()
            self.out += out
        if ev == EV_STARTTLS:
            assert self.settings.starttls and not self.core.tls, "STARTTLS accepted where not offered"
            assert self.out.endswith(TLS_READY), f"the 220 to STARTTLS is not the last reply: {self.out[-200:]!r}"
            assert self.core.held == 0, "input pipelined after STARTTLS was kept"
            self.starttls = True
            self.messages.append(("starttls", len(self.out)))   # the runs must agree on where
        if ev == EV_CLOSE:
            assert self.core.closed
            assert self.core.feed(b"QUIT\r\n") == (b"", EV_CLOSE), "a closed session answered"

    def _message(self) -> tuple[bytes, int]:
        t = self.core.transaction()
        self.messages.append((t.mail_from, list(t.rcpts), bytes(t.data), t.chunked, t.size_hint,
                              t.tls, t.authed, t.auth_tenant))
        assert t.rcpts, "a message without recipients was handed over"
        if not t.chunked:
            assert len(t.data) <= self.max_size, "DATA content over max_message_size was handed over"
        assert t.tls == self.core.tls, "the transaction's TLS flag is not the session's"
        assert not t.authed or (t.tls and self.auth_ok and t.auth_tenant == "t"), \
            "a transaction is authed without a successful AUTH over TLS"
        assert t.tls or not self.settings.require_tls, "a message came in without TLS under require_tls"
        return self.core.resume(self.verdict)

    def _auth(self) -> tuple[bytes, int]:
        core = self.core
        assert core.tls and self.settings.auth, "an AUTH exchange completed without TLS"
        assert not self.auth_ok, "a second AUTH exchange after a successful one"
        mech, responses = core.auth_request
        assert mech in (b"PLAIN", b"LOGIN", b"SCRAM-SHA-256"), f"AUTH mechanism {mech!r}"
        for r in responses:
            assert b"\n" not in r and len(r) <= self.settings.max_line_length, f"SASL response {r[:80]!r}"
        if mech == b"SCRAM-SHA-256" and len(responses) == 1 and hasattr(core, "auth_continue"):
            # a server-first message; the client's final one comes back as another EV_AUTH
            return core.auth_continue(b"cj1meXp6LHM9YzJGc2RBPT0saT00MDk2")
        decoded = decode_sasl(mech, list(responses)) if mech != b"SCRAM-SHA-256" else None
        if decoded is not None:
            # only base64 gets past the decoder (a bare CR, NUL, spaces ... are refused)
            assert all(r == b"=" or B64.fullmatch(r) for r in responses), f"decoded {responses!r}"
        ok = decoded == ("good", b"pw")
        if decoded is not None:
            self.messages.append(("auth", decoded, ok))
        self.auth_ok = self.auth_ok or ok
        return core.auth_done(ok, "AUTH_FAILED", "t" if ok else None, None)

    def handshake(self) -> None:
        """A segment boundary: the TLS handshake, if STARTTLS is pending."""
        if not self.starttls:
            return
        self.starttls = False
        self.core.tls_started()
        assert self.core.tls and self.core.state == ST["connected"], "TLS did not start over"

    def _check_data_boundary(self, before: int, ev: int) -> None:
        state = self.core.state
        if before != ST["data"] and state == ST["data"]:
            self.data_start = self.fed
        elif before == ST["data"] and state != ST["data"]:
            content = self.stream[self.data_start:self.fed]
            assert content.endswith(b".\r\n") and self.stream[:self.fed].endswith(b"\r\n.\r\n"), \
                f"DATA ended without CRLF.CRLF: {self.stream[max(0, self.fed - 20):self.fed]!r}"
            assert not reference(content[:-1], self.normalize)[2], "DATA ended after its first terminator"
            want, bare, ended = reference(content, self.normalize)
            assert ended, "DATA ended where the reference sees no terminator"
            if len(want) > self.max_size:
                assert ev != EV_MESSAGE, "an oversized message was accepted"
            elif bare and not self.normalize:
                assert ev != EV_MESSAGE, "a message with bare CR/LF was accepted in reject mode"
            else:
                assert ev == EV_MESSAGE, "a valid DATA content was not handed over"
                got = bytes(self.core.transaction().data)
                assert got == want, f"content {got[:200]!r} differs from the reference {want[:200]!r}"

    def result(self) -> tuple[bytes, list]:
        return bytes(self.out), self.messages


def segments(stream: bytes) -> list[tuple[int, int]]:
    """(start, end) of the stream's segments, HANDSHAKE markers left out."""
    out, start = [], 0
    while (i := stream.find(HANDSHAKE, start)) >= 0:
        out.append((start, i))
        start = i + len(HANDSHAKE)
    out.append((start, len(stream)))
    return out


def run(settings, relay: bool, verdict: bytes, stream: bytes, cuts: list[int] | None, exact: bool = False):
    """Feed `stream`'s segments; offsets (Session.fed, the DATA checks) are in the stream
    with the HANDSHAKE markers taken out, which is what the core sees."""
    parts = [stream[a:b] for a, b in segments(stream)]
    s = Session(settings, relay, verdict, b"".join(parts))
    for n, part in enumerate(parts):
        if n:
            s.handshake()
        if exact:
            for i in range(len(part)):
                s.feed(part[i:i + 1], True)
        else:
            prev = 0
            for cut in [*(c for c in cuts or () if 0 < c < len(part)), len(part)]:
                if cut > prev:
                    s.feed(part[prev:cut], False)
                prev = cut
    return s.result()


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    flags, limits = data[0], data[1]
    stream = data[4:]
    settings = settings_for(flags & 0xe7, limits)
    relay = bool(flags & 2)
    verdict = VERDICTS[(flags >> 3) & 3]
    rng = random.Random(int.from_bytes(data[2:4], "little"))
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(1, 12)))) if len(stream) > 1 else []

    whole = run(settings, relay, verdict, stream, None)
    check_replies(whole[0])
    bytewise = run(settings, relay, verdict, stream, None, exact=True)
    assert bytewise == whole, "feeding one byte at a time changed the session"
    split = run(settings, relay, verdict, stream, cuts)
    assert split == whole, f"splitting at {cuts} changed the session"


HEADER = bytes([0x02, 0x0b, 0, 0])      # reject mode, relay allowed, 4096-byte messages

SESSIONS = [
    (b"EHLO c.example\r\nMAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n"
     b"RCPT TO:<r@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@d.example\r\nDATA\r\n"
     b"Subject: x\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n"),
    b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@d>\r\nRCPT TO:<s@d>\r\nBDAT 5\r\nab\r\ncBDAT 3 LAST\r\nx\r\nRSET\r\n",
    b"EHLO c\r\nMAIL FROM:<full@b>\r\nMAIL FROM:<a@b> RET=HDRS ENVID=QQ+2B\r\nRCPT TO:<\"q\\ t\"@d>\r\nDATA\r\nline\n.\r\n.\r\nNOOP\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@d>\r\nDATA\r\nx\r\r\n.\r\n\r\n.\r\nVRFY x\r\nHELP\r\nQUIT\r\n",
    b"EHLO c\r\nBDAT 4\r\nabcdMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<r@d>\r\nBDAT 0 LAST\r\nSTARTTLS\r\nAUTH PLAIN\r\n",
]


PLAIN_GOOD = b"AGdvb2QAcHc="          # base64 of "\0good\0pw"
TLS_SESSIONS = [
    # STARTTLS with a whole transaction pipelined behind it (CVE-2011-0411), then the
    # real session inside TLS: AUTH PLAIN with an initial response
    (b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@b>\r\nRCPT TO:<r@d>\r\nDATA\r\nx\r\n.\r\n"
     + HANDSHAKE + b"EHLO c\r\nAUTH PLAIN " + PLAIN_GOOD + b"\r\nMAIL FROM:<a@b>\r\n"
     b"RCPT TO:<r@d>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"),
    # AUTH before TLS, STARTTLS twice, LOGIN in steps with garbage, an abort, a wrong
    # password, then PLAIN in two steps
    (b"EHLO c\r\nAUTH PLAIN " + PLAIN_GOOD + b"\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n"
     + HANDSHAKE + b"STARTTLS\r\nEHLO c\r\nAUTH LOGIN\r\n!!notbase64\r\nAUTH LOGIN Z29vZA==\r\n*\r\n"
     b"AUTH LOGIN\r\nZ29vZA==\r\nd3Jvbmc=\r\nAUTH PLAIN\r\n" + PLAIN_GOOD + b"\r\n"
     b"AUTH PLAIN " + PLAIN_GOOD + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<r@d>\r\nBDAT 2 LAST\r\nhi"),
    # SCRAM (refused), an over-long SASL line, AUTH inside a transaction, MAIL under
    # require_tls before the handshake
    (b"EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n" + HANDSHAKE + b"EHLO c\r\n"
     b"AUTH SCRAM-SHA-256\r\nbiwsbj11c2VyLHI9eHl6\r\nAUTH PLAIN\r\n" + b"QUFB" * 200 + b"\r\n"
     b"MAIL FROM:<a@b>\r\nAUTH PLAIN " + PLAIN_GOOD + b"\r\nRSET\r\nAUTH PLAIN =\r\nQUIT\r\n"),
]


def seeds():
    for s in SESSIONS:
        yield HEADER + s
        yield bytes([0x27, 0x00, 1, 0]) + s   # normalize, tight limits, policy hooks
    for s in TLS_SESSIONS:
        yield bytes([0x40, 0x0b, 0, 0]) + s   # STARTTLS and AUTH, no relay by address
        yield bytes([0xc2, 0x2b, 2, 0]) + s   # require TLS, relay, tight errors
    # the end-of-data sequences of the SMTP smuggling tools, each followed by a smuggled transaction
    smuggling = corpora.find("smtp-smuggling")
    if smuggling is None:
        raise FileNotFoundError(corpora.missing("smtp-smuggling"))
    table = smuggling / "sequences.tsv"
    with table.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            seq = bytes.fromhex(row["hex"])
            yield HEADER + SESSIONS[0].replace(
                b"\r\n.\r\nQUIT", b"\r\n" + seq + b"MAIL FROM:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT")
