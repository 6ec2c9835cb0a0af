"""The HTTP admin API (JSON over HTTP/1.1 on loopback), used by `mta queue`.

    GET /queue/summary          scheduled and ready queues with counts
    GET /queue/messages/<id>    one message: envelope, size, headers

Deliberately tiny (no framework) until the full injection/admin API with
OpenAPI arrives. Trust: requests are bounded (8 KiB of head), only GET is
served, errors are JSON with a status code; nothing here changes state yet.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import orjson

log = logging.getLogger("mta.admin")
_MAX_HEAD = 8192


class AdminServer:
    def __init__(self, routes: dict[str, Callable[[str], Any]]):
        # path prefix -> handler(rest of path) returning a JSON-able value or None (404)
        self.routes = routes
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
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, UnicodeDecodeError):
            writer.close()
            return
        status, body = self._dispatch(method, path)
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (status, b"OK" if status == 200 else b"Error",
                                                     len(body)) + body)
        try:
            await writer.drain()
        finally:
            writer.close()

    def _dispatch(self, method: str, path: str) -> tuple[int, bytes]:
        if method != "GET":
            return 405, orjson.dumps({"error": "only GET is served"})
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
