"""Fuzz target: the DATA and BDAT content scanners (native/wire/data.c), differential.

The wire module exposes the scanners only through ServerCore, so each input drives
a session to DATA (or BDAT) and feeds the content in pseudo-random pieces.

Input: 4 header bytes, then the content.
  [0] bit 0 bare_newline=normalize, bit 1 send the content as BDAT chunks
  [1] max_message_size selector
  [2:4] seed of the split points (DATA pieces, BDAT chunk sizes)
DATA: the content plus a final <CR><LF>.<CR><LF> must give exactly what the
reference model (tests/test_wire_data.py: RFC 5321 4.5.2 unstuffing, only
CRLF.CRLF ends data) gives for the text up to its first terminator, or the
refusal it implies (552 over max_message_size, 550 for bare CR/LF in reject mode).
BDAT: chunks are raw (no stuffing, no terminator); a CR ending one chunk pairs
with an LF starting the next; bare CR/LF are refused or normalised (LF -> CRLF,
CR -> SP) exactly as chunk_reference() below says.
"""
from __future__ import annotations

import random

from test_wire_data import reference

from mta._native.wire import EV_MESSAGE, ServerCore
from mta.ingest.settings import server_settings
from mta.model.replies import REPLIES, reply

MAX_LEN = 8192
TIMEOUT = 10
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"
SIZES = (1, 10, 100, 1000, 50 << 20)
QUEUED = reply("QUEUED", "FUZZ")
_settings: dict = {}


def chunk_reference(raw: bytes, normalize: bool) -> tuple[bytes, int]:
    """-> (stored content, bare CR/LF count) for BDAT content (all chunks joined)."""
    out = bytearray()
    bare = i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == 0x0D and raw[i + 1:i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        if c == 0x0D or c == 0x0A:
            bare += 1
            out += (b" " if c == 0x0D else b"\r\n") if normalize else bytes([c])
        else:
            out.append(c)
        i += 1
    return bytes(out), bare


def _settings_for(normalize: bool, max_size: int):
    key = (normalize, max_size)
    if key not in _settings:
        _settings[key] = server_settings("mx.fuzz.test", "fuzz", max_message_size=max_size,
                                         bare_newline="normalize" if normalize else "reject")
    return _settings[key]


def _outcome(core: ServerCore, feeds) -> tuple[bytes | None, bytes]:
    """Feed pieces until the first message or refusal -> (content or None, output)."""
    out = bytearray()
    for piece in feeds:
        o, ev = core.feed(piece)
        out += o
        if ev == EV_MESSAGE:
            return bytes(core.transaction().data), bytes(out)
    return None, bytes(out)


def _expect(content: bytes | None, out: bytes, want: bytes, bare: int, max_size: int, normalize: bool,
            over: bool) -> None:
    if over:
        assert content is None and REPLIES["SIZE_TOO_BIG"].line() in out, \
            f"content over {max_size} bytes: got {out[-120:]!r}, want the 552 refusal"
    elif bare and not normalize:
        assert content is None and REPLIES["BARE_NEWLINE"].line() in out, \
            f"{bare} bare CR/LF in reject mode: got {out[-120:]!r}, want the 550 refusal"
    else:
        assert content == want, f"got {content!r:.300}, want {want!r:.300}"


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    normalize = bool(data[0] & 1)
    max_size = SIZES[data[1] % len(SIZES)]
    rng = random.Random(int.from_bytes(data[2:4], "little"))
    body = data[4:]
    core = ServerCore(_settings_for(normalize, max_size), True)
    core.feed(ENVELOPE)
    if data[0] & 2:
        pieces, prev = [], 0
        while prev < len(body) or not pieces:
            size = min(rng.choice((0, 1, 2, 3, 7, 64, 1000)), len(body) - prev)
            pieces.append(body[prev:prev + size])
            prev += size
        feeds = [b"BDAT %d%s\r\n" % (len(p), b" LAST" if k == len(pieces) - 1 else b"") + p
                 for k, p in enumerate(pieces)]
        content, out = _outcome(core, feeds)
        want, bare = chunk_reference(body, normalize)
        _expect(content, out, want, bare, max_size, normalize, over=len(body) > max_size)
        return
    stream = b"DATA\r\n" + body + b"\r\n.\r\n"
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 16))))
    feeds = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    content, out = _outcome(core, feeds)
    want, bare, ended = reference(body + b"\r\n.\r\n", normalize)
    assert ended, "the appended terminator always ends the data"
    _expect(content, out, want, bare, max_size, normalize, over=len(want) > max_size)


def seeds():
    bodies = [b"", b"Subject: s\r\n\r\nbody\r\n", b"..a\r\n.b\r\n...\r\n", b"a\nb\rc\r\r\n.\n.\r\r\n",
              b"x" * 200 + b"\r\n.\r\nQUIT\r\n", b"\r\n.\r", b".", b"\r\n..\r\n\n.\n\r.\r"]
    for body in bodies:
        for flags in range(4):
            yield bytes([flags, 3, 7, 1]) + body
