"""STARTTLS command injection (CVE-2011-0411 class) against a real daemon (`mta serve`)
over real sockets: whatever a client sends in plaintext behind STARTTLS must never run,
be answered, or count once the session is encrypted. The daemon and its certificate,
user file and relay settings are tests/test_inbound_tls.py's `tls_daemon` (127.0.0.1 may
relay only after AUTH; alice may send as alice.example).

- a whole transaction (MAIL, RCPT, DATA, content, QUIT) pipelined after STARTTLS in one
  packet: the first reply inside TLS is for the client's first TLS command, MAIL needs a
  new EHLO, and nothing is received or spooled;
- AUTH PLAIN with good credentials pipelined after STARTTLS: the TLS session is not
  authenticated (relaying is refused) and the credentials were never checked;
- plaintext commands in a later packet, after the 220 and before the handshake: they are
  not executed (the handshake fails on them and the connection closes), and the daemon
  serves the next client.
"""
from __future__ import annotations

import base64
import socket

from test_inbound_tls import greeted, tls_daemon  # noqa: F401  (tls_daemon: the fixture)
from tlspki import HOST, client_context

GOOD_PLAIN = base64.b64encode(b"\0alice\0correct horse")


def _plain_session(d):
    return greeted(d, b"EHLO c.example\r\n", b"250 ")


def _tls(d, raw):
    tls = client_context(d.ca).wrap_socket(raw, server_hostname=HOST)
    return tls, tls.makefile("rb")


def test_transaction_pipelined_after_starttls_never_runs(tls_daemon):  # noqa: F811
    d = tls_daemon
    raw, f = _plain_session(d)
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<a@alice.example>\r\nRCPT TO:<victim@alice.example>\r\n"
                b"DATA\r\nSubject: injected\r\n\r\nevil\r\n.\r\nQUIT\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    tls, tf = _tls(d, raw)
    tls.sendall(b"NOOP\r\n")
    assert tf.readline().startswith(b"250 2.0.0 OK")    # not a reply to the injected MAIL
    tls.sendall(b"MAIL FROM:<a@alice.example>\r\n")
    assert tf.readline().startswith(b"503 5.5.1")       # EHLO forgotten (RFC 3207 4.2)
    tls.sendall(b"QUIT\r\n")
    assert tf.readline().startswith(b"221")
    tls.close()
    d.stop()
    assert d.log_records("Reception") == []
    assert not d.spooled().envelopes


def test_auth_pipelined_after_starttls_does_not_authenticate(tls_daemon):  # noqa: F811
    d = tls_daemon
    raw, f = _plain_session(d)
    raw.sendall(b"STARTTLS\r\nAUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    tls, tf = _tls(d, raw)
    tls.sendall(b"EHLO c.example\r\n")
    lines = []
    while not (line := tf.readline()).startswith(b"250 "):
        lines.append(line)
    assert any(b"AUTH SCRAM-SHA-256 PLAIN LOGIN" in x for x in lines)   # offered, so not yet done
    tls.sendall(b"MAIL FROM:<a@alice.example>\r\nRCPT TO:<r@far.example>\r\n")
    assert tf.readline().startswith(b"250 2.1.0")
    assert tf.readline().startswith(b"554")                # no relaying: not authenticated
    # the real AUTH inside TLS works, and only then relaying does
    tls.sendall(b"RSET\r\nAUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert tf.readline().startswith(b"250")
    assert tf.readline().startswith(b"235")
    tls.close()


def test_plaintext_after_the_220_never_runs(tls_daemon):  # noqa: F811
    d = tls_daemon
    raw, f = _plain_session(d)
    raw.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    raw.sendall(b"MAIL FROM:<a@alice.example>\r\nRCPT TO:<victim@alice.example>\r\nDATA\r\n")
    raw.settimeout(20)
    rest = b""
    try:
        while chunk := raw.recv(4096):      # a TLS alert at most, then EOF
            rest += chunk
            assert len(rest) < 65536
    except (ConnectionResetError, socket.timeout):
        pass
    raw.close()
    assert b"250" not in rest and b"354" not in rest, rest
    # the daemon is fine and serves the next client
    raw, f = _plain_session(d)
    raw.sendall(b"QUIT\r\n")
    assert f.readline().startswith(b"221")
    raw.close()
    d.stop()
    assert d.log_records("Reception") == []
