"""The server side of a node's view: `?node=1` on any worker's admin API asks every worker
of the node (itself included) and merges their answers (mta/control/nodeview.py). The
merging is apart from this, so the `mta` commands that merge in the client load no HTTP
client or server.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from mta.control import metrics as mx
from mta.control.body import BodyTooLarge, read_bounded
from mta.control.nodeview import (FANOUT_HEADER, MAX_ANSWER, SIBLING_TIMEOUT, WorkerAnswer,
                                  merge, merge_metrics, strip_node)


class NodeFanout:
    """Answers `?node=1` requests of one worker's admin API by asking every worker of the
    node (itself included) at `host`:`ports[I]` and merging. Installed as
    AdminServer.node by mta/server.py when [server] workers > 1."""

    def __init__(self, host: str, ports: Sequence[int], *, timeout: float = SIBLING_TIMEOUT,
                 max_answer: int = MAX_ANSWER):
        self.host = host
        self.ports = list(ports)
        self.timeout = timeout
        self.max_answer = max_answer

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get(FANOUT_HEADER):
            return _json(400, {"error": f"a request from a worker of the node ({FANOUT_HEADER})"
                                        " is not fanned out again"})
        path = strip_node(request.raw_path)
        body = await request.read() if request.method == "POST" else None
        headers = {FANOUT_HEADER: "1"}
        auth = request.headers.get("Authorization")
        if auth is not None:
            headers["Authorization"] = auth
        if body is not None:
            headers["Content-Type"] = "application/json"
        metrics = request.method == "GET" and path.partition("?")[0] == "/metrics"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            answers = await asyncio.gather(*(
                self._ask(session, i, port, request.method, path, body, headers, metrics)
                for i, port in enumerate(self.ports)))
        if metrics:
            node = merge_metrics(answers)
            status, text = (node.status, node.data) if not node.missing else \
                (502, "not every worker of the node answered: " + "; ".join(node.problems()))
            return web.Response(status=status, body=str(text).encode("utf-8"),
                                headers={"Content-Type": mx.CONTENT_TYPE if status == 200
                                         else "text/plain; charset=utf-8"})
        status, data = merge(request.method, path, answers).http()
        return _json(status, data)

    async def _ask(self, session: aiohttp.ClientSession, index: int, port: int, method: str,
                   path: str, body: bytes | None, headers: dict[str, str],
                   text: bool) -> WorkerAnswer:
        url = f"http://{_host(self.host)}:{port}{path}"
        try:
            async with session.request(method, url, data=body, headers=headers,
                                       allow_redirects=False) as resp:
                raw = await read_bounded(resp.content, resp.content_length, self.max_answer)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return WorkerAnswer(index, 0, None, f"no answer from {self.host}:{port}: "
                                f"{type(exc).__name__} {exc}".strip())
        except BodyTooLarge:
            return WorkerAnswer(index, 0, None, f"its answer is larger than "
                                f"{self.max_answer} bytes")
        if text and status == 200:
            return WorkerAnswer(index, status, raw.decode("utf-8", "replace"))
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return WorkerAnswer(index, 0, None, f"HTTP {status}, not JSON")
        error = data.get("error", "") if isinstance(data, dict) and status != 200 else ""
        return WorkerAnswer(index, status, data, str(error)[:500])


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _json(status: int, value: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS),
                        content_type="application/json")
