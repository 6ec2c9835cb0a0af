"""The admin API of a real daemon (`mta serve` subprocess): roles, /health, /ready during a
drain, and /openapi.json checked against the daemon's real responses.

The daemon gets an [admin] tokens_file (0600) with a read-only and an operator token,
besides its own token_file (an operator's, which `mta` commands use). Mail is held so the
views have content: two messages, then a hold made by the operator. Every GET path in the
description is fetched and its body validated (jsonschema) against the schema the
description gives; every action in the description declares its request body. A SIGTERM
with a message in DATA keeps the daemon draining while /ready answers 503 "draining" and
/health 200; then the message ends and the daemon exits 0.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import jsonschema
import orjson
import pytest
from conftest import ROOT, free_port
from peers import _records, _send

RO = "ro-" + "a" * 40
OP = "op-" + "b" * 40
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def call(port, method, path, body=None, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = orjson.dumps(body)
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, orjson.loads(r.read())
    finally:
        conn.close()


@pytest.fixture
def admin_daemon(daemon_factory, tmp_path):
    tokens = tmp_path / "admin.tokens"
    tokens.write_text(f"# roles\nread-only {RO}\noperator {OP}\n")
    os.chmod(tokens, 0o600)
    port = free_port()
    d = daemon_factory(extra=f'[delivery]\nhold = true\n[admin]\nlisten = "127.0.0.1:{port}"\n'
                             f'tokens_file = "{tokens}"\n')
    d.admin_port = port
    return d


def _schema_for(doc: dict, template: str) -> dict:
    schema = doc["paths"][template]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}   # "#/components/..." resolves here


def test_roles_openapi_and_real_responses(admin_daemon):
    d = admin_daemon
    port = d.admin_port
    _send(d.port, "a@sender.test", ["x@example.test", "y@other.test"])
    _send(d.port, "b@sender.test", ["z@example.test"])
    recs = _records(d, "Reception", 2)
    # unauthenticated probes
    assert call(port, "GET", "/health") == (200, {"status": "live"})
    assert call(port, "GET", "/ready") == (200, {"status": "ready"})
    # no token, a bad one: 401; a read-only token may GET, not POST
    assert call(port, "GET", "/queue/summary")[0] == 401
    assert call(port, "GET", "/queue/summary", token="c" * 40)[0] == 401
    assert call(port, "GET", "/openapi.json")[0] == 401
    status, summary = call(port, "GET", "/queue/summary", token=RO)
    assert status == 200 and sum(r["count"] for r in summary["scheduled"].values()) == 3
    sel = {"selector": {"domain": "example.test"}}
    status, body = call(port, "POST", "/control/hold", sel, token=RO)
    assert status == 403 and "read-only" in body["error"]
    assert call(port, "GET", "/queue/holds", token=RO) == (200, [])
    assert call(port, "GET", "/control/hold", token=OP)[0] == 404    # GET never acts
    assert call(port, "GET", "/queue/holds", token=RO) == (200, [])
    status, body = call(port, "POST", "/control/hold", sel, token=OP)
    assert status == 200, body
    # a body that does not fit the action's declared request: 400, nothing done
    status, body = call(port, "POST", "/control/hold", {"selector": {"domain": 3}}, token=OP)
    assert status == 400 and "domain" in body["error"]
    status, body = call(port, "POST", "/control/hold", {"selector": {}, "bogus": 1}, token=OP)
    assert status == 400 and "bogus" in body["error"]
    # the daemon's own token file is an operator's: `mta` commands keep working
    r = subprocess.run([sys.executable, "-m", "mta", "queue", "count", "-c", str(d.config)],
                       check=False, env=ENV, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "3"), r.stderr

    status, doc = call(port, "GET", "/openapi.json", token=RO)
    assert status == 200 and doc["openapi"] == "3.1.0"
    gets = {p for p, item in doc["paths"].items() if "get" in item}
    posts = {p for p, item in doc["paths"].items() if "post" in item}
    from mta.control.views import view_routes
    for prefix in view_routes(None):                 # every registered view ...
        assert prefix in gets or any(p.startswith(prefix + "/{") for p in gets), prefix
    for path in ("/control/suspend", "/control/resume", "/control/rebind", "/control/reload",
                 "/control/hold", "/control/release", "/control/flush", "/control/delete",
                 "/control/bounce", "/control/limits"):
        assert path in posts, path
    for path, item in doc["paths"].items():          # ... and action is declared, not "any"
        op = item.get("get") or item.get("post")
        assert "undeclared" not in op["summary"], (path, op["summary"])
        if "post" in item:
            ref = item["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.split("/")[-1] in doc["components"]["schemas"]
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

    # every GET path with a real response, validated against the description
    queue = next(iter(summary["scheduled"]))
    concrete = {
        "/queue/summary": "/queue/summary",
        "/queue/messages/{id}": f"/queue/messages/{recs[0]['id']}",
        "/queue/ages": "/queue/ages",
        "/queue/ages/{by}": "/queue/ages/domain",
        "/queue/list/{queue}": f"/queue/list/{urllib.parse.quote(queue, safe='')}?limit=1",
        "/queue/holds": "/queue/holds",
        "/shaping": "/shaping",
        "/warmup": "/warmup",
        "/adaptive": "/adaptive",
        "/live": "/live",
        "/drain": "/drain",
        "/health": "/health", "/ready": "/ready", "/openapi.json": "/openapi.json",
    }
    assert gets <= set(concrete), f"no real request for {gets - set(concrete)}"
    for template in sorted(gets):
        status, body = call(port, "GET", concrete[template], token=RO)
        assert status == 200, (template, status, body)
        jsonschema.validate(body, _schema_for(doc, template),
                            cls=jsonschema.Draft202012Validator)
    status, holds = call(port, "GET", "/queue/holds", token=RO)
    assert holds == [{"domain": "example.test"}]
    status, message = call(port, "GET", f"/queue/messages/{recs[0]['id']}", token=RO)
    assert len(message["recipients"]) == 2
    # a wrong-typed view fails validation: the schemas are not "anything goes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(summary, wheel="many"), _schema_for(doc, "/queue/summary"),
                            cls=jsonschema.Draft202012Validator)
    assert d.stop() == 0


def test_ready_is_503_while_draining(admin_daemon):
    d = admin_daemon
    port = d.admin_port
    assert call(port, "GET", "/ready") == (200, {"status": "ready"})
    # a message in DATA keeps the drain open
    s = socket.create_connection(("127.0.0.1", d.port), timeout=15)
    f = s.makefile("rb")
    try:
        def say(line: bytes, code: bytes) -> None:
            if line:
                s.sendall(line)
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            assert reply.startswith(code), (line, reply)
        say(b"", b"220")
        say(b"EHLO client.test\r\n", b"250")
        say(b"MAIL FROM:<a@sender.test>\r\n", b"250")
        say(b"RCPT TO:<x@example.test>\r\n", b"250")
        say(b"DATA\r\n", b"354")
        s.sendall(b"Subject: draining\r\n\r\nhalf a message")
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while True:
            status, body = call(port, "GET", "/ready")
            if status == 503:
                break
            assert time.monotonic() < deadline, "/ready never went 503 after SIGTERM"
            time.sleep(0.1)
        assert body == {"status": "not ready", "reason": "draining"}
        assert call(port, "GET", "/health") == (200, {"status": "live"})
        # the read-only token still sees views while draining
        assert call(port, "GET", "/queue/summary", token=RO)[0] == 200
        say(b"\r\n.\r\n", b"250")
    finally:
        f.close()
        s.close()
    rc = d.proc.wait(30)
    d.proc = None
    assert rc == 0
    with pytest.raises(OSError):
        call(port, "GET", "/health")                 # gone with the daemon


def test_tokens_file_readable_by_others_is_refused(daemon_factory, tmp_path):
    tokens = tmp_path / "admin.tokens"
    tokens.write_text(f"read-only {RO}\n")
    os.chmod(tokens, 0o644)
    d = daemon_factory(extra=f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                             f'tokens_file = "{tokens}"\n', start=False)
    with pytest.raises(RuntimeError, match="chmod 600"):
        d.start()


def test_ready_is_503_while_the_spool_refuses_mail(daemon_factory):
    port = free_port()
    d = daemon_factory(extra=f'[delivery]\nhold = true\n[admin]\nlisten = "127.0.0.1:{port}"\n',
                       start=False)
    d.config.write_text(d.config.read_text().replace(
        "[spool]\n", "[spool]\nmax_queued_messages = 1\n", 1))
    d.start()
    assert call(port, "GET", "/ready") == (200, {"status": "ready"})
    _send(d.port, "a@sender.test", ["x@example.test"])
    _records(d, "Reception", 1)
    status, body = call(port, "GET", "/ready")
    assert (status, body) == (503, {"status": "not ready",
                                    "reason": "spool refuses mail: QUEUE_FULL"})
    assert call(port, "GET", "/health") == (200, {"status": "live"})
    # the operator deletes the message: ready again
    token = (d.spool_dir / "admin.token").read_text().strip()
    status, body = call(port, "POST", "/control/delete", {"selector": {"all": True}},
                        token=token)
    assert status == 200, body
    deadline = time.monotonic() + 15
    while call(port, "GET", "/ready")[0] != 200:
        assert time.monotonic() < deadline, "/ready stayed 503 after the queue emptied"
        time.sleep(0.1)
    assert d.stop() == 0
