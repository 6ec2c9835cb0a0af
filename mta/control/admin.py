"""The HTTP admin API (JSON over HTTP/1.1 on loopback), used by `mta queue`.

    GET  /queue/summary          scheduled and ready queues with counts
    GET  /queue/messages/<id>    one message: envelope, size, headers
    GET  /shaping                live state and limits per (source, site)
    POST /control/suspend        {"kind": "queue|site|source|pair", "name": ..., "site": ...,
                                  "duration": seconds}
    POST /control/resume         {"kind": ..., "name": ..., "site": ...}
    POST /control/rebind         {"queue": ..., "pool": ...}

Deliberately tiny (no framework) until the full injection/admin API with
OpenAPI arrives. Trust: it listens on loopback by default and has no
authentication (say so in the operator docs); requests are bounded (8 KiB
of head, 64 KiB of JSON body), errors are JSON with a status code.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable

import orjson

log = logging.getLogger("mta.control.admin")
_MAX_HEAD = 8192
_MAX_BODY = 65536


class AdminServer:
    def __init__(self, routes: dict[str, Callable[[str], Any]],
                 actions: dict[str, Callable[[dict], Any]] | None = None):
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
            if method == "POST":
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                length = int(m[1]) if m else 0
                if length > _MAX_BODY:
                    raise ValueError
                request = await asyncio.wait_for(reader.readexactly(length), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, UnicodeDecodeError):
            writer.close()
            return
        if method == "POST":
            status, body = self._act(path, request)
        else:
            status, body = self._dispatch(method, path)
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (status, b"OK" if status == 200 else b"Error",
                                                     len(body)) + body)
        try:
            await writer.drain()
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
