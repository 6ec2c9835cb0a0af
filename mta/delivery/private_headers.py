"""Headers meant for us, not for the recipient: removed from a message before it goes out.

Reception reads the tenant, campaign and queue class from X-headers ([reception]
tenant_header, campaign_header, class_header); they name the sender's customers and
campaigns, so by default they do not reach recipients ([delivery] strip_private_headers).
Only the header block is scanned (up to the first empty line, at most 64 KiB), once
with one regex (linear: a literal alternation anchored at line starts), and the
content is copied only when something is removed. A folded field goes with its
continuation lines.
"""
from __future__ import annotations

import re

_HEADER_SCAN = 64 << 10


class PrivateHeaders:
    __slots__ = ("_rx",)

    def __init__(self, names: list[str]):
        names = sorted({n for n in names if n}, key=str.lower)
        self._rx = None
        if names:
            alt = b"|".join(re.escape(n.encode("ascii")) for n in names)
            self._rx = re.compile(rb"(?im)^(?:" + alt + rb")[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")

    def strip(self, content: bytes) -> bytes:
        rx = self._rx
        if rx is None:
            return content
        end = content.find(b"\r\n\r\n", 0, _HEADER_SCAN)
        head_end = end + 2 if end >= 0 else min(len(content), _HEADER_SCAN)
        head = content[:head_end]
        if rx.search(head) is None:
            return content
        return rx.sub(b"", head) + content[head_end:]
