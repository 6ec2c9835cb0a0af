"""Version 1 spool records (16-byte header, no nonce), as written before issue 10.

No writer makes them any more, but recovery still reads them; the spool fuzz target
and the regression tests build v1 segments with these.
"""
from __future__ import annotations

import struct
import zlib

from mta.spool import records as rec


def v1_record(rtype: int, body: bytes) -> bytes:
    """A version 1 record with a valid checksum."""
    total = rec.HEADER_V1_SIZE + len(body)
    head = bytearray(rec.HEADER_V1.pack(rec.MAGIC, rec.V1, rtype, 0, total, 0)) + body
    struct.pack_into("<I", head, rec.CRC_OFFSET, zlib.crc32(memoryview(head)[rec.CRC_START:]))
    return bytes(head)


def v1_message(msg_id: bytes, content: bytes) -> bytes:
    env = b'{"id":"%s","sender":"","rcpts":[["x@y",null,null]]}' % msg_id.hex().encode()
    return v1_record(rec.RecordType.MESSAGE, rec.MESSAGE_FIXED.pack(msg_id, len(env)) + env + content)
