"""Sealed recipients (mta/model/sealed.py, mta/config/keyring.py): the format, the keyring
file, the RCPT hook and the reply redaction. End to end: tests/scenarios/test_privacy_at_rest.py."""
from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from mta.config import parse_config
from mta.config.keyring import KeyringError, load_keyring, parse_keyring
from mta.model import sealed
from mta.model.sealed import Keyring, Unsealable, max_clear_length, redact

K1 = bytes(range(64))
K2 = bytes(range(64, 128))


def test_round_trip_and_format():
    ring = Keyring({"k1": K1, "k2": K2})
    s = ring.seal("Alice.Smith@Example.COM", "k1")
    local, _, domain = s.rpartition("@")
    assert domain == "Example.COM"
    assert re.fullmatch(r"e1k1\.[A-Za-z0-9_-]+", local), s
    assert len(local) <= 64
    assert ring.open(s) == "Alice.Smith@Example.COM"
    assert ring.key_id(s) == "k1"
    assert ring.seal("bob@example.com") == ring.seal("bob@example.com", "k2"), "k2 is current (last)"
    # deterministic (AES-SIV): one address, one sealed form, under one key
    assert ring.seal("bob@example.com") == ring.seal("bob@example.com")
    assert ring.seal("bob@example.com", "k1") != ring.seal("bob@example.com", "k2")
    assert ring.open("alice@example.com") is None, "an ordinary address"
    assert ring.open("e1xyz@example.com") is None, "no '.': does not claim the format"
    assert ring.open("e1k1.abc.def@example.com") is None


def test_utf8_local_part_and_idn_domain():
    ring = Keyring({"k1": K1})
    s = ring.seal("jörg@bücher.example", "k1")
    assert ring.open(s) == "jörg@bücher.example"
    # the associated data is the A-label: the same mailbox spelled as an A-label opens too
    a_label = s.rpartition("@")[0] + "@" + "bücher.example".encode("idna").decode()
    assert ring.open(a_label) == "jörg@xn--bcher-kva.example"


def test_length_limit():
    assert max_clear_length("k1") == 28
    assert max_clear_length("1") == 29
    assert max_clear_length("abcdefgh") == 23
    ring = Keyring({"k1": K1})
    longest = "x" * 28
    s = ring.seal(longest + "@example.com", "k1")
    assert len(s.rpartition("@")[0]) <= 64 and ring.open(s) == longest + "@example.com"
    with pytest.raises(ValueError, match="at most 28"):
        ring.seal("x" * 29 + "@example.com", "k1")
    with pytest.raises(ValueError):
        ring.seal("@example.com", "k1")


def test_bound_to_the_domain_and_tamper_refused():
    ring = Keyring({"k1": K1, "k2": K2})
    s = ring.seal("alice@example.com", "k1")
    local = s.rpartition("@")[0]
    with pytest.raises(Unsealable):
        ring.open(local + "@example.org")
    assert ring.open(local + "@EXAMPLE.com") == "alice@EXAMPLE.com", "domains are case-blind"
    for i in range(5, len(local)):   # every character of the blob
        c = "A" if local[i] != "A" else "B"
        bad = local[:i] + c + local[i + 1:] + "@example.com"
        try:
            got = ring.open(bad)
        except Unsealable:
            continue
        # a change in the last base64 character's unused bits decodes to the same bytes
        assert got == "alice@example.com", bad
    with pytest.raises(Unsealable, match="unknown key id"):
        ring.open("e1k9" + local[4:] + "@example.com")
    with pytest.raises(Unsealable):
        ring.open("e1k2" + local[4:] + "@example.com")   # right blob, wrong key
    assert ring.open("e1k1.AAAA@example.com") is None, "too short to claim the format"
    assert ring.open("e1k1." + "A" * 22 + "@example.com") is None
    with pytest.raises(Unsealable):
        ring.open("e1k1." + "A" * 23 + "@example.com")    # claims it, does not open
    with pytest.raises(Unsealable):
        ring.open("e1k1." + local[5:-3] + "@example.com")  # truncated


def test_rotation_keeps_old_messages_openable():
    old = Keyring({"k1": K1}).seal("alice@example.com")
    rotated = Keyring({"k1": K1, "k2": K2})
    assert rotated.current == "k2"
    assert rotated.open(old) == "alice@example.com"
    with pytest.raises(Unsealable):
        Keyring({"k2": K2}).open(old)


def test_documented_snippet_matches():
    """The function the module docstring offers to applications seals what we open."""
    doc = sealed.__doc__
    snippet = textwrap.dedent(doc[doc.index("    import base64"):doc.index("(a clear local part")])
    ns: dict = {}
    exec(snippet, ns)
    ring = Keyring({"k3": K2})
    for addr in ("alice@example.com", "Bob.Smith@Sub.Example.org", "jörg@bücher.example"):
        s = ns["seal"](addr, "k3", K2)
        assert ring.open(s).rpartition("@")[0] == addr.rpartition("@")[0], addr


def test_keyring_file(tmp_path):
    p = tmp_path / "ring"
    b1, b2 = base64.b64encode(K1).decode(), base64.urlsafe_b64encode(K2).decode().rstrip("=")
    p.write_text(f"# keys\nk1 {b1}\n\nk2 {b2}\ncurrent k1\n")
    os.chmod(p, 0o600)
    ring = load_keyring(p)
    assert ring.keys == {"k1": K1, "k2": K2} and ring.current == "k1"
    os.chmod(p, 0o640)
    with pytest.raises(KeyringError, match="chmod 600"):
        load_keyring(p)
    for bad, why in ((f"K1 {b1}\n", "key id"), (f"k1 {b1}\nk1 {b1}\n", "twice"),
                     ("k1 c2hvcnQ=\n", "bytes"), ("k1 !!!!\n", "base64"), ("", "no keys"),
                     (f"k1 {b1}\ncurrent k2\n", "current"), ("k1\n", "expected")):
        with pytest.raises(KeyringError, match=why):
            parse_keyring(bad)
    with pytest.raises(KeyringError):
        load_keyring(tmp_path / "missing")


def test_config_key_and_bad_keyring_refused_at_start(tmp_path):
    from mta.config import ConfigError
    from mta.feedback.state import Feedback
    cfg = parse_config(f'[privacy]\nkeyring = "{tmp_path}/nope"\n[suppression]\nenabled = false\n')
    assert str(cfg.privacy.keyring).endswith("nope")
    with pytest.raises(ConfigError, match="privacy.keyring"):
        Feedback(cfg)
    assert parse_config("").privacy.keyring is None


def test_rcpt_hook_opens_for_suppression_and_refuses_unopenable(tmp_path):
    from mta.feedback.rcpt_policy import RecipientPolicy
    from mta.feedback.state import Feedback
    ring_path = tmp_path / "ring"
    ring_path.write_text(f"k1 {base64.b64encode(K1).decode()}\n")
    os.chmod(ring_path, 0o600)
    cfg = parse_config(f'[privacy]\nkeyring = "{ring_path}"\n'
                       f'[suppression]\nstore = "{tmp_path}/s.sqlite"\nkey_file = "{tmp_path}/s.key"\n')
    fb = Feedback(cfg)
    try:
        fb.suppress("blocked@example.com", "global", "manual")
        policy = RecipientPolicy(fb)
        ring = Keyring({"k1": K1})
        blocked = ring.seal("blocked@example.com")
        name, line = policy.rcpt_check(blocked, "app@sender.test", True)
        assert name == "SUPPRESSED" and line.startswith(b"550 5.7.1")
        assert b"blocked@" not in line, "the reply names the sealed form only"
        assert policy.rcpt_check(ring.seal("fine@example.com"), "app@sender.test", True) is None
        assert policy.rcpt_check("e1k1.AAAAAAAAAAAAAAAAAAAAAAAAAAAA@example.com", "a@b.c", True) == \
            ("BAD_SEALED", b"550 5.1.3 Error: bad recipient address\r\n")
        # clients that may not relay learn nothing: the relay check answers them
        assert policy.rcpt_check("e1k1.AAAAAAAAAAAAAAAAAAAAAAAAAAAA@example.com", "a@b.c", False) is None
        # after DATA (drop mode / tenant scope): filter() checks the clear address, reports the sealed
        policy.reject = False
        rcpts = [(blocked, None, None), (ring.seal("fine@example.com"), None, None)]
        dropped = policy.filter(rcpts, "app@sender.test", None)
        assert [d[0] for d in dropped] == [blocked] and len(rcpts) == 1
        # hard bounces and log hashes of a sealed recipient use its clear address
        gone = ring.seal("gone@example.com")
        assert fb.hard_bounce(gone, "src", "site")
        assert fb.suppressions.check("gone@example.com") is not None
        assert fb.hash_address(gone) == fb.hash_address("gone@example.com")
    finally:
        fb.close()


def test_redact():
    clear, sealed_addr = "Alice.Smith@example.com", "e1k1.XYZ@example.com"
    text = "550 5.1.1 <alice.smith@EXAMPLE.com>: user unknown; alice.smith? ALICE.SMITH"
    out = redact(text, clear, sealed_addr)
    assert "alice" not in out.lower() and out.count("e1k1.XYZ") == 3, out
    assert redact("user ab unknown", "ab@x.org", "e1k1.Q@x.org") == "user ab unknown", \
        "a local part under 3 octets is only replaced as the whole address"
    assert redact("no echo", clear, sealed_addr) == "no echo"


def test_cli_keygen_encrypt_decrypt(tmp_path):
    ring = tmp_path / "ring"
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}

    def mta(*args):
        return subprocess.run([sys.executable, "-m", "mta", "privacy", *args, "--keyring", str(ring)],
                              capture_output=True, text=True, env=env, timeout=60)

    assert mta("keygen", "k1").returncode == 0
    assert oct(ring.stat().st_mode & 0o777) == "0o600"
    assert mta("keygen", "k2").returncode == 0
    r = mta("keygen", "k2")
    assert r.returncode != 0 and "already" in r.stderr
    r = mta("encrypt", "alice@example.com")
    s = r.stdout.strip()
    assert r.returncode == 0 and s.startswith("e1k2.") and s.endswith("@example.com"), r
    r = mta("encrypt", "alice@example.com", "--key-id", "k1")
    assert r.stdout.startswith("e1k1.")
    r = mta("decrypt", s)
    assert r.returncode == 0 and r.stdout.strip() == "alice@example.com"
    r = mta("decrypt", "e1k2.AAAAAAAAAAAAAAAAAAAAAAAAAAAA@example.com")
    assert r.returncode != 0 and "does not open" in r.stderr
    r = mta("encrypt", "x" * 40 + "@example.com")
    assert r.returncode != 0 and "at most" in r.stderr
