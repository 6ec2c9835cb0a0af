"""Egress content scanning at the other doors (issue 16 item 5): POST /inject on a real
daemon (`mta serve`) and local submission (`Server.inject()` on an in-process mta.Server),
both against a real spamd (the fixture of test_scanning.py); /inject delivers to
test_http_inject's MultiSink (127.0.0.1, an ephemeral port, through the smarthost),
Server.inject() to an aiosmtpd receiver on 127.0.141.1:25.

/inject: GTUBE for tenant a (action reject) is refused (422, the message's status
"rejected" with 550 5.7.1, Rejection and Scanned records, nothing delivered) while a clean
one is queued and delivered untouched; a templated request whose GTUBE hides in one
recipient's substitution is refused for that recipient only (200, one queued, one
rejected); tenant b's GTUBE is held (status "held", listed by `mta queue holds`, released,
then delivered); tenant c's arrives tagged, its DKIM signature (made after the tag) verifying; tenant d's is dropped (status "dropped",
never delivered) and a message above its max_size is refused unscanned (oversize). spamd down: fail = "open" queues and delivers, fail = "closed" answers
503 with status "deferred" (451 4.7.1) and stores nothing.

Server.inject(): GTUBE raises ContentRefused (permanent 550 5.7.1); a hold returns the id
and the message stays held; a clean message is delivered; spamd down with fail = "closed"
raises ContentRefused (not permanent, 451 4.7.1).
"""
from __future__ import annotations

import asyncio
import time

import dkim
import orjson
import pytest

import mta
from conftest import free_port
from mta.dkim.signer import keygen
from mta.ingest.scan import ContentRefused
from peers import _records
from test_http_inject import _daemon, call, sink  # noqa: F401  (fixture: a MultiSink)
from test_queue_surgery import _mta, _wait
from test_scanning import GTUBE, spamd  # noqa: F401  (fixture: a real spamd)

LOCAL_SINK = "127.0.141.1"   # Server.inject()'s sink; /inject's is a MultiSink


def _tables(spamd_port: int) -> str:
    return "".join(f'[[scan]]\ntenant = "{t}"\naddress = "127.0.0.1:{spamd_port}"\n'
                   f'action = "{a}"\ntimeout = "60s"\nconcurrency = 2\n'
                   for t, a in (("a", "reject"), ("b", "hold"), ("c", "tag"), ("d", "drop"))) \
        + 'max_size = "1KiB"\noversize = "reject"\n'   # tenant d: bigger is refused unscanned


def _raw(subject: str, body: bytes) -> str:
    return f"From: <alice@sender.test>\r\nSubject: {subject}\r\n\r\n{body.decode()}\r\n"


def test_inject_per_tenant_policy(daemon_factory, sink, spamd, tmp_path):  # noqa: F811
    pem, public = keygen("rsa", 2048)
    (tmp_path / "k.pem").write_bytes(pem)
    dkim_txt = {"s1._domainkey.sender.test.": f"v=DKIM1; k=rsa; p={public}".encode()}
    d = _daemon(daemon_factory, tmp_path, sink, _tables(spamd) + (
        f'[signing]\nstage = "reception"\n'
        f'[[dkim]]\ndomain = "sender.test"\nselector = "s1"\nkey_file = "{tmp_path}/k.pem"\n'))
    req = {"from": "alice@sender.test", "recipients": ["bob@dest.test"]}

    # tenant a: GTUBE refused with the SMTP reply, nothing stored
    st, got = call(d.admin_port, {**req, "raw": _raw("spam", GTUBE), "tenant": "a"})
    assert st == 422, got
    m, = got["messages"]
    assert m["status"] == "rejected" and m["error"].startswith("550 5.7.1"), got
    rej, = _records(d, "Rejection", 1)
    assert rej["code"] == 550 and rej["reason"] == "spam" and rej["listener"] == "http-inject"
    scanned, = _records(d, "Scanned", 1)
    assert scanned["action"] == "reject" and scanned["id"] == m["id"], scanned
    assert "GTUBE" in scanned["symbols"]

    # tenant a: a clean message is queued and delivered untouched
    st, got = call(d.admin_port, {**req, "raw": _raw("clean", b"the quarterly report"),
                                  "tenant": "a"})
    assert st == 200 and got["messages"][0]["status"] == "queued", got
    (*_, content), = sink.wait(1, timeout=60)
    assert b"Subject: clean" in content and b"X-Spam" not in content

    # one request, two recipients: the GTUBE hidden in one substitution refuses that one only
    st, got = call(d.admin_port, {
        "from": "alice@sender.test", "tenant": "a", "subject": "hello {{name}}",
        "text": "Dear {{name}},\n{{line}}\n",
        "recipients": [{"email": "ann@dest.test", "substitutions": {"name": "Ann", "line": "hi"}},
                       {"email": "cy@dest.test", "substitutions": {"name": "Cy",
                                                                   "line": GTUBE.decode()}}]})
    assert st == 200, got
    by = {m["recipients"][0]: m for m in got["messages"]}
    assert by["ann@dest.test"]["status"] == "queued", got
    assert by["cy@dest.test"]["status"] == "rejected" and \
        by["cy@dest.test"]["error"].startswith("550 5.7.1"), got
    msgs = sink.wait(2, timeout=60)
    assert any(b"Subject: hello Ann" in c for *_, c in msgs)

    # tenant c: tagged; tenant d: dropped (a record, never delivered)
    st, got = call(d.admin_port, {**req, "raw": _raw("tagged", GTUBE), "tenant": "c"})
    assert st == 200 and got["messages"][0]["status"] == "queued", got
    st, got = call(d.admin_port, {**req, "raw": _raw("dropped", GTUBE), "tenant": "d"})
    assert st == 200 and got["messages"][0]["status"] == "dropped", got
    # the size bound holds here as at SMTP: above max_size, "oversize" decides unscanned
    st, got = call(d.admin_port, {**req, "raw": _raw("big", b"x" * 2048), "tenant": "d"})
    assert st == 422 and got["messages"][0]["error"].startswith("550 5.7.1 Message too big"), got
    _wait(lambda: any(r["reason"] == "oversize" and r["spam"] is None
                      for r in d.log_records("Scanned")), 15, "an oversize Scanned record")
    msgs = sink.wait(3, timeout=60)
    content = next(c for *_, c in msgs if b"Subject: tagged" in c)
    assert b"X-Spam-Flag: YES" in content and b"X-Spam-Status: Yes, score=1" in content
    # tagged before signing: the signature covers the tag and verifies
    assert dkim.DKIM(content).verify(dnsfunc=lambda name, timeout=5: dkim_txt.get(name.decode(), b""))

    # tenant b: held under an operator hold on its id, released, then delivered
    st, got = call(d.admin_port, {**req, "raw": _raw("held", GTUBE), "tenant": "b"})
    assert st == 200, got
    m, = got["messages"]
    assert m["status"] == "held", got
    assert {"id": m["id"]} in _mta(d, "queue", "holds")
    time.sleep(3)   # retry_initial is 1s: a message not held would have gone by now
    assert not any(b"Subject: held" in c for *_, c in sink.messages)
    assert _mta(d, "queue", "release", "--id", m["id"])["released"] == 1
    msgs = sink.wait(4, timeout=60)
    assert any(b"Subject: held" in c for *_, c in msgs)
    assert not any(b"Subject: dropped" in c or b"Subject: spam" in c for *_, c in msgs)
    assert not any(b"GTUBE" in c for *_, c in msgs if b"Subject: hello Cy" in c)
    assert len(msgs) == 4, [c[:200] for *_, c in msgs]


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_inject_spamd_down(daemon_factory, sink, tmp_path, fail):  # noqa: F811
    dead = free_port()   # nothing listens there
    d = _daemon(daemon_factory, tmp_path, sink,
                f'[[scan]]\naddress = "127.0.0.1:{dead}"\nfail = "{fail}"\ntimeout = "5s"\n')
    st, got = call(d.admin_port, {"from": "alice@sender.test", "recipients": ["bob@dest.test"],
                                  "raw": _raw("down", GTUBE)})
    rec, = _records(d, "Scanned", 1)
    assert rec["spam"] is None and "spamd" in rec["reason"], rec
    if fail == "open":
        assert st == 200 and got["messages"][0]["status"] == "queued", got
        sink.wait(1, timeout=60)
    else:
        assert st == 503, got
        m, = got["messages"]
        assert m["status"] == "deferred" and m["error"].startswith("451 4.7.1"), got
        assert not d.log_records("Reception")


def _config(tmp_path, scan: str):
    return mta.config.parse_config(
        f'[spool]\ndirectory = "{tmp_path}/spool"\n[log]\ndirectory = "{tmp_path}/log"\n'
        f'[admin]\nlisten = ""\n[dns]\nnameservers = ["127.0.0.1:9"]\n'   # never leaves loopback
        f'[delivery]\nsmarthost = "{LOCAL_SINK}:25"\nretry_initial = "1s"\n'
        f'[[listener]]\nport = {free_port()}\n' + scan)


def _records_in(tmp_path, rtype: str) -> list[dict]:
    path = tmp_path / "log" / "mta.jsonl"
    if not path.exists():
        return []
    return [r for r in map(orjson.loads, path.read_bytes().splitlines()) if r["type"] == rtype]


def _msg(tenant: str, subject: str, body: bytes) -> bytes:
    return (f"From: <alice@sender.test>\r\nSubject: {subject}\r\nX-Tenant: {tenant}\r\n\r\n"
            .encode() + body + b"\r\n")


def test_local_submission(receivers, spamd, tmp_path):  # noqa: F811
    receiver = receivers(LOCAL_SINK)

    async def run() -> tuple[str, str]:
        async with mta.Server(_config(tmp_path, _tables(spamd))) as server:
            with pytest.raises(ContentRefused) as refused:
                await server.inject("alice@sender.test", ["bob@dest.test"],
                                    _msg("a", "spam", GTUBE))
            assert refused.value.permanent and refused.value.reply.startswith("550 5.7.1")
            clean = await server.inject("alice@sender.test", ["bob@dest.test"],
                                        _msg("a", "clean", b"the quarterly report"))
            held = await server.inject("alice@sender.test", ["bob@dest.test"],
                                       _msg("b", "held", GTUBE))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: receiver.wait(1, timeout=60))
            await asyncio.sleep(3)   # retry_initial is 1s: the held one would have gone
            return clean, held

    clean, held = asyncio.run(run())
    assert [c for _, _, c in receiver.messages if b"Subject: clean" in c], receiver.messages
    assert not any(b"Subject: held" in c or b"Subject: spam" in c for _, _, c in receiver.messages)
    by_action = {r["action"]: r for r in _records_in(tmp_path, "Scanned")}
    assert set(by_action) == {"reject", "accept", "hold"}, by_action
    assert by_action["hold"]["id"] == held and by_action["accept"]["id"] == clean
    assert {r["id"] for r in _records_in(tmp_path, "Reception")} == {clean, held}


def test_local_submission_spamd_down_closed(tmp_path):
    dead = free_port()

    async def run() -> ContentRefused:
        async with mta.Server(_config(tmp_path, f'[[scan]]\naddress = "127.0.0.1:{dead}"\n'
                                                f'fail = "closed"\ntimeout = "5s"\n')) as server:
            with pytest.raises(ContentRefused) as refused:
                await server.inject("alice@sender.test", ["bob@dest.test"],
                                    _msg("x", "down", b"hello"))
            return refused.value

    refused = asyncio.run(run())
    assert not refused.permanent and refused.reply.startswith("451 4.7.1"), refused.reply
    assert not _records_in(tmp_path, "Reception")
