"""The admin API's OpenAPI 3.1 description, generated from the typed views and action requests.

Where it sits: the control stage, next to the views it describes. GET /openapi.json
(mta/control/admin.py) serves `describe(routes, actions)`.

Nothing here is a hand-written copy of a schema: `schema_of(type)` derives a JSON Schema
(2020-12, the dialect of OpenAPI 3.1) from Python types, and a dataclass becomes a named
component from its fields and their annotations:

    int -> integer, float -> number, str -> string, bool -> boolean, bytes -> string
    (its text form), X | None -> anyOf [X, null], list[X] -> array, dict[K, V] -> object
    whose values are V (an Enum K names its keys), Enum -> its values, Any -> anything,
    a view dataclass (views.py, Selector, the requests here) -> an object with one property per field (named as in
    JSON: `klass` is "class"), required when the field has no default, no others allowed;
    a type that is not such a view (the message's Envelope: its own view()) -> object.

Which type a route answers with is declared once in ROUTE_VIEWS (the route's prefix -> the
view type, its path parameter, its query parameters); the views' own `to_json()` writes
that shape, and tests/test_admin_api.py checks real responses validate against the
description. Each POST action declares its request body once as a dataclass in
ACTION_REQUESTS; `validate(cls, body)` checks a request against that same dataclass
before the handler sees it (400 with the reason otherwise), and the description's
requestBody is generated from it. A route or action without a declaration is described
as returning/taking any JSON (and the test names it, so a new one gets declared).
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from mta.control import views as v
from mta.queues.select import Selector

_JSON_NAMES = {"klass": "class"}   # Python field name -> JSON key, where a keyword is in the way
_SCALARS: dict[Any, dict[str, Any]] = {
    int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
    bool: {"type": "boolean"}, bytes: {"type": "string"}, type(None): {"type": "null"},
}


# --- action requests: declared once, used to validate and to describe ---------------------

@dataclass
class SuspendRequest:
    """Suspend a scheduled queue, a site, a source or a (source, site) pair."""
    kind: str                        # queue, site, source or pair
    name: str                        # the queue, site or source name
    site: str = ""                   # the site, for kind pair
    duration: float | None = None    # seconds; the default when absent


@dataclass
class ResumeRequest:
    """End a suspension made with /control/suspend."""
    kind: str
    name: str
    site: str = ""


@dataclass
class RebindRequest:
    """Send a scheduled queue's messages through another egress pool."""
    queue: str
    pool: str


@dataclass
class ReloadRequest:
    """Read the config file again and apply what may change without a restart."""


@dataclass
class SurgeryRequest:
    """flush, hold, release, delete or bounce the queued messages a selector matches."""
    selector: Selector
    reason: str = ""                 # delete and bounce: logged, and in the bounce


@dataclass
class LimitsRequest:
    """Override shaping keys for a scope (values, ttl), or with clear drop overrides (keys)."""
    kind: str                        # provider, site, source or pair
    name: str = ""
    site: str = ""
    values: dict[str, Any] | None = None
    ttl: float | None = None         # seconds; null: no end
    reason: str = ""
    clear: bool = False
    keys: list[str] = field(default_factory=list)


@dataclass
class DrainRequest:
    """Stop accepting and move every queued message to another node (mta drain)."""
    to: str                          # the target's admin API URL, or smtp://host:port
    token: str = ""                  # the target's operator token (not for smtp://)


ACTION_REQUESTS: dict[str, type] = {
    "/control/drain": DrainRequest,
    "/control/suspend": SuspendRequest,
    "/control/resume": ResumeRequest,
    "/control/rebind": RebindRequest,
    "/control/reload": ReloadRequest,
    **{f"/control/{verb}": SurgeryRequest
       for verb in ("flush", "hold", "release", "delete", "bounce")},
    "/control/limits": LimitsRequest,
}


@dataclass(frozen=True)
class RouteView:
    """What a GET route answers with: its type, the path parameter after the prefix (None:
    the prefix alone), whether that parameter may be left out, and query parameters."""
    answer: Any
    param: str | None = None
    optional: bool = False
    query: tuple[tuple[str, Any], ...] = ()
    summary: str = ""


ROUTE_VIEWS: dict[str, RouteView] = {
    "/queue/summary": RouteView(v.QueueSummary, summary="every queue with its counts"),
    "/queue/messages": RouteView(v.MessageView, "id", summary="one queued message"),
    "/queue/ages": RouteView(v.AgeTable, "by", optional=True,
                             summary="messages by age, per queue or per domain"),
    "/queue/list": RouteView(v.QueueListing, "queue", query=(("limit", int), ("after", str)),
                             summary="the messages of one scheduled queue, a page at a time"),
    "/queue/holds": RouteView(list[Selector], summary="operator holds in force"),
    "/shaping": RouteView(list[v.ShapingRow], summary="live state and limits per (source, site)"),
}
ROUTE_VIEWS["/drain"] = RouteView(v.DrainProgress, summary="the drain's progress (mta drain)")
if hasattr(v, "WarmupRow"):
    ROUTE_VIEWS["/warmup"] = RouteView(list[v.WarmupRow],
                                       summary="warming sources: day, caps per class, use")
if hasattr(v, "AdaptiveRow"):
    ROUTE_VIEWS["/adaptive"] = RouteView(list[v.AdaptiveRow],
                                         summary="adaptive delivery actions in force")
if hasattr(v, "LiveView"):
    ROUTE_VIEWS["/live"] = RouteView(v.LiveView, summary="one snapshot for mta top and the "
                                     "dashboard: counters, depths, holds, recent errors")


# --- schemas from types ----------------------------------------------------------------

def json_name(name: str) -> str:
    return _JSON_NAMES.get(name, name)


_VIEW_MODULES = (v.__name__, Selector.__module__, __name__)


def _is_view(tp: Any) -> bool:
    """A typed view (mta/control/views.py), a selector or an action request: a dataclass
    whose JSON has one key per field. Other dataclasses (Envelope) have their own shapes."""
    return (isinstance(tp, type) and dataclasses.is_dataclass(tp)
            and tp.__module__ in _VIEW_MODULES)


class Schemas:
    """Collects named components while deriving schemas; `ref` style as OpenAPI wants."""

    def __init__(self, prefix: str = "#/components/schemas/"):
        self.prefix = prefix
        self.components: dict[str, dict[str, Any]] = {}

    def of(self, tp: Any) -> dict[str, Any]:
        if tp is Any:
            return {}
        if tp in _SCALARS:
            return dict(_SCALARS[tp])
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            return {"anyOf": [self.of(a) for a in args]}
        if origin in (list, tuple, set, frozenset):
            return {"type": "array", "items": self.of(args[0]) if args else {}}
        if origin is dict:
            out: dict[str, Any] = {"type": "object"}
            if args:
                if isinstance(args[0], type) and issubclass(args[0], enum.Enum):
                    out["propertyNames"] = self.of(args[0])
                out["additionalProperties"] = self.of(args[1])
            return out
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            values = [m.value for m in tp]
            kind = "string" if all(isinstance(x, str) for x in values) else "integer"
            return {"type": kind, "enum": values}
        if _is_view(tp):
            name = tp.__name__
            if name not in self.components:
                self.components[name] = {}          # placeholder: recursion stops here
                self.components[name] = self._object(tp)
            return {"$ref": self.prefix + name}
        if isinstance(tp, type):                     # e.g. Envelope: its own view()
            return {"type": "object", "description": f"{tp.__name__} (see its view())"}
        return {}

    def _object(self, cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        props: dict[str, Any] = {}
        required: list[str] = []
        for f in dataclasses.fields(cls):
            key = json_name(f.name)
            props[key] = self.of(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(key)
        out: dict[str, Any] = {"type": "object", "properties": props,
                               "additionalProperties": False}
        if required:
            out["required"] = required
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):   # not the dataclass default
            out["description"] = doc.splitlines()[0]
        return out


def schema_of(tp: Any) -> dict[str, Any]:
    """A standalone JSON Schema for `tp` (components under $defs)."""
    s = Schemas("#/$defs/")
    root = s.of(tp)
    if s.components:
        root = {**root, "$defs": s.components}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root}


# --- validating a request against its dataclass ------------------------------------------

def validate(cls: type, body: Any) -> None:
    """Raise ValueError naming the first place `body` does not fit `cls`'s fields."""
    _check(cls, body, "body")


def _check(tp: Any, value: Any, where: str) -> None:
    if tp is Any:
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        problems = []
        for a in args:
            try:
                _check(a, value, where)
                return
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError(problems[-1] if problems else f"{where}: unexpected value")
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{where}: must be null")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer")
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: must be a number")
        return
    if tp in (str, bytes):
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string")
        return
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, list):
            raise ValueError(f"{where}: must be an array")
        for i, item in enumerate(value):
            _check(args[0] if args else Any, item, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be an object")
        for k, item in value.items():
            _check(args[1] if args else Any, item, f"{where}.{k}")
        return
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a JSON object")
        hints = typing.get_type_hints(tp)
        known = {json_name(f.name): f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(known) or 'none'})")
        for key, f in known.items():
            if key not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{where}: {key} is required")
                continue
            _check(hints[f.name], value[key], f"{where}.{key}")
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if value not in {m.value for m in tp}:
            raise ValueError(f"{where}: one of {', '.join(str(m.value) for m in tp)}")
        return


# --- the description ---------------------------------------------------------------------

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}},
          "required": ["error"]}


# ?node=1 (mta/control/nodeview.py): with [server] workers = N the answer of every worker
# of the node, from any worker's admin API
NODE_DOC = (
    "One node, several worker processes ([server] workers = N, admin API on [admin] listen "
    "port + I): add the query parameter node=1 to a GET view, GET /metrics or a POST action "
    "on any worker's admin API and that worker asks every worker of the node (itself "
    "included, with the request's own bearer token, each within a timeout below [admin] "
    "timeout and at most 64 MiB of answer) and answers for the node. Views that can be "
    "merged are: /queue/summary, /queue/ages and /live summed (rows merged by queue, domain "
    "or (source, site)); /queue/list pages concatenated in id order up to limit, with the "
    "cursor of the merged page; /queue/messages/{id} from the worker that holds it; "
    "/queue/holds the union; /metrics every series summed (histograms bucket-wise; "
    "mta_start_time_seconds the earliest, ages, lags, errnos and failing flags the worst): "
    "Prometheus scrapes one port with /metrics?node=1. Other views (each worker's own live "
    "state and limits: /shaping, /adaptive, /warmup, /drain) and every action answer one "
    "section per worker, {\"workers\": [{\"worker\": I, \"status\": S, \"result\": ...} or "
    "{..., \"error\": ...}]}, an action being applied on every worker. When a worker does "
    "not answer the node answers 502 {\"error\", \"missing\": [{\"worker\", \"status\", "
    "\"error\"}], \"partial\": the merge of the others} (a section list for actions and "
    "per-worker views), never a partial view as 200. Requests a worker sends to its siblings "
    "carry the header Mta-Node-Fanout and are not fanned out again (node=1 with that header: "
    "400). With one worker process node=1 answers as without it. POST /inject and /xfer "
    "take no node=1 (400): a message goes to one worker.")
_NODE_PARAM = {"name": "node", "in": "query", "required": False,
               "description": "1: the answer of every worker of the node (see the API's "
                              "description)", "schema": {"type": "integer", "enum": [0, 1]}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad request (the error says why)", 401: "no or a wrong bearer token",
            403: "a read-only token may not POST", 404: "not found",
            408: "the request took too long", 413: "request body too large",
            502: "node=1: a worker of the node did not answer (the others in partial)",
            503: "not ready, or too many connections"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def describe(routes: dict[str, Callable], actions: dict[str, Callable],
             title: str = "mta admin API", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document for these GET routes and POST actions (plus /health,
    /ready and /openapi.json, which admin.py serves itself)."""
    s = Schemas()
    paths: dict[str, Any] = {}
    status = {"type": "object", "properties": {"status": {"type": "string"},
                                               "reason": {"type": "string"}},
              "required": ["status"]}
    paths["/health"] = {"get": {"summary": "live: answers while the daemon's loop runs",
                                "security": [], "responses": {"200": _json(status, "live")}}}
    paths["/ready"] = {"get": {"summary": "ready: accepting mail (listeners open, spool "
                                          "writable, not draining)", "security": [],
                               "responses": {"200": _json(status, "accepting mail"),
                                             "503": _json(status, "not accepting; reason")}}}
    paths["/openapi.json"] = {"get": {"summary": "this description",
                                      "responses": {"200": _json({"type": "object"},
                                                                 "OpenAPI 3.1"),
                                                    **_errors(401)}}}
    for prefix in sorted(routes):
        rv = ROUTE_VIEWS.get(prefix)
        answer = s.of(rv.answer) if rv else {}
        op: dict[str, Any] = {"summary": rv.summary if rv else "(undeclared view: any JSON)",
                              "operationId": "get" + prefix.replace("/", "_"),
                              "responses": {"200": _json(answer, "the view"),
                                            **_errors(400, 401, 404, 502)}}
        params = [_NODE_PARAM]
        if rv is not None:
            for qname, qtype in rv.query:
                params.append({"name": qname, "in": "query", "required": False,
                               "schema": s.of(qtype)})
        if rv is not None and rv.param:
            paths[f"{prefix}/{{{rv.param}}}"] = {"get": {
                **op, "operationId": op["operationId"] + "_by_" + rv.param,
                "parameters": [{"name": rv.param, "in": "path", "required": True,
                                "schema": {"type": "string"}}] + params}}
            if not rv.optional:
                continue
        paths[prefix] = {"get": {**op, "parameters": params}}
    for path in sorted(actions):
        cls = ACTION_REQUESTS.get(path)
        body = s.of(cls) if cls else {"type": "object"}
        paths[path] = {"post": {
            "summary": ((cls.__doc__ or "").strip().splitlines() or [""])[0] if cls
            else "(undeclared action: any JSON object)",
            "operationId": "post" + path.replace("/", "_"),
            "parameters": [_NODE_PARAM],
            "requestBody": {"required": False, "content": {"application/json": {"schema": body}}},
            "responses": {"200": _json({}, "what the action did"),
                          **_errors(400, 401, 403, 404, 413, 502)}}}
    s.components["Error"] = _ERROR
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Bearer-token authentication: read-only tokens may GET, "
                                "operator tokens may also POST. /health and /ready need none. "
                                + NODE_DOC},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": s.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
