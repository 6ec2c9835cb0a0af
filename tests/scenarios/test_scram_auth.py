"""SMTP AUTH SCRAM-SHA-256 (RFC 5802, RFC 7677; issue 16 item 1's "SCRAM if you like").

Python's smtplib speaks no SCRAM, so the client side is written here from RFC 5802 and
checked against RFC 7677's test vectors, as is the server side (mta/ingest/auth.py
ScramServer). Then a real daemon (`mta serve`, STARTTLS listener on 127.0.136.1, the
client on 127.0.136.5, which may relay only after AUTH): a good exchange verifies the
server's signature and relays; a wrong password, an unknown user, a replayed or
tampered proof, a changed nonce, channel binding and garbage are refused and counted
towards the lockout; an entry written before SCRAM existed (no keys) still logs in with
PLAIN, and a file holding one is not offered SCRAM in EHLO.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from peers import _records
from tlspki import add_user, make_certs

from mta.ingest.auth import ScramServer, User, UserFile, parse_scram, saslprep, scram_keys

ADDR = "127.0.136.1"
CLIENT = "127.0.136.5"      # outside relay_cidrs: relaying needs AUTH

# RFC 7677 3
V_USER, V_PASSWORD = "user", b"pencil"
V_CNONCE = b"rOprNGfwEbeRWgbNEkqO"
V_SNONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
V_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
V_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
V_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                  b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
V_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                  b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
V_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


# -- the client side, from RFC 5802 3 ---------------------------------------------------

class ScramClient:
    def __init__(self, user: str, password: bytes, cnonce: bytes | None = None, gs2: bytes = b"n,,"):
        self.password = password
        self.gs2 = gs2
        name = user.replace("=", "=3D").replace(",", "=2C").encode()
        self.cnonce = cnonce or base64.b64encode(os.urandom(18))
        self.first_bare = b"n=" + name + b",r=" + self.cnonce

    def first(self) -> bytes:
        return self.gs2 + self.first_bare

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(a.split(b"=", 1) for a in server_first.split(b","))
        nonce, salt, i = attrs[b"r"], base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
        assert nonce.startswith(self.cnonce), "the server must extend our nonce"
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, i)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored = hashlib.sha256(client_key).digest()
        without_proof = b"c=" + base64.b64encode(self.gs2) + b",r=" + nonce
        auth_message = self.first_bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(stored, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.expected = b"v=" + base64.b64encode(hmac.digest(server_key, auth_message, "sha256"))
        return without_proof + b",p=" + base64.b64encode(proof)

    def check(self, server_final: bytes) -> bool:
        return hmac.compare_digest(server_final, self.expected)


# -- RFC 7677's vectors, both sides ---------------------------------------------------------

def test_rfc7677_vectors_client_and_server():
    client = ScramClient(V_USER, V_PASSWORD, V_CNONCE)
    assert client.first() == V_CLIENT_FIRST
    assert client.final(V_SERVER_FIRST) == V_CLIENT_FINAL
    assert client.check(V_SERVER_FINAL)

    entry = scram_keys(V_PASSWORD, V_SALT, 4096)
    assert parse_scram(entry)[:2] == (4096, V_SALT)
    users = {V_USER: User(V_USER, "unused", None, ("*",), entry)}
    server = ScramServer()
    assert server.first(V_CLIENT_FIRST, users, b"k" * 32, V_SNONCE) == V_SERVER_FIRST
    user, final = server.final(V_CLIENT_FINAL)
    assert user is users[V_USER] and final == V_SERVER_FINAL

    # a proof off by one bit, another nonce, a channel-binding header: refused
    for bad in (V_CLIENT_FINAL[:-6] + b"AAVQ=", V_CLIENT_FINAL.replace(b"$k0", b"$k1"),
                V_CLIENT_FINAL.replace(b"c=biws", b"c=eSws")):
        server = ScramServer()
        server.first(V_CLIENT_FIRST, users, b"k" * 32, V_SNONCE)
        assert server.final(bad) == (None, None), bad
    assert ScramServer().first(b"p=tls-unique,,n=user,r=abc", users, b"k" * 32) is None
    assert ScramServer().first(b"n,,m=ext,n=user,r=abc", users, b"k" * 32) is None
    assert ScramServer().first(b"n,a=admin,n=user,r=abc", users, b"k" * 32) is None
    # an unknown user gets a salt and iterations like anyone (stable per name), then fails
    a, b = ScramServer(), ScramServer()
    sa, sb = (x.first(b"n,,n=nobody,r=abc", users, b"k" * 32) for x in (a, b))
    assert sa.split(b",")[1:] == sb.split(b",")[1:]
    assert a.final(b"c=biws,r=" + sa.split(b",")[0][2:] + b",p=" + base64.b64encode(bytes(32))) \
        == (None, None)


def test_saslprep_rfc4013_examples_and_stored_keys(tmp_path):
    assert [saslprep(x) for x in ("I\u00adX", "user", "USER", "\u00aa", "\u2168")] == [
        "IX", "user", "USER", "a", "IX"]
    for bad in ("\u0007", "\u0627\u0031"):
        with pytest.raises(ValueError):
            saslprep(bad)
    f = UserFile(tmp_path / "u.json")
    user = f.set("soft", "I\u00adX".encode(), None, ["*"])       # a soft hyphen maps to nothing
    i, salt, _, _ = parse_scram(user.scram)
    assert user.scram == scram_keys(b"IX", salt, i)
    server, client = ScramServer(), ScramClient("soft", b"IX")
    got_user, final = server.final(client.final(server.first(client.first(), f.users, b"k" * 32)))
    assert got_user is user and client.check(final)
    assert f.set("bell", b"ring\x07", None, ["*"]).scram is None   # PLAIN only


def test_old_entries_without_scram_keys_still_load(tmp_path):
    path = tmp_path / "users.json"
    f = UserFile(path)
    f.set("new", b"secret", "t", ["*"])
    f.save()
    doc = json.loads(path.read_text())
    assert doc["users"]["new"]["scram"].startswith("scram-sha-256$32768$")
    doc["users"]["old"] = {k: v for k, v in doc["users"]["new"].items() if k != "scram"}
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)
    users = UserFile.load(path).users
    assert users["old"].scram is None and users["new"].scram is not None
    UserFile.load(path).save()          # rewriting keeps the old entry as it was
    assert "scram" not in json.loads(path.read_text())["users"]["old"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    listed = subprocess.run([sys.executable, "-m", "mta", "user", "--file", str(path), "list"],
                            capture_output=True, text=True, env=env, timeout=60).stdout
    assert listed.splitlines() == ["new\ttenant=t\tdomains=*",
                                   "old\ttenant=t\tdomains=*\tno SCRAM keys (passwd sets them)"]
    r = subprocess.run([sys.executable, "-m", "mta", "user", "--file", str(path), "passwd", "old"],
                       input=b"secret\n", capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert UserFile.load(path).users["old"].scram is not None


# -- the native core's side: each SCRAM response goes up, each challenge comes down -----

def test_native_core_scram_steps():
    from mta._native.wire import EV_AUTH, EV_NONE, ServerCore
    from mta.ingest.settings import server_settings
    core = ServerCore(server_settings("mx.test.example", "ESMTP", starttls=True, auth=True,
                                      scram=True), False)
    core.greeting()
    out, _ = core.feed(b"EHLO c.example\r\nAUTH SCRAM-SHA-256\r\n")
    assert out.endswith(b"538 5.7.11 Encryption required for requested authentication "
                        b"mechanism\r\n")
    core.feed(b"STARTTLS\r\n")
    core.tls_started()
    out, _ = core.feed(b"EHLO c.example\r\n")
    assert b"AUTH SCRAM-SHA-256 PLAIN LOGIN" in out
    with pytest.raises(Exception):
        core.auth_continue(b"x")             # no AUTH under way
    out, ev = core.feed(b"AUTH SCRAM-SHA-256\r\n")
    assert (out, ev) == (b"334 \r\n", EV_NONE)
    out, ev = core.feed(b"Zmlyc3Q=\r\n")
    assert ev == EV_AUTH and core.auth_request == (b"SCRAM-SHA-256", [b"Zmlyc3Q="])
    out, ev = core.auth_continue(b"c2VydmVy")
    assert (out, ev) == (b"334 c2VydmVy\r\n", EV_NONE)
    out, ev = core.feed(b"ZmluYWw=\r\n")
    assert ev == EV_AUTH and core.auth_request[1] == [b"Zmlyc3Q=", b"ZmluYWw="]
    core.auth_continue(b"dj1zaWc=")
    out, ev = core.feed(b"\r\n")
    assert ev == EV_AUTH and core.auth_request[1] == [b"Zmlyc3Q=", b"ZmluYWw=", b""]
    out, ev = core.auth_done(True, "", "t", None)
    assert out.startswith(b"235 2.7.0")
    # cancel with "*" inside an exchange: 501
    core2 = ServerCore(server_settings("mx.test.example", "ESMTP", starttls=True, auth=True), False)
    core2.greeting()
    core2.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
    core2.tls_started()
    core2.feed(b"EHLO c.example\r\n")
    core2.feed(b"AUTH SCRAM-SHA-256 Zmlyc3Q=\r\n")
    core2.auth_continue(b"c2VydmVy")
    out, _ = core2.feed(b"*\r\n")
    assert out.startswith(b"501 5.0.0")


# -- a real daemon ---------------------------------------------------------------------

def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@pytest.fixture
def rig(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki", tag="scram")
    users = tmp_path / "users.json"
    add_user(users, "alice", "correct horse", "tenant-a", "alice.example")
    port = _free_port(ADDR)
    listener = (f'relay_cidrs = ["127.0.136.9/32"]\n'
                f'[[listener]]\naddress = "{ADDR}"\nport = {port}\n'
                f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
                f'relay_cidrs = ["127.0.136.9/32"]\nauth_max_failures = 4\nauth_lockout = "10m"\n')
    d = daemon_factory(listener=listener, extra="[delivery]\nhold = true\n")
    d.ca, d.users, d.scram_port = ca, users, port
    return d


def _session(d, client: str = CLIENT) -> smtplib.SMTP:
    s = smtplib.SMTP(ADDR, d.scram_port, source_address=(client, 0), timeout=30)
    s.ehlo("client.example")
    ctx = ssl.create_default_context(cafile=str(d.ca))
    ctx.check_hostname = False      # the chain is verified; the name is mx.test.example
    s.starttls(context=ctx)
    s.ehlo("client.example")
    return s


def _scram(s: smtplib.SMTP, user: str, password: bytes, initial: bool = True,
           tamper=None) -> tuple[int, bytes, ScramClient]:
    """Run the exchange; the last (code, text) and the client (its check of the server)."""
    c = ScramClient(user, password)
    first = base64.b64encode(c.first())
    if initial:
        code, text = s.docmd("AUTH", "SCRAM-SHA-256 " + first.decode())
    else:
        code, text = s.docmd("AUTH", "SCRAM-SHA-256")
        assert (code, text) == (334, b""), (code, text)
        code, text = s.docmd(first.decode())
    if code != 334:
        return code, text, c
    final = c.final(base64.b64decode(text))
    if tamper is not None:
        final = tamper(final)
    code, text = s.docmd(base64.b64encode(final).decode())
    if code != 334:
        return code, text, c
    assert c.check(base64.b64decode(text)), "the server's signature must verify (mutual auth)"
    code, text = s.docmd("")
    return code, text, c


def test_scram_login_relays_and_failures_are_refused_and_counted(rig):
    d = rig
    with _session(d) as s:
        assert "SCRAM-SHA-256" in s.esmtp_features["auth"].upper().split()
        code, text, _ = _scram(s, "alice", b"correct horse")
        assert (code, text) == (235, b"2.7.0 Authentication successful"), (code, text)
        s.sendmail("a@alice.example", ["rcpt@far.example"], b"Subject: scram\r\n\r\nhi\r\n")
    rec, = _records(d, "Reception", 1)
    assert rec["tenant"] == "tenant-a"
    with _session(d) as s:                     # no initial response: "334 " first
        assert _scram(s, "alice", b"correct horse", initial=False)[0] == 235

    # refusals, all from CLIENT: each counts toward auth_max_failures (4)
    with _session(d) as s:
        assert _scram(s, "alice", b"wrong horse")[:2] == (535, b"5.7.8 Error: authentication "
                                                          b"credentials invalid")
        assert _scram(s, "mallory", b"correct horse")[0] == 535     # unknown: the same answer
        flip = (lambda f: f[:-6] + (b"AAAA" if f[-6:-2] != b"AAAA" else b"BBBB") + f[-2:])
        assert _scram(s, "alice", b"correct horse", tamper=flip)[0] == 535
        code, text = s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(
            b"p=tls-server-end-point,,n=alice,r=abc").decode())
        assert code == 501, (code, text)       # no channel binding offered
    with _session(d) as s:                     # locked out now, even with the password
        code, text, _ = _scram(s, "alice", b"correct horse")
        assert code == 454, (code, text)
    with _session(d, client="127.0.136.6") as s:   # another address is not
        assert _scram(s, "alice", b"correct horse")[0] == 235
        code, text = s.docmd("AUTH", "SCRAM-SHA-256")
        assert code == 503                     # already authenticated
    # cancel, and AUTH before TLS
    with _session(d, client="127.0.136.7") as s:
        assert s.docmd("AUTH", "SCRAM-SHA-256")[0] == 334
        assert s.docmd("*")[0] == 501
    with smtplib.SMTP(ADDR, d.scram_port, source_address=("127.0.136.7", 0), timeout=30) as s:
        s.ehlo("client.example")
        assert s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(
            ScramClient("alice", b"x").first()).decode())[0] == 538
    time.sleep(0.5)
    rejections = [r for r in d.log_records("Rejection") if r.get("reason", "").startswith("auth")]
    assert len(rejections) >= 4, d.log_records("Rejection")


def test_old_entry_without_keys_plain_still_works_and_scram_is_not_offered(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki", tag="old")
    users = tmp_path / "users.json"
    add_user(users, "olduser", "old pass", "tenant-o", "old.example")
    doc = json.loads(users.read_text())
    del doc["users"]["olduser"]["scram"]         # as a file written before SCRAM existed
    users.write_text(json.dumps(doc))
    os.chmod(users, 0o600)
    port = _free_port(ADDR)
    d = daemon_factory(listener=(
        f'relay_cidrs = ["127.0.136.9/32"]\n[[listener]]\naddress = "{ADDR}"\nport = {port}\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
        f'relay_cidrs = ["127.0.136.9/32"]\n'), extra="[delivery]\nhold = true\n")
    d.ca, d.scram_port = ca, port
    with _session(d, client="127.0.136.8") as s:
        assert s.esmtp_features["auth"].upper().split() == ["PLAIN", "LOGIN"]
        assert _scram(s, "olduser", b"old pass")[0] == 535   # no keys: SCRAM cannot succeed
        s.login("olduser", "old pass")                        # PLAIN
        s.sendmail("x@old.example", ["rcpt@far.example"], b"Subject: plain\r\n\r\nhi\r\n")
    assert [r["tenant"] for r in _records(d, "Reception", 1)] == ["tenant-o"]
