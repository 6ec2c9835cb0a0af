"""The HTTP admin API (JSON over HTTP/1.1 on loopback), used by `mta queue`.

    GET  /queue/summary          scheduled and ready queues with counts
    GET  /queue/messages/<id>    one message: envelope, size, headers
    GET  /shaping                live state and limits per (source, site)
    GET  /warmup                 warming sources: day, caps per provider class, use
    POST /control/suspend        {"kind": "queue|site|source|pair", "name": ..., "site": ...,
                                  "duration": seconds}
    POST /control/resume         {"kind": ..., "name": ..., "site": ...}
    POST /control/rebind         {"queue": ..., "pool": ...}

Deliberately tiny (no framework) until the full injection/admin API with
OpenAPI arrives. Trust: it listens on loopback by default, and every request
must carry `Authorization: Bearer <token>`, the token in [admin] token_file
(default <spool directory>/admin.token, created by the daemon at start when
missing: 0600, 32 random bytes in hex); anything else gets 401 and reaches no
handler (AdminServer._authorized is the one check). The token also makes a
command talk to its own daemon: a command run with another daemon's config is
refused rather than answered by the wrong daemon. Requests are bounded (8 KiB of head, 64 KiB of JSON body), errors are
JSON with a status code.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
from pathlib import Path
from typing import Any, Callable

import orjson

from mta.config import Config
from mta.files import create_once

log = logging.getLogger("mta.control.admin")
_MAX_HEAD = 8192
_MAX_BODY = 65536
_AUTH = re.compile(rb"(?im)^authorization:[ \t]*bearer[ \t]+(\S+)[ \t]*\r?$")
_TOKEN = re.compile(r"[\x21-\x7e]{16,256}", re.ASCII)   # visible ASCII, no spaces
TOKEN_NAME = "admin.token"


class TokenError(Exception):
    """The token file is unreadable or does not hold a token (the text names the file)."""


def token_path(config: Config) -> Path:
    """[admin] token_file, or admin.token in the spool directory."""
    return config.admin.token_file or Path(config.spool.directory) / TOKEN_NAME


def read_token(path: Path) -> str:
    """The token in `path`; FileNotFoundError when missing, TokenError when unusable."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096).decode("ascii").strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TokenError(f"admin token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        text = ""
    if not _TOKEN.fullmatch(text):
        raise TokenError(f"admin token file {path}: not a token (16 to 256 visible ASCII "
                         "characters; delete it and the daemon makes a new one)")
    return text


def load_or_create_token(path: Path) -> str:
    """The token in `path`, written first (0600, 32 random bytes in hex) when missing.
    Created under a temporary name and linked into place, so a reader never sees half a
    token and two daemons racing on one file end with one token."""
    try:
        return read_token(path)
    except FileNotFoundError:
        pass
    token = secrets.token_hex(32)
    if not create_once(path, token.encode() + b"\n"):
        return read_token(path)   # another process made it first: theirs stands
    return token


class AdminServer:
    def __init__(self, routes: dict[str, Callable[[str], Any]],
                 actions: dict[str, Callable[[dict], Any]] | None = None, *, token: str):
        # every request must send "Authorization: Bearer <token>"
        self._token = token.encode()
        # path prefix -> handler(rest of path) returning a JSON-able value or None (404)
        self.routes = routes
        # POST path -> handler(JSON object) returning a JSON-able value; ValueError -> 400
        self.actions = actions or {}
        self._server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if len(head) > _MAX_HEAD:
                raise ValueError
            method, path, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
            request = b""
            if method == "POST":   # read (bounded) even when refused: closing on an unread
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)   # body resets
                length = int(m[1]) if m else 0                                # the reply
                if length > _MAX_BODY:
                    raise ValueError
                request = await asyncio.wait_for(reader.readexactly(length), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, UnicodeDecodeError):
            writer.close()
            return
        if not self._authorized(head):
            await self._reply(writer, 401, orjson.dumps(
                {"error": "unauthorized: send the daemon's token ([admin] token_file) as "
                          "Authorization: Bearer"}), b"WWW-Authenticate: Bearer\r\n")
            return
        if method == "POST":
            status, body = self._act(path, request)
        else:
            status, body = self._dispatch(method, path)
        await self._reply(writer, status, body)

    def _authorized(self, head: bytes) -> bool:
        """The one place the token is checked (constant-time compare)."""
        m = _AUTH.search(head)
        return m is not None and hmac.compare_digest(m[1], self._token)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes,
                     extra: bytes = b"") -> None:
        reason = {200: b"OK", 401: b"Unauthorized"}.get(status, b"Error")
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"%sConnection: close\r\n\r\n" % (status, reason, len(body), extra) + body)
        try:
            await writer.drain()
        except OSError:   # the client went away
            pass
        finally:
            writer.close()

    def _act(self, path: str, request: bytes) -> tuple[int, bytes]:
        handler = self.actions.get(path)
        if handler is None:
            return 404, orjson.dumps({"error": f"no such action: {path}"})
        try:
            args = orjson.loads(request or b"{}")
            if not isinstance(args, dict):
                raise ValueError("the request body must be a JSON object")
            return 200, orjson.dumps(handler(args))
        except (ValueError, TypeError) as exc:   # orjson.JSONDecodeError is a ValueError
            return 400, orjson.dumps({"error": str(exc)})
        except Exception:
            log.exception("admin action %s failed", path)
            return 500, orjson.dumps({"error": "internal error"})

    def _dispatch(self, method: str, path: str) -> tuple[int, bytes]:
        if method != "GET":
            return 405, orjson.dumps({"error": "GET for views, POST for /control actions"})
        for prefix, handler in self.routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                try:
                    value = handler(path[len(prefix) + 1:])
                except ValueError as exc:
                    return 400, orjson.dumps({"error": str(exc)})
                except Exception:
                    log.exception("admin request %s failed", path)
                    return 500, orjson.dumps({"error": "internal error"})
                if value is None:
                    return 404, orjson.dumps({"error": f"not found: {path}"})
                return 200, orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return 404, orjson.dumps({"error": f"no such endpoint: {path}"})
