"""The native DATA scanner against a byte-at-a-time Python reference model.

The C scanner copies whole clean lines with memchr; the model below is the
specification it must match for any input: RFC 5321 4.5.2 unstuffing, only
CRLF.CRLF ends data, bare CR/LF counted (reject) or rewritten (normalize).
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from mta.ingest.settings import server_settings
from mta._native.wire import EV_MESSAGE, ServerCore


def reference(data: bytes, normalize: bool) -> tuple[bytes, int, bool]:
    """-> (content, bare count, ended) for DATA bytes (after the 354)."""
    out = bytearray()
    bare = 0
    i, n = 0, len(data)
    line_start, after_bare = True, False
    while i < n:
        c = data[i]
        if line_start and not after_bare and c == 0x2E:          # '.' at a line start
            if data[i + 1:i + 3] == b"\r\n":
                return bytes(out), bare, True                   # CRLF.CRLF
            if i + 1 < n and data[i + 1] == 0x0A:               # ".\n": content, bare LF
                bare += 1
                out += b".\r\n" if normalize else b".\n"
                i += 2
                line_start, after_bare = True, True
                continue
            i += 1                                              # stuffing dot dropped
            if i >= n:
                break
            if data[i] == 0x0D and not data[i + 1:i + 2] == b"\n":   # ".\rX": bare CR
                bare += 1
                out += b" " if normalize else b"\r"
                i += 1
                line_start = after_bare = False
                continue
            c = data[i]
        if c == 0x0D:
            if data[i + 1:i + 2] == b"\n":
                out += b"\r\n"
                i += 2
                line_start, after_bare = True, False
                continue
            if i + 1 >= n:
                break                                           # undecided CR at the end
            bare += 1
            out += b" " if normalize else b"\r"
            i += 1
            line_start = after_bare = False
            continue
        if c == 0x0A:
            bare += 1
            out += b"\r\n" if normalize else b"\n"
            i += 1
            line_start, after_bare = True, True
            continue
        out.append(c)
        i += 1
        line_start = after_bare = False
    return bytes(out), bare, False


ALPHABET = st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"x" * 40])


@settings(max_examples=600, deadline=None)
@given(parts=st.lists(ALPHABET, max_size=60), normalize=st.booleans(),
       cut=st.integers(min_value=1, max_value=50))
def test_native_scanner_matches_reference(parts, normalize, cut):
    body = b"".join(parts)
    data = body + b"\r\n.\r\n"
    want, bare, ended = reference(data, normalize)
    assert ended, "the appended terminator always ends the data"
    settings_ = server_settings("mx.test", "x", bare_newline="normalize" if normalize else "reject")
    core = ServerCore(settings_, True)
    core.feed(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    ev, out = 0, b""
    for off in range(0, len(data), cut):   # arbitrary chunking must not matter
        chunk_out, ev = core.feed(data[off:off + cut])
        out += chunk_out
        if ev == EV_MESSAGE:
            break
    if bare and not normalize:
        assert ev != EV_MESSAGE and b"550 5.6.0" in out, f"got {out!r}, want the bare-newline refusal"
        return
    assert ev == EV_MESSAGE, f"got event {ev}, want a message"
    got = bytes(core.transaction().data)
    assert got == want, f"got {got!r}, want {want!r}"
