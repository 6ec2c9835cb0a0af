"""Signed VERP return paths: proof that we sent one recipient one message, until a date.

The delivery stage puts `encode(...)` in MAIL FROM. A bounce or complaint that comes
back later names a recipient; `parse` reads the message id, recipient index and expiry
out of the address, and `verify` recomputes the MAC with the recipient the report names.
Only that recipient matches, so a genuine return path cannot be used to suppress anyone
else, and nothing needs to be looked up: the original may be long gone from the spool.

Form:  <prefix>-<id><index>-<expiry><mac>@<domain>
  id      the 16-byte id in RFC 4648 base32, lowercase, unpadded: 26 characters
  index   the recipient index in decimal, no leading zeros
  expiry  the hour (since the Unix epoch) after which the address proves nothing,
          4 base32 characters (20 bits: until the year 2089)
  mac     HMAC-SHA256(key, label | id | index as 4 bytes | expiry as 4 bytes |
          recipient in suppression form) truncated to 80 bits: 16 base32 characters
e.g. b-aaaqeayeaudaocajbifqydiob447-ph6hwkjnfom7yw7qjezi@bounce.example: 48 octets plus
the prefix and the index digits, so 54 with prefix "b" and index 99999 (the largest a
listener accepts); a prefix of up to 11 characters fits with five-digit indexes.

The recipient is bound in its suppression form (mta.feedback.suppression.normalise: lowercased,
A-label domain), the form a suppression acts on, so a DSN that spells the address in
another case still matches.

Only lowercase letters, digits and hyphens, because some MTAs lowercase the local
part; parse folds case. The local part stays within RFC 5321 4.5.3.1.1's 64 octets
(encode raises ValueError otherwise, so a long prefix fails at start-up, not at send).

Return paths of the first form (`<prefix>-<id><index>-<mac>`, no recipient, no expiry)
still parse, as LEGACY: their MAC is checked only to say so in the log; they never
prove anything, because they would let their holder suppress anyone, forever. The cost:
bounces and complaints about mail sent before the upgrade do not suppress (their records
say verp_legacy, with the recipient, for an operator to act on); a message still queued
at the upgrade is retried with the new form.

Diagnostics: encode raises ValueError for a bad id, index, recipient, expiry, prefix or
an over-long local part. parse and verify never raise on input from the network (the
MAC is compared in constant time). Trust: both take addresses from untrusted reports.
"""
from __future__ import annotations

import base64
import hmac
import math
import re
import time
from dataclasses import dataclass

from mta.feedback.suppression import normalise

MAC_BYTES = 10            # 80 bits: forging takes ~2^80 tries, each one a report we receive
MAX_LOCAL = 64            # RFC 5321 4.5.3.1.1
MAX_ADDRESS = 512         # longer input is not one of ours (and is not hashed)
_LABEL = b"mta-verp-v2\0"  # domain separation: this key may serve other purposes too
_LEGACY_LABEL = b"mta-verp-v1\0"
_PREFIX = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
_BODY = re.compile(r"([a-z2-7]{26})(0|[1-9][0-9]{0,9})-([a-z2-7]{4})?([a-z2-7]{16})\Z")
_HOUR = 3600
_B32 = "abcdefghijklmnopqrstuvwxyz234567"   # RFC 4648, lowercase
_PAIRS = [a + b for a in _B32 for b in _B32]   # 10 bits -> two characters
_MAX_HOUR = 2**20                             # 4 characters

# verify()'s answers
VALID = "valid"
EXPIRED = "verp_expired"      # minted for this recipient, but too long ago
MISMATCH = "verp_mismatch"    # not minted for this recipient (or not by us)
LEGACY = "verp_legacy"        # ours, of the first form: names no recipient, never expires


@dataclass(frozen=True, slots=True)
class Token:
    """A return path as parsed, not yet verified: it proves nothing until `verify`."""

    msg_id: bytes
    index: int
    expiry_hour: int | None    # None for the legacy form
    mac: str


def _b32(raw: bytes) -> str:
    """RFC 4648 base32, lowercase, unpadded. Ten bits per step: base64.b32encode is pure
    Python and took 4 us of the 14 us an encode cost at every send."""
    chars = -(-len(raw) * 8 // 5)
    steps = -(-chars // 2)
    n = int.from_bytes(raw, "big") << (steps * 10 - len(raw) * 8)
    return "".join(_PAIRS[(n >> shift) & 1023]
                   for shift in range(steps * 10 - 10, -1, -10))[:chars]


def _hour_text(hour: int) -> str:
    return _PAIRS[hour >> 10] + _PAIRS[hour & 1023]


def _bound(recipient: str) -> bytes:
    # surrogatepass: any str encodes, so network input cannot make this raise
    return normalise(recipient).encode("utf-8", "surrogatepass")


def _mac(key: bytes, msg_id: bytes, index: int, hour: int, recipient: bytes) -> str:
    data = _LABEL + msg_id + index.to_bytes(4, "big") + hour.to_bytes(4, "big") + recipient
    return _b32(hmac.digest(key, data, "sha256")[:MAC_BYTES])


def _legacy_mac(key: bytes, msg_id: bytes, index: int) -> str:
    return _b32(hmac.digest(key, _LEGACY_LABEL + msg_id + index.to_bytes(4, "big"),
                            "sha256")[:MAC_BYTES])


def encode(msg_id: bytes, rcpt_index: int, recipient: str, expires: float, key: bytes,
           prefix: str, domain: str) -> str:
    """The signed return path for recipient `rcpt_index` (`recipient`) of `msg_id`,
    valid until Unix time `expires` (rounded up to the hour)."""
    if len(msg_id) != 16:
        raise ValueError(f"got a {len(msg_id)}-byte message id, want 16")
    if not 0 <= rcpt_index < 2**32:
        raise ValueError(f"recipient index {rcpt_index} out of range")
    if not _PREFIX.match(prefix):
        raise ValueError(f"bad VERP prefix {prefix!r}: want lowercase letters, digits, hyphens")
    if not key:
        raise ValueError("empty VERP key")
    hour = math.ceil(expires / _HOUR)
    if not 0 < hour < _MAX_HOUR:
        raise ValueError(f"VERP expiry {expires} is outside 1970-2089")
    mac = _mac(key, msg_id, rcpt_index, hour, _bound(recipient))
    local = f"{prefix}-{_b32(msg_id)}{rcpt_index}-{_hour_text(hour)}{mac}"
    if len(local) > MAX_LOCAL:
        raise ValueError(f"VERP local part of {len(local)} octets exceeds {MAX_LOCAL} "
                         f"(RFC 5321 4.5.3.1.1): shorten the prefix {prefix!r}")
    return f"{local}@{domain.lower()}"


def parse(address: str, prefix: str, domain: str) -> Token | None:
    """The token in an address of our form at `domain` with `prefix`; None for anything
    else. Case-insensitive; checks no MAC (see `verify`)."""
    try:
        a = address.strip()
        if a.startswith("<") and a.endswith(">"):
            a = a[1:-1]
        if len(a) > MAX_ADDRESS:
            return None
        local, at, dom = a.rpartition("@")
        if not at or dom.lower().rstrip(".") != domain.lower().rstrip("."):
            return None
        local = local.lower()
        head = prefix.lower() + "-"
        if not local.startswith(head):
            return None
        m = _BODY.match(local, len(head))
        if not m:
            return None
        id_text, index_text, hour_text, mac = m.groups()
        msg_id = base64.b32decode(id_text.upper() + "======")
        if _b32(msg_id) != id_text:
            return None      # non-canonical: the last character's 2 spare bits were set
        index = int(index_text)
        if index >= 2**32:
            return None
        hour = None
        if hour_text is not None:
            hour = 0
            for ch in hour_text:
                hour = hour << 5 | _B32.index(ch)
        return Token(msg_id, index, hour, mac)
    except (ValueError, TypeError, UnicodeError):
        return None


def verify(token: Token, recipient: str, key: bytes, now: float | None = None) -> str:
    """VALID when `token` was minted with `key` for `recipient` and has not expired;
    otherwise why not (EXPIRED, MISMATCH, LEGACY). Never raises."""
    if token.expiry_hour is None:
        legacy = _legacy_mac(key, token.msg_id, token.index)
        return LEGACY if hmac.compare_digest(legacy, token.mac) else MISMATCH
    if not recipient or len(recipient) > MAX_ADDRESS:
        return MISMATCH
    try:
        bound = _bound(recipient)
    except ValueError:       # not an address at all
        return MISMATCH
    expected = _mac(key, token.msg_id, token.index, token.expiry_hour, bound)
    if not hmac.compare_digest(expected, token.mac):
        return MISMATCH
    if (time.time() if now is None else now) > token.expiry_hour * _HOUR:
        return EXPIRED
    return VALID
