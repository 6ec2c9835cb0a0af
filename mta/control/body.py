"""An HTTP body read whole within a size bound: the admin API's requests (/inject, /xfer)
and a sibling worker's answers to the node view (fanout.py). Never more than the bound
plus one chunk in memory, whatever the peer claims or sends.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import StreamReader


class BodyTooLarge(Exception):
    """The body (or its Content-Length) is over the bound."""


async def read_bounded(content: StreamReader, length: int | None, limit: int) -> bytes:
    """The body of an aiohttp request or response (`content`, with its Content-Length
    `length` or None); BodyTooLarge past `limit` bytes."""
    if length is not None and length > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
