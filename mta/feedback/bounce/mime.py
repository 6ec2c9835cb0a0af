"""Robust MIME access for bounce parsing: load any bytes, walk parts, decode text.

Bounces come from every MTA ever written: LF, CRLF or bare-CR line ends, an
mbox "From " line, wrong or missing charsets, broken transfer encodings. This
module turns them into `email.message.Message` objects and str without ever
raising: undecodable bytes become U+FFFD, unknown charsets fall back to UTF-8
then Latin-1.
"""
from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import re

__all__ = ["load", "header", "part_text", "raw_text", "text_parts", "html_to_text"]

_MBOX_FROM = re.compile(rb"\AFrom [^\n]*\n")


# The email package checks every line against the boundary of every enclosing
# multipart, and builds an object per part: nesting and part counts multiply its
# cost. Real bounces declare at most about six boundaries and have a few dozen
# delimiter lines (the corpus: 6 and 16); a message is cut before the
# declaration or delimiter line past these limits (the notice and the status
# come first; what is cut is the tail of the returned original).
MAX_BOUNDARIES = 8
MAX_DELIMITERS = 200
# Lines times declared boundaries: what the package's per-line checks cost. A message is
# cut to this many (83,333 lines under 6 boundaries: a real 1 MB one, with lines of tens
# of bytes, base64 76, never comes near; 1 MB of 3-byte lines under 8 does).
MAX_LINE_CHECKS = 500_000
_BOUNDARY = re.compile(rb"\bboundary\s*+(?:\*\d*\*?)?\s*+=", re.I)
_DELIMITER = re.compile(rb"^--", re.M)


def _cut_at(data: bytes, pattern: re.Pattern[bytes], limit: int) -> bytes:
    for i, m in enumerate(pattern.finditer(data)):
        if i == limit:
            return data[:data.rfind(b"\n", 0, m.start()) + 1]
    return data


def load(data: bytes) -> email.message.Message:
    """Parse bytes into a Message after normalising every line end to LF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = _MBOX_FROM.sub(b"", data, count=1)
    data = _cut_at(_cut_at(data, _BOUNDARY, MAX_BOUNDARIES), _DELIMITER, MAX_DELIMITERS)
    data = _cut_lines(data, MAX_LINE_CHECKS // max(1, len(_BOUNDARY.findall(data))))
    return email.message_from_bytes(data, policy=email.policy.compat32)


def _cut_lines(data: bytes, limit: int) -> bytes:
    """The first `limit` lines of `data` (all of it when it has no more)."""
    if data.count(b"\n") <= limit:
        return data
    end = -1
    for _ in range(limit):
        end = data.find(b"\n", end + 1)
    return data[:end + 1]


# A header field's text as the detectors read it: enough for any real From,
# Subject or X-Failed-Recipients, and a bound for the regexes scanning it.
MAX_HEADER_CHARS = 16384


def header(msg: email.message.Message, name: str) -> str:
    """A header as text: RFC 2047 decoded, unfolded, '' when absent."""
    raw = msg.get(name)
    if raw is None:
        return ""
    if isinstance(raw, email.header.Header):
        raw = str(raw)
    raw = raw[:MAX_HEADER_CHARS]
    try:
        parts = email.header.decode_header(raw)
        out = []
        for chunk, cs in parts:
            if isinstance(chunk, bytes):
                out.append(_decode(chunk, cs))
            else:
                out.append(chunk)
        text = "".join(out)
    except Exception:
        text = str(raw)
    return " ".join(text.split())


def _decode(data: bytes, charset: str | None) -> str:
    for cs in (charset, "utf-8"):
        if not cs:
            continue
        try:
            return data.decode(cs)
        except (LookupError, ValueError):   # ValueError: a bad name ("utf\0-8"), or bytes it cannot decode
            continue
    return data.decode("latin-1")


def payload_of(part: email.message.Message) -> str | list:
    """part.get_payload() that does not raise: for 8-bit text, email decodes it with the
    declared charset and raises ValueError on a name holding a NUL ("utf\\0-8"); such
    a part's text comes through part_text instead (UTF-8, then Latin-1)."""
    try:
        return part.get_payload()
    except ValueError:
        return part_text(part)


def part_text(part: email.message.Message) -> str:
    """The decoded body of a non-multipart part (transfer encoding and charset)."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if payload is None:
        raw = part.get_payload()
        if isinstance(raw, list):
            return "\n\n".join(raw_text(p) for p in raw if isinstance(p, email.message.Message))
        return raw if isinstance(raw, str) else ""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    if charset in (None, "us-ascii", "ascii"):
        charset = "utf-8"
    text = _decode(payload, charset)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def raw_text(msg: email.message.Message) -> str:
    """A (sub)message as text: its header block, a blank line, its body."""
    try:
        return msg.as_string()
    except Exception:
        lines = [f"{k}: {v}" for k, v in msg.items()]
        # not get_payload(): it decodes 8-bit text with the declared charset and raises
        # on a bad one ("iso-\0..."); part_text falls back to UTF-8, then Latin-1
        body = "" if msg.is_multipart() else part_text(msg)
        return "\n".join(lines) + "\n\n" + body


def text_parts(msg: email.message.Message) -> list[email.message.Message]:
    """The human-readable parts of a report: text/* leaves not inside an attached message."""
    out: list[email.message.Message] = []

    def walk(m: email.message.Message) -> None:
        ctype = m.get_content_type()
        if m.is_multipart():
            if ctype.startswith("message/"):
                return   # an attached original: not the notice
            for sub in m.get_payload():
                if isinstance(sub, email.message.Message):
                    walk(sub)
        elif ctype.startswith("text/") and ctype != "text/rfc822-headers":
            disp = header(m, "Content-Disposition").lower()
            if "attachment" not in disp or ctype == "text/plain":
                out.append(m)

    walk(msg)
    return out


# Linear by construction: a tag ends at the next ">" and cannot contain "<", so
# a "<" that is never closed is read up to the next "<" only (with "<[^>]*>",
# each unclosed "<" rescanned the rest of the part: quadratic).
_TAG = re.compile(r"<[^<>]*>")
_BR = re.compile(r"<\s*+(?:br|/p|/div|/tr|/li|/h\d|p|div|tr|li)\b[^<>]*>", re.I)
_CELL = re.compile(r"<\s*+/?t[dh]\b[^<>]*>", re.I)
_SCRIPT_OPEN = re.compile(r"<(script|style)\b", re.I)
_SCRIPT_CLOSE = {"script": re.compile(r"</script\s*>", re.I), "style": re.compile(r"</style\s*>", re.I)}


def _without_scripts(html: str) -> str:
    """Drop <script> and <style> elements, contents included. An element that is
    never closed drops the rest: no later one could be closed either."""
    out, pos = [], 0
    while (m := _SCRIPT_OPEN.search(html, pos)) is not None:
        out.append(html[pos:m.start()])
        close = _SCRIPT_CLOSE[m.group(1).lower()].search(html, m.end())
        if close is None:
            return "".join(out)
        pos = close.end()
    out.append(html[pos:])
    return "".join(out)


def html_to_text(html: str) -> str:
    import html as htmlmod
    text = _BR.sub("\n", _without_scripts(html))
    text = _CELL.sub("\t", text)   # table cells: "Recipient</td><td>a@b" is two words
    text = _TAG.sub("", text)
    return htmlmod.unescape(text)
