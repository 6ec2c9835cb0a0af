"""Inbound STARTTLS, implicit TLS, AUTH and REQUIRETLS (issue 16 items 1 and 3).

The native core's side (ServerCore fed bytes directly): what EHLO offers before and
after TLS, the STARTTLS reset and the injection defence (CVE-2011-0411), the AUTH
exchanges, require_tls, REQUIRETLS at MAIL. Then a real daemon (`mta serve`) with a
certificate from a CA this test makes: smtplib with STARTTLS and AUTH, plaintext
pipelined after STARTTLS over a real socket, implicit TLS, the TLS-Required header.
The certificates come from tests/tlspki.py (shared with tests/scenarios/test_tls_auth.py).
"""
from __future__ import annotations

import base64
import os
import smtplib
import socket
import subprocess
import sys
from typing import Any

import pytest

from conftest import ROOT, free_port
from mta._native.wire import EV_AUTH, EV_MESSAGE, EV_NONE, EV_STARTTLS, ServerCore
from mta.ingest.settings import server_settings
from tlspki import HOST, add_user, client_context, make_certs

# -- the native core ---------------------------------------------------------------

def _core(relay: bool = False, **kw) -> ServerCore:
    return ServerCore(server_settings(HOST, "ESMTP", **kw), relay)


def _feed(core: ServerCore, data: bytes) -> tuple[bytes, int]:
    return core.feed(data)


def test_ehlo_offers_starttls_in_plaintext_auth_and_requiretls_after():
    core = _core(starttls=True, auth=True)
    out, _ = _feed(core, b"EHLO c.example\r\n")
    assert b"250-STARTTLS\r\n" in out or b"250 STARTTLS\r\n" in out
    assert b"AUTH" not in out and b"REQUIRETLS" not in out
    out, ev = _feed(core, b"STARTTLS\r\n")
    assert out.startswith(b"220 2.0.0") and ev == EV_STARTTLS
    core.tls_started()
    out, _ = _feed(core, b"EHLO c.example\r\n")
    assert b"AUTH PLAIN LOGIN" in out and b"REQUIRETLS" in out and b"STARTTLS" not in out
    out, _ = _feed(core, b"STARTTLS\r\n")
    assert out.startswith(b"503 5.5.1")


def test_no_certificate_no_starttls():
    core = _core()
    out, _ = _feed(core, b"EHLO c.example\r\n")
    assert b"STARTTLS" not in out
    out, ev = _feed(core, b"STARTTLS\r\n")
    assert out.startswith(b"502") and ev == EV_NONE


def test_plaintext_pipelined_after_starttls_is_dropped():
    """CVE-2011-0411: commands sent in the same packet as STARTTLS never run."""
    core = _core(relay=True, starttls=True)
    out, ev = _feed(core, b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\n"
                          b"RCPT TO:<victim@y.example>\r\n")
    assert ev == EV_STARTTLS and b"250 2.1.0" not in out
    # more plaintext before the handshake is discarded too
    assert _feed(core, b"DATA\r\n") == (b"", EV_NONE)
    core.tls_started()
    # the session starts over: MAIL needs a new EHLO (RFC 3207 4.2)
    out, _ = _feed(core, b"MAIL FROM:<a@b.example>\r\n")
    assert out.startswith(b"503 5.5.1")
    out, _ = _feed(core, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert b"250 2.1.0" in out


def test_require_tls_refuses_mail_before_starttls():
    core = _core(relay=True, starttls=True, require_tls=True)
    out, _ = _feed(core, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert b"530 5.7.0" in out
    _feed(core, b"STARTTLS\r\n")
    core.tls_started()
    out, _ = _feed(core, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert out.endswith(b"250 2.1.0 Sender OK\r\n")


def test_auth_refused_before_tls_and_when_not_offered():
    core = _core(starttls=True, auth=True)
    out, _ = _feed(core, b"EHLO c\r\nAUTH PLAIN AGZvbwBiYXI=\r\n")
    assert b"538 5.7.11" in out
    core = _core()
    out, _ = _feed(core, b"EHLO c\r\nAUTH PLAIN AGZvbwBiYXI=\r\n")
    assert b"502 5.5.1" in out


def _tls_core(**kw) -> ServerCore:
    core = _core(starttls=True, auth=True, **kw)
    _feed(core, b"EHLO c\r\nSTARTTLS\r\n")
    core.tls_started()
    _feed(core, b"EHLO c\r\n")
    return core


def test_auth_plain_login_exchanges():
    core = _tls_core()
    out, ev = _feed(core, b"AUTH PLAIN AGZvbwBiYXI=\r\n")
    assert ev == EV_AUTH and core.auth_request == (b"PLAIN", [b"AGZvbwBiYXI="])
    out, ev = core.auth_done(False, "AUTH_FAILED")
    assert out.startswith(b"535 5.7.8")
    # PLAIN without an initial response, then LOGIN in two steps
    out, ev = _feed(core, b"AUTH PLAIN\r\n")
    assert out == b"334 \r\n" and ev == EV_NONE
    out, ev = _feed(core, b"AGZvbwBiYXI=\r\n")
    assert ev == EV_AUTH and core.auth_request == (b"PLAIN", [b"AGZvbwBiYXI="])
    core.auth_done(False, "AUTH_FAILED")
    out, ev = _feed(core, b"AUTH LOGIN\r\n")
    assert out == b"334 VXNlcm5hbWU6\r\n"
    out, ev = _feed(core, b"Zm9v\r\n")
    assert out == b"334 UGFzc3dvcmQ6\r\n"
    out, ev = _feed(core, b"YmFy\r\n")
    assert ev == EV_AUTH and core.auth_request == (b"LOGIN", [b"Zm9v", b"YmFy"])
    out, ev = core.auth_done(True, "", "tenant-a", lambda s: s.endswith("@ok.example"))
    assert out.startswith(b"235 2.7.0") and core.authed and core.relay_allowed
    out, _ = _feed(core, b"AUTH PLAIN AGZvbwBiYXI=\r\n")
    assert out.startswith(b"503")
    out, _ = _feed(core, b"MAIL FROM:<x@bad.example>\r\n")
    assert out.startswith(b"550 5.7.1")
    out, _ = _feed(core, b"MAIL FROM:<x@ok.example> REQUIRETLS\r\nRCPT TO:<r@far.example>\r\n"
                         b"DATA\r\n")
    assert b"250 2.1.0" in out and b"250 2.1.5" in out and b"354" in out
    out, ev = _feed(core, b"Subject: t\r\n\r\nhi\r\n.\r\n")
    assert ev == EV_MESSAGE
    t = core.transaction()
    assert t.tls and t.requiretls and t.auth_tenant == "tenant-a"


def test_auth_cancel_and_failures_count_towards_max_errors():
    core = _tls_core(max_errors=3)
    out, _ = _feed(core, b"AUTH LOGIN\r\n*\r\n")
    assert out.endswith(b"501 5.0.0 Authentication cancelled\r\n")
    _feed(core, b"AUTH PLAIN AGZvbwBiYXI=\r\n")
    core.auth_done(False, "AUTH_FAILED")
    _feed(core, b"AUTH PLAIN AGZvbwBiYXI=\r\n")
    out, _ = core.auth_done(False, "AUTH_FAILED")
    assert out.startswith(b"421 4.7.0") and core.closed


def test_requiretls_param_only_over_tls():
    core = _core(relay=True, starttls=True)
    out, _ = _feed(core, b"EHLO c\r\nMAIL FROM:<a@b.example> REQUIRETLS\r\n")
    assert b"555 5.5.4" in out


# -- a real daemon -----------------------------------------------------------------

@pytest.fixture
def tls_daemon(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki")
    users = tmp_path / "users.json"
    add_user(users, "alice", "correct horse", "tenant-a", "alice.example")
    implicit_port = free_port()
    listener = (f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
                f'relay_cidrs = ["10.255.0.0/16"]\n'
                f'[[listener]]\naddress = "127.0.0.1"\nport = {implicit_port}\ntls = "implicit"\n'
                f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n'
                f'relay_cidrs = ["10.255.0.0/16"]\n')
    d = daemon_factory(listener=listener, extra='[delivery]\nhold = true\n')
    d.ca, d.implicit_port, d.users = ca, implicit_port, users
    return d


def test_smtplib_starttls_auth_and_wrong_password(tls_daemon):
    d = tls_daemon
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0correct horse").decode())
        assert code == 538
        # relaying needs AUTH here: 127.0.0.1 is not in relay_cidrs
        s.mail("a@alice.example")
        assert s.rcpt("r@far.example")[0] == 554
        s.rset()
        s.starttls(context=client_context(d.ca))
        s.ehlo("client.example")
        assert "PLAIN" in s.esmtp_features["auth"] and s.has_extn("requiretls")
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("alice", "wrong")
        assert err.value.smtp_code == 535
        s.login("alice", "correct horse")
        s.sendmail("a@alice.example", ["r@far.example"],
                   b"X-Tenant: other\r\nSubject: t\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            s.sendmail("a@mallory.example", ["r@far.example"], b"Subject: t\r\n\r\nx\r\n")
        assert err.value.smtp_code == 550
    d.stop()
    recs = [r for r in d.log_records("Reception")]
    assert len(recs) == 1 and recs[0]["tenant"] == "tenant-a"


def test_implicit_tls_listener_and_login(tls_daemon):
    d = tls_daemon
    with smtplib.SMTP_SSL("127.0.0.1", d.implicit_port, timeout=20,
                          context=client_context(d.ca)) as s:
        s.ehlo("client.example")
        assert not s.has_extn("starttls") and s.has_extn("auth")
        s.ehlo_resp  # noqa: B018
        s.user, s.password = "alice", "correct horse"
        code, _ = s.auth("LOGIN", s.auth_login)
        assert code == 235
        s.sendmail("", ["r@far.example"], b"Subject: t\r\n\r\nhello\r\n",
                   mail_options=["REQUIRETLS"])
    d.stop()
    [env] = list(d.spooled().envelopes.values())
    assert env.requiretls and env.tenant == "tenant-a"
    assert env.protocol == "ESMTPSA"


def test_plaintext_injection_after_starttls_over_a_socket(tls_daemon):
    """The whole attack in one packet: the server must not answer MAIL over TLS."""
    d = tls_daemon
    raw, f = greeted(d, b"EHLO c.example\r\n", b"250 ")
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    tls = client_context(d.ca).wrap_socket(raw, server_hostname=HOST)
    tf = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    # the first reply over TLS is the NOOP's, not a 250 for the injected MAIL
    assert tf.readline().startswith(b"250 2.0.0 OK")
    tls.sendall(b"MAIL FROM:<a@b.example>\r\n")
    assert tf.readline().startswith(b"503 5.5.1")    # EHLO forgotten
    tls.close()


def greeted(d, send: bytes, until: bytes) -> tuple[socket.socket, Any]:
    """A plaintext connection to `d`: its greeting read, `send` sent, and the replies read
    up to the line that starts with `until` -> (socket, its reader)."""
    raw = socket.create_connection(("127.0.0.1", d.port), timeout=20)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(send)
    while not (line := f.readline()).startswith(until):
        assert line, f"got the connection closed before a reply starting {until!r}"
    return raw, f


def _starttls(d, ctx, session=None):
    raw, _ = greeted(d, b"EHLO c.example\r\nSTARTTLS\r\n", b"220 2.0.0")
    tls = ctx.wrap_socket(raw, server_hostname=HOST, session=session)
    tf = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    assert tf.readline().startswith(b"250 2.0.0")  # the session ticket came before it
    return tls


def test_starttls_session_resumes_with_the_ticket(tls_daemon):
    """The listener issues one TLS 1.3 ticket per handshake (tls.py, a CPU saving): a client
    resumes with it on later connections, more than once."""
    d = tls_daemon
    ctx = client_context(d.ca)
    first = _starttls(d, ctx)
    assert first.version() == "TLSv1.3" and not first.session_reused
    assert "GCM" in first.cipher()[0] or "CHACHA20" in first.cipher()[0]
    session = first.session
    first.close()
    assert session is not None and session.has_ticket
    for _ in range(2):      # the one ticket serves several connections
        again = _starttls(d, ctx, session)
        assert again.session_reused
        again.close()


def test_tls_required_no_header_is_recorded(tls_daemon):
    d = tls_daemon
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.starttls(context=client_context(d.ca))
        s.login("alice", "correct horse")
        s.sendmail("a@alice.example", ["r@far.example"],
                   b"Subject: t\r\nTLS-Required: No\r\n\r\nhello\r\n")
    d.stop()
    [env] = list(d.spooled().envelopes.values())
    assert env.tls_optional and not env.requiretls
    assert env.protocol == "ESMTPSA"


def test_check_config_refuses_what_cannot_work(daemon_factory, tmp_path):
    ca, cert, key = make_certs(tmp_path / "pki")
    users = tmp_path / "users.json"
    add_user(users, "alice", "pw", "t", "*")
    os.chmod(users, 0o644)
    cases = [("require_tls = true\n", "need tls_cert and tls_key"),
             (f'tls_cert = "{cert}"\n', "tls_cert and tls_key go together"),
             (f'tls_cert = "{cert}"\ntls_key = "{ca}"\n', "tls_key"),
             (f'tls_cert = "{cert}"\ntls_key = "{key}"\nauth_users = "{users}"\n', "chmod 600")]
    for listener, want in cases:
        d = daemon_factory(listener=listener, start=False)
        r = subprocess.run([sys.executable, "-m", "mta", "check-config", "-c", str(d.config)],
                           capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           timeout=60)
        assert r.returncode == 1 and want in r.stderr.decode() + r.stdout.decode(), (listener, r)
