"""The AUTH credentials file and `mta user` (mta/ingest/auth.py).

scrypt hashes with their parameters per entry, the 0600 rule, the CLI reading the
password from stdin, SASL decoding of hostile responses, the per-IP lockout, and the
verifier not running scrypt on the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import os
import stat
import subprocess
import sys
import threading

import orjson
import pytest

from conftest import ROOT
from mta.ingest.auth import (AuthError, Authenticator, User, UserFile, decode_sasl,
                             hash_password, verify_password)


def _mta(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], input=stdin, capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


def test_hash_and_verify_keep_parameters_per_entry():
    h = hash_password(b"s3cret", n=1 << 10, r=4, p=1)
    scheme, n, r, p, salt, key = h.split("$")
    assert (scheme, n, r, p) == ("scrypt", "1024", "4", "1")
    assert verify_password(b"s3cret", h) and not verify_password(b"s3cret!", h)
    assert hash_password(b"s3cret", n=1 << 10) != hash_password(b"s3cret", n=1 << 10)  # salted
    # damaged or hostile entries are refused, never raise
    for bad in ("", "md5$1$2$3$4$5", f"scrypt$1000$8$1${salt}${key}",       # N not a power of 2
                f"scrypt${1 << 24}$8$1${salt}${key}", "scrypt$1024$4$1$!!$!!"):
        assert not verify_password(b"s3cret", bad)


def test_cli_add_list_passwd_remove(tmp_path):
    users = tmp_path / "users.json"
    r = _mta("user", "--file", str(users), "add", "alice", "--tenant", "t1",
             "--domain", "Alice.Example", "--domain", "b.example", stdin=b"pw one\n")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    doc = orjson.loads(users.read_bytes())
    assert doc["users"]["alice"]["tenant"] == "t1"
    assert doc["users"]["alice"]["domains"] == ["alice.example", "b.example"]
    assert b"pw one" not in users.read_bytes()
    assert verify_password(b"pw one", doc["users"]["alice"]["hash"])
    r = _mta("user", "--file", str(users), "add", "alice", "--domain", "x.example", stdin=b"x\n")
    assert r.returncode != 0 and b"exists" in r.stderr
    r = _mta("user", "--file", str(users), "list")
    assert r.stdout.decode() == "alice\ttenant=t1\tdomains=alice.example,b.example\n"
    assert _mta("user", "--file", str(users), "passwd", "alice", stdin=b"pw two\n").returncode == 0
    f = UserFile.load(users)
    assert verify_password(b"pw two", f.users["alice"].hash)
    assert f.users["alice"].tenant == "t1"
    assert _mta("user", "--file", str(users), "remove", "alice").returncode == 0
    assert UserFile.load(users).users == {}
    assert _mta("user", "--file", str(users), "remove", "alice").returncode != 0
    r = _mta("user", "--file", str(users), "add", "bad:name", "--domain", "a.example", stdin=b"x\n")
    assert r.returncode != 0 and b"user name" in r.stderr


def test_file_readable_by_others_is_refused(tmp_path):
    users = tmp_path / "users.json"
    f = UserFile(users)
    f.set("bob", b"pw", None, ["*"])
    f.save()
    os.chmod(users, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        UserFile.load(users)
    os.chmod(users, 0o600)
    assert UserFile.load(users).users["bob"].sender_allowed("x@anything.example")


def test_sender_domains():
    u = User("u", "", "t", ("a.example",))
    assert u.sender_allowed("x@a.example") and u.sender_allowed("x@A.EXAMPLE")
    assert u.sender_allowed("")                     # bounces
    assert not u.sender_allowed("x@b.example") and not u.sender_allowed("x@sub.a.example")


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def test_decode_sasl_is_strict():
    assert decode_sasl(b"PLAIN", [_b64(b"\0alice\0pw")]) == ("alice", b"pw")
    assert decode_sasl(b"PLAIN", [_b64(b"alice\0alice\0pw")]) == ("alice", b"pw")
    assert decode_sasl(b"PLAIN", [_b64(b"admin\0alice\0pw")]) is None     # no proxying
    assert decode_sasl(b"PLAIN", [b"not base64!"]) is None
    assert decode_sasl(b"PLAIN", [_b64(b"\0alice")]) is None
    assert decode_sasl(b"PLAIN", [_b64(b"\0\0pw")]) is None
    assert decode_sasl(b"LOGIN", [_b64(b"alice"), _b64(b"pw")]) == ("alice", b"pw")
    assert decode_sasl(b"LOGIN", [_b64(b"alice")]) is None
    assert decode_sasl(b"PLAIN", [_b64(b"\0" + b"u" * 300 + b"\0pw")]) is None
    assert decode_sasl(b"PLAIN", [_b64(b"\0\xff\xfe\0pw")]) is None


def test_authenticator_lockout_and_off_loop(tmp_path):
    users = tmp_path / "users.json"
    f = UserFile(users)
    f.set("alice", b"right", "t", ["a.example"])
    f.save()
    auth = Authenticator(users, concurrency=2, max_failures=3, lockout=30.0)
    good = [_b64(b"\0alice\0right")]
    bad = [_b64(b"\0alice\0wrong")]

    async def run():
        loop_thread = threading.get_ident()
        seen = []
        import mta.ingest.auth as mod
        real = mod._verify

        def spy(pw, stored):
            seen.append(threading.get_ident())
            return real(pw, stored)

        mod._verify = spy
        try:
            user, name = await auth.check(b"PLAIN", good, "192.0.2.1")
            assert user is not None and user.tenant == "t" and name == "AUTH_OK"
            # unknown users cost a scrypt too
            assert await auth.check(b"PLAIN", [_b64(b"\0nobody\0x")], "192.0.2.2") == (None, "AUTH_FAILED")
            results = await asyncio.gather(*[auth.check(b"PLAIN", bad, "192.0.2.3") for _ in range(3)])
            assert all(r == (None, "AUTH_FAILED") for r in results)
            # locked out: even the right password gets 454, without a password check
            n = len(seen)
            assert await auth.check(b"PLAIN", good, "192.0.2.3") == (None, "AUTH_TEMP")
            assert len(seen) == n
            # another address is not affected
            assert (await auth.check(b"PLAIN", good, "192.0.2.4"))[0] is not None
        finally:
            mod._verify = real
        assert seen and loop_thread not in seen
    asyncio.run(run())
    assert auth.locked("192.0.2.3", 0.0)


def test_reload_keeps_old_users_on_a_broken_file(tmp_path):
    users = tmp_path / "users.json"
    f = UserFile(users)
    f.set("alice", b"pw", None, ["*"])
    f.save()
    auth = Authenticator(users)
    users.write_bytes(b"{broken")
    assert "not JSON" in auth.reload()
    assert "alice" in auth.users
    f.set("carol", b"pw", None, ["*"])
    f.save()
    assert auth.reload() is None and set(auth.users) == {"alice", "carol"}
