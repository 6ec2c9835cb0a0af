"""RFC 8058 one-click unsubscribe: signed per-recipient links and the HTTP(S) endpoint.

Outgoing single-recipient mail gets `list_unsubscribe_headers(...)`:
    List-Unsubscribe: <https://unsub.example/u/TOKEN>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click
(RFC 8058 3.1; the DKIM signer's default header set already covers both, as 3.1 and
4 ask). When the mailbox provider (or the user) POSTs `List-Unsubscribe=One-Click`
to that URL (RFC 8058 3.2), `UnsubscribeServer` adds the token's suppression hash to
the suppression list with reason "unsubscribe" in the token's scope.

Tokens carry the recipient's suppression HASH (HMAC-SHA256 of the normalised address
under the suppression key), never the address, plus the scope and a MAC, url-safe
base64 without padding. `key` everywhere here is the suppression key (the 32-byte key
file of mta/feedback/suppression); the token MAC uses a key derived from it, so one secret
serves both and a token MAC can never be confused with an address hash. Tokens do not
expire (RFC 8058 does not ask for it; a list link should keep working); rotating the
key invalidates every outstanding link.

The server: aiohttp's low-level HTTP/1.1 server (the library the admin API uses,
mta/control/admin.py: asyncio-native, so it runs on the daemon's uvloop; a maintained
parser), on its own listening socket, one request per connection (Connection: close).
Bounded: request line and each header field (max_head), header count, body size, an
idle/request timeout (408, also for a head that never ends), a connection cap (503);
optional TLS via an ssl.SSLContext (handshake bounded by the same timeout).
Trust: every byte is from the Internet; errors answer with a fixed text, never with
exception text or request content (aiohttp's parse errors are answered here, not by its
default page, which quotes the offending bytes).
Diagnostics: 400 bad request or bad/forged token; 404 unknown path; 405 method;
408 too slow; 411 no Content-Length; 413 body too large; 431 a request or header line
too long or too many header fields; 500 when the store fails (logged); 503 over the
connection cap. Logs carry hashes, never addresses or full tokens.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import html
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from email.parser import BytesParser
from email.policy import HTTP

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from mta.feedback.suppression.store import (SuppressionList, address_hash, check_scope, hash_text,
                                   parse_hash)
from mta.logs.writer import LogWriter
from mta.model.log_records import RecordType

log = logging.getLogger("mta.feedback.unsubscribe")

_VERSION = b"\x01"
_MAC_BYTES = 16
_TOKEN_LABEL = b"mta rfc8058 token key v1"
ONE_CLICK = "List-Unsubscribe=One-Click"


# --- tokens ---------------------------------------------------------------------------

def _token_key(key: bytes) -> bytes:
    return hmac.digest(key, _TOKEN_LABEL, "sha256")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def make_token(address: str, scope: str, key: bytes) -> str:
    """A url-safe token naming the address's suppression hash and the scope, signed."""
    return make_token_for_hash(address_hash(key, address), scope, key)


def make_token_for_hash(h: str | bytes, scope: str, key: bytes) -> str:
    body = _VERSION + parse_hash(h) + check_scope(scope).encode("utf-8")
    return _b64(body + hmac.digest(_token_key(key), body, "sha256")[:_MAC_BYTES])


def read_token(token: str, key: bytes) -> tuple[str, str] | None:
    """(hash "hmac-sha256:<hex>", scope) for a token we signed; None otherwise."""
    if not 0 < len(token) <= 1024 or not token.isascii() or "=" in token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return None
    if _b64(raw) != token:          # non-canonical base64 (e.g. stray characters)
        return None
    if len(raw) < 1 + 32 + 1 + _MAC_BYTES or raw[:1] != _VERSION:
        return None
    body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if not hmac.compare_digest(hmac.digest(_token_key(key), body, "sha256")[:_MAC_BYTES], mac):
        return None
    try:
        scope = check_scope(body[33:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return hash_text(body[1:33]), scope


def list_unsubscribe_headers(address: str, scope: str, key: bytes,
                             base_url: str) -> list[tuple[str, str]]:
    """The two RFC 8058 header fields for a message to `address` (one recipient only:
    the link unsubscribes exactly that recipient). `base_url` must be https (3.1)."""
    if not base_url.lower().startswith("https://"):
        raise ValueError(f"List-Unsubscribe base URL {base_url!r}: RFC 8058 3.1 requires https")
    url = f"{base_url.rstrip('/')}/u/{make_token(address, scope, key)}"
    return [("List-Unsubscribe", f"<{url}>"), ("List-Unsubscribe-Post", ONE_CLICK)]


# --- the HTTP endpoint ----------------------------------------------------------------

class _Reject(Exception):
    def __init__(self, status: int, text: str):
        self.status, self.text = status, text


_BAD_TOKEN = "This unsubscribe link is not valid (it may be damaged or forged).\n"
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            # the token is in the URL: keep it out of Referer headers
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; form-action 'self'",
            "Connection": "close", "Server": "mta"}
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 23\r\nConnection: close\r\n\r\nBusy, try again later.\n")
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Length: 19\r\nConnection: close\r\n\r\nRequest timed out.\n")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>Unsubscribe</title></head>
<body><p>Unsubscribe this address from these messages?</p>
<form method="post" action="/u/{token}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form></body></html>
"""


def _text(status: int, text: str, ctype: str = "text/plain") -> web.Response:
    resp = web.Response(status=status, text=text, content_type=ctype, charset="utf-8",
                        headers=_HEADERS)
    if status == 405:
        resp.headers["Allow"] = "GET, HEAD, POST"
    resp.force_close()
    return resp


class _Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, with this endpoint's limits: over the
    connection cap a fixed 503 at once; a connection whose request has not reached the
    handler within the timeout (a slow or idle head) gets a fixed 408 and is closed;
    aiohttp's own parse errors answer with a fixed text (never the request's bytes, which
    aiohttp would quote) and are not logged as errors."""

    def __init__(self, owner: UnsubscribeServer, manager: web.Server, **kw):
        super().__init__(manager, **kw)
        self.owner = owner
        self.started = False          # a request reached the handler
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.owner.connections > self.owner.max_connections:
            transport.write(_BUSY)    # type: ignore[attr-defined]
            transport.close()
            return
        self._deadline = asyncio.get_running_loop().call_later(self.owner.timeout, self._expire)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _expire(self) -> None:
        transport = self.transport
        if not self.started and transport is not None and not transport.is_closing():
            transport.write(_TIMED_OUT)   # type: ignore[attr-defined]
            transport.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        self.started = True
        log.debug("unsubscribe: bad request from %s: %s", request.remote, type(exc).__name__)
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage)
                                            and "Too many headers" in str(exc)):
            return _text(431, "Request head too large.\n")
        if status == 500:
            return _text(500, "Internal error.\n")
        return _text(400 if status < 500 else status, "Bad request.\n")


class UnsubscribeServer:
    """POST /u/<token> (body List-Unsubscribe=One-Click) suppresses; GET /u/<token> shows
    a confirmation form. Runs on the caller's loop; `suppressions` is used from it.

    On aiohttp's low-level server (the same library as the admin API,
    mta/control/admin.py): its HTTP/1.1 parser, with the limits below; one request per
    connection (Connection: close)."""

    def __init__(self, suppressions: SuppressionList, key: bytes, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, *, max_head: int = 8192,
                 max_headers: int = 50, max_body: int = 4096, timeout: float = 10.0,
                 max_connections: int = 256, logs: LogWriter | None = None,
                 store: Callable[[str, str, str, str], Awaitable[bool]] | None = None):
        self.suppressions = suppressions
        # (hash, scope, reason, note) -> stored: the daemon's writer thread, off the loop
        # (Feedback.add_hash); None: `suppressions.add_hash` on the loop (tools, tests)
        self.store = store
        self.logs = logs                      # an Unsubscribe record for each one stored
        self._key = key
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.max_head = max_head              # the request line, and each header field, bytes
        self.max_headers = max_headers        # header field count
        self.max_body = max_body              # a one-click body is 26 bytes; a form a few hundred
        self.timeout = timeout                # whole request (idle included), and the TLS handshake
        self.max_connections = max_connections
        self._server: web.Server | None = None    # made in start(): it wants the running loop
        self._listener: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None

    def _connection(self) -> _Connection:
        assert self._server is not None
        return _Connection(self, self._server, loop=asyncio.get_running_loop(),
                           keepalive_timeout=self.timeout + 1,   # _expire() answers first
                           lingering_time=0,
                           max_line_size=self.max_head, max_field_size=self.max_head,
                           max_headers=self.max_headers, access_log=None,
                           auto_decompress=False)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = web.Server(self._handle, handler_cancellation=True)
        self._listener = await loop.create_server(
            self._connection, self.host, self.port, ssl=self.ssl_context, reuse_address=True,
            reuse_port=True,   # every worker process of a supervisor binds it (SO_REUSEPORT)
            ssl_handshake_timeout=self.timeout if self.ssl_context else None)
        self.address = self._listener.sockets[0].getsockname()[:2]
        log.info("unsubscribe server listening on %s:%d%s", *self.address,
                 " (https)" if self.ssl_context else "")

    async def stop(self) -> None:
        """Stop listening and end the connections in progress."""
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        if self._server is not None:
            await self._server.shutdown(1.0)

    @property
    def connections(self) -> int:
        """Connections open now (this one included, from its connection_made on)."""
        return len(self._server.connections) if self._server is not None else 0

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        proto = request.protocol
        if isinstance(proto, _Connection):
            proto.started = True
        try:
            async with asyncio.timeout(self.timeout):
                return await self._request(request)
        except _Reject as r:
            return _text(r.status, r.text)
        except TimeoutError:
            return _text(408, "Request timed out.\n")

    async def _request(self, request: web.BaseRequest) -> web.StreamResponse:
        for name in ("Content-Length", "Content-Type", "Transfer-Encoding", "Host"):
            if len(request.headers.getall(name, ())) > 1:
                raise _Reject(400, f"Duplicate {name.lower()} header field.\n")
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith("/u/") or "/" in path[3:]:
            raise _Reject(404, "Not found.\n")
        token = path[3:]
        method = request.method
        if method not in ("GET", "HEAD", "POST"):
            raise _Reject(405, "Only GET and POST are served.\n")
        found = read_token(token, self._key)
        if method == "POST":
            body = await self._read_body(request)
            if found is None:
                log.info("unsubscribe: rejected a bad or forged token")
                raise _Reject(400, _BAD_TOKEN)
            if not _is_one_click(request.headers.get("Content-Type", ""), body):
                raise _Reject(400, "Expected the form field List-Unsubscribe=One-Click "
                                   "(RFC 8058).\n")
            h, scope = found
            # the 200 only once the entry is committed (in the daemon by the store's writer
            # thread: the loop never waits on SQLite)
            try:
                if self.store is not None:
                    if not await self.store(h, scope, "unsubscribe", "rfc8058 one-click"):
                        raise RuntimeError("suppression writer queue full")
                else:
                    self.suppressions.add_hash(h, scope=scope, reason="unsubscribe",
                                               note="rfc8058 one-click")
            except Exception:
                log.exception("unsubscribe: storing %s... in %s failed", h[:24], scope)
                return _text(500, "Could not record the unsubscribe; try again later.\n")
            log.info("unsubscribe: %s... suppressed in %s", h[:24], scope)
            if self.logs is not None:
                self.logs.log(RecordType.UNSUBSCRIBE, recipient_hash=h, scope=scope,
                              client_ip=request.remote)
            return _text(200, "You have been unsubscribed.\n")
        # GET/HEAD never unsubscribe: link scanners and mail security gateways prefetch
        # every URL in a message (the reason RFC 8058 requires POST); a person gets a form.
        # (aiohttp sends no body for HEAD.)
        if found is None:
            raise _Reject(400, _BAD_TOKEN)
        return _text(200, _PAGE.format(token=html.escape(token, quote=True)), "text/html")

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        if "Transfer-Encoding" in request.headers:
            # Chunked bodies are not needed for a 26-byte form; RFC 9110 15.5.12.
            raise _Reject(411, "Send the body with a Content-Length.\n")
        cl = request.headers.get("Content-Length")
        if cl is None:
            raise _Reject(411, "Content-Length required.\n")
        if not cl.isdigit() or len(cl) > 12:
            raise _Reject(400, "Bad Content-Length.\n")
        if int(cl) > self.max_body:
            raise _Reject(413, "Request body too large.\n")
        try:
            return await request.content.readexactly(int(cl))
        except asyncio.IncompleteReadError:
            raise _Reject(400, "Incomplete body.\n") from None


def _is_one_click(content_type: str, body: bytes) -> bool:
    """True when the POST carries List-Unsubscribe=One-Click as application/
    x-www-form-urlencoded or multipart/form-data (RFC 8058 3.2 allows both)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in ("application/x-www-form-urlencoded", ""):
        try:
            fields = urllib.parse.parse_qs(body.decode("ascii"), strict_parsing=False,
                                           max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return False
        return "One-Click" in fields.get("List-Unsubscribe", [])
    if ctype == "multipart/form-data":
        try:
            msg = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
            if not msg.is_multipart():
                return False
            for part in msg.iter_parts():
                if part.get_param("name", header="content-disposition") == "List-Unsubscribe":
                    value = part.get_payload(decode=True) or b""
                    return value.strip() == b"One-Click"
        except (ValueError, TypeError, UnicodeError, LookupError):
            return False
    return False
