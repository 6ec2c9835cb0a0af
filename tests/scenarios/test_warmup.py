"""IP warm-up end to end (mta/egress/warmup.py): a real `mta serve` with a warming source
(127.0.45.1, warmup_start = "now") and a warm one (127.0.45.2) delivers to an aiosmtpd
receiver on 127.0.45.10 found through a DNS server on loopback (its own zone, warm.test).
Warm-up days are 12 s long. Checked from the receiver's side (the client address of each
message) and the log records: the warming source never gets more than its day's cap, the
rest of a mixed pool goes through the warm source, mail only the warming source may send
waits for the next day, the next day's cap grows (WarmupDay record), the state survives a
restart, and `mta warmup show` prints it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import orjson
import pytest
from aiosmtpd.controller import Controller

from conftest import ROOT
from peers import _records

NET = "127.0.45"
NEW, OLD, MX = f"{NET}.1", f"{NET}.2", f"{NET}.10"
DAY = 12.0
CAPS = [5, 10]                  # [warmup] default: day 1, day 2, then no cap
ZONE = ["warm.test. 60 IN MX 10 mx.warm.test.", f"mx.warm.test. 60 IN A {MX}",
        "sender.test. 60 IN MX 10 mx.warm.test."]


class PeerReceiver:
    """Records which client address sent each recipient; refuses reject* (550 5.1.1)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, float]] = []    # (client ip, recipient, time)
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.got.append((session.peer[0], rcpt, time.time()))
        return "250 2.0.0 accepted"

    def count(self) -> int:
        with self.lock:
            return len(self.got)

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {self.count()} recipients, want {n}")
            time.sleep(0.05)


@pytest.fixture
def receiver():
    handler = PeerReceiver()
    ctl = Controller(handler, hostname=MX, port=25)
    ctl.start()
    yield handler
    ctl.stop()


def _mta(d, *args: str):
    out = subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=30)
    assert out.returncode == 0, f"mta {' '.join(args)}: {out.stderr.decode()}"
    return out.stdout.decode()


def _inject(port: int, sender: str, rcpts: list[str]) -> None:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port) as s:
        for rcpt in rcpts:
            s.sendmail(sender, [rcpt], b"From: <%s>\r\nSubject: warm-up\r\n\r\nhello\r\n"
                       % sender.encode())


def _show(d) -> dict:
    (row,) = orjson.loads(_mta(d, "warmup", "show", "--json"))
    return row


def _per_day(d, start: float) -> dict[int, int]:
    """Deliveries from the warming source per warm-up day (from the Delivery records)."""
    days: dict[int, int] = {}
    for r in d.log_records("Delivery"):
        if r["source"] == "new":
            day = int((r["time"] - start) // DAY) + 1
            days[day] = days.get(day, 0) + 1
    return days


def _daemon(daemon_factory, dns_server, pool: str = "mixed", warmup: str = ""):
    dns = dns_server(ZONE)
    return daemon_factory(extra=f"""
[dns]
nameservers = ["127.0.0.1:{dns.port}"]
[delivery]
retry_initial = "1s"
retry_max = "1s"
[egress]
default_pool = "{pool}"
[[source]]
name = "new"
address = "{NEW}"
warmup_start = "now"
[[source]]
name = "old"
address = "{OLD}"
[[pool]]
name = "mixed"
sources = ["new", "old"]
[[pool]]
name = "solo"
sources = ["new"]
[[egress_rule]]
sender_domain = "solo.test"
pool = "solo"
[warmup]
day_length = "{DAY:g}s"
default = {CAPS}
hour_divisor = 1
{warmup}
""")


def test_a_warming_source_keeps_to_its_caps(daemon_factory, dns_server, receiver):
    d = _daemon(daemon_factory, dns_server)
    start = _show(d)["start"]
    # day 1: a mixed pool: the warming source takes its 5, the warm one the rest
    _inject(d.port, "a@sender.test", [f"m{i}@warm.test" for i in range(30)])
    receiver.wait(30, timeout=60)
    by_ip = {ip: sum(1 for g in receiver.got if g[0] == ip) for ip in (NEW, OLD)}
    assert by_ip[NEW] + by_ip[OLD] == 30 and by_ip[OLD] >= 30 - sum(CAPS)
    # mail only the warming source may send: what is over today's cap waits for tomorrow
    _inject(d.port, "b@solo.test", [f"s{i}@warm.test" for i in range(8)])
    receiver.wait(38, timeout=3 * DAY + 30)
    solo = [g for g in receiver.got if g[1].startswith("s")]
    assert {g[0] for g in solo} == {NEW}
    _records(d, "Delivery", 38, timeout=30)
    days = _per_day(d, start)
    assert sum(days.values()) == by_ip[NEW] + 8
    assert all(n <= CAPS[day - 1] for day, n in days.items() if day <= len(CAPS)), days
    # the next day's cap grew: a WarmupDay record for day 2 with cap 10
    grown = [r for r in _records(d, "WarmupDay", 3)     # day 2's: one per class
             if r["source"] == "new" and r["class"] == "default" and r["day"] == 2]
    assert grown and grown[0]["action"] == "grown" and grown[0]["cap"] == 10, grown
    # state survives a restart: same start, schedule position, the day's use counted on
    assert d.stop() == 0
    state = orjson.loads((d.spool_dir / "warmup.json").read_bytes())["sources"]["new"]
    assert state["start"] == start and state["steps"]["default"] >= 1
    d.start()
    after = _show(d)
    assert after["start"] == start and after["day"] >= state["day"]
    default = {c["class"]: c for c in after["classes"]}["default"]
    assert default["step"] >= 2 and default["last"].startswith("grown")
    if after["day"] == state["day"]:    # today's use is counted on, not from 0
        (day, _, used, _) = state["usage"]["site:mx.warm.test"]
        assert after["use"][0]["day"] == (used if day == state["day"] else 0)
    text = _mta(d, "warmup", "show")
    assert f"new: warm-up day {after['day']}" in text and "default" in text
    assert "last day: grown" in text


def test_a_day_with_too_many_bounces_holds_the_cap(daemon_factory, dns_server, receiver):
    d = _daemon(daemon_factory, dns_server, pool="solo", warmup="min_volume = 1")
    start = _show(d)["start"]
    _inject(d.port, "a@sender.test", ["ok1@warm.test", "ok2@warm.test", "ok3@warm.test",
                                      "reject1@warm.test", "reject2@warm.test"])
    _records(d, "Bounce", 2, timeout=DAY)
    assert time.time() < start + DAY, "the machine is too slow for a 12 s warm-up day"
    row = {c["class"]: c for c in _show(d)["classes"]}["default"]
    assert (row["tried"], row["bounced"], row["may_grow"]) == (5, 2, False)
    assert row["why_not"].startswith("bounce rate 40.00 % > 3 %")
    held = [r for r in _records(d, "WarmupDay", 3, timeout=2 * DAY)
            if r["class"] == "default" and r["day"] == 2]
    assert held and (held[0]["action"], held[0]["cap"]) == ("held", CAPS[0]), held
    text = _mta(d, "warmup", "show")
    assert "last day: held: day 1: bounce rate 40.00 % > 3 %" in text
