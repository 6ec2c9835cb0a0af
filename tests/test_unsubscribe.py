"""mta.feedback.unsubscribe: RFC 8058 tokens and headers, and the one-click endpoint driven by real
HTTP clients (http.client, urllib, curl when installed) over 127.0.0.1, plain and HTTPS
with a throwaway self-signed certificate. Suppression is checked through a fresh
SuppressionList on the same SQLite file."""
from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from mta.feedback.suppression import SuppressionList, address_hash, hash_text
from mta.feedback.unsubscribe import (UnsubscribeServer, list_unsubscribe_headers, make_token,
                             read_token)

KEY = b"\x42" * 32
ADDR = "Reader@Example.com"
ONE_CLICK = b"List-Unsubscribe=One-Click"
CURL = shutil.which("curl")


# --- tokens and headers ----------------------------------------------------------------

def test_token_round_trip_and_content():
    for scope in ("global", "tenant:acme", "domain:news.example"):
        t = make_token(ADDR, scope, KEY)
        assert set(t) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        got = read_token(t, KEY)
        want = (hash_text(address_hash(KEY, ADDR)), scope)
        assert got == want, f"got {got}, want {want}"
        assert "reader" not in t.lower()
    # the same recipient in other case gives the same token (the hash is normalised)
    assert make_token("reader@EXAMPLE.COM", "global", KEY) == make_token(ADDR, "global", KEY)


def test_token_forgeries_rejected():
    t = make_token(ADDR, "tenant:acme", KEY)
    assert read_token(t, b"\x43" * 32) is None, "got a token accepted under another key"
    for i in range(len(t)):
        for repl in "Aa0-_":
            if repl != t[i]:
                forged = t[:i] + repl + t[i + 1:]
                assert read_token(forged, KEY) is None, f"got {forged} accepted (pos {i})"
    for bad in ("", "x", t + "=", t + "A", t[:-1], "%" * 80, "é" * 80, "A" * 5000,
                make_token(ADDR, "global", KEY)[:-22] + t[-22:]):
        assert read_token(bad, KEY) is None, f"got {bad!r} accepted"
    with pytest.raises(ValueError):
        make_token(ADDR, "bogus", KEY)


def test_list_unsubscribe_headers():
    h = list_unsubscribe_headers(ADDR, "tenant:acme", KEY, "https://unsub.example/")
    assert [n for n, _ in h] == ["List-Unsubscribe", "List-Unsubscribe-Post"]
    assert h[1][1] == "List-Unsubscribe=One-Click"          # RFC 8058 3.1, verbatim
    url = h[0][1]
    assert url.startswith("<https://unsub.example/u/") and url.endswith(">")
    assert read_token(url[1:-1].rsplit("/", 1)[1], KEY) == (
        hash_text(address_hash(KEY, ADDR)), "tenant:acme")
    assert "example.com" not in url.lower()
    with pytest.raises(ValueError, match="https"):
        list_unsubscribe_headers(ADDR, "global", KEY, "http://unsub.example")


# --- the server ------------------------------------------------------------------------

class Running:
    """An UnsubscribeServer on its own loop thread, on a free 127.0.0.1 port. The
    SuppressionList is created on that thread (sqlite3 connections stay on theirs)."""

    def __init__(self, store, ssl_context=None, **limits):
        self.store, self.ssl_context, self.limits = store, ssl_context, limits
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "server did not start"
        self.port = self.server.address[1]

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.suppressions = SuppressionList(self.store, KEY)
        self.server = UnsubscribeServer(self.suppressions, KEY, "127.0.0.1", 0,
                                        self.ssl_context, **self.limits)
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()
        self.suppressions.close()
        self.loop.close()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "supp.sqlite"


@pytest.fixture
def server(store):
    s = Running(store, timeout=2.0)
    yield s
    s.close()


def suppressed(store, address=ADDR, **kw):
    with SuppressionList(store, KEY) as fresh:      # a new connection: what is on disk
        return fresh.check(address, **kw)


def request(port, method, path, body=None, headers=None, context=None):
    cls = http.client.HTTPSConnection if context else http.client.HTTPConnection
    kw = {"context": context} if context else {}
    conn = cls("127.0.0.1", port, timeout=10, **kw)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        conn.close()


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_post_one_click_suppresses(server, store):
    token = make_token(ADDR, "tenant:acme", KEY)
    assert suppressed(store, tenant="acme") is None
    status, text, headers = request(server.port, "POST", f"/u/{token}", ONE_CLICK, FORM)
    assert status == 200, f"got {status} {text!r}, want 200"
    assert "unsubscribed" in text
    assert headers["Connection"] == "close" and headers["Cache-Control"] == "no-store"
    e = suppressed(store, "reader@example.com", tenant="acme")
    assert e is not None, "got no suppression after a one-click POST"
    assert (e.scope, e.reason) == ("tenant:acme", "unsubscribe")
    assert suppressed(store) is None, "got a global suppression, want only tenant:acme"
    # repeating it is harmless (providers retry)
    assert request(server.port, "POST", f"/u/{token}", ONE_CLICK, FORM)[0] == 200
    assert SuppressionList(store, KEY).count() == 1


def test_post_multipart_suppresses(server, store):
    token = make_token(ADDR, "global", KEY)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
            b"One-Click\r\n--XyZ--\r\n")
    status, text, _ = request(server.port, "POST", f"/u/{token}", body,
                              {"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert status == 200, f"got {status} {text!r}"
    assert suppressed(store).reason == "unsubscribe"


def test_get_shows_form_and_does_not_suppress(server, store):
    token = make_token(ADDR, "global", KEY)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/u/{token}", timeout=10) as r:
        page = r.read().decode()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert f'action="/u/{token}"' in page and 'method="post"' in page
    assert 'name="List-Unsubscribe" value="One-Click"' in page
    status, text, headers = request(server.port, "HEAD", f"/u/{token}")
    assert status == 200 and text == ""
    assert suppressed(store) is None, "got suppressed by a GET/HEAD, want only POST to act"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_forged_token_rejected(server, store, method):
    token = make_token(ADDR, "global", KEY)
    forged = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    other_key = make_token(ADDR, "global", b"\x01" * 32)
    for bad in (forged, other_key, "nonsense"):
        status, text, _ = request(server.port, method, f"/u/{bad}",
                                  ONE_CLICK if method == "POST" else None, FORM)
        assert status == 400, f"{method} {bad}: got {status}, want 400"
        assert "not valid" in text
    assert suppressed(store) is None


def test_bad_requests(server, store):
    token = make_token(ADDR, "global", KEY)
    cases = [  # (name, method, path, body, headers, want status)
        ("unknown path", "GET", "/x", None, {}, 404),
        ("nested path", "GET", f"/u/{token}/x", None, {}, 404),
        ("method", "PUT", f"/u/{token}", b"", {}, 405),
        ("wrong body", "POST", f"/u/{token}", b"List-Unsubscribe=Yes", FORM, 400),
        ("empty body", "POST", f"/u/{token}", b"", FORM, 400),
        ("json", "POST", f"/u/{token}", b'{"List-Unsubscribe":"One-Click"}',
         {"Content-Type": "application/json"}, 400),
        ("body too large", "POST", f"/u/{token}", ONE_CLICK + b"&x=" + b"y" * 5000, FORM, 413),
    ]
    for name, method, path, body, headers, want in cases:
        status, text, _ = request(server.port, method, path, body, headers)
        assert status == want, f"{name}: got {status} {text!r}, want {want}"
    assert suppressed(store) is None


def raw(port, data: bytes, read_timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return out
            out += chunk
        return out


def test_oversized_and_malformed_heads(server, store):
    token = make_token(ADDR, "global", KEY)
    big_head = (f"POST /u/{token} HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 10000}\r\n"
                "Content-Length: 26\r\n\r\n").encode() + ONE_CLICK
    many = (f"POST /u/{token} HTTP/1.1\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(60))
            + "Content-Length: 26\r\n\r\n").encode() + ONE_CLICK
    cases = [
        ("head too large", big_head, b"HTTP/1.1 431 "),
        ("too many headers", many, b"HTTP/1.1 431 "),
        ("no host", f"GET /u/{token} HTTP/1.1\r\n\r\n".encode(), b"HTTP/1.1 400 "),  # RFC 9112 3.2
        ("chunked", f"POST /u/{token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "1a\r\nList-Unsubscribe=One-Click\r\n0\r\n\r\n".encode(), b"HTTP/1.1 411 "),
        ("no length", f"POST /u/{token} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"HTTP/1.1 411 "),
        ("bad length", f"POST /u/{token} HTTP/1.1\r\nContent-Length: -1\r\n\r\n".encode(),
         b"HTTP/1.1 400 "),
        ("two lengths", f"POST /u/{token} HTTP/1.1\r\nContent-Length: 26\r\nContent-Length: 0"
                        "\r\n\r\n".encode() + ONE_CLICK, b"HTTP/1.1 400 "),
        ("folded header", f"GET /u/{token} HTTP/1.1\r\nHost: x\r\n y\r\n\r\n".encode(),
         b"HTTP/1.1 400 "),
        ("bad request line", b"GARBAGE\r\n\r\n", b"HTTP/1.1 400 "),
        ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 400 "),
    ]
    for name, data, want in cases:
        got = raw(server.port, data)
        # aiohttp answers what its parser refuses as HTTP/1.0 (it has no request version)
        assert got.startswith((want, want.replace(b"/1.1", b"/1.0"))), \
            f"{name}: got {got[:60]!r}, want {want!r}"
        assert b"aaaa" not in got and b"X-H" not in got, f"{name}: the reply quotes the request"
    assert suppressed(store) is None


def test_idle_timeout_closes(server):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /u/x HTTP/1.1\r\n")         # then nothing: a slowloris
        got = s.recv(1000)
        while chunk := s.recv(1000):
            got += chunk
    took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408 "), f"got {got[:40]!r}, want a 408"
    assert 1.5 < took < 6, f"got closed after {took:.1f}s, want ~2s (the configured timeout)"


def test_connection_cap(store):
    s = Running(store, timeout=3.0, max_connections=2)
    try:
        held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]
        time.sleep(0.2)
        got = raw(s.port, b"GET /u/x HTTP/1.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 "), f"got {got[:40]!r}, want 503 over the cap"
        for h in held:
            h.close()
        time.sleep(0.2)
        token = make_token(ADDR, "global", KEY)
        assert request(s.port, "POST", f"/u/{token}", ONE_CLICK, FORM)[0] == 200
    finally:
        s.close()


# --- HTTPS -----------------------------------------------------------------------------

@pytest.fixture
def tls_files(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


@pytest.fixture
def https_server(store, tls_files):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_files)
    s = Running(store, ctx, timeout=2.0)
    yield s
    s.close()


def test_https_one_click(https_server, store, tls_files):
    client = ssl.create_default_context(cafile=str(tls_files[0]))   # verifies the IP SAN
    token = make_token(ADDR, "domain:news.example", KEY)
    status, _, _ = request(https_server.port, "GET", f"/u/{token}", context=client)
    assert status == 200 and suppressed(store, sender_domain="news.example") is None
    status, text, _ = request(https_server.port, "POST", f"/u/{token}", ONE_CLICK, FORM,
                              context=client)
    assert status == 200, f"got {status} {text!r}"
    assert suppressed(store, sender_domain="news.example").scope == "domain:news.example"
    # plain HTTP to the TLS port gets nothing useful and the server keeps serving
    assert not raw(https_server.port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    status, text, _ = request(https_server.port, "POST", "/u/forged", ONE_CLICK, FORM,
                              context=client)
    assert status == 400


# --- curl, as a mailbox provider's one-click POST looks on the wire ------------------------

def curl(*args) -> tuple[int, str]:
    r = subprocess.run([CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10",
                        *args], capture_output=True, text=True, timeout=30)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_with_curl_or_http_client(https_server, store, tls_files):
    """curl when the machine has it (RFC 8058's example request, form and multipart),
    else the same requests through http.client."""
    token = make_token(ADDR, "tenant:acme", KEY)
    other = make_token("second@example.com", "tenant:acme", KEY)
    url = f"https://127.0.0.1:{https_server.port}/u/"
    if CURL:
        cacert = ["--cacert", str(tls_files[0])]
        assert curl(*cacert, url + token)[0] == 200                       # GET
        assert suppressed(store, tenant="acme") is None
        code, text = curl(*cacert, "-X", "POST", "-d", "List-Unsubscribe=One-Click", url + "AAAA")
        assert code == 400 and "not valid" in text
        code, text = curl(*cacert, "-d", "List-Unsubscribe=One-Click", url + token)
        assert code == 200, f"got {code} {text!r}"
        code, text = curl(*cacert, "-F", "List-Unsubscribe=One-Click", url + other)
        assert code == 200, f"multipart: got {code} {text!r}"
    else:
        client = ssl.create_default_context(cafile=str(tls_files[0]))
        assert request(https_server.port, "GET", f"/u/{token}", context=client)[0] == 200
        assert suppressed(store, tenant="acme") is None
        assert request(https_server.port, "POST", f"/u/{token}", ONE_CLICK, FORM,
                       context=client)[0] == 200
        body = (b"--b\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
                b"One-Click\r\n--b--\r\n")
        assert request(https_server.port, "POST", f"/u/{other}", body,
                       {"Content-Type": "multipart/form-data; boundary=b"}, context=client)[0] == 200
    assert suppressed(store, tenant="acme").reason == "unsubscribe"
    assert suppressed(store, "second@example.com", tenant="acme") is not None


def test_no_address_in_store_after_unsubscribe(server, store, tmp_path):
    token = make_token(ADDR, "global", KEY)
    assert request(server.port, "POST", f"/u/{token}", ONE_CLICK, FORM)[0] == 200
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("supp"))
    assert data and b"reader" not in data.lower()


def test_urllib_post(server, store):
    token = make_token(ADDR, "global", KEY)
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/u/{token}", data=ONE_CLICK,
                                 method="POST")    # urllib sends the form content type itself
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert suppressed(store) is not None
    bad = urllib.request.Request(f"http://127.0.0.1:{server.port}/u/{token}x", data=ONE_CLICK)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(bad, timeout=10)
    assert exc.value.code == 400
