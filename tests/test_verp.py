"""mta.verp: signed VERP return paths round-trip, fold case, stay within 64 octets, and
refuse every tampered, foreign or wrongly keyed address."""
from __future__ import annotations

import os
import re
import string

import pytest

from mta.verp import MAX_LOCAL, decode, encode

KEY = b"\x11" * 32
DOMAIN = "bounce.example.com"


def ids():
    yield bytes(16)
    yield b"\xff" * 16
    yield bytes(range(16))
    for _ in range(50):
        yield os.urandom(16)


@pytest.mark.parametrize("index", [0, 1, 9, 10, 99, 12345, 99_999, 100_000])
def test_round_trip(index):
    for msg_id in ids():
        a = encode(msg_id, index, KEY, "b", DOMAIN)
        local, _, dom = a.partition("@")
        assert dom == DOMAIN
        assert re.fullmatch(r"[a-z0-9-]+", local), f"got {local!r}, want [a-z0-9-] only"
        assert local.startswith("b-")
        got = decode(a, KEY, "b", DOMAIN)
        assert got == (msg_id, index), f"decode({a}): got {got}, want {(msg_id, index)}"
        assert decode(f"<{a}>", KEY, "b", DOMAIN) == (msg_id, index)


def test_case_insensitive():
    msg_id = os.urandom(16)
    a = encode(msg_id, 4242, KEY, "bounce-v", DOMAIN)
    for variant in (a.upper(), a.title(), a.swapcase(), a.split("@")[0].upper() + "@" + DOMAIN):
        got = decode(variant, KEY, "bounce-v", DOMAIN)
        assert got == (msg_id, 4242), f"decode({variant}): got {got}"
    assert decode(a, KEY, "BOUNCE-V", DOMAIN.upper()) == (msg_id, 4242)


def test_every_character_tampered_fails():
    msg_id = os.urandom(16)
    a = encode(msg_id, 31337, KEY, "b", DOMAIN)
    local = a.split("@")[0]
    alphabet = string.ascii_lowercase + string.digits + "-"
    tried = 0
    for i, ch in enumerate(local):
        for repl in alphabet:
            if repl == ch:
                continue
            forged = local[:i] + repl + local[i + 1:] + "@" + DOMAIN
            got = decode(forged, KEY, "b", DOMAIN)
            assert got is None, f"got {got} for {forged} (position {i} {ch!r}->{repl!r}), want None"
            tried += 1
    assert tried == len(local) * (len(alphabet) - 1)
    # insertions and deletions too
    for i in range(len(local)):
        assert decode(local[:i] + local[i + 1:] + "@" + DOMAIN, KEY, "b", DOMAIN) is None
        assert decode(local[:i] + "0" + local[i:] + "@" + DOMAIN, KEY, "b", DOMAIN) is None


def test_last_id_character_spare_bits():
    # 26 base32 characters hold 130 bits for a 128-bit id: a last character that differs
    # only in the 2 spare bits decodes to the same id, so decode insists on the canonical one.
    msg_id = bytes(16)
    a = encode(msg_id, 1, KEY, "b", DOMAIN)
    local = a.split("@")[0]
    pos = len("b-") + 25
    assert local[pos] == "a"
    for spare in "bcd":     # values 1..3: only the spare bits set
        forged = local[:pos] + spare + local[pos + 1:] + "@" + DOMAIN
        assert decode(forged, KEY, "b", DOMAIN) is None


def test_wrong_key_prefix_domain_fail():
    msg_id = os.urandom(16)
    a = encode(msg_id, 5, KEY, "b", DOMAIN)
    cases = [
        ("wrong key", b"\x12" * 32, "b", DOMAIN),
        ("wrong prefix", KEY, "c", DOMAIN),
        ("longer prefix", KEY, "bb", DOMAIN),
        ("wrong domain", KEY, "b", "other.example.com"),
        ("parent domain", KEY, "b", "example.com"),
    ]
    for name, key, prefix, domain in cases:
        assert decode(a, key, prefix, domain) is None, f"{name}: got a decode, want None"
    assert decode(a, KEY, "b", DOMAIN + ".") == (msg_id, 5)    # a root dot is the same domain


@pytest.mark.parametrize("garbage", [
    "", "@", "b-@" + DOMAIN, "postmaster@" + DOMAIN, "b-" + "a" * 26 + "1-" + "a" * 16,
    "b-" + "a" * 26 + "01-" + "a" * 16 + "@" + DOMAIN,          # leading zero
    "b-" + "a" * 26 + "-" + "a" * 16 + "@" + DOMAIN,            # no index
    "b-" + "a" * 26 + "99999999999-" + "a" * 16 + "@" + DOMAIN,  # index > 32 bits
    "b-" + "1" * 26 + "5-" + "a" * 16 + "@" + DOMAIN,           # 1 is not base32
    "b-" + "a" * 26 + "5-" + "a" * 300 + "@" + DOMAIN,
    "b-\u00e9" + "a" * 25 + "5-" + "a" * 16 + "@" + DOMAIN,
    "<<>>", "\x00\x00@\x00",
])
def test_garbage_is_none(garbage):
    assert decode(garbage, KEY, "b", DOMAIN) is None


def test_length_bound():
    worst = encode(b"\xff" * 16, 99_999, KEY, "b", DOMAIN)
    assert len(worst.split("@")[0]) <= MAX_LOCAL
    # 100,000 recipients: index 99,999; also 100,000 and the longest prefix that fits
    for index in (99_999, 100_000, 999_999):
        a = encode(os.urandom(16), index, KEY, "p" * 14, DOMAIN)
        n = len(a.split("@")[0])
        assert n <= MAX_LOCAL, f"got a {n}-octet local part for index {index}, want <= 64"
    with pytest.raises(ValueError, match="64"):
        encode(bytes(16), 100_000, KEY, "p" * 15, DOMAIN)


def test_mac_is_at_least_64_bits():
    a = encode(bytes(16), 0, KEY, "b", DOMAIN)
    mac = a.split("@")[0].rsplit("-", 1)[1]
    assert len(mac) * 5 >= 64, f"got a {len(mac) * 5}-bit MAC field"
    # different recipients of one message get unrelated MACs
    macs = {encode(bytes(16), i, KEY, "b", DOMAIN).split("@")[0].rsplit("-", 1)[1] for i in range(1000)}
    assert len(macs) == 1000


@pytest.mark.parametrize("args, match", [
    ((bytes(15), 0, KEY, "b", DOMAIN), "16"),
    ((bytes(16), -1, KEY, "b", DOMAIN), "range"),
    ((bytes(16), 2**32, KEY, "b", DOMAIN), "range"),
    ((bytes(16), 0, KEY, "B", DOMAIN), "prefix"),
    ((bytes(16), 0, KEY, "b_x", DOMAIN), "prefix"),
    ((bytes(16), 0, KEY, "", DOMAIN), "prefix"),
    ((bytes(16), 0, b"", "b", DOMAIN), "key"),
])
def test_encode_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        encode(*args)
