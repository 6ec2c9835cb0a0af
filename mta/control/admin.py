"""The HTTP admin API (JSON over HTTP/1.1, loopback by default), used by `mta` commands.

    GET  /health                 live: 200 while the daemon's loop runs (no token needed)
    GET  /ready                  200 while the daemon accepts mail, else 503 with the reason
                                 (listeners open, spool writable, not draining; no token)
    GET  /openapi.json           the OpenAPI 3.1 description (mta/control/openapi.py)
    GET  /queue/summary          scheduled and ready queues with counts
    GET  /queue/messages/<id>    one message: envelope, size, headers
    GET  /queue/ages[/<by>], /queue/list/<queue>?limit=&after=, /queue/holds
    GET  /shaping                live state and limits per (source, site)
    GET  /warmup                 warming sources: day, caps per provider class, use
    POST /control/suspend        {"kind": "queue|site|source|pair", "name": ..., "site": ...,
                                  "duration": seconds}
    POST /control/resume         {"kind": ..., "name": ..., "site": ...}
    POST /control/rebind         {"queue": ..., "pool": ...}
    POST /control/{flush,hold,release,delete,bounce,limits,reload}   (see /openapi.json)
    ?node=1 on a view, /metrics or an action: the answer of every worker process of the node
                                 ([server] workers > 1; mta/control/nodeview.py)

The library: aiohttp's web server. It is asyncio-native, so it runs on the daemon's own
(uvloop) loop beside the SMTP listeners without a thread or a second loop; it is mature
and maintained (the aio-libs HTTP stack, years of CVE handling in its HTTP parser);
request body limits (client_max_size), header line/field limits and the idle
connection timeout are built in, and the same library serves the one-click unsubscribe
endpoint (mta/feedback/unsubscribe.py, TLS through ssl_context). ASGI frameworks would
need a separate server (uvicorn) and their own loop management; http.server is
thread-based.

Registration (other modules add to these dicts, even after start): `routes` maps a GET
path prefix to handler(rest of the raw path, query string included) returning a JSON-able
value, or None for 404, ValueError for 400; `actions` maps a POST path to handler(JSON
object) returning a JSON-able value (ValueError/TypeError -> 400). A POST body is first
checked against the action's request dataclass (openapi.ACTION_REQUESTS) when it has one.
GET never changes state: routes are views (mta/control/views.py); everything that acts is
a POST action.

Trust: every request but /health and /ready must carry `Authorization: Bearer <token>`.
Tokens (mta/control/token.py): the one in [admin] token_file (default <spool
directory>/admin.token, created by the daemon at start when missing: 0600, 32 random
bytes in hex) is an operator token, so `mta` commands of the same config work; [admin]
tokens_file adds tokens, one `ROLE TOKEN` a line (roles read-only and operator; the file
must not be readable by group or others).
A read-only token may GET, an operator token may also POST: 401 without a known token,
403 for a read-only token on POST. The compare is constant-time against every token. The
token also makes a command talk to its own daemon: a command run with another daemon's
config is refused rather than answered by the wrong daemon.

Limits on every request: [admin] max_body bytes of body (413), header lines of 8 KiB
(aiohttp answers 400 beyond), [admin] timeout seconds for the whole request once its head
is in (408; a connection that sends no complete head in that time is closed),
[admin] max_connections at once (503 beyond). Errors are JSON {"error": ...}.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from mta.control import openapi
from mta.control.nodeview import strip_node, wants_node
from mta.control.token import OPERATOR

log = logging.getLogger("mta.control.admin")
_MAX_HEAD = 8192          # one request or header line; aiohttp's parser enforces it
_MAX_BODY = 65536
_TIMEOUT = 10.0
_MAX_CONNECTIONS = 64
_OPEN = frozenset({"/health", "/ready"})    # no token: load balancers and probes


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": text}),
                        content_type="application/json", headers=headers)


def _ok(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS),
                        content_type="application/json")


class _Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, answering what its parser refuses with a
    short JSON error rather than its default page (which quotes the offending bytes), and
    logging that at debug level: malformed requests are the client's problem."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("admin request %s failed", request.path, exc_info=exc)
            resp = _error(500, "internal error")
        else:
            log.debug("admin: refused a malformed request: %s", type(exc).__name__)
            resp = _error(status, "bad request")
        resp.force_close()
        return resp


class AdminServer:
    def __init__(self, routes: dict[str, Callable[[str], Any]],
                 actions: dict[str, Callable[[dict], Any]] | None = None, *, token: str,
                 tokens: dict[str, str] | None = None,
                 ready: Callable[[], str | None] | None = None,
                 max_body: int = _MAX_BODY, timeout: float = _TIMEOUT,
                 max_connections: int = _MAX_CONNECTIONS):
        # token (bytes) -> role; `token` is an operator's (the [admin] token_file one)
        self._tokens: list[tuple[bytes, str]] = [
            (t.encode(), r) for t, r in {**(tokens or {}), token: OPERATOR}.items()]
        # path prefix -> handler(rest of path) returning a JSON-able value or None (404)
        self.routes = routes
        # POST path -> handler(JSON object) returning a JSON-able value; ValueError -> 400
        self.actions = actions or {}
        # None while the daemon accepts mail, else why not (GET /ready answers 503 with it)
        self.ready = ready
        self.max_body, self.timeout, self.max_connections = max_body, timeout, max_connections
        # (method, path) -> async handler(request): endpoints that answer other than JSON
        # views and actions (GET /metrics as text, POST /inject reading its own body)
        self.handlers: dict[tuple[str, str], Callable[[web.Request], Any]] = {}
        # GET paths answered without a token besides /health and /ready ([admin] metrics_public)
        self.public: set[str] = set()
        # ?node=1 on a view, /metrics or an action: the node's answer from every worker
        # (fanout.NodeFanout, set by mta/server.py when [server] workers > 1); None: this
        # process is the whole node, and ?node=1 answers as without it
        self.node: Callable[[web.Request], Any] | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body,
                              middlewares=[self._guard, self._authenticate])
        app.router.add_route("GET", "/health", self._health)
        app.router.add_route("GET", "/ready", self._ready)
        app.router.add_route("GET", "/openapi.json", self._openapi)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        server, loop = self._runner.server, asyncio.get_running_loop()
        assert server is not None
        settings = {
            "loop": loop, "access_log": None,
            "keepalive_timeout": self.timeout,   # also closes a connection that sends no head
            "lingering_time": min(self.timeout, 2.0),   # unread body after an error reply
            "max_line_size": _MAX_HEAD, "max_field_size": _MAX_HEAD}
        self._listener = await loop.create_server(
            lambda: _Connection(server, **settings), host, port, reuse_address=True)
        self.address = self._listener.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middlewares: limits, then authentication ----------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        server = self._runner.server if self._runner is not None else None
        if server is not None and len(server.connections) > self.max_connections:
            return _error(503, "too many connections; try again later")
        try:
            async with asyncio.timeout(self.timeout):
                return await handler(request)
        except TimeoutError:
            return _error(408, f"the request took longer than {self.timeout:g}s",
                          {"Connection": "close"})
        except web.HTTPException as exc:   # aiohttp's own: 413 from client_max_size, ...
            return _error(exc.status, exc.reason, {"Connection": "close"}
                          if exc.status == 413 else None)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if (request.path in _OPEN or request.path in self.public) \
                and request.method in ("GET", "HEAD"):
            return await handler(request)
        role = self.role(request.headers.get("Authorization", ""))
        if role is None:
            if request.body_exists:   # read (bounded) first: closing on an unread body
                await request.read()  # can reset the connection before the reply arrives
            return _error(401, "unauthorized: send a token ([admin] token_file or "
                               "tokens_file) as Authorization: Bearer",
                          {"WWW-Authenticate": "Bearer"})
        if request.method not in ("GET", "HEAD") and role != OPERATOR:
            if request.body_exists:
                await request.read()
            return _error(403, "forbidden: a read-only token may only GET")
        return await handler(request)

    def role(self, authorization: str) -> str | None:
        """The role of the bearer token in an Authorization header value, or None. The one
        place tokens are checked: constant-time, and every token is compared."""
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = value.strip().encode("latin-1", "replace")
        found = None
        for token, role in self._tokens:
            if hmac.compare_digest(given, token):
                found = role
        return found

    # -- handlers ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return _ok({"status": "live"})

    async def _ready(self, request: web.Request) -> web.Response:
        try:
            why = self.ready() if self.ready is not None else None
        except Exception:
            log.exception("admin /ready check failed")
            why = "readiness check failed"
        if why:
            return _ok({"status": "not ready", "reason": why}, 503)
        return _ok({"status": "ready"})

    async def _openapi(self, request: web.Request) -> web.Response:
        return _ok(openapi.describe(self.routes, self.actions))

    def _fans_out(self, request: web.Request) -> bool:
        """Whether ?node=1 may ask every worker for this request: GET views and /metrics,
        POST actions (not /inject, /xfer: a message goes to one worker)."""
        if request.method == "POST":
            return request.path in self.actions
        if request.method != "GET":
            return False
        path = request.path
        return path == "/metrics" or any(path == p or path.startswith(p + "/")
                                         for p in self.routes)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        if wants_node(request.query_string):
            if not self._fans_out(request):
                return _error(400, "?node=1 is for GET views, /metrics and POST actions")
            if self.node is not None:
                return await self.node(request)
        if "node" in request.query:       # node=0, or one process: this worker is the node
            path = strip_node(path)
        own = self.handlers.get((request.method, request.path))
        if own is not None:
            try:
                return await own(request)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("admin request %s failed", request.path)
                return _error(500, "internal error")
        if request.method == "POST":
            return await self._act(request)
        if request.method != "GET":
            return _error(405, "GET for views, POST for /control actions",
                          {"Allow": "GET, POST"})
        for prefix, handler in list(self.routes.items()):
            if path == prefix or path.startswith(prefix + "/"):
                try:
                    value = handler(path[len(prefix) + 1:])
                except ValueError as exc:
                    return _error(400, str(exc))
                except Exception:
                    log.exception("admin request %s failed", path)
                    return _error(500, "internal error")
                if value is None:
                    return _error(404, f"not found: {path}")
                return _ok(value)
        return _error(404, f"no such endpoint: {request.path}")

    async def _act(self, request: web.Request) -> web.Response:
        raw = await request.read()     # at most client_max_size, else 413 (the guard)
        path = request.path
        handler = self.actions.get(path)
        if handler is None:
            return _error(404, f"no such action: {path}")
        try:
            args = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the request body is not JSON: {exc}")
        if not isinstance(args, dict):
            return _error(400, "the request body must be a JSON object")
        declared = openapi.ACTION_REQUESTS.get(path)
        try:
            if declared is not None:
                openapi.validate(declared, args)
            return _ok(handler(args))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        except Exception:
            log.exception("admin action %s failed", path)
            return _error(500, "internal error")
