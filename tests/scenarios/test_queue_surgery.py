"""Issue 13, items 2 and 4 end to end: a real daemon (`mta serve`), real sinks (aiosmtpd
on 127.0.31.x:25), a DNS server on loopback, and the `mta` commands as an operator
types them.

Restarts keep their state: a deferred message keeps its attempt count and is not
retried before its due time after a restart; a suspension, a hold and a shaping
override survive a restart. Queue surgery: flush makes a deferred message go now;
hold keeps mail queued until release; delete leaves an AdminDelete record and the
message is never delivered (nor recovered); bounce sends a DSN to the sender's
address at a sink with AdminBounce records; inspect, ls and summary --ages show it.
"""
from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
import time

import orjson
import pytest

from conftest import ROOT
from peers import _records, _send

NET = "127.0.31"   # this file's sinks: 127.0.31.x:25
ZONE = [
    "slow.test. 60 IN MX 10 mx.slow.test.",
    f"mx.slow.test. 60 IN A {NET}.1",
    "sender.test. 60 IN MX 10 mx.sender.test.",
    f"mx.sender.test. 60 IN A {NET}.2",
    "fast.test. 60 IN MX 10 mx.fast.test.",
    f"mx.fast.test. 60 IN A {NET}.3",
]
SITE_FAST = "mx.fast.test"


def _daemon(daemon_factory, dns_server, retry: str = "60s"):
    dns = dns_server(ZONE)
    return daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                                f'[delivery]\nretry_initial = "{retry}"\nretry_max = "{retry}"\n')


def _mta(d, *args: str, ok: bool = True) -> dict | list | str:
    out = subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=30)
    if ok:
        assert out.returncode == 0, f"mta {' '.join(args)}: {out.stderr.decode()}"
    text = out.stdout.decode()
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _restart(d) -> None:
    assert d.stop() == 0
    d.start()


def _queued_id(d) -> str:
    rec, = _records(d, "Reception", 1)
    return rec["id"]


def _wait(pred, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_restart_keeps_attempts_and_retry_time_then_flush(daemon_factory, dns_server,
                                                          receivers):
    slow = receivers(f"{NET}.1")      # defers every defer* recipient
    d = _daemon(daemon_factory, dns_server, retry="120s")
    _send(d.port, "alice@sender.test", ["defer-1@slow.test", "ok@slow.test"])
    first, = _records(d, "TransientFailure", 1)
    assert first["attempt"] == 1
    msg_id = _queued_id(d)
    _wait(lambda: _inspect(d, msg_id)["recipients"][0]["last_reply"], 10,
          "the SCHEDULE record to be written")
    row, ok = _inspect(d, msg_id)["recipients"]
    assert ok["state"] == "delivered", ok
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["next_retry"] > time.time() + 60, f"want a retry ~120 s out, got {row}"
    assert row["last_reply"].startswith("451"), row
    due = row["next_retry"]
    _restart(d)
    # after the restart: same attempt count and due time, and no retry before it
    row, ok = _inspect(d, msg_id)["recipients"]
    assert ok["state"] == "delivered", "per-recipient state survives the restart"
    assert (row["state"], row["where"], row["attempts"]) == ("pending", "scheduled", 1), row
    assert abs(row["next_retry"] - due) < 0.01, f"got due {row['next_retry']}, want {due}"
    time.sleep(4)
    assert slow.deferred == 1, "retried at once after the restart; want it to wait for its due time"
    assert len(d.log_records("TransientFailure")) == 1
    # flush: it goes now, and the attempt count continues
    out = _mta(d, "queue", "flush", "--id", msg_id)
    assert out["flushed"] == 1, out
    second = _records(d, "TransientFailure", 2)[-1]
    assert second["attempt"] == 2, f"want attempt 2 after a restart and a flush, got {second}"
    assert slow.deferred == 2


def _inspect(d, msg_id: str) -> dict:
    return _mta(d, "queue", "inspect", msg_id)


def test_suspension_and_shaping_override_survive_a_restart(daemon_factory, dns_server,
                                                           receivers):
    fast = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server)
    _mta(d, "suspend", "queue", "fast.test", "--for", "1h")
    _mta(d, "shaping", "set", "*", SITE_FAST, "connection_limit=1", "--for", "1h",
         "--reason", "test")
    state = orjson.loads((d.spool_dir / "controls.json").read_bytes())
    assert [s["name"] for s in state["suspensions"]] == ["fast.test"]
    assert state["limits"][0]["values"] == {"connection_limit": 1}
    _restart(d)
    _send(d.port, "alice@sender.test", ["bob@fast.test"])
    time.sleep(3)
    assert not fast.messages, "delivered while its queue was suspended (before the restart)"
    summary = _mta(d, "queue", "summary", "--json")
    row = summary["scheduled"]["fast.test"]
    assert row["suspended"] and row["held"] == 1, row
    _mta(d, "resume", "queue", "fast.test")
    fast.wait(1)
    shaping = _mta(d, "shaping", "show", "--json")
    row, = [r for r in shaping if r["site"] == SITE_FAST]
    assert row["connection_limit"] == 1 and f"override:site:{SITE_FAST}" in row["matched"], row
    _mta(d, "shaping", "clear", "*", SITE_FAST)
    state = orjson.loads((d.spool_dir / "controls.json").read_bytes())
    assert state["limits"] == [] and state["suspensions"] == [], state


def test_hold_survives_a_restart_until_release(daemon_factory, dns_server, receivers):
    fast = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server)
    out = _mta(d, "queue", "hold", "--domain", "fast.test")
    assert out["holds"] == [{"domain": "fast.test"}]
    _send(d.port, "alice@sender.test", ["bob@fast.test"])
    msg_id = _queued_id(d)
    time.sleep(2)
    row, = _inspect(d, msg_id)["recipients"]
    assert (row["state"], row["where"]) == ("pending", "held"), row
    _restart(d)
    time.sleep(2)
    assert not fast.messages, "a held message was delivered"
    assert _mta(d, "queue", "holds") == [{"domain": "fast.test"}]
    out = _mta(d, "queue", "release", "--domain", "fast.test")
    assert out["released"] == 1 and out["holds"] == [], out
    (_, rcpts, _), = fast.wait(1)
    assert rcpts == ["bob@fast.test"]


def test_delete_logs_and_never_delivers(daemon_factory, dns_server, receivers):
    slow = receivers(f"{NET}.1")
    d = _daemon(daemon_factory, dns_server, retry="2s")
    _send(d.port, "alice@sender.test", ["defer-1@slow.test"])
    _records(d, "TransientFailure", 1)
    msg_id = _queued_id(d)
    out = _mta(d, "queue", "delete", "--id", msg_id, "--reason", "spam run")
    assert out["deleted"] == 1, out
    rec, = _records(d, "AdminDelete", 1)
    assert (rec["id"], rec["recipients"], rec["reason"]) == (msg_id, ["defer-1@slow.test"],
                                                              "spam run")
    time.sleep(5)   # two retry intervals: nothing may try it again
    assert slow.deferred == 1 and not slow.messages
    gone = subprocess.run([sys.executable, "-m", "mta", "queue", "inspect", msg_id, "-c",
                           str(d.config)], capture_output=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert gone.returncode == 1, "a deleted message is not queued any more"
    d.stop()
    assert msg_id not in {m.hex() for m in d.spooled().messages}, "a deleted message came back"


def test_bounce_sends_a_dsn_to_the_sender(daemon_factory, dns_server, receivers):
    receivers(f"{NET}.1")
    dsn_box = receivers(f"{NET}.2")
    d = _daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["defer-1@slow.test", "defer-2@slow.test"])
    _records(d, "TransientFailure", 2)
    msg_id = _queued_id(d)
    out = _mta(d, "queue", "bounce", "--queue", "slow.test", "--reason", "campaign cancelled")
    assert (out["bounced"], out["dsns"]) == (1, 1), out
    (dsn_from, dsn_to, dsn), = dsn_box.wait(1)
    assert dsn_from in ("", "<>") and dsn_to == ["alice@sender.test"]
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    text = dsn.decode("utf-8", "replace")
    assert "campaign cancelled" in text and "5.0.0" in text
    recs = _records(d, "AdminBounce", 2)
    assert sorted(r["recipient"] for r in recs) == ["defer-1@slow.test", "defer-2@slow.test"]
    assert all(r["id"] == msg_id and r["dsn"] for r in recs)
    assert not d.log_records("Bounce"), "an admin bounce is not a remote bounce"


def test_ls_and_ages(daemon_factory, dns_server, receivers):
    receivers(f"{NET}.1")
    d = _daemon(daemon_factory, dns_server)
    for n in range(5):
        _send(d.port, "alice@sender.test", [f"defer-{n}@slow.test"])
    _records(d, "TransientFailure", 5)
    page = _mta(d, "queue", "ls", "slow.test", "--limit", "2", "--json")
    assert len(page["messages"]) == 2 and page["next"], page
    seen = [m["id"] for m in page["messages"]]
    while page["next"]:
        page = _mta(d, "queue", "ls", "slow.test", "--limit", "2", "--after", page["next"],
                    "--json")
        seen += [m["id"] for m in page["messages"]]
    assert len(seen) == 5 and seen == sorted(seen), seen
    ages = _mta(d, "queue", "summary", "--ages", "--by", "domain", "--json")
    assert ages["rows"]["slow.test"][0] == 5 and ages["buckets"][0] == "0-5m", ages
    text = _mta(d, "queue", "summary", "--ages")
    assert "slow.test" in text and "160m+" in text


@pytest.mark.parametrize("args", [["queue", "flush"], ["queue", "delete", "--id", "zz"]])
def test_bad_selections_are_refused(daemon_factory, dns_server, args):
    d = _daemon(daemon_factory, dns_server)
    out = subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=30)
    assert out.returncode != 0 and out.stderr, out
