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

The server: HTTP/1.1 on asyncio streams, no framework (like mta/control/admin.py), one request
per connection (Connection: close). Bounded: request head size, header count, body
size, an idle/request timeout, a connection cap; optional TLS via an ssl.SSLContext.
Trust: every byte is from the Internet; errors answer with a fixed text, never with
exception text or request content.
Diagnostics: 400 bad request or bad/forged token; 404 unknown path; 405 method;
411 no Content-Length; 413 body too large; 415 wrong content type; 431 head too large
or too many headers; 500 when the store fails (logged). Logs carry hashes, never
addresses or full tokens.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import html
import logging
import ssl
import urllib.parse
from email.parser import BytesParser
from email.policy import HTTP

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


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}
_BAD_TOKEN = "This unsubscribe link is not valid (it may be damaged or forged).\n"

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>Unsubscribe</title></head>
<body><p>Unsubscribe this address from these messages?</p>
<form method="post" action="/u/{token}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form></body></html>
"""


class UnsubscribeServer:
    """POST /u/<token> (body List-Unsubscribe=One-Click) suppresses; GET /u/<token> shows
    a confirmation form. Runs on the caller's loop; `suppressions` is used from it."""

    def __init__(self, suppressions: SuppressionList, key: bytes, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, *, max_head: int = 8192,
                 max_headers: int = 50, max_body: int = 4096, timeout: float = 10.0,
                 max_connections: int = 256, logs: LogWriter | None = None):
        self.suppressions = suppressions
        self.logs = logs                      # an Unsubscribe record for each one stored
        self._key = key
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.max_head = max_head              # request line + header fields, bytes
        self.max_headers = max_headers        # header field count
        self.max_body = max_body              # a one-click body is 26 bytes; a form a few hundred
        self.timeout = timeout                # whole request (idle included), and the TLS handshake
        self.max_connections = max_connections
        self._active = 0
        self._tasks: set[asyncio.Task] = set()   # connections being served, for stop()
        self._server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, ssl=self.ssl_context, reuse_address=True,
            limit=self.max_head, ssl_handshake_timeout=self.timeout if self.ssl_context else None)
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("unsubscribe server listening on %s:%d%s", *self.address,
                 " (https)" if self.ssl_context else "")

    async def stop(self) -> None:
        """Stop listening and end the connections in progress (Python 3.11's
        Server.wait_closed does not wait for them)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            send_body = True
            if self._active > self.max_connections:
                status, ctype, body = 503, "text/plain", "Busy, try again later.\n"
            else:
                try:
                    status, ctype, body, send_body = await asyncio.wait_for(
                        self._request(reader, writer.get_extra_info("peername")), self.timeout)
                except _Reject as r:
                    status, ctype, body = r.status, "text/plain", r.text
                except asyncio.TimeoutError:
                    status, ctype, body = 408, "text/plain", "Request timed out.\n"
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return      # the client went away; nobody to answer
            await self._respond(writer, status, ctype, body, send_body)
        finally:
            self._active -= 1
            self._tasks.discard(task)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
                pass

    async def _respond(self, writer: asyncio.StreamWriter, status: int, ctype: str, text: str,
                       send_body: bool = True) -> None:
        payload = text.encode("utf-8")
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}; charset=utf-8\r\nContent-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                # the token is in the URL: keep it out of Referer headers
                "Referrer-Policy: no-referrer\r\n"
                "Content-Security-Policy: default-src 'none'; form-action 'self'\r\n"
                + ("Allow: GET, HEAD, POST\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n")
        writer.write(head.encode("ascii") + (payload if send_body else b""))
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass

    async def _request(self, reader: asyncio.StreamReader,
                       peer: tuple | None = None) -> tuple[int, str, str, bool]:
        """(status, content type, text, send the body: False for HEAD)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Reject(431, "Request head too large.\n") from None
        if len(head) > self.max_head:
            raise _Reject(431, "Request head too large.\n")
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise _Reject(400, "Bad request line.\n") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _Reject(400, "Unsupported HTTP version.\n")
        headers = self._parse_headers(lines[1:])
        path = target.split("?", 1)[0]
        if not path.startswith("/u/") or "/" in path[3:]:
            raise _Reject(404, "Not found.\n")
        token = path[3:]
        if method not in ("GET", "HEAD", "POST"):
            raise _Reject(405, "Only GET and POST are served.\n")
        found = read_token(token, self._key)
        if method == "POST":
            body = await self._read_body(reader, headers)
            if found is None:
                log.info("unsubscribe: rejected a bad or forged token")
                raise _Reject(400, _BAD_TOKEN)
            if not _is_one_click(headers.get("content-type", ""), body):
                raise _Reject(400, "Expected the form field List-Unsubscribe=One-Click "
                                   "(RFC 8058).\n")
            h, scope = found
            # XXX: the SQLite commit (an fsync with synchronous=FULL) runs on the loop;
            # fine for unsubscribe rates, an executor hop if this shares the MTA's loop.
            try:
                self.suppressions.add_hash(h, scope=scope, reason="unsubscribe",
                                           note="rfc8058 one-click")
            except Exception:
                log.exception("unsubscribe: storing %s... in %s failed", h[:24], scope)
                return 500, "text/plain", "Could not record the unsubscribe; try again later.\n", True
            log.info("unsubscribe: %s... suppressed in %s", h[:24], scope)
            if self.logs is not None:
                self.logs.log(RecordType.UNSUBSCRIBE, recipient_hash=h, scope=scope,
                              client_ip=peer[0] if peer else None)
            return 200, "text/plain", "You have been unsubscribed.\n", True
        # GET/HEAD never unsubscribe: link scanners and mail security gateways prefetch
        # every URL in a message (the reason RFC 8058 requires POST); a person gets a form.
        if found is None:
            raise _Reject(400, _BAD_TOKEN)
        return 200, "text/html", _PAGE.format(token=html.escape(token, quote=True)), method != "HEAD"

    def _parse_headers(self, lines: list[bytes]) -> dict[str, str]:
        if len(lines) > self.max_headers:
            raise _Reject(431, "Too many header fields.\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                # obsolete line folding and whitespace before the colon: RFC 9112 5.1/5.2
                raise _Reject(400, "Bad header field.\n")
            try:
                key, val = name.decode("ascii").lower(), value.strip().decode("latin-1")
            except UnicodeDecodeError:
                raise _Reject(400, "Bad header field.\n") from None
            if key in headers and key in ("content-length", "content-type", "transfer-encoding", "host"):
                raise _Reject(400, f"Duplicate {key} header field.\n")
            headers[key] = val
        return headers

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            # Chunked bodies are not needed for a 26-byte form; RFC 9110 15.5.12.
            raise _Reject(411, "Send the body with a Content-Length.\n")
        cl = headers.get("content-length")
        if cl is None:
            raise _Reject(411, "Content-Length required.\n")
        if not cl.isdigit() or len(cl) > 12:
            raise _Reject(400, "Bad Content-Length.\n")
        if int(cl) > self.max_body:
            raise _Reject(413, "Request body too large.\n")
        return await reader.readexactly(int(cl))


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
