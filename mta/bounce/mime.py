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


def load(data: bytes) -> email.message.Message:
    """Parse bytes into a Message after normalising every line end to LF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = _MBOX_FROM.sub(b"", data, count=1)
    return email.message_from_bytes(data, policy=email.policy.compat32)


def header(msg: email.message.Message, name: str) -> str:
    """A header as text: RFC 2047 decoded, unfolded, '' when absent."""
    raw = msg.get(name)
    if raw is None:
        return ""
    if isinstance(raw, email.header.Header):
        raw = str(raw)
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
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


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
        body = msg.get_payload()
        return "\n".join(lines) + "\n\n" + (body if isinstance(body, str) else "")


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
            disp = (m.get("Content-Disposition") or "").lower()
            if "attachment" not in disp or ctype == "text/plain":
                out.append(m)

    walk(msg)
    return out


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_BR = re.compile(r"<\s*(br|/p|/div|/tr|/li|/h\d|p|div|tr|li)\b[^>]*>", re.I)


def html_to_text(html: str) -> str:
    import html as htmlmod
    text = _BR.sub("\n", html)
    text = _TAG.sub("", text)
    return htmlmod.unescape(text)
