"""Scenario: inbound TLS and AUTH against `mta serve` with real clients (swaks, smtplib).

A listener on 127.0.80.1 whose relay_cidrs hold only 127.0.80.9: a client connecting
from 127.0.80.5 may relay only after AUTH (over STARTTLS, or on the implicit TLS
listener); require_tls refuses MAIL before STARTTLS; failed AUTH from one address
locks it out; SIGHUP with new certificate files serves the new certificate to new
connections on both kinds of listener. The certificates come from CAs the test makes
(tests/tlspki.py); swaks verifies them with --tls-verify.
"""
from __future__ import annotations

import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from tlspki import add_user, make_certs

ADDR = "127.0.80.1"       # the listeners
CLIENT = "127.0.80.5"     # not allowed to relay by address
RCPT = "rcpt@far.example"


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def swaks(port: int, *args: str, sender: str = "a@alice.example", ca=None,
          client: str = CLIENT) -> tuple[int, str]:
    assert shutil.which("swaks"), "swaks missing: tools/dev.sh installs it"
    cmd = ["swaks", "--server", ADDR, "--port", str(port), "--timeout", "20",
           "--local-interface", client, "--helo", "client.example",
           "--from", sender, "--to", RCPT, "--header", "X-Tenant: spoofed", *args]
    if ca is not None:
        cmd += ["--tls-verify", "--tls-ca-path", str(ca)]
    r = subprocess.run(cmd, capture_output=True, timeout=60)
    return r.returncode, r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")


@pytest.fixture
def rig(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki", tag="one")
    users = tmp_path / "users.json"
    add_user(users, "alice", "correct horse", "tenant-a", "alice.example")
    starttls, implicit, required = (_free_port(ADDR) for _ in range(3))
    common = (f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
              f'relay_cidrs = ["127.0.80.9/32"]\nauth_max_failures = 3\nauth_lockout = "10m"\n')
    listener = (f'relay_cidrs = ["127.0.80.9/32"]\n'
                f'[[listener]]\naddress = "{ADDR}"\nport = {starttls}\n{common}'
                f'[[listener]]\naddress = "{ADDR}"\nport = {implicit}\ntls = "implicit"\n{common}'
                f'[[listener]]\naddress = "{ADDR}"\nport = {required}\nrequire_tls = true\n{common}')
    d = daemon_factory(listener=listener, extra="[delivery]\nhold = true\n")
    d.ca, d.cert, d.key, d.users = ca, cert, key, users
    d.starttls, d.implicit, d.required = starttls, implicit, required
    return d


def test_swaks_relay_by_auth_from_a_non_relay_address(rig):
    d = rig
    rc, out = swaks(d.starttls)
    assert "554 5.7.1" in out, out                           # no AUTH: no relaying
    rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=d.ca)
    assert rc == 0 and "235 2.7.0" in out and "Ok: queued as" in out, out
    rc, out = swaks(d.starttls, "--tls", "--auth", "LOGIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=d.ca)
    assert rc == 0 and "Ok: queued as" in out, out
    rc, out = swaks(d.implicit, "--tlsc", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=d.ca)
    assert rc == 0 and "Ok: queued as" in out, out
    # the user's sender domains bind MAIL FROM
    rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", sender="a@mallory.example", ca=d.ca)
    assert rc != 0 and "550 5.7.1" in out, out
    d.stop()
    envs = list(d.spooled().envelopes.values())
    assert len(envs) == 3
    assert {e.tenant for e in envs} == {"tenant-a"}           # the user's, not X-Tenant
    assert {e.client_ip for e in envs} == {CLIENT}
    rejections = d.log_records("Rejection")
    assert any(r["reason"] == "relay_denied" for r in rejections)
    assert any(r["reason"] == "sender_denied" for r in rejections)


def test_wrong_passwords_lock_the_address_out(rig):
    d = rig
    for _ in range(3):
        rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                        "--auth-password", "wrong", ca=d.ca)
        assert "535 5.7.8" in out, out
    rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=d.ca)
    assert "454 4.7.0" in out and "queued" not in out, out
    # another client address is not locked out
    rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=d.ca, client="127.0.80.6")
    assert rc == 0 and "Ok: queued as" in out, out
    d.stop()
    reasons = [r["reason"] for r in d.log_records("Rejection") if r["client_ip"] == CLIENT]
    assert reasons.count("auth_failed") == 3 and reasons.count("auth_temp") == 1


def test_failed_auth_counts_towards_max_errors(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki")
    users = tmp_path / "users.json"
    add_user(users, "alice", "pw", "t", "*")
    port = _free_port(ADDR)
    d = daemon_factory(listener=f'[[listener]]\naddress = "{ADDR}"\nport = {port}\n'
                                f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
                                f'max_errors = 2\nauth_max_failures = 100\n')
    with smtplib.SMTP(ADDR, port, timeout=20) as s:
        s.starttls(context=ssl.create_default_context(cafile=str(ca)))
        s.ehlo("c.example")
        assert s.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 535
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
        assert code == 421, text
    d.stop()


def test_require_tls_listener(rig):
    d = rig
    with smtplib.SMTP(ADDR, d.required, timeout=20, source_address=(CLIENT, 0)) as s:
        s.ehlo("c.example")
        code, text = s.mail("a@alice.example")
        assert (code, text[:5]) == (530, b"5.7.0")
        s.starttls(context=ssl.create_default_context(cafile=str(d.ca)))
        s.login("alice", "correct horse")
        s.sendmail("a@alice.example", [RCPT], b"Subject: t\r\n\r\nhi\r\n",
                   mail_options=["REQUIRETLS"])
    d.stop()
    [env] = d.spooled().envelopes.values()
    assert env.requiretls and env.tenant == "tenant-a" and env.listener.endswith(str(d.required))


def _served_cn(port: int, implicit: bool) -> str:
    """The subject CN of the certificate a new connection gets."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ADDR, port), timeout=20) as raw:
        if not implicit:
            f = raw.makefile("rb")
            assert f.readline().startswith(b"220")
            raw.sendall(b"EHLO c.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220 2.0.0")
        with ctx.wrap_socket(raw, server_hostname="mx.test.example") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def test_sighup_serves_the_new_certificate(rig, tmp_path):
    d = rig
    assert _served_cn(d.starttls, False).endswith("one")
    assert _served_cn(d.implicit, True).endswith("one")
    # a session encrypted before the reload keeps working
    old = smtplib.SMTP(ADDR, d.starttls, timeout=20, source_address=(CLIENT, 0))
    old.starttls(context=ssl.create_default_context(cafile=str(d.ca)))
    ca2, cert2, key2 = make_certs(tmp_path / "pki2", tag="two")
    d.cert.write_bytes(cert2.read_bytes())
    d.key.write_bytes(key2.read_bytes())
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while not _served_cn(d.starttls, False).endswith("two"):
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.2)
    assert _served_cn(d.implicit, True).endswith("two")
    rc, out = swaks(d.implicit, "--tlsc", "--auth", "PLAIN", "--auth-user", "alice",
                    "--auth-password", "correct horse", ca=ca2)
    assert rc == 0 and "Ok: queued as" in out, out
    old.login("alice", "correct horse")
    old.sendmail("a@alice.example", [RCPT], b"Subject: t\r\n\r\nhi\r\n")
    old.quit()
    # a broken pair on the next reload keeps the certificate in force
    d.key.write_bytes(b"not a key")
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert _served_cn(d.starttls, False).endswith("two")
    d.stop()
    assert len(d.spooled().envelopes) == 2
    assert re.search(r"keeping what was loaded before", (d.workdir / "daemon.err").read_text())


def test_users_file_is_read_again_on_sighup(rig):
    d = rig
    add_user(d.users, "bob", "pw bob", "tenant-b", "bob.example")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while True:
        rc, out = swaks(d.starttls, "--tls", "--auth", "PLAIN", "--auth-user", "bob",
                        "--auth-password", "pw bob", sender="b@bob.example", ca=d.ca,
                        client="127.0.80.7")
        if rc == 0:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    d.stop()
    assert [e.tenant for e in d.spooled().envelopes.values()] == ["tenant-b"]


