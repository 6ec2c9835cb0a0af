"""mta.feedback.verp: signed VERP return paths round-trip, fold case, stay within 64 octets, prove
exactly one recipient until their expiry, and refuse every tampered, foreign or wrongly
keyed address; the first form (no recipient, no expiry) is recognised and proves nothing."""
from __future__ import annotations

import os
import re
import string
import time

import pytest

from mta.feedback.verp import (EXPIRED, LEGACY, MAX_LOCAL, MISMATCH, VALID, Token, encode, parse,
                      verify)

KEY = b"\x11" * 32
DOMAIN = "bounce.example.com"
RCPT = "Bob.Smith+news@Example.org"
NOW = 1_800_000_000.0
LATER = NOW + 35 * 86400
# made by the first form's encoder (commit 308a90e) for bytes(range(16)), index 7, KEY
LEGACY_ADDRESS = "b-aaaqeayeaudaocajbifqydiob47-c5igdu7sobglko5w@bounce.example.com"


def ids():
    yield bytes(16)
    yield b"\xff" * 16
    yield bytes(range(16))
    for _ in range(50):
        yield os.urandom(16)


def _check(address: str, rcpt: str = RCPT, key: bytes = KEY, now: float = NOW,
           prefix: str = "b", domain: str = DOMAIN) -> str | None:
    token = parse(address, prefix, domain)
    return None if token is None else verify(token, rcpt, key, now)


@pytest.mark.parametrize("index", [0, 1, 9, 10, 99, 12345, 99_999, 100_000])
def test_round_trip(index):
    for msg_id in ids():
        a = encode(msg_id, index, RCPT, LATER, KEY, "b", DOMAIN)
        local, _, dom = a.partition("@")
        assert dom == DOMAIN
        assert re.fullmatch(r"[a-z0-9-]+", local), f"got {local!r}, want [a-z0-9-] only"
        assert local.startswith("b-")
        token = parse(a, "b", DOMAIN)
        assert (token.msg_id, token.index) == (msg_id, index), f"parse({a}): got {token}"
        assert token.expiry_hour * 3600 >= LATER > (token.expiry_hour - 1) * 3600
        assert verify(token, RCPT, KEY, NOW) == VALID
        assert parse(f"<{a}>", "b", DOMAIN) == token


def test_case_insensitive_address_and_recipient():
    msg_id = os.urandom(16)
    a = encode(msg_id, 4242, RCPT, LATER, KEY, "bounce-v", DOMAIN)
    for variant in (a.upper(), a.title(), a.swapcase(), a.split("@")[0].upper() + "@" + DOMAIN):
        assert _check(variant, prefix="bounce-v") == VALID, f"{variant}"
    assert _check(a, prefix="BOUNCE-V", domain=DOMAIN.upper()) == VALID
    # a DSN may spell the recipient in another case, with brackets, or the domain as A-label
    for spelling in (RCPT.lower(), RCPT.upper(), f" <{RCPT}> "):
        assert _check(a, spelling, prefix="bounce-v") == VALID, spelling
    idn = encode(msg_id, 1, "user@b\u00fccher.example", LATER, KEY, "b", DOMAIN)
    assert _check(idn, "USER@xn--bcher-kva.example") == VALID


def test_proves_only_its_recipient():
    a = encode(os.urandom(16), 3, RCPT, LATER, KEY, "b", DOMAIN)
    for other in ("eve@example.org", "bob.smith@example.org", "bob.smith+news@example.net",
                  "bob.smith+news@example.org.evil", "", "not an address", "@", "x" * 600):
        assert _check(a, other) == MISMATCH, f"{other!r} matched a return path minted for {RCPT}"


def test_expiry():
    a = encode(bytes(16), 0, RCPT, NOW + 3600, KEY, "b", DOMAIN)
    assert _check(a, now=NOW) == VALID
    assert _check(a, now=NOW + 3600) == VALID            # valid through its last hour
    assert _check(a, now=NOW + 2 * 3600 + 1) == EXPIRED
    assert _check(a, "eve@example.org", now=NOW + 2 * 3600 + 1) == MISMATCH, \
        "a wrong recipient is a mismatch, expired or not"


def test_every_character_tampered_fails():
    msg_id = os.urandom(16)
    a = encode(msg_id, 31337, RCPT, LATER, KEY, "b", DOMAIN)
    local = a.split("@")[0]
    alphabet = string.ascii_lowercase + string.digits + "-"
    tried = 0
    for i, ch in enumerate(local):
        for repl in alphabet:
            if repl == ch:
                continue
            forged = local[:i] + repl + local[i + 1:] + "@" + DOMAIN
            got = _check(forged)
            assert got in (None, MISMATCH), f"got {got} for {forged} (position {i} {ch!r}->{repl!r})"
            tried += 1
    assert tried == len(local) * (len(alphabet) - 1)
    # insertions and deletions too (deleting 4 MAC characters yields the first form)
    for i in range(len(local)):
        assert _check(local[:i] + local[i + 1:] + "@" + DOMAIN) in (None, MISMATCH)
        assert _check(local[:i] + "0" + local[i:] + "@" + DOMAIN) in (None, MISMATCH)


def test_last_id_character_spare_bits():
    # 26 base32 characters hold 130 bits for a 128-bit id: a last character that differs
    # only in the 2 spare bits decodes to the same id, so parse insists on the canonical one.
    a = encode(bytes(16), 1, RCPT, LATER, KEY, "b", DOMAIN)
    local = a.split("@")[0]
    pos = len("b-") + 25
    assert local[pos] == "a"
    for spare in "bcd":     # values 1..3: only the spare bits set
        assert parse(local[:pos] + spare + local[pos + 1:] + "@" + DOMAIN, "b", DOMAIN) is None


def test_wrong_key_prefix_domain_fail():
    a = encode(os.urandom(16), 5, RCPT, LATER, KEY, "b", DOMAIN)
    assert _check(a, key=b"\x12" * 32) == MISMATCH
    for prefix, domain in (("c", DOMAIN), ("bb", DOMAIN), ("b", "other.example.com"),
                           ("b", "example.com")):
        assert parse(a, prefix, domain) is None, f"{prefix} {domain}: got a token, want None"
    assert _check(a, domain=DOMAIN + ".") == VALID    # a root dot is the same domain


def test_first_form_is_recognised_and_proves_nothing():
    token = parse(LEGACY_ADDRESS, "b", DOMAIN)
    assert token == Token(bytes(range(16)), 7, None, "c5igdu7sobglko5w")
    assert verify(token, RCPT, KEY, NOW) == LEGACY
    assert verify(token, RCPT, b"\x12" * 32, NOW) == MISMATCH, "a forged first form is forged"


@pytest.mark.parametrize("garbage", [
    "", "@", "b-@" + DOMAIN, "postmaster@" + DOMAIN, "b-" + "a" * 26 + "1-" + "a" * 20,
    "b-" + "a" * 26 + "01-" + "a" * 20 + "@" + DOMAIN,          # leading zero
    "b-" + "a" * 26 + "-" + "a" * 20 + "@" + DOMAIN,            # no index
    "b-" + "a" * 26 + "99999999999-" + "a" * 20 + "@" + DOMAIN,  # index > 32 bits
    "b-" + "1" * 26 + "5-" + "a" * 20 + "@" + DOMAIN,           # 1 is not base32
    "b-" + "a" * 26 + "5-" + "a" * 18 + "@" + DOMAIN,           # neither form's length
    "b-" + "a" * 26 + "5-" + "a" * 300 + "@" + DOMAIN,
    "b-" + "a" * 26 + "5-" + "a" * 20 + "@" + DOMAIN + "x" * 600,
    "b-\u00e9" + "a" * 25 + "5-" + "a" * 20 + "@" + DOMAIN,
    "<<>>", "\x00\x00@\x00", "b-" + "\udcff" * 40 + "@" + DOMAIN,
])
def test_garbage_is_none(garbage):
    assert parse(garbage, "b", DOMAIN) is None


@pytest.mark.parametrize("rcpt", ["", "@", "a@", "\udcff@\udcfe", "x@" + "\u00e9" * 300,
                                  "a@[127.0.0.1]", "a@xn--", "a@" + "." * 40])
def test_verify_never_raises_on_hostile_recipients(rcpt):
    token = parse(encode(bytes(16), 0, RCPT, LATER, KEY, "b", DOMAIN), "b", DOMAIN)
    assert verify(token, rcpt, KEY, NOW) == MISMATCH


def test_length_bound():
    worst = encode(b"\xff" * 16, 99_999, RCPT, LATER, KEY, "b", DOMAIN)
    assert len(worst.split("@")[0]) <= MAX_LOCAL
    # a listener takes at most 100,000 recipients: index 99,999 with the longest prefix
    n = len(encode(os.urandom(16), 99_999, RCPT, LATER, KEY, "p" * 11, DOMAIN).split("@")[0])
    assert n == MAX_LOCAL, f"got a {n}-octet local part, want exactly 64"
    with pytest.raises(ValueError, match="64"):
        encode(bytes(16), 99_999, RCPT, LATER, KEY, "p" * 12, DOMAIN)


def test_mac_is_at_least_64_bits_and_binds_every_field():
    a = encode(bytes(16), 0, RCPT, LATER, KEY, "b", DOMAIN)
    assert len(parse(a, "b", DOMAIN).mac) * 5 >= 64
    macs = {parse(encode(bytes(16), i, RCPT, LATER, KEY, "b", DOMAIN), "b", DOMAIN).mac
            for i in range(1000)}
    macs |= {parse(encode(bytes(16), 0, f"r{i}@example.org", LATER, KEY, "b", DOMAIN), "b",
                   DOMAIN).mac for i in range(1000)}
    macs |= {parse(encode(bytes(16), 0, RCPT, LATER + i * 3600, KEY, "b", DOMAIN), "b",
                   DOMAIN).mac for i in range(1, 1000)}
    assert len(macs) == 2999, "each index, recipient and expiry gets its own MAC"


def test_same_reception_same_address():
    # a retry mints the same return path (greylisting keys on MAIL FROM)
    received = time.time()
    assert (encode(bytes(16), 2, RCPT, received + 86400, KEY, "b", DOMAIN)
            == encode(bytes(16), 2, RCPT.lower(), received + 86400, KEY, "b", DOMAIN))


@pytest.mark.parametrize("args, match", [
    ((bytes(15), 0, RCPT, LATER, KEY, "b", DOMAIN), "16"),
    ((bytes(16), -1, RCPT, LATER, KEY, "b", DOMAIN), "range"),
    ((bytes(16), 2**32, RCPT, LATER, KEY, "b", DOMAIN), "range"),
    ((bytes(16), 0, RCPT, LATER, KEY, "B", DOMAIN), "prefix"),
    ((bytes(16), 0, RCPT, LATER, KEY, "b_x", DOMAIN), "prefix"),
    ((bytes(16), 0, RCPT, LATER, KEY, "", DOMAIN), "prefix"),
    ((bytes(16), 0, RCPT, LATER, b"", "b", DOMAIN), "key"),
    ((bytes(16), 0, "nobody", LATER, KEY, "b", DOMAIN), "address"),
    ((bytes(16), 0, RCPT, 0, KEY, "b", DOMAIN), "2089"),
    ((bytes(16), 0, RCPT, 4e9, KEY, "b", DOMAIN), "2089"),
])
def test_encode_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        encode(*args)
