"""`mta drain` (issue 15 item 3): a node's queue moves to another node, whole and once.

Real daemons (`mta serve` subprocesses), real sinks (aiosmtpd on 127.0.120.x-127.0.124.x
port 25, reached through [delivery] routes), the real CLI: node A queues mail it cannot
deliver (its sink defers everything, or delivery.hold), `mta drain` moves it to node B
whose sink takes it. Checked at the sink (every message once), in B's queue views
(envelope fields, attempts, next retry), in both spools and logs.
"""
from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from aiosmtpd.controller import Controller

from mta.control.xfer import Entry, Item, parse_body
from mta.model.envelope import Envelope, Recipient

ROOT = Path(__file__).resolve().parent.parent


class Sink:
    """aiosmtpd handler: defers every RCPT but those whose local part starts with "ok"
    (`defer`), or takes every message."""

    def __init__(self, defer: bool):
        self.defer = defer
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.defer and not address.startswith("ok"):
            return "451 4.7.1 come back later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  envelope.original_content))
        return "250 2.0.0 accepted"

    def ids(self) -> list[bytes]:
        with self.lock:
            return [_message_id(m[2]) for m in self.messages]


def _message_id(content: bytes) -> bytes:
    for line in content.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip()
    return b""


@pytest.fixture
def sinks():
    started = []

    def make(host: str, defer: bool) -> Sink:
        handler = Sink(defer)
        ctl = Controller(handler, hostname=host, port=25)
        ctl.start()
        started.append(ctl)
        return handler

    yield make
    for ctl in started:
        ctl.stop()


def _node(daemon_factory, sink_host: str, delivery: str = ""):
    return daemon_factory(extra=f'[delivery]\nroutes = {{ "example.test" = "{sink_host}:25", '
                                f'"other.test" = "{sink_host}:25" }}\nretry_initial = "1h"\n'
                                f'retry_max = "1h"\nshutdown_grace = "5s"\n{delivery}\n')


def _admin(d, path: str, body: dict | None = None) -> tuple[int, dict]:
    token = (d.spool_dir / "admin.token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        if body is None:
            conn.request("GET", path, headers=headers)
        else:
            conn.request("POST", path, orjson.dumps(body),
                         {**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def _send(d, n: int, start: int = 0, **kw) -> None:
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        for k in range(start, start + n):
            s.sendmail("sender@origin.test", kw.get("rcpts", [f"user{k}@example.test"]),
                       b"From: <sender@origin.test>\r\nSubject: drain %d\r\n"
                       b"X-Tenant: acme\r\nX-Campaign: spring\r\n"
                       b"Message-ID: <m%d@origin.test>\r\n\r\nbody %d\r\n" % (k, k, k),
                       mail_options=kw.get("mail_options", []),
                       rcpt_options=kw.get("rcpt_options", []))


def _wait(what, timeout: float = 30.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _queued(d) -> int:
    status, data = _admin(d, "/queue/summary")
    assert status == 200, data
    return sum(q.get("count", 0) for q in data.get("queues", data.get("scheduled", [])))


def _drain(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta", "drain", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _token_file(d) -> str:
    return str(d.spool_dir / "admin.token")


def _url(d) -> str:
    return f"http://127.0.0.1:{d.admin_port}"


def test_live_drain_moves_envelope_and_schedule(daemon_factory, sinks):
    """Deferred mail on A (attempt 1, next retry in an hour) moves to B with its envelope,
    attempts and schedule; A refuses mail from then on; flushed on B, each message goes
    out once."""
    sinks("127.0.120.1", defer=True)
    good = sinks("127.0.120.2", defer=False)
    a = _node(daemon_factory, "127.0.120.1")
    b = _node(daemon_factory, "127.0.120.2")
    _send(a, 5, mail_options=["RET=HDRS", "ENVID=env-1"],
          rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@example.test"])
    _send(a, 1, start=5, rcpts=["one@example.test", "two@other.test"])
    # delivered to one recipient by A, deferred for the other: only the other moves
    _send(a, 1, start=6, rcpts=["ok@example.test", "later@example.test"])
    deferred = _wait(lambda: len(a.log_records("TransientFailure")) >= 8
                     and a.log_records("Delivery") and a.log_records("TransientFailure"))
    ids = sorted({r["id"] for r in deferred})
    assert len(ids) == 7
    before = {i: _admin(a, f"/queue/messages/{i}")[1] for i in ids}
    pending = {i: [r for r in v["recipients"] if r["state"] == "pending"]
               for i, v in before.items()}
    assert sum(len(rows) for rows in pending.values()) == 8
    assert all(r["attempts"] == 1 and r["next_retry"] for rows in pending.values()
               for r in rows)

    out = _drain("-c", str(a.config), "--to", _url(b), "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "summary: 7 of 7 messages moved" in out.stdout, out.stdout

    # A: drained, refuses mail, its spool holds nothing live
    with pytest.raises(smtplib.SMTPException):
        _send(a, 1, start=50)
    assert _admin(a, "/inject", {"from": "a@origin.test", "recipients": ["x@example.test"],
                                 "raw": "Subject: x\r\n\r\nx\r\n"})[0] == 503
    assert _wait(lambda: len(a.log_records("Transfer")) == 7)
    assert {r["id"] for r in a.log_records("Transfer")} == set(ids)

    # B: the same ids, envelopes and schedules
    for i in ids:
        status, view = _admin(b, f"/queue/messages/{i}")
        assert status == 200, view
        old = before[i]
        assert view["envelope"]["sender"] == old["envelope"]["sender"]
        assert view["envelope"]["rcpts"] == [old["envelope"]["rcpts"][r["index"]]
                                             for r in pending[i]]
        for k in ("envid", "ret", "tenant", "campaign", "smtputf8", "received", "client_ip"):
            assert view["envelope"].get(k) == old["envelope"].get(k), k
        assert len(view["recipients"]) == len(pending[i])
        for new_r, old_r in zip(view["recipients"], pending[i]):
            assert new_r["attempts"] == old_r["attempts"] == 1
            assert new_r["where"] == "scheduled"
            assert abs(new_r["next_retry"] - old_r["next_retry"]) < 1.0
            assert new_r["queue"] == old_r["queue"]
            assert "come back later" in (new_r["last_reply"] or "")
    assert before[ids[0]]["envelope"]["envid"] == "env-1" or any(
        v["envelope"]["envid"] == "env-1" for v in before.values())

    # flushed on B: every message out once
    assert _admin(b, "/control/flush", {"selector": {"all": True}})[0] == 200
    _wait(lambda: len(good.messages) >= 8)   # the two-domain message: two transactions
    time.sleep(1.0)
    got = [(_message_id(c), r) for _, rcpts, c in good.messages for r in rcpts]
    assert len(got) == len(set(got)) == 8
    assert len(set(good.ids())) == 7
    assert "ok@example.test" not in {r for _, r in got}
    a.stop()
    assert not a.spooled().messages


def test_kill_mid_transfer_then_drain_again(daemon_factory, sinks):
    """kill -9 of the draining node mid-transfer, restart, drain again: B delivers every
    message exactly once. A copy of A's spool taken before the drain and replayed offline
    afterwards is answered "duplicate" throughout: nothing is delivered twice."""
    n = 400
    good = sinks("127.0.121.2", defer=False)
    a = _node(daemon_factory, "127.0.121.1", "hold = true")
    b = _node(daemon_factory, "127.0.121.2")
    for k in range(0, n, 50):    # at most 100 messages a session (the listener's limit)
        _send(a, 50, start=k)
    _wait(lambda: len(a.log_records("Reception")) >= n)
    a.stop()
    copy = a.workdir / "spool-copy"
    shutil.copytree(a.spool_dir, copy)
    a.start()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    drain = subprocess.Popen([sys.executable, "-m", "mta", "drain", "-c", str(a.config),
                              "--to", _url(b), "--to-token-file", _token_file(b)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _admin(a, "/drain")[1].get("moved", 0) >= 20, step=0.01)
        a.kill()     # SIGKILL mid-transfer
        drain.wait(30)
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.wait()
    time.sleep(0.5)   # B's log flush
    moved_first = len(b.log_records("Transfer"))
    assert 20 <= moved_first < n, moved_first

    a.start()
    out = _drain("-c", str(a.config), "--to", _url(b), "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    _wait(lambda: len(good.messages) >= n)
    _wait(lambda: len(b.log_records("Transfer")) >= n)   # B's log is flushed every 0.2 s
    assert len(b.log_records("Transfer")) == n
    # the offline replay of the old copy: every message is a duplicate for B
    out = _drain("-c", str(a.config), "--spool-dir", str(copy), "--to", _url(b),
                 "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"summary: {n} of {n} messages moved" in out.stdout, out.stdout
    assert f"0 stored, {n} already there" in out.stdout, out.stdout
    time.sleep(1.0)
    assert len(good.messages) == n
    assert sorted(good.ids()) == sorted(b"<m%d@origin.test>" % k for k in range(n))
    a.stop()
    assert not a.spooled().messages


def test_offline_replay_of_dead_spool(daemon_factory, sinks):
    """A node dies (kill -9) with deferred mail; a copy of its spool is replayed offline
    to B: attempts and next retry carry over, the copy is tombstoned (a second replay
    finds nothing), Transfer records are written, and B delivers each message once."""
    first = sinks("127.0.122.1", defer=True)
    good = sinks("127.0.122.2", defer=False)
    a = _node(daemon_factory, "127.0.122.1")
    b = _node(daemon_factory, "127.0.122.2")
    _send(a, 4, rcpt_options=["NOTIFY=FAILURE"], mail_options=["ENVID=dead-1"])
    # one recipient delivered by A, the other deferred: only the other moves
    _send(a, 1, start=4, rcpts=["ok@example.test", "later@example.test"],
          rcpt_options=["NOTIFY=FAILURE"], mail_options=["ENVID=dead-1"])
    deferred = _wait(lambda: len(a.log_records("TransientFailure")) >= 5
                     and a.log_records("Delivery") and a.log_records("TransientFailure"))
    assert [r for _, r, _ in first.messages] == [["ok@example.test"]]
    ids = sorted({r["id"] for r in deferred})
    assert len(ids) == 5
    time.sleep(0.5)   # the SCHEDULE records' batch
    a.kill()
    copy = a.workdir / "dead-copy"
    shutil.copytree(a.spool_dir, copy)

    out = _drain("-c", str(a.config), "--spool-dir", str(copy), "--to", _url(b),
                 "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "summary: 5 of 5 messages moved" in out.stdout, out.stdout
    logged = [orjson.loads(line) for line in
              (a.log_dir / "drain.jsonl").read_bytes().splitlines()]
    assert sorted(r["id"] for r in logged if r["type"] == "Transfer") == ids
    for i in ids:
        status, view = _admin(b, f"/queue/messages/{i}")
        assert status == 200, view
        assert view["envelope"]["envid"] == "dead-1"
        assert view["envelope"]["rcpts"][0][1] == "FAILURE"
        assert [r["address"] for r in view["recipients"]] != ["ok@example.test"]
        assert len(view["recipients"]) == 1
        row = view["recipients"][0]
        assert row["attempts"] == 1 and row["where"] == "scheduled"
        assert row["next_retry"] > time.time() + 1800   # 1h, jittered
    again = _drain("-c", str(a.config), "--spool-dir", str(copy), "--to", _url(b),
                   "--to-token-file", _token_file(b))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "summary: 0 of 0 messages moved" in again.stdout, again.stdout
    assert _admin(b, "/control/flush", {"selector": {"all": True}})[0] == 200
    _wait(lambda: len(good.messages) >= 5)
    time.sleep(0.5)
    assert len(good.messages) == 5
    assert "ok@example.test" not in {r for _, rcpts, _ in good.messages for r in rcpts}


def test_xfer_refuses_bad_requests(daemon_factory, tmp_path):
    """POST /xfer: a token is needed, the payload is checked, a sealed recipient this
    node's keyring cannot open is refused, a repeated key is answered "duplicate" without
    a second copy (also after a restart); the envelope (REQUIRETLS, sealed recipient) is
    kept as sent."""
    import base64

    from mta.model.sealed import seal
    key = bytes(range(64))
    ring = tmp_path / "keyring"
    ring.write_text(f"k1 {base64.b64encode(key).decode()}\n")
    ring.chmod(0o600)
    b = daemon_factory(extra=f'[delivery]\nhold = true\n[privacy]\nkeyring = "{ring}"\n')
    env = Envelope("0" * 8 + "ab" * 12, "s@origin.test",
                   [Recipient(seal("alice@example.test", "k1", key), None, None)],
                   requiretls=True, tenant="t1")
    item = Item(bytes.fromhex(env.id), f"{env.id}.00112233aabbccdd.1.24", env,
                b"Subject: x\r\n\r\nbody\r\n", [Entry("example.test", 2, time.time() + 600)])
    body = item.body("node-a")
    assert parse_body(body)[3] == env

    def post(data: bytes, token: str | None = None) -> tuple[int, dict]:
        token = token or (b.spool_dir / "admin.token").read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", b.admin_port, timeout=10)
        try:
            conn.request("POST", "/xfer", data, {"Authorization": f"Bearer {token}",
                                                 "Content-Type": "application/x-mta-xfer"})
            resp = conn.getresponse()
            return resp.status, orjson.loads(resp.read())
        finally:
            conn.close()

    assert post(body, "x" * 32)[0] == 401
    assert post(b"not json\n")[0] == 400
    assert post(b'{"v": 1, "key": "../x"}\n')[0] == 400
    assert post(body.replace(b'"v":1', b'"v":2'))[0] == 400
    forged = dataclasses.replace(env, recipients=[Recipient(
        "e1k1.QUJDREVGR0hJSktMTU5PUFFSU1RVVldY@example.test")])
    status, answer = post(dataclasses.replace(item, envelope=forged).body("node-a"))
    assert status == 422 and "cannot open" in answer["error"], answer
    assert post(body) == (200, {"status": "stored", "id": env.id})
    assert post(body) == (200, {"status": "duplicate", "id": env.id})
    status, view = _admin(b, f"/queue/messages/{env.id}")
    assert status == 200
    assert view["envelope"]["requiretls"] is True and view["envelope"]["tenant"] == "t1"
    assert view["envelope"]["rcpts"][0][0] == env.recipients[0].address
    assert view["recipients"][0]["attempts"] == 2
    b.stop()
    found = b.spooled()
    assert list(found.envelopes.values())[0].requiretls
    b.start()
    assert post(body) == (200, {"status": "duplicate", "id": env.id})


def test_journal_rebuilt_at_start(tmp_path):
    """A key with only its intent line counts as done when its message is live in the
    spool (the receiver died between its spool sync and the done line); else it is
    forgotten (never stored). Expired keys go; the file is rewritten compact."""
    from mta.control.xfer import JOURNAL_NAME, Journal
    now = int(time.time())
    live, gone, old, kept = ("%032x" % k for k in (1, 2, 3, 4))
    lines = [f"{now} I {live}.aa.1.24", f"{now} I {gone}.aa.1.99",
             f"{now - 10 ** 7} I {old}.aa.1.24", f"{now - 10 ** 7} D {old}.aa.1.24",
             f"{now} I {kept}.bb.2.24", f"{now} D {kept}.bb.2.24"]
    (tmp_path / JOURNAL_NAME).write_text("\n".join(lines) + "\n" + f"{now} D torn")
    j = Journal(str(tmp_path), keep=86400.0)
    j.load(lambda raw: raw == bytes.fromhex(live))
    assert j.keys == {f"{live}.aa.1.24", f"{kept}.bb.2.24"}
    again = Journal(str(tmp_path), keep=86400.0)
    again.load(lambda raw: False)
    assert again.keys == j.keys
    assert len((tmp_path / JOURNAL_NAME).read_text().splitlines()) == 2


def test_smtp_fallback_relays_with_dsn_parameters(daemon_factory):
    """--to smtp://host:port: each message is relayed to the target's listener with its
    DSN parameters, tombstoned on the 250; the target gives it a new id (attempts and
    schedule are not carried: the admin API transport does that)."""
    a = _node(daemon_factory, "127.0.123.1", "hold = true")
    b = _node(daemon_factory, "127.0.123.2", "hold = true")
    _send(a, 3, mail_options=["RET=FULL", "ENVID=smtp-1"],
          rcpt_options=["NOTIFY=DELAY", "ORCPT=rfc822;first@example.test"])
    _wait(lambda: len(a.log_records("Reception")) >= 3)
    out = _drain("-c", str(a.config), "--to", f"smtp://127.0.0.1:{b.port}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "summary: 3 of 3 messages moved" in out.stdout, out.stdout
    got = _wait(lambda: len(b.log_records("Reception")) >= 3 and b.log_records("Reception"))
    assert len(got) == 3
    sent = {r["id"] for r in a.log_records("Transfer") if r["status"] == "relayed"}
    assert len(sent) == 3 and not sent & {r["id"] for r in got}
    for r in got:
        status, view = _admin(b, f"/queue/messages/{r['id']}")
        assert status == 200, view
        env = view["envelope"]
        assert (env["envid"], env["ret"]) == ("smtp-1", "FULL")
        assert env["rcpts"][0][1:] == ["DELAY", "rfc822;first@example.test"]
        assert env["tenant"] == "acme" and env["campaign"] == "spring"
    a.stop()
    assert not a.spooled().messages


def test_offline_drain_refuses_a_live_spool(daemon_factory):
    """`mta drain --spool-dir` on the spool of a daemon that runs refuses (two writers
    on one spool would lose mail)."""
    a = daemon_factory()
    out = _drain("--spool-dir", str(a.spool_dir), "--to", "smtp://127.0.0.1:9")
    assert out.returncode == 1
    assert f"process {a.proc.pid} has" in out.stderr, out.stderr


def test_drain_every_worker_of_a_node(daemon_factory, sinks):
    """A node with [server] workers = 2: `mta drain` asks both workers (each moves its own
    spool shard) and sums their progress; B delivers every message once."""
    good = sinks("127.0.124.2", defer=False)
    a = daemon_factory(extra='[delivery]\nhold = true\n', start=False)
    a.config.write_text(a.config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1))
    a.start()
    b = _node(daemon_factory, "127.0.124.2")
    n = 12
    for k in range(n):    # a connection each: SO_REUSEPORT spreads them over the workers
        _send(a, 1, start=k)
    out = _drain("-c", str(a.config), "--to", _url(b), "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"summary: {n} of {n} messages moved" in out.stdout, out.stdout
    _wait(lambda: len(good.messages) >= n)
    time.sleep(0.5)
    assert sorted(good.ids()) == sorted(b"<m%d@origin.test>" % k for k in range(n))
    a.stop()
    from mta.spool.recovery import scan
    assert not any(scan(str(a.spool_dir / w)).messages for w in ("w0", "w1"))
    moved = [[r for r in (orjson.loads(line) for line in
                          (a.log_dir / f"mta.w{i}.jsonl").read_bytes().splitlines())
              if r["type"] == "Transfer"] for i in (0, 1)]
    assert len(moved[0]) + len(moved[1]) == n
    assert moved[0] and moved[1], "both workers moved their shard"


def test_offline_drain_of_a_multi_worker_spool(daemon_factory, sinks):
    """The root spool of a stopped 2-worker node (shards w0, w1) replayed offline: every
    shard's messages move."""
    good = sinks("127.0.124.4", defer=False)
    a = daemon_factory(extra='[delivery]\nhold = true\n', start=False)
    a.config.write_text(a.config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1))
    a.start()
    b = _node(daemon_factory, "127.0.124.4")
    n = 10
    for k in range(n):
        _send(a, 1, start=k)
    a.stop()
    copy = a.workdir / "copy"
    shutil.copytree(a.spool_dir, copy)
    out = _drain("-c", str(a.config), "--spool-dir", str(copy), "--to", _url(b),
                 "--to-token-file", _token_file(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("spool shard ") == 2, out.stdout
    assert f"summary: {n} of {n} messages moved" in out.stdout, out.stdout
    _wait(lambda: len(good.messages) >= n)
    time.sleep(0.5)
    assert sorted(good.ids()) == sorted(b"<m%d@origin.test>" % k for k in range(n))


def test_hostile_xfer_heads_are_refused_in_linear_time():
    """/xfer's first line is network input: a megabyte-long key shaped like the real one,
    and a body without a newline, are refused at once (the key pattern has only bounded
    quantifiers)."""
    import orjson as _orjson
    crafted = "0" * 32 + "." + "a" * 16 + "." + "1" * 1_000_000 + ".x"
    body = _orjson.dumps({"v": 1, "key": crafted, "envelope": {}}) + b"\n"
    started = time.perf_counter()
    with pytest.raises(ValueError, match="key"):
        parse_body(body)
    with pytest.raises(ValueError, match="no JSON line"):
        parse_body(b"{" + b"a" * (5 << 20))
    assert time.perf_counter() - started < 0.5
