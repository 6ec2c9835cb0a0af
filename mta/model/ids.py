"""SpoolId: the time-ordered 128-bit id every accepted message gets.

Layout (big-endian, so byte order is time order): 48-bit Unix milliseconds,
32 random bits drawn once per process (two daemons on one spool never
collide), 48-bit counter. The text form is 32 lowercase hex digits; it is
what the 250 reply, the logs and `mta queue inspect` show.
"""
from __future__ import annotations

import os
import time

_NODE = int.from_bytes(os.urandom(4), "big")
_counter = int.from_bytes(os.urandom(3), "big")  # random start: restarts in one ms differ


def new_id() -> bytes:
    """A fresh 16-byte id."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFFFFFFFF
    ms = time.time_ns() // 1_000_000
    return (((ms & 0xFFFFFFFFFFFF) << 80) | (_NODE << 48) | _counter).to_bytes(16, "big")


def id_text(raw: bytes) -> str:
    return raw.hex()


def id_from_text(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 16:
        raise ValueError(f"a spool id is 32 hex digits, got {text!r}")
    return raw


def id_time(raw: bytes) -> float:
    """Unix time (seconds) at which the id was made."""
    return int.from_bytes(raw[:6], "big") / 1000.0
