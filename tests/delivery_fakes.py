"""Fakes for unit tests of the delivery engine on virtual time (tests/virtual_time.py):
a spool in RAM, a scripted network of MX hosts behind a fake SMTP client, and message
ids made at the virtual clock's time. No sockets, no DNS (static routes)."""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from mta.delivery.client import SessionError
from mta.model.attempt import RemoteReply, TransactionResult
from mta.model.envelope import Envelope, Recipient
from mta.model.ids import id_text

_serial = itertools.count(1)


def make_id(now: float) -> bytes:
    """A spool id made at `now` (its first 48 bits are milliseconds), unique per call."""
    return int(now * 1000).to_bytes(6, "big") + next(_serial).to_bytes(10, "big")


class FakeSpool:
    """What the engine needs of mta.spool.Spool: read, finish, finish_recipients."""

    def __init__(self) -> None:
        self.messages: dict[bytes, tuple[Envelope, bytes]] = {}
        self.finished: list[bytes] = []                    # tombstones, in order
        self.rcpts_done: list[tuple[bytes, list[int]]] = []   # RCPTS_DONE records
        self.noted: list[tuple] = []                        # note_schedule() calls
        self.writable = True

    def add(self, msg_id: bytes, sender: str, rcpts: list[str], **extra) -> Envelope:
        env = Envelope(id_text(msg_id), sender, [Recipient(r) for r in rcpts], **extra)
        self.messages[msg_id] = (env, b"Subject: test\r\n\r\nhello\r\n")
        return env

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self.messages and msg_id not in self.finished

    def read(self, msg_id: bytes):
        return self.messages[msg_id]

    def envelope(self, msg_id: bytes):
        return self.messages[msg_id][0]

    def finish(self, msg_id: bytes) -> None:
        self.finished.append(msg_id)

    def finish_recipients(self, msg_id: bytes, idxs) -> None:
        self.rcpts_done.append((msg_id, sorted(idxs)))

    def note_schedule(self, msg_id: bytes, domain: str, attempts: int, due: float,
                      **state) -> None:
        """SCHEDULE records (issue 13): (id, domain, attempts, due, the rest) in order."""
        self.noted.append((msg_id, domain, attempts, due, state))

    def schedules(self, msg_id: bytes) -> list:
        return []


OK = RemoteReply(250, "2.0.0", "ok")


@dataclass
class Net:
    """The remote side: how long a transaction takes, what each recipient gets, and
    every connection and transaction seen (times are loop times)."""

    loop: asyncio.AbstractEventLoop
    send_time: float = 1.0                      # virtual seconds per transaction
    replies: dict[str, RemoteReply] = field(default_factory=dict)   # recipient -> reply
    refuse: bool = False                        # connect fails (no MX reachable)
    drop_at: str | None = None                  # the session dies in a transaction to this rcpt
    connects: list[float] = field(default_factory=list)
    sends: list[tuple[int, str, float]] = field(default_factory=list)  # (conn, rcpt, time)
    open: int = 0
    peak: int = 0

    def client(self):
        net = self

        class FakeClient:
            @classmethod
            async def connect(cls, address, port, **kw):
                if net.refuse:
                    raise SessionError("connection refused", phase="connecting")
                net.connects.append(net.loop.time())
                net.open += 1
                net.peak = max(net.peak, net.open)
                return cls(len(net.connects))

            def __init__(self, n: int) -> None:
                self.n = n
                self.mx_name = "mx.example"
                self.peer = ("127.0.0.1", 25)
                self.tls = False
                self.closed = False

            @property
            def reusable(self) -> bool:
                return not self.closed

            async def send(self, sender, rcpts, content, **kw):
                await asyncio.sleep(net.send_time)
                got = [net.replies.get(r[0], OK) for r in rcpts]
                if net.drop_at in [r[0] for r in rcpts]:
                    self.abort()
                    raise SessionError("connection reset by peer", phase="sending message data",
                                       recipients=got)
                for r in rcpts:
                    net.sends.append((self.n, r[0], net.loop.time()))
                data = OK if any(g.code < 300 for g in got) else None
                return TransactionResult(got, data, "end of data")

            async def quit(self) -> None:
                self.abort()

            def abort(self) -> None:
                if not self.closed:
                    self.closed = True
                    net.open -= 1

        return FakeClient
