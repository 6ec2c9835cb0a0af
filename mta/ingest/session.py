"""The asyncio Protocol around the native SMTP server core, one per connection.

Where it sits: Listener (server.py) creates one per accepted connection; it
feeds the bytes to mta._native.wire.ServerCore, writes back what the core
returns, and at end of data hands the transaction to Reception
(reception.py), answering 250 only when the spool batch holding the message
is durable. While a message is being stored, reading is paused: pipelined
commands wait in the core's buffer, never in an unbounded queue. After every
read it tells the memory governor (governor.py) how much content it holds;
the governor may pause its reading or close it at the global budget.

STARTTLS (RFC 3207): the core answers 220 and reports EV_STARTTLS, having dropped
whatever the client pipelined after the command (CVE-2011-0411); the session stops
reading, upgrades the transport with loop.start_tls and tells the core, which starts
over (EHLO again). On an implicit TLS listener the server socket did the handshake
before connection_made. AUTH: the
core collects the SASL lines and reports EV_AUTH; the listener's Authenticator
(auth.py) checks them off the loop and the verdict goes back with auth_done(). While
either is under way reading is paused and the session counts as busy (`storing`).

Trust: network bytes go only to the core. Diagnostics: a bug in the core
(InternalError or any exception) closes this connection with 421 and is
logged; it never takes the daemon down.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mta._native.wire import EV_AUTH, EV_CLOSE, EV_MESSAGE, EV_STARTTLS, ServerCore, ServerSettings
from mta.ingest.auth import SCRAM, ScramServer
from mta.ingest.reception import Peer, Reception
from mta.model.replies import reply

log = logging.getLogger("mta.session")


class Host(Protocol):
    """What a session needs of the listener that accepted it (Listener in listener.py)."""

    name: str                              # listener name, for the logs
    hostname: str                          # our name in the greeting and refusals
    settings: ServerSettings               # its replies and limits, for the native core
    reception: Reception                   # where finished transactions go
    loop: asyncio.AbstractEventLoop
    draining: bool                         # shutting down: 421 after the message in hand

    def admit(self, session: SmtpSession) -> str | None: ...   # None, or a refusal reply name
    def forget(self, session: SmtpSession) -> None: ...
    def relay_allowed(self, ip: str) -> bool: ...

    tls: object            # ServerTls or None (tls.py)
    implicit_tls: bool     # TLS from the first byte
    authenticator: object  # Authenticator or None (auth.py)
    handshake_timeout: float


class SmtpSession(asyncio.Protocol):
    __slots__ = ("listener", "transport", "core", "peer_ip", "peer_port", "peer", "last_active",
                 "_storing", "_write_paused", "_memory_paused", "_held", "_busy", "_scram")

    def __init__(self, listener: Host):
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.core: ServerCore | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.peer = Peer("", 0, listener.name)   # the same, as values for reception
        self.last_active = 0.0        # loop.time() of the last bytes received
        self._storing = False         # a message is on its way to the spool
        self._write_paused = False    # the transport's write buffer is over its high-water mark
        self._memory_paused = False   # the memory governor stopped reading (budget reached)
        self._held = 0                # bytes last reported to the memory governor
        self._busy = False            # a TLS handshake or an AUTH check is under way
        self._scram: ScramServer | None = None   # a SCRAM-SHA-256 exchange under way

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = peer[0], peer[1]
        self.peer = Peer(self.peer_ip, self.peer_port, self.listener.name)
        refusal = self.listener.admit(self)
        if refusal is not None:
            transport.write(reply(refusal, self.listener.hostname))
            transport.close()
            return
        self.core = ServerCore(self.listener.settings, self.listener.relay_allowed(self.peer_ip))
        self.last_active = self.listener.loop.time()
        if self.listener.implicit_tls:   # the handshake is done already (listener.py)
            self.core.tls = True
        transport.write(self.core.greeting())

    def data_received(self, data: bytes) -> None:
        core = self.core
        if core is None:
            return
        self.last_active = self.listener.loop.time()
        try:
            out, ev = core.feed(data)
        except Exception:
            self._bug()
            return
        self._handle(out, ev)
        self._charge()

    def pause_writing(self) -> None:
        # The peer does not read its replies (e.g. it pipelines without end):
        # stop reading its commands until they drain, or the write buffer
        # grows without bound (RFC 2920 3.1: the server may block on writes).
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if (self.transport is not None and not self._storing and not self._memory_paused
                and not self._busy and not self.transport.is_closing()):
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        self.listener.reception.memory.release(self)
        self.core = None

    # -- flow ------------------------------------------------------------------------

    def _handle(self, out: bytes, ev: int) -> None:
        core = self.core
        transport = self.transport
        if core is None or transport is None:
            return
        if core.rejections:
            self.listener.reception.log_rejections(self.peer, core.rejections)
            core.rejections.clear()
        if out:
            transport.write(out)
        if ev == EV_MESSAGE:
            self._storing = True
            transport.pause_reading()
            fut = self.listener.reception.accept(core.transaction(), self.peer)
            fut.add_done_callback(self._on_stored)
        elif ev == EV_CLOSE:
            transport.close()
        elif ev == EV_STARTTLS:
            self._start_tls()
        elif ev == EV_AUTH:
            self._check_auth()

    # -- STARTTLS and AUTH -----------------------------------------------------------

    def _start_tls(self) -> None:
        transport = self.transport
        tls = self.listener.tls
        if transport is None or tls is None:
            return
        transport.pause_reading()
        self._busy = True
        task = self.listener.loop.create_task(self._upgrade(transport, tls.context))
        task.add_done_callback(_consume)

    async def _upgrade(self, transport, ctx) -> None:
        loop = self.listener.loop
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=self.listener.handshake_timeout)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError, RuntimeError) as exc:
            # a failed handshake: the connection is unusable (we cannot speak plaintext now)
            log.info("TLS handshake with %s failed: %s", self.peer_ip, exc)
            self._busy = False
            transport.abort()
            return
        self._busy = False
        core = self.core
        if core is None or new is None:
            if new is not None:
                new.abort()
            return
        self.transport = new
        self.last_active = loop.time()
        core.tls_started()
        if not self._write_paused and not self._memory_paused:
            new.resume_reading()

    def _check_auth(self) -> None:
        core, transport = self.core, self.transport
        auth = self.listener.authenticator
        if core is None or transport is None or auth is None:
            return
        mech, responses = core.auth_request
        if mech == SCRAM:   # SCRAM-SHA-256: steps answered at once (HMACs), see auth.py
            self._scram_step(core, auth, list(responses))
            return
        transport.pause_reading()
        self._busy = True
        task = self.listener.loop.create_task(auth.check(mech, list(responses), self.peer_ip))
        task.add_done_callback(self._on_auth)

    def _scram_step(self, core, auth, responses: list) -> None:
        try:
            if len(responses) == 1:
                self._scram = ScramServer()
            kind, value = auth.scram(responses, self.peer_ip, self._scram)
            if kind == "challenge":
                out, ev = core.auth_continue(value)
            else:
                self._scram = None
                if kind == "ok":
                    out, ev = core.auth_done(True, "", value.tenant, value.sender_allowed)
                    log.info("AUTH %s (SCRAM-SHA-256) from %s", value.name, self.peer_ip)
                else:
                    out, ev = core.auth_done(False, value)
                    self.listener.reception.log_rejections(self.peer, [(value, "", [])])
        except Exception:
            self._bug()
            return
        self._handle(out, ev)

    def _on_auth(self, task: asyncio.Task) -> None:
        self._busy = False
        core = self.core
        if core is None or task.cancelled():
            return
        try:
            user, name = task.result()
            if user is not None:
                out, ev = core.auth_done(True, "", user.tenant, user.sender_allowed)
                log.info("AUTH %s from %s", user.name, self.peer_ip)
            else:
                out, ev = core.auth_done(False, name)
                # a Rejection record (reason auth_failed, auth_temp ...) for the operator
                self.listener.reception.log_rejections(self.peer, [(name, "", [])])
        except Exception:
            self._bug()
            return
        if (self.transport is not None and not self.transport.is_closing()
                and not self._write_paused and not self._memory_paused):
            self.transport.resume_reading()
        self._handle(out, ev)

    def _on_stored(self, fut: asyncio.Future) -> None:
        self._storing = False
        core = self.core
        if core is None:  # the client went away; the message is stored regardless
            return
        try:
            line = fut.result()
            out, ev = core.resume(line)
        except Exception:
            self._bug()
            return
        if (self.transport is not None and not self.transport.is_closing()
                and not self._write_paused and not self._memory_paused):
            self.transport.resume_reading()
        self._handle(out, ev)
        transport = self.transport
        if self.listener.draining and transport is not None and not transport.is_closing():
            # the message got its reply: now the 421
            self.close_with("SHUTDOWN")
            return
        self._charge()

    def _charge(self) -> None:
        core = self.core
        if core is None:
            return
        memory = self.listener.reception.memory
        held = core.held
        if held != self._held or (memory.full and core.in_content):   # DATA waits too
            self._held = held
            memory.charge(self, held)

    def _bug(self) -> None:
        log.exception("internal error in SMTP session from %s; closing it", self.peer_ip)
        if self.transport is not None:
            self.transport.write(reply("INTERNAL"))
            self.transport.close()
        self.core = None

    # -- used by the memory governor ------------------------------------------------

    def memory_pause(self) -> None:
        self._memory_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def memory_resume(self) -> None:
        self._memory_paused = False
        self.last_active = self.listener.loop.time()   # the wait was ours, not the client's
        if (self.transport is not None and not self._storing and not self._write_paused
                and not self._busy and not self.transport.is_closing()):
            self.transport.resume_reading()

    @property
    def in_content(self) -> bool:
        return self.core is not None and self.core.in_content

    @property
    def memory_paused(self) -> bool:
        return self._memory_paused

    # -- used by the listener ------------------------------------------------------

    def idle_for(self, now: float) -> float:
        return now - self.last_active

    def timeout_limit(self, idle_timeout: float, data_timeout: float) -> float:
        core = self.core
        return data_timeout if core is not None and core.in_content else idle_timeout

    def close_with(self, name: str) -> None:
        """End the session with a 421 `name` (timeout, shutdown), if not storing."""
        if self.transport is not None and self.transport.is_closing():
            # closed before (a sweep ago) and still here: the peer does not read,
            # so the final reply can never drain and close() would wait forever
            self.transport.abort()
            return
        if self.core is None or self.transport is None:
            return
        self.transport.write(self.core.close_with(name))
        self.transport.close()

    @property
    def storing(self) -> bool:
        return self._storing or self._busy


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("TLS upgrade failed: %r", task.exception())
