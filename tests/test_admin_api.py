"""The admin API server (mta/control/admin.py on aiohttp) and its OpenAPI description.

An AdminServer on its own loop thread on a free loopback port, spoken to with http.client
and raw sockets: roles (read-only may GET, operator may also POST; 401/403), /health and
/ready without a token, limits (413 for an oversized body, 408 for a slow body, a closed
connection for a slow head, 503 over the connection cap), 400 for bad JSON and for a body
that does not fit the action's request dataclass, GET never reaching an action. The
OpenAPI document is generated from the views' dataclasses; jsonschema checks it and the
schemas it derives. tests/scenarios/test_admin_roles.py does the same against a real
daemon and validates its real responses.
"""
from __future__ import annotations

import asyncio
import dataclasses
import http.client
import os
import socket
import threading
import time

import jsonschema
import orjson
import pytest

from mta.control import openapi, views
from mta.control.admin import AdminServer
from mta.control.token import OPERATOR, READ_ONLY, TokenError, load_tokens_file

OP = "o" * 64
RO = "r" * 64


class Running:
    """An AdminServer on a loop thread; `calls` records every action invoked."""

    def __init__(self, **kw):
        self.calls: list[tuple[str, dict]] = []
        self.unready: str | None = None
        routes = {"/echo": lambda rest: {"rest": rest},
                  "/none": lambda rest: None,
                  "/bad": lambda rest: (_ for _ in ()).throw(ValueError("bad thing"))}
        actions = {"/control/suspend": lambda a: self.calls.append(("suspend", a)) or {"ok": 1},
                   "/control/free": lambda a: self.calls.append(("free", a)) or {"ok": 2}}
        self.server = AdminServer(routes, actions, token=OP, tokens={RO: READ_ONLY},
                                  ready=lambda: self.unready, **kw)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.port = self.server.address[1]

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def admin():
    r = Running()
    yield r
    r.close()


def call(port, method, path, body=None, token=OP, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = orjson.dumps(body)
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        raw = r.read()
        return r.status, orjson.loads(raw) if raw else None, dict(r.getheaders())
    finally:
        conn.close()


def raw(port, data: bytes, timeout=15.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


# --- roles -----------------------------------------------------------------------------------

def test_roles(admin):
    # both roles may GET
    for token in (OP, RO):
        status, body, _ = call(admin.port, "GET", "/echo/x?y=1", token=token)
        assert (status, body) == (200, {"rest": "x?y=1"})
    # no token, a wrong one, another scheme: 401 with WWW-Authenticate, reaching no handler
    for headers, token in (({}, None), ({}, "x" * 64), ({"Authorization": "Basic " + OP}, None),
                           ({"Authorization": OP}, None), ({}, OP[:-1])):
        for method, path in (("GET", "/echo"), ("POST", "/control/suspend"),
                             ("GET", "/openapi.json")):
            status, body, h = call(admin.port, method, path,
                                   {"kind": "site", "name": "x"} if method == "POST" else None,
                                   token=token, headers=headers)
            assert status == 401 and "unauthorized" in body["error"], (headers, token, status)
            assert h.get("WWW-Authenticate") == "Bearer"
    # a read-only token may not POST: 403, the action not called
    status, body, _ = call(admin.port, "POST", "/control/suspend",
                           {"kind": "site", "name": "x"}, token=RO)
    assert status == 403 and "read-only" in body["error"]
    assert admin.calls == []
    # the operator may
    status, body, _ = call(admin.port, "POST", "/control/suspend",
                           {"kind": "site", "name": "x", "duration": 5})
    assert (status, body) == (200, {"ok": 1})
    assert admin.calls == [("suspend", {"kind": "site", "name": "x", "duration": 5})]


def test_get_never_acts(admin):
    for token in (OP, RO):
        for path in ("/control/suspend", "/control/free"):
            status, _, _ = call(admin.port, "GET", path, token=token)
            assert status == 404
    for method in ("PUT", "DELETE", "PATCH"):
        status, body, h = call(admin.port, method, "/control/suspend", b"{}")
        assert status == 405 and "POST" in body["error"] and "POST" in h["Allow"], method
    assert admin.calls == []


def test_health_and_ready_need_no_token(admin):
    assert call(admin.port, "GET", "/health", token=None)[:2] == (200, {"status": "live"})
    assert call(admin.port, "GET", "/ready", token=None)[:2] == (200, {"status": "ready"})
    admin.unready = "draining"
    status, body, _ = call(admin.port, "GET", "/ready", token=None)
    assert (status, body) == (503, {"status": "not ready", "reason": "draining"})
    # POST to them is not open
    assert call(admin.port, "POST", "/health", b"{}", token=None)[0] == 401


def test_views_errors(admin):
    assert call(admin.port, "GET", "/none/x")[0] == 404
    status, body, _ = call(admin.port, "GET", "/bad")
    assert status == 400 and body == {"error": "bad thing"}
    assert call(admin.port, "GET", "/nothing")[0] == 404
    assert call(admin.port, "GET", "/echoes")[0] == 404       # a prefix is a path segment


# --- request bodies --------------------------------------------------------------------------

def test_bad_json_and_bad_requests(admin):
    for body, want in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object"),
                       (b"\xff\xfe", "not JSON")):
        status, got, _ = call(admin.port, "POST", "/control/suspend", body,
                              headers={"Content-Type": "application/json"})
        assert status == 400 and want in got["error"], (body, status, got)
    # declared request dataclass (SuspendRequest): wrong types, unknown and missing fields
    for body, want in (({"kind": "site", "name": 3}, "body.name: must be a string"),
                       ({"kind": "site", "name": "x", "duration": "1h"}, "body.duration"),
                       ({"kind": "site", "name": "x", "durration": 5}, "unknown field"),
                       ({"kind": "site"}, "name is required"),
                       ({"kind": "site", "name": "x", "duration": True}, "body.duration")):
        status, got, _ = call(admin.port, "POST", "/control/suspend", body)
        assert status == 400 and want in got["error"], (body, status, got)
    assert admin.calls == []
    # an action without a declared request takes any JSON object
    assert call(admin.port, "POST", "/control/free", {"anything": [1]})[:2] == (200, {"ok": 2})
    assert call(admin.port, "POST", "/control/nothing", {})[0] == 404


def test_oversized_body_413():
    r = Running(max_body=4096)
    try:
        big = orjson.dumps({"kind": "site", "name": "x" * 10000})
        status, body, _ = call(r.port, "POST", "/control/suspend", big)
        assert status == 413, (status, body)
        assert "error" in body
        # a declared length over the limit, body never sent in full: 413 as well
        got = raw(r.port, (f"POST /control/suspend HTTP/1.1\r\nHost: x\r\n"
                           f"Authorization: Bearer {OP}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: 100000000\r\n\r\n").encode() + b"{" * 5000, 15)
        assert got.startswith(b"HTTP/1.1 413 "), got[:80]
        assert r.calls == []
        # and the server still serves
        assert call(r.port, "GET", "/echo")[0] == 200
    finally:
        r.close()


def test_oversized_head_refused(admin):
    got = raw(admin.port, (f"GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OP}\r\n"
                           f"X-Pad: {'a' * 20000}\r\n\r\n").encode())
    assert got[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.0 400 ", b"HTTP/1.1 431 "), got[:80]
    assert b"aaaa" not in got and got.endswith(b'{"error":"bad request"}'), got[-200:]


def test_slow_body_408_and_slow_head_closed():
    r = Running(timeout=1.5)
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", r.port), timeout=15) as s:
            s.sendall((f"POST /control/suspend HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {OP}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: 40\r\n\r\n{{\"kind\"").encode())   # then nothing
            got = s.recv(4096)
            took = time.monotonic() - t0
            while chunk := s.recv(4096):
                got += chunk
        assert got.startswith(b"HTTP/1.1 408 "), got[:80]
        assert 1.0 < took < 10, took
        assert time.monotonic() - t0 < 15
        # a head that never ends: the connection is closed after about the timeout
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", r.port), timeout=15) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        took = time.monotonic() - t0
        assert not got.startswith(b"HTTP/1.1 200"), got[:80]
        assert 1.0 < took < 10, took
        assert r.calls == []
    finally:
        r.close()


def test_connection_cap():
    r = Running(max_connections=2, timeout=5)
    try:
        held = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(2)]
        time.sleep(0.3)
        status, body, _ = call(r.port, "GET", "/echo")
        assert status == 503 and "too many" in body["error"]
        for h in held:
            h.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if call(r.port, "GET", "/echo")[0] == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the cap did not free after the connections closed")
    finally:
        r.close()


# --- tokens files ----------------------------------------------------------------------------

def test_tokens_file(tmp_path):
    p = tmp_path / "tokens"
    p.write_text(f"# admin tokens\n\nread-only {RO}\noperator   {OP}\n")
    os.chmod(p, 0o600)
    assert load_tokens_file(p) == {RO: READ_ONLY, OP: OPERATOR}
    os.chmod(p, 0o640)
    with pytest.raises(TokenError, match="chmod 600"):
        load_tokens_file(p)
    for text in ("admin " + OP, "operator short", f"operator {OP} extra", f"operator\t{OP}x\u00e9"):
        p.write_text(text + "\n", encoding="utf-8")
        os.chmod(p, 0o600)
        with pytest.raises(TokenError):
            load_tokens_file(p)
    with pytest.raises(TokenError):
        load_tokens_file(tmp_path / "missing")


def test_the_single_token_is_an_operator_even_when_listed_read_only():
    # the [admin] token_file token stays the `mta` commands' operator token
    s = AdminServer({}, {}, token=OP, tokens={OP: READ_ONLY, RO: READ_ONLY})
    assert s.role(f"Bearer {OP}") == OPERATOR
    assert s.role(f"bearer {RO}") == READ_ONLY
    assert s.role(f"Bearer {RO}x") is None and s.role("") is None and s.role(OP) is None


# --- OpenAPI ---------------------------------------------------------------------------------

VIEW_TYPES = [c for c in vars(views).values()
              if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == views.__name__]


def test_openapi_document_is_valid_and_complete(admin):
    status, doc, _ = call(admin.port, "GET", "/openapi.json", token=RO)
    assert status == 200 and doc["openapi"].startswith("3.1")
    for path in ("/health", "/ready", "/openapi.json", "/echo", "/none", "/bad"):
        assert "get" in doc["paths"][path], path
    for path in ("/control/suspend", "/control/free"):
        assert "post" in doc["paths"][path], path
    assert doc["paths"]["/health"]["get"]["security"] == []
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    body = doc["paths"]["/control/suspend"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/SuspendRequest"}
    want = doc["components"]["schemas"]["SuspendRequest"]
    assert want["required"] == ["kind", "name"] and not want["additionalProperties"]


def test_every_view_dataclass_has_a_derived_schema():
    for cls in VIEW_TYPES:
        schema = openapi.schema_of(cls)
        jsonschema.Draft202012Validator.check_schema(schema)
        comp = schema["$defs"][cls.__name__]
        assert set(comp["properties"]) == {openapi.json_name(f.name)
                                           for f in dataclasses.fields(cls)}


def test_schemas_accept_what_to_json_writes_and_from_json_reads():
    # a view written by to_json validates; the schema is as strict as the view's reader
    row = views.ScheduledRow(3, None, "bulk", "default", 0, 1, True, 1.5e9)
    schema = openapi.schema_of(views.ScheduledRow)
    jsonschema.validate(row.to_json(), schema)
    assert views.ScheduledRow.from_json(row.to_json()) == row
    bad = dict(row.to_json(), count="3")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    extra = dict(row.to_json(), surprise=1)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(extra, schema)
    missing = {k: v for k, v in row.to_json().items() if k != "class"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, schema)


def test_request_schema_and_validator_agree():
    # what validate() accepts the generated schema accepts, and the reverse
    cases = [({"selector": {"queue": "q"}}, True), ({"selector": {"all": True}, "reason": "x"}, True),
             ({"selector": {"queue": 1}}, False), ({"selector": "q"}, False), ({}, False),
             ({"selector": {"queue": "q"}, "why": 1}, False)]
    schema = openapi.schema_of(openapi.SurgeryRequest)
    for body, ok in cases:
        try:
            openapi.validate(openapi.SurgeryRequest, body)
            mine = True
        except ValueError:
            mine = False
        theirs = jsonschema.Draft202012Validator(schema).is_valid(body)
        assert mine == theirs == ok, (body, mine, theirs)
