"""The returned original inside a report: its header block and OUR message id.

Where the original is: a message/rfc822 (or message/global) part, a
text/rfc822-headers part, or quoted inline after a separator in the notice of
a non-standard bounce. Our id is in the Received: field this MTA adds on
reception ("by HOSTNAME (mta) with ESMTP id <32 hex digits>", see
mta/ingest/reception.py) or in an X-Mta-Id: header field.
"""
from __future__ import annotations

import email
import email.message
import email.policy
import re

from .mime import part_text, payload_of

__all__ = ["attached_original", "headers_from_text", "our_message_id"]

_OUR_RECEIVED = re.compile(r"\bby\s+\S+\s+\(mta\)\s+with\s+\S+\s+id\s+<?([0-9A-Za-z._-]+)>?", re.I)
_FIELD_LINE = re.compile(r"\s*[A-Za-z][\w-]*:")
_X_MTA_ID = re.compile(r"^X-Mta-Id:[ \t]*<?([0-9A-Za-z._-]+)>?", re.I | re.M)


def attached_original(msg: email.message.Message) -> email.message.Message | None:
    """The attached original (whole or headers only) as a Message, None if not attached."""
    for part in msg.walk():
        if part is msg:
            continue
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global", "message/partial"):
            payload = payload_of(part)
            if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                inner = payload[0]
                if len(inner.keys()) == 0 and isinstance(payload_of(inner), str):
                    # Headers were encoded (base64/QP) as a whole: decode and reparse.
                    return headers_from_text(part_text(part))
                return inner
            if isinstance(payload, str):
                return headers_from_text(part_text(part))
        if ctype in ("text/rfc822-headers", "message/global-headers", "message/rfc822-headers"):
            return headers_from_text(part_text(part))
    return None


def headers_from_text(text: str) -> email.message.Message | None:
    """Parse a quoted header block (leading separator lines and indentation removed)."""
    lines = text.lstrip("\n").split("\n")
    first = next((i for i, l in enumerate(lines) if _FIELD_LINE.match(l)), None)
    if first is None:
        return None
    del lines[:first]   # (one slice: popping the head line by line was quadratic)
    # Quoted originals are sometimes indented as a whole: strip the common indent.
    indent = min((len(l) - len(l.lstrip(" ")) for l in lines[:5] if l.strip()), default=0)
    if indent:
        lines = [l[indent:] if l[:indent].strip() == "" else l for l in lines]
    msg = email.message_from_string("\n".join(lines), policy=email.policy.compat32)
    return msg if len(msg.keys()) else None


def our_message_id(headers: email.message.Message | None, quoted_text: str = "") -> str | None:
    """Our id from the original's Received: / X-Mta-Id: fields (or from raw quoted text)."""
    if headers is not None:
        v = headers.get("X-Mta-Id")
        if v:
            m = re.search(r"[0-9A-Za-z._-]+", str(v))
            if m:
                return m.group(0)
        for rcv in headers.get_all("Received") or []:
            m = _OUR_RECEIVED.search(" ".join(str(rcv).split()))
            if m:
                return m.group(1)
    if quoted_text:
        m = _X_MTA_ID.search(quoted_text)
        if m:
            return m.group(1)
        m = _OUR_RECEIVED.search(" ".join(quoted_text.split()))
        if m:
            return m.group(1)
    return None
