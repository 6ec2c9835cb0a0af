"""POST /inject on a real daemon (`mta serve` subprocess) delivering to a real SMTP sink.

Raw (JSON text, base64, message/rfc822) and structured messages (text and html parts,
headers) for many recipients with per-recipient {{placeholders}} (HTML-escaped in html);
tenant, campaign and class from the request in the Reception record and the envelope;
durability (kill -9 right after the 200: the message is delivered after the restart);
suppression (taken out, a Suppressed record, 422 when nobody is left); limits (body size
413, recipients, template size, a missing placeholder value: 400 naming it); a
read-only token refused (403), no token 401; spool admission (503 with the SMTP reason).
"""
from __future__ import annotations

import base64
import email
import email.policy
import http.client
import os
import subprocess
import sys

import orjson
import pytest
from conftest import ROOT, free_port
from multisink import MultiSink
from peers import _records

RO = "ro-" + "c" * 40
OP = "op-" + "d" * 40


def call(port: int, body, token: str | None = OP, ctype: str = "application/json",
         path: str = "/inject") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": ctype}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        conn.request("POST", path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, orjson.loads(r.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture
def sink():
    s = MultiSink()
    yield s
    s.close()


def _daemon(daemon_factory, tmp_path, sink, extra: str = "", start: bool = True):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read-only {RO}\noperator {OP}\n")
    os.chmod(tokens, 0o600)
    port = free_port()
    d = daemon_factory(extra=(
        f'[delivery]\nsmarthost = "127.0.0.1:{sink.ports[0]}"\nretry_initial = "1s"\n'
        f'[reception]\ntenant_header = "X-Tenant"\n'
        f'[admin]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{tokens}"\n'
        f'inject_max_size = "256KiB"\ninject_max_recipients = 50\n'
        f'inject_max_template = "4KiB"\n{extra}'), start=start)
    d.admin_port = port
    return d


def _parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_raw_and_structured_with_templates(daemon_factory, tmp_path, sink):
    d = _daemon(daemon_factory, tmp_path, sink)
    raw = "From: <a@sender.test>\nSubject: raw one\n\nline 1\nline 2\n"
    st, got = call(d.admin_port, {"from": "a@sender.test", "recipients": ["r1@example.test",
                                                                        "r2@example.test"],
                                  "raw": raw, "tenant": "acme", "campaign": "spring",
                                  "class": "bulk"})
    assert st == 200, got
    assert len(got["messages"]) == 1 and got["messages"][0]["recipients"] == [
        "r1@example.test", "r2@example.test"]
    raw_id = got["messages"][0]["id"]
    st, got = call(d.admin_port, {"from": "b@sender.test", "recipients": ["r3@example.test"],
                                  "raw_base64": base64.b64encode(b"Subject: b64\r\n\r\nbody\r\n")
                                  .decode()})
    assert st == 200, got
    st, got = call(d.admin_port, b"Subject: rfc822\r\n\r\nbody\r\n", ctype="message/rfc822",
                   path="/inject?from=c@sender.test&to=r4@example.test&to=r5@example.test")
    assert st == 200 and got["messages"][0]["recipients"] == ["r4@example.test", "r5@example.test"]
    st, got = call(d.admin_port, {
        "from": "news@sender.test", "subject": "Hello {{name}}",
        "text": "Dear {{name}}, your code is {{code}}.", "html": "<p>Dear {{ name }}</p>",
        "headers": {"X-Campaign-Ref": "ref-{{code}}"}, "substitutions": {"code": "0"},
        "recipients": [{"email": "ann@example.test", "substitutions": {"name": "Ann <&>"}},
                       {"email": "bob@example.test",
                        "substitutions": {"name": "Bob", "code": 42}}]})
    assert st == 200, got
    assert [m["recipients"] for m in got["messages"]] == [["ann@example.test"],
                                                          ["bob@example.test"]]
    msgs = sink.wait(5)
    by_rcpt = {r: data for _, _, rcpts, data in msgs for r in rcpts}
    assert set(by_rcpt) == {"r1@example.test", "r2@example.test", "r3@example.test",
                            "r4@example.test", "r5@example.test", "ann@example.test",
                            "bob@example.test"}
    assert b"line 1\r\nline 2\r\n" in by_rcpt["r1@example.test"]
    assert b"with HTTP id " + raw_id.encode() in by_rcpt["r1@example.test"]
    ann = _parsed(by_rcpt["ann@example.test"])
    assert ann["Subject"] == "Hello Ann <&>" and ann["To"] == "ann@example.test"
    assert ann["X-Campaign-Ref"] == "ref-0"
    assert "Dear Ann <&>, your code is 0." in ann.get_body(("plain",)).get_content()
    assert "<p>Dear Ann &lt;&amp;&gt;</p>" in ann.get_body(("html",)).get_content()
    bob = _parsed(by_rcpt["bob@example.test"])
    assert bob["Subject"] == "Hello Bob" and bob["X-Campaign-Ref"] == "ref-42"
    recs = _records(d, "Reception", 5)
    assert {r["protocol"] for r in recs} == {"HTTP"}
    assert {r["listener"] for r in recs} == {"http-inject"}
    first = next(r for r in recs if r["id"] == raw_id)
    assert first["tenant"] == "acme" and first["campaign"] == "spring"
    assert first["size"] > len(raw)


def test_durable_before_the_answer_kill9_then_delivered(daemon_factory, tmp_path, sink):
    # held: nothing leaves before the kill; the 200 means it is on disk
    held = _daemon(daemon_factory, tmp_path, sink, start=False)
    cfg = held.config.read_text().replace("[delivery]\n", "[delivery]\nhold = true\n", 1)
    held.config.write_text(cfg)
    held.start()
    st, got = call(held.admin_port, {"from": "a@sender.test", "recipients": [
        f"k{i}@example.test" for i in range(5)], "subject": "s", "text": "durable"})
    assert st == 200, got
    held.proc.kill()          # kill -9 right after the 200
    held.proc.wait(30)
    held.proc = None
    held.config.write_text(cfg.replace("hold = true\n", ""))
    held.start()
    msgs = sink.wait(1)
    assert {r for _, _, rcpts, _ in msgs for r in rcpts} == {f"k{i}@example.test"
                                                             for i in range(5)}
    assert b"durable" in msgs[0][3]


def test_suppression_applies(daemon_factory, tmp_path, sink):
    d = _daemon(daemon_factory, tmp_path, sink, start=False)
    got = subprocess.run([sys.executable, "-m", "mta", "suppress", "-c", str(d.config), "add",
                          "gone@example.test", "--reason", "complaint"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    d.start()
    st, got = call(d.admin_port, {"from": "a@sender.test", "recipients": [
        "gone@example.test", "here@example.test"], "subject": "s", "text": "t"})
    assert st == 200, got
    assert got["messages"][0]["recipients"] == ["here@example.test"]
    assert [s["recipient"] for s in got["suppressed"]] == ["gone@example.test"]
    st, got = call(d.admin_port, {"from": "a@sender.test", "recipients": ["gone@example.test"],
                                  "subject": "s", "text": "t"})
    assert st == 422 and got["suppressed"][0]["recipient"] == "gone@example.test"
    assert sink.wait(1)[0][2] == ["here@example.test"]
    recs = _records(d, "Suppressed", 2)
    assert {r["listener"] for r in recs} == {"http-inject"}


def test_limits_tokens_and_clear_400s(daemon_factory, tmp_path, sink):
    d = _daemon(daemon_factory, tmp_path, sink)
    p = d.admin_port
    base = {"from": "a@sender.test", "recipients": ["x@example.test"], "subject": "s",
            "text": "t"}
    # roles: no token 401, read-only 403, GET is not injection
    assert call(p, base, token=None)[0] == 401
    assert call(p, base, token=RO)[0] == 403
    # size: over inject_max_size (256 KiB) -> 413; over [admin] max_body (64 KiB) but
    # within inject_max_size is fine (the endpoint reads its body under its own bound)
    st, got = call(p, {**base, "text": "x" * (300 << 10)})
    assert st == 413 and "inject_max_size" in got["error"]
    big = "Subject: big\r\n\r\n" + ("y" * 76 + "\r\n") * 1300   # ~100 KiB
    st, got = call(p, {"from": "a@sender.test", "recipients": ["big@example.test"], "raw": big})
    assert st == 200, got
    # recipients over the cap; an address that is not one; no body parts; bad base64
    st, got = call(p, {**base, "recipients": [f"r{i}@example.test" for i in range(51)]})
    assert st == 400 and "at most 50" in got["error"]
    st, got = call(p, {**base, "recipients": ["not an address"]})
    assert st == 400 and "recipients[0]" in got["error"]
    st, got = call(p, {"from": "a@sender.test", "recipients": ["x@example.test"]})
    assert st == 400 and "text" in got["error"]
    st, got = call(p, {**base, "text": None, "raw_base64": "!!!"})
    assert st == 400 and "base64" in got["error"]
    # template too large, a placeholder with no value, a value making a header two lines
    st, got = call(p, {**base, "text": "{{a}}" + "y" * 5000})
    assert st == 400 and "inject_max_template" in got["error"]
    st, got = call(p, {**base, "text": "hi {{who}}"})
    assert st == 400 and "{{who}}" in got["error"] and "recipients[0]" in got["error"]
    st, got = call(p, {**base, "subject": "{{s}}", "recipients": [
        {"email": "x@example.test", "substitutions": {"s": "a\r\nBcc: evil@example.test"}}]})
    assert st == 400 and "one line" in got["error"]
    # substitution that would exceed the template size after expansion
    st, got = call(p, {**base, "text": "{{v}}" * 200, "substitutions": {"v": "z" * 100}})
    assert st == 400 and "after substitution" in got["error"]
    st, got = call(p, b"not json")
    assert st == 400 and "JSON" in got["error"]
    st, got = call(p, b"x", ctype="text/plain")
    assert st == 415
    # header names we set ourselves are refused
    st, got = call(p, {**base, "headers": {"From": "x@example.test"}})
    assert st == 400 and "header" in got["error"]
    # still fine afterwards
    st, got = call(p, base)
    assert st == 200, got


def test_spool_full_is_503_with_the_reason(daemon_factory, tmp_path, sink):
    d = _daemon(daemon_factory, tmp_path, sink, start=False)
    cfg = d.config.read_text().replace("[delivery]\n", "[delivery]\nhold = true\n", 1)
    cfg = cfg.replace("[spool]\n", "[spool]\nmax_queued_messages = 1\n", 1)
    d.config.write_text(cfg)
    d.start()
    base = {"from": "a@sender.test", "recipients": ["x@example.test"], "subject": "s",
            "text": "t"}
    assert call(d.admin_port, base)[0] == 200
    st, got = call(d.admin_port, base)
    assert st == 503 and "4.3.2" in got["error"], got


def test_substitute_is_one_pass_bounded_and_escapes():
    from mta.control.inject import substitute
    values = {"a": "{{b}}", "b": "never", "h": "<b>&\"'"}
    # a value is never scanned again
    assert substitute("x{{a}}y{{ b }}", values, 100) == "x{{b}}ynever"
    assert substitute("{{h}}", values, 100, escape=True) == "&lt;b&gt;&amp;&quot;&#x27;"
    with pytest.raises(ValueError, match="after substitution"):
        substitute("{{b}}" * 30, values, 100)
    with pytest.raises(ValueError, match=r"no value for \{\{zz\}\}"):
        substitute("{{zz}}", values, 100)
    assert substitute("no placeholders {x} {{}}", {}, 100) == "no placeholders {x} {{}}"
