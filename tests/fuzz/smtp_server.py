"""Fuzz target: the SMTP server core (mta._native.wire.ServerCore) on arbitrary client bytes.

Input: 4 header bytes, then the client's byte stream.
  [0] bit 0 bare_newline=normalize, bit 1 the client may relay, bit 2 an RCPT policy
      hook is set, bits 3-4 the spool's verdict (250 queued, 451, 554), bit 5 a MAIL
      admission hook is set (spool or memory backpressure)
  [1] limits: bits 0-1 message size, 2-3 line length, then one bit each for
      tight recipient, error, junk-command and per-session message limits
  [2:4] seed of the pseudo-random split points
Every input runs three times: one feed(), one byte per feed(), split at random
points. Invariants (any break raises AssertionError, any other exception is a bug:
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
  - a closed session stays closed.
"""
from __future__ import annotations

import csv
import random
import re
from functools import cache

import corpora
from test_wire_data import reference

from mta._native.wire import EV_CLOSE, EV_MESSAGE, STATES, ServerCore
from mta.ingest.settings import server_settings
from mta.model.replies import reply

MAX_LEN = 4096
TIMEOUT = 10

ST = {name: number for number, name in STATES.items()}
VERDICTS = (reply("QUEUED", "FUZZ0001"), reply("SPOOL_ERROR"), reply("RELAY_DENIED"), reply("QUEUED", "FUZZ0002"))
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[\x20-\x7e]*\Z")
SUPPRESSED = ("SUPPRESSED", reply("SUPPRESSED", "x", "fuzz"))
SPOOL_FULL = ("SPOOL_FULL", reply("SPOOL_FULL"))


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
        max_messages_per_session=2 if limits & 0x80 else 1000)
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

    def feed(self, chunk: bytes, exact: bool) -> None:
        """`exact`: chunk is one byte, so state changes can be pinned to a stream offset."""
        before = self.core.state
        out, ev = self.core.feed(chunk)
        self.fed += len(chunk)
        self.out += out
        if exact:
            self._check_data_boundary(before, ev)
            assert self.core.held <= self.max_held, f"session holds {self.core.held} bytes"
        while ev == EV_MESSAGE:
            t = self.core.transaction()
            self.messages.append((t.mail_from, list(t.rcpts), bytes(t.data), t.chunked, t.size_hint))
            assert t.rcpts, "a message without recipients was handed over"
            if not t.chunked:
                assert len(t.data) <= self.max_size, "DATA content over max_message_size was handed over"
            out, ev = self.core.resume(self.verdict)
            self.out += out
        if ev == EV_CLOSE:
            assert self.core.closed
            assert self.core.feed(b"QUIT\r\n") == (b"", EV_CLOSE), "a closed session answered"

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


def run(settings, relay: bool, verdict: bytes, stream: bytes, cuts: list[int] | None, exact: bool = False):
    s = Session(settings, relay, verdict, stream)
    if exact:
        for i in range(len(stream)):
            s.feed(stream[i:i + 1], True)
    else:
        prev = 0
        for cut in [*(cuts or []), len(stream)]:
            s.feed(stream[prev:cut], False)
            prev = cut
    return s.result()


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    flags, limits = data[0], data[1]
    stream = data[4:]
    settings = settings_for(flags & 0x27, limits)
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


def seeds():
    for s in SESSIONS:
        yield HEADER + s
        yield bytes([0x27, 0x00, 1, 0]) + s   # normalize, tight limits, policy hooks
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
