"""Sealed recipients: encrypted local parts, so the clear address never rests on disk.

An injecting application may send `RCPT TO:<e1k3.BLOB@example.com>` instead of the
clear `<alice@example.com>`. The spool, the logs, queue views, DSNs and metrics keep
what the client sent (the sealed form); the delivery dispatcher opens it in memory
right before the RCPT command, and reception opens it in memory for the suppression
check (which hashes it), then drops it.

Format, version 1 (the only one):

    local part = "e1" KEYID "." BASE64URL(siv(16) || ciphertext)

- "e1": the prefix "e" and the format version "1". A local part "e1", a key id of 1
  to 8 characters [a-z0-9], ".", then 23 or more base64url characters *claims* the
  format (with a keyring configured, such local parts are reserved for it);
  a claiming local part that does not open (unknown key id, bad base64, tag mismatch)
  is refused (550 5.1.3 at RCPT): the client learns nothing more than "refused".
  Any other local part is an ordinary clear address (cost: one prefix check).
- KEYID: names the key in the keyring (lower case letters and digits, 1-8), so keys
  rotate: the application seals with its newest key; the MTA opens with any key it
  still holds.
- cipher: AES-256-SIV (RFC 5297, `cryptography`'s AESSIV over OpenSSL; 64-byte keys):
  an authenticated, deterministic cipher whose 16-byte synthetic IV is also the tag.
  Why not AES-GCM: its 12-byte nonce would cost 16 base64 characters of the 64 an
  RFC 5321 local part may have (16 octets of clear local part instead of 28), and a
  random nonce per address would give one recipient a different sealed form per
  message. Deterministic means one address always seals to the same text, so whoever
  reads the spool can tell two messages went to the same (unknown) recipient: no more
  than the HMAC address hashes of `[log] recipient_privacy = "hashed"` tell already.
  No padding of the base64 text.
- associated data: b"mta-sealed-v1:" + the domain, lower-cased (IDNA A-label when the
  domain is non-ASCII), so a sealed local part cannot be moved to another domain.
- plaintext: the clear local part, UTF-8.

RFC 5321 4.5.3.1.1 bounds a local part to 64 octets. The overhead is the 16-octet
SIV, base64url (4 chars per 3 octets, unpadded) plus "e1" + key id + ".": with a
2-character key id ("e1k3." = 5 characters) 59 characters remain, i.e.
floor(59 * 3 / 4) = 44 octets of raw data, minus 16 = **28 octets of clear local
part** at most; `max_clear_length(key_id)` computes it for other key id lengths
(1-char key id: 29 octets, 8-char: 23). Longer clear local parts cannot be sealed (`seal` raises
ValueError): send them in the clear. Mail is sent to the opened address, and sealed
addresses are case-sensitive (base64url), so the sealed form is passed through
unchanged.

Here only the pure cipher: no file is read (keyrings are loaded by
mta/config/keyring.py). The function an application needs (`seal_local_part`) only
needs `cryptography`; an application may copy this:

    import base64
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    def seal(address: str, key_id: str, key: bytes) -> str:   # key: 64 bytes
        local, _, domain = address.rpartition("@")
        ad = b"mta-sealed-v1:" + domain.lower().encode("idna")
        ct = AESSIV(key).encrypt(local.encode(), [ad])          # siv || ciphertext
        blob = base64.urlsafe_b64encode(ct).rstrip(b"=").decode()
        return f"e1{key_id}.{blob}@{domain}"

(a clear local part longer than 28 octets cannot be sealed: send it in the clear)
"""
from __future__ import annotations

import base64
import binascii
import re


PREFIX = "e1"                 # "e" + format version 1
KEY_ID = re.compile(r"[a-z0-9]{1,8}\Z")
# the blob holds at least the SIV and one octet: 17 octets, 23 base64url characters
_CLAIM = re.compile(r"e1([a-z0-9]{1,8})\.([A-Za-z0-9_-]{23,})\Z")
SIV = 16                      # synthetic IV = tag, first in the ciphertext
MAX_LOCAL = 64                # RFC 5321 4.5.3.1.1
KEY_BYTES = 64                # AES-256-SIV: two 256-bit keys


class Unsealable(ValueError):
    """A local part that claims the sealed format but does not open."""


def max_clear_length(key_id: str = "k1") -> int:
    """The longest clear local part (octets) whose sealed form fits in 64 octets."""
    room = MAX_LOCAL - len(PREFIX) - len(key_id) - 1
    return room * 3 // 4 - SIV


def _ad(domain: str) -> bytes:
    d = domain.strip().rstrip(".").lower()
    try:
        d.encode("ascii")
    except UnicodeEncodeError:
        d = d.encode("idna").decode("ascii")
    return b"mta-sealed-v1:" + d.encode("ascii")


def claims(address: str) -> bool:
    """True when the local part starts like a sealed one (cheap: one prefix check)."""
    return address.startswith(PREFIX)


def seal_local_part(local: str, domain: str, key_id: str, key: bytes) -> str:
    """The sealed local part for `local`@`domain` under key `key_id`."""
    if not KEY_ID.match(key_id):
        raise ValueError("key id: 1 to 8 characters a-z 0-9")
    raw = local.encode("utf-8")
    limit = max_clear_length(key_id)
    if len(raw) > limit:
        raise ValueError(f"local part of {len(raw)} octets: at most {limit} can be sealed "
                         f"with key id {key_id!r} (64-octet limit of RFC 5321)")
    if not raw:
        raise ValueError("empty local part")
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV
    ct = AESSIV(key).encrypt(raw, [_ad(domain)])
    blob = base64.urlsafe_b64encode(ct).rstrip(b"=").decode("ascii")
    return f"{PREFIX}{key_id}.{blob}"


def seal(address: str, key_id: str, key: bytes) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an address: {address!r}")
    return seal_local_part(local, domain, key_id, key) + "@" + domain


class Keyring:
    """Key id -> 64-byte AES-256-SIV key; `current` is the id new addresses are sealed with
    (by tools: the MTA itself only opens)."""

    __slots__ = ("keys", "current", "_aead")

    def __init__(self, keys: dict[str, bytes], current: str | None = None):
        for kid, key in keys.items():
            if not KEY_ID.match(kid):
                raise ValueError(f"key id {kid!r}: 1 to 8 characters a-z 0-9")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r}: {len(key)} bytes, need {KEY_BYTES}")
        if current is not None and current not in keys:
            raise ValueError(f"current key {current!r} is not in the keyring")
        self.keys = dict(keys)
        self.current = current if current is not None else (next(reversed(keys)) if keys else None)
        # imported here, not at module level: every process importing mta (e.g. the bounce
        # parser children under a small RLIMIT_AS) would map OpenSSL's bindings otherwise
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV
        self._aead = {kid: AESSIV(key) for kid, key in keys.items()}

    def seal(self, address: str, key_id: str | None = None) -> str:
        kid = key_id or self.current
        if kid is None or kid not in self.keys:
            raise ValueError(f"no key {kid!r} in the keyring")
        return seal(address, kid, self.keys[kid])

    def open(self, address: str) -> str | None:
        """The clear address for a sealed one; None when `address` does not claim the
        format (an ordinary address); Unsealable when it claims it and does not open."""
        if not address.startswith(PREFIX):
            return None
        local, at, domain = address.rpartition("@")
        m = _CLAIM.match(local)
        if m is None or not at:
            return None
        aead = self._aead.get(m.group(1))
        if aead is None:
            raise Unsealable(f"unknown key id {m.group(1)!r}")
        blob = m.group(2)
        try:
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        except (binascii.Error, ValueError):
            raise Unsealable("bad base64") from None
        if len(raw) < SIV + 1:
            raise Unsealable("too short")
        from cryptography.exceptions import InvalidTag
        try:
            clear = aead.decrypt(raw, [_ad(domain)])
            return clear.decode("utf-8") + "@" + domain
        except (InvalidTag, UnicodeDecodeError, ValueError):
            raise Unsealable("does not open") from None

    def sealed_forms(self, address: str, limit: int = 8) -> list[str]:
        """The forms `address` (a clear one, as a remote server wrote it) seals to under
        each key, newest key first, at most `limit`: what a returned report about a
        sealed recipient is matched against (mta/feedback/trust.py). A local part in
        other case than sealed is tried lower-cased too (servers may fold it)."""
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or address.startswith(PREFIX):
            return []
        variants = [local] if local == local.lower() else [local, local.lower()]
        out: list[str] = []
        for kid in reversed(list(self.keys)):
            for v in variants:
                if len(out) >= limit:
                    return out
                try:
                    raw = v.encode("utf-8")
                    if len(raw) > max_clear_length(kid):
                        continue            # too long to have been sealed with this key id
                    ct = self._aead[kid].encrypt(raw, [_ad(domain)])
                except (ValueError, UnicodeError):   # not an address (surrogates, bad IDNA)
                    continue
                blob = base64.urlsafe_b64encode(ct).rstrip(b"=").decode("ascii")
                out.append(f"{PREFIX}{kid}.{blob}@{domain}")
        return out

    def replace(self, other: "Keyring") -> None:
        """Take `other`'s keys in place (a reload): every holder of this object sees them."""
        self.keys, self.current, self._aead = other.keys, other.current, other._aead

    def key_id(self, address: str) -> str | None:
        m = _CLAIM.match(address.rpartition("@")[0])
        return m.group(1) if m else None


def _replace_ci(text: str, old: str, new: str) -> str:
    low, tl = old.lower(), text.lower()
    if low not in tl:
        return text
    out, i = [], 0
    while True:
        j = tl.find(low, i)
        if j < 0:
            break
        out.append(text[i:j])
        out.append(new)
        i = j + len(low)
    out.append(text[i:])
    return "".join(out)


def redact(text: str, clear: str, sealed: str) -> str:
    """`text` (a remote reply, ASCII) without the clear address: servers echo the
    recipient. The whole clear address, then its local part alone (when 3 octets or
    more: a shorter one would mangle the text and tells little), are replaced by the
    sealed forms, in any case. Linear in the text."""
    if not clear or clear == sealed:
        return text
    text = _replace_ci(text, clear, sealed)
    local = clear.rpartition("@")[0]
    if len(local) >= 3:
        text = _replace_ci(text, local, sealed.rpartition("@")[0])
    return text
