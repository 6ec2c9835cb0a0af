"""Receivers and DNS data shared by the delivery scenarios (aiosmtpd on 127.0.7.x:25).

Also home of the small helpers those files share: _send (smtplib injection),
_records (wait for log records), _daemon, and the `receivers` fixture (made
visible to all tests by tests/conftest.py).
"""
from __future__ import annotations

import smtplib
import threading
import time
from typing import TYPE_CHECKING

import pytest
from aiosmtpd.controller import Controller

if TYPE_CHECKING:
    from conftest import Daemon

NET = "127.0.7"   # receivers of this file live on 127.0.7.x:25


class Receiver:
    """aiosmtpd handler: records messages; scripted replies by local part:
    reject* -> 550, defer* -> 451 (until `defer_until` deliveries were refused)."""

    def __init__(self, defer_times: int = 10**9):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.defer_times = defer_times
        self.deferred = 0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 <%s>: no such user" % address
        if local.startswith("defer"):
            with self.lock:
                self.deferred += 1
                if self.deferred <= self.defer_times:
                    return "451 4.2.0 greylisted, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 accepted"

    def wait(self, n: int, timeout: float = 15.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"got {len(self.messages)} messages at the receiver, want {n}")


ZONE = [
    # example.test: two MX, the preferred one has nobody listening (next MX on failure)
    "example.test. 60 IN MX 10 mx1.example.test.",
    "example.test. 60 IN MX 20 mx2.example.test.",
    f"mx1.example.test. 60 IN A {NET}.1",
    f"mx2.example.test. 60 IN A {NET}.2",
    # sender.test: where DSNs go
    "sender.test. 60 IN MX 10 mx.sender.test.",
    f"mx.sender.test. 60 IN A {NET}.3",
    # nullmx.test: RFC 7505
    "nullmx.test. 60 IN MX 0 .",
    # implicit.test: no MX, an A record (RFC 5321 5.1)
    f"implicit.test. 60 IN A {NET}.4",
]


def _daemon(daemon_factory, dns_server, delivery: str = "", retry: str = "1s") -> Daemon:
    dns = dns_server(ZONE)
    return daemon_factory(extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                                f'[delivery]\nretry_initial = "{retry}"\nretry_max = "{retry}"\n{delivery}\n')


def _send(port: int, sender: str, rcpts: list[str], body: bytes = b"hello\r\n", **kw) -> None:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail(sender, rcpts, b"From: <%s>\r\nSubject: test\r\nMessage-ID: <t1@sender.test>\r\n\r\n"
                   % sender.encode() + body, **kw)


def _records(d: Daemon, rtype: str, n: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = d.log_records(rtype)
        if len(recs) >= n:
            return recs
        time.sleep(0.1)
    raise AssertionError(f"got {len(d.log_records(rtype))} {rtype} records, want {n}")


@pytest.fixture
def receivers():
    started = []

    def make(host: str, **kw) -> Receiver:
        handler = Receiver(**kw)
        ctl = Controller(handler, hostname=host, port=25)
        ctl.start()
        started.append(ctl)
        return handler

    yield make
    for ctl in started:
        ctl.stop()
