"""PrivateHeaders (mta/delivery/private_headers.py): the reception's classification
headers leave the header block, with their continuation lines, and nothing else does;
hostile header blocks cost linear time."""
from __future__ import annotations

import time

from mta.delivery.private_headers import PrivateHeaders

NAMES = ["X-Tenant", "X-Campaign", "X-Queue-Class"]


def test_only_the_named_fields_of_the_header_block_go():
    p = PrivateHeaders(NAMES)
    msg = (b"Received: from a\r\n\tby b\r\nX-Tenant: acme\r\nSubject: hi\r\n"
           b"x-campaign : spring\r\n\tsale\r\nX-Tenant-Note: stays\r\n\r\n"
           b"X-Tenant: in the body stays\r\n")
    assert p.strip(msg) == (b"Received: from a\r\n\tby b\r\nSubject: hi\r\n"
                            b"X-Tenant-Note: stays\r\n\r\nX-Tenant: in the body stays\r\n")
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert p.strip(plain) is plain, "nothing to remove: no copy"
    assert PrivateHeaders(["", ""]).strip(msg) is msg


def test_hostile_header_blocks_are_linear():
    p = PrivateHeaders(NAMES)
    for hostile in (b"X-Tenant: " + b"a" * 2_000_000 + b"\r\n\r\n",
                    b"X-Tenant: x\r\n" + b" \r\n" * 200_000 + b"\r\n",
                    b"X-Tenan" * 300_000 + b"\r\n\r\n",
                    b"\n" * 1_000_000):
        t = time.perf_counter()
        p.strip(hostile)
        assert time.perf_counter() - t < 0.5, "a scan of the header block, once"
