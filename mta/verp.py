"""Signed VERP return paths: which message and recipient an out-of-band bounce is about.

The delivery stage puts `encode(...)` in MAIL FROM so a bounce that arrives later at
the bounce domain names the message (16-byte spool id) and the recipient (its index
in the envelope). Inbound DSN/ARF processing calls `decode(...)` on the address the
bounce was sent to; only addresses we minted decode, so a forged bounce cannot
suppress someone else's recipient.

Form:  <prefix>-<id><index>-<mac>@<domain>
  id     the 16-byte id in RFC 4648 base32, lowercase, unpadded: 26 characters
  index  the recipient index in decimal, no leading zeros
  mac    HMAC-SHA256(key, label | id | index as 4 bytes) truncated to 80 bits,
         base32 lowercase: 16 characters
e.g. b-aaaqeayeaudaocajbifqydiob47-5awyu5gngjf6h2ex@bounce.example: 44 octets plus
the prefix and the index digits, so 51 with prefix "b" and index 100000; a prefix of up
to 14 characters fits with six-digit indexes.

Only lowercase letters, digits and hyphens, because some MTAs lowercase the local
part; decode folds case. The local part stays within RFC 5321 4.5.3.1.1's 64 octets
(encode raises ValueError otherwise, so a long prefix fails at start-up, not at send).

Diagnostics: encode raises ValueError for a bad id, index, prefix or an over-long local
part. decode never raises on input from the network: it returns None for anything we
did not mint with this key, prefix and domain (the MAC is compared in constant time).
Trust: decode takes addresses from untrusted bounces.
"""
from __future__ import annotations

import base64
import hmac
import re

MAC_BYTES = 10            # 80 bits: forging takes ~2^80 tries, each one a bounce we receive
MAX_LOCAL = 64            # RFC 5321 4.5.3.1.1
_LABEL = b"mta-verp-v1\0"  # domain separation: this key may serve other purposes too
_PREFIX = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
_ID_CHARS = 26
_MAC_CHARS = 16
_BODY = re.compile(r"([a-z2-7]{26})(0|[1-9][0-9]{0,9})-([a-z2-7]{16})\Z")


def _mac(key: bytes, msg_id: bytes, rcpt_index: int) -> str:
    tag = hmac.digest(key, _LABEL + msg_id + rcpt_index.to_bytes(4, "big"), "sha256")[:MAC_BYTES]
    return base64.b32encode(tag).decode("ascii").lower()


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def encode(msg_id: bytes, rcpt_index: int, key: bytes, prefix: str, domain: str) -> str:
    """The signed return path for recipient `rcpt_index` of message `msg_id`."""
    if len(msg_id) != 16:
        raise ValueError(f"got a {len(msg_id)}-byte message id, want 16")
    if not 0 <= rcpt_index < 2**32:
        raise ValueError(f"recipient index {rcpt_index} out of range")
    if not _PREFIX.match(prefix):
        raise ValueError(f"bad VERP prefix {prefix!r}: want lowercase letters, digits, hyphens")
    if not key:
        raise ValueError("empty VERP key")
    local = f"{prefix}-{_b32(msg_id)}{rcpt_index}-{_mac(key, msg_id, rcpt_index)}"
    if len(local) > MAX_LOCAL:
        raise ValueError(f"VERP local part of {len(local)} octets exceeds {MAX_LOCAL} "
                         f"(RFC 5321 4.5.3.1.1): shorten the prefix {prefix!r}")
    return f"{local}@{domain.lower()}"


def decode(address: str, key: bytes, prefix: str, domain: str) -> tuple[bytes, int] | None:
    """(msg_id, rcpt_index) for an address `encode` made with this key, prefix and
    domain; None for a forged, garbled or foreign address. Case-insensitive."""
    try:
        a = address.strip()
        if a.startswith("<") and a.endswith(">"):
            a = a[1:-1]
        local, at, dom = a.rpartition("@")
        if not at or dom.lower().rstrip(".") != domain.lower().rstrip("."):
            return None
        local = local.lower()
        head = prefix.lower() + "-"
        if len(local) > 2 * MAX_LOCAL or not local.startswith(head):
            return None
        m = _BODY.match(local, len(head))
        if not m:
            return None
        id_text, index_text, mac = m.groups()
        msg_id = base64.b32decode(id_text.upper() + "======")
        if _b32(msg_id) != id_text:
            return None      # non-canonical: the last character's 2 spare bits were set
        index = int(index_text)
        if index >= 2**32:
            return None
        if not hmac.compare_digest(_mac(key, msg_id, index), mac):
            return None
        return msg_id, index
    except (ValueError, TypeError, UnicodeError):
        return None
