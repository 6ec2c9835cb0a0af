"""The SMTP client session: an asyncio Protocol around mta._native.wire.ClientCore.

Where it sits: the dispatcher opens one session per connection to a site
with SmtpClient.connect() (connect.py binds it to the egress source), sends
messages with send() while `reusable`, and ends with quit(). The core
(native/wire/client.pxi) parses every reply and decides every command; this
module only moves bytes, runs the per-phase timers (Timeouts; RFC 5321
4.5.3.2) and does the TLS handshake the core asks for.

Reads/writes: one socket. Diagnostics: SessionError when the session fails
as a whole (connect, greeting, EHLO/HELO, TLS handshake, timeout, dropped
connection, 421, malformed reply) with the phase it failed in, and whether
it is permanent; a refused recipient or message is a result, not an error.
ValueError for arguments the core cannot put on the wire. A bug in the core
(any other exception) is logged with its traceback and fails the session
as a transient SessionError; the daemon goes on.
Trust: the peer's bytes go only to the core, which bounds and checks them.
RFCs: those of client.pxi, plus RFC 7435 (opportunistic TLS).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Callable

from mta._native.wire import EV_CLOSED, EV_DONE, EV_FAILED, EV_STARTTLS, ClientCore, InternalError
from mta.delivery.connect import ConnectError, endpoint, open_socket
from mta.delivery.tls_policy import peer_chain
from mta.model.attempt import RemoteReply, TransactionResult

log = logging.getLogger("mta.delivery")

PHASE_CONNECT = "connecting"    # the phase of a failed TCP connect


class SessionError(Exception):
    """The connection failed as a whole; str() names destination and phase.

    `recipients` holds the replies of the transaction in progress received
    before the failure (None: not answered), so a 550 already given is not
    lost. In the phase "sending end of data -- message may be sent more than
    once" the message may have been delivered although no reply came."""

    def __init__(self, message: str, *, phase: str, reply: RemoteReply | None = None,
                 permanent: bool = False, recipients: list[RemoteReply | None] | None = None):
        super().__init__(message)
        self.reply = reply              # the reply that ended it; None: timeout or drop
        self.phase = phase              # Postfix-style phrase of the state it failed in
        self.permanent = permanent      # True: 5xx greeting or HELO; retrying will not help
        self.recipients = recipients or []  # replies of the interrupted transaction


@dataclass(slots=True, frozen=True)
class Timeouts:
    """Seconds per phase; defaults are RFC 5321 4.5.3.2 minimums (connect, quit: ours)."""
    connect: float = 30         # TCP connect
    greeting: float = 300       # 220 greeting
    ehlo: float = 300           # EHLO/HELO reply, STARTTLS and its handshake
    mail: float = 300           # MAIL reply (also RSET)
    rcpt: float = 300           # each RCPT reply
    data: float = 120           # 354 reply to DATA
    body: float = 600           # handing the content to the kernel
    end_of_data: float = 600    # reply to end of data / BDAT LAST
    quit: float = 10            # 221 reply to QUIT


_opportunistic: ssl.SSLContext | None = None


def _opportunistic_context() -> ssl.SSLContext:
    """A context that encrypts without authenticating (RFC 7435): MX hosts
    rarely have certificates that match, and plaintext is the alternative."""
    global _opportunistic
    if _opportunistic is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _opportunistic = ctx
    return _opportunistic


# The core's transaction result: (recipient replies, data reply, phase).
_Result = tuple[list[tuple[int, str, str]], tuple[int, str, str] | None, str]


def _reply(t: tuple[int, str, str] | None) -> RemoteReply | None:
    return None if t is None else RemoteReply(*t)


class SmtpClient(asyncio.Protocol):
    """One outbound SMTP session. Build it with `await SmtpClient.connect(...)`."""

    # Slots: tens of thousands of these can be open at once (bench/egress_conns.py).
    __slots__ = ("loop", "core", "timeouts", "destination", "peer", "local", "mx_name",
                 "_tls_context", "_server_hostname", "_transport", "_timer", "_timer_key",
                 "_waiter", "_error", "_result", "_starttls", "_closed", "_busy", "_chain",
                 "_verdicts", "tlsa")

    def __init__(self, core: ClientCore, timeouts: Timeouts, destination: str,
                 tls_context: ssl.SSLContext | None, server_hostname: str | None):
        self.loop = asyncio.get_running_loop()
        self.core = core
        self.timeouts = timeouts
        self.destination = destination     # "ip:port" for messages
        self.peer: tuple[str, int] = ("", 0)    # remote address and port
        self.local: tuple[str, int] = ("", 0)   # our (egress source) address and port
        self.mx_name = ""                   # the MX host name (set by the dispatcher)
        self._tls_context = tls_context
        self._server_hostname = server_hostname
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key = (-1, -1)          # (state, replies) the timer was armed for
        self._waiter: asyncio.Future[None] | None = None
        self._error: SessionError | None = None  # set once the session has failed
        self._result: _Result | None = None     # the core's result, until send() takes it
        self._starttls = False              # the core asked for the TLS handshake
        self._closed = False                # connection_lost() was called
        self._busy = False                  # a send() is running
        self._chain: list[bytes] | None = None  # the peer's certificates (DER), when asked
        self._verdicts: dict | None = None  # TLS policy checks of this session (tls_policy.py)
        self.tlsa: list = []                # the MX host's secure TLSA records (DANE), if any

    # -- API -------------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, port: int, *, source: str | None, ehlo_name: str,
                      timeouts: Timeouts, tls: str = "opportunistic",
                      tls_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> SmtpClient:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS when offered.

        With tls="opportunistic" and STARTTLS offered, the session is
        upgraded with `tls_context`, by default one that does not verify the
        peer (RFC 7435; logged as untrusted). A failed handshake raises a
        transient SessionError in phase "performing the TLS handshake": the
        caller may retry this destination later with tls="off", as Postfix
        does for opportunistic TLS. `server_hostname` is sent as SNI.
        """
        core = ClientCore(ehlo_name, tls)
        dest = endpoint(address, port)
        try:
            sock = await open_socket(address, port, source=source, timeout=timeouts.connect)
        except ConnectError as e:
            raise SessionError(e.strerror or str(e), phase=PHASE_CONNECT) from e
        self = cls(core, timeouts, dest, tls_context, server_hostname)
        try:
            await self.loop.create_connection(lambda: self, sock=sock)
        except OSError as e:
            sock.close()
            raise SessionError(f"{dest}: {e}", phase=PHASE_CONNECT) from e
        try:
            while True:
                await self._wait_for(lambda: self.core.reusable or self._starttls)
                if not self._starttls:
                    return self
                await self._start_tls()
        except BaseException:
            self.abort()
            raise

    async def send(self, mail_from: str, rcpts: list[tuple[str, str | None, str | None]],
                   content: bytes | bytearray | memoryview, *, body_8bit: bool = False,
                   smtputf8: bool = False, ret: str | None = None,
                   envid: str | None = None, requiretls: bool = False) -> TransactionResult:
        """Send one message. `content` (CRLF, unstuffed) must not change until
        this returns. Raises SessionError if the session dies on the way."""
        if self._busy:
            raise RuntimeError("SmtpClient.send() while another send() runs")
        self._busy = True
        try:
            await self._wait_for(lambda: self.core.reusable)   # an RSET may be pending
            try:
                out, ev = self.core.start(mail_from, rcpts, content, body_8bit=body_8bit,
                                          smtputf8=smtputf8, ret=ret, envid=envid,
                                          requiretls=requiretls)
            except InternalError as e:
                self._bug()
                raise self._failed() from e
            try:
                self._handle(out, ev)
                await self._wait_for(lambda: self._result is not None)
            except asyncio.CancelledError:
                # the caller gave up mid-transaction: the peer's state is
                # unknown, so the connection cannot carry another message
                self.abort()
                raise
            assert self._result is not None
            rcpt, data, phase = self._result
            self._result = None
            return TransactionResult([RemoteReply(*r) for r in rcpt], _reply(data), phase)
        finally:
            self._busy = False

    async def quit(self) -> None:
        """End the session politely (QUIT, wait for 221 or close) and close
        it. Never raises: the session is over either way."""
        if self._transport is None or self._closed:
            return
        try:
            out = self.core.quit()
        except InternalError:       # mid-transaction: nothing polite left to do
            self.abort()
            return
        if out:
            self._transport.write(out)
        self._arm()
        try:
            await self._wait_for(lambda: self._closed)
        except SessionError:
            pass
        finally:
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        """Drop the connection now (shutdown, a caller's own deadline)."""
        if self._error is None and not self._closed:
            self.core.lost("aborted by the dispatcher")
            self._error = self._failed()
        if self._transport is not None:
            self._transport.abort()
        self._cancel_timer()
        self._wake()

    @property
    def capabilities(self) -> dict[str, str]:
        return self.core.capabilities

    @property
    def messages_sent(self) -> int:
        return self.core.messages_sent

    @property
    def reusable(self) -> bool:
        """Another message may be sent on this connection now or after RSET."""
        return self._error is None and not self._closed and not self.core.closing

    @property
    def tls(self) -> bool:
        return self.core.tls_active

    def chain(self) -> list[bytes]:
        """The peer's certificate chain (DER, leaf first) as it sent it, unverified;
        [] without TLS. Read once per session (tls_policy.py verifies it)."""
        if self._chain is None:
            self._chain = peer_chain(self._transport) if self.core.tls_active else []
        return self._chain

    def verdict(self, key: tuple, check: Callable[[], object]) -> object:
        """`check()`'s result, computed once per session and `key` (policy checks)."""
        if self._verdicts is None:
            self._verdicts = {}
        if key not in self._verdicts:
            self._verdicts[key] = check()
        return self._verdicts[key]

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport     # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)     # None if already reset
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (peer[0], peer[1])
        self.local = (local[0], local[1])
        self._watch_writes()
        self._arm()

    def data_received(self, data: bytes) -> None:
        try:
            out, ev = self.core.feed(data)
        except Exception:
            self._bug()
            return
        self._handle(out, ev)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self.core.lost("connection lost" if exc is None else f"connection lost: {exc}"):
            self._error = self._error or self._failed()
        self._transport = None
        self._wake()

    def resume_writing(self) -> None:
        # the write buffer is empty (limits are 0): the body reached the kernel
        self._body_flushed()

    def pause_writing(self) -> None:
        pass

    # -- flow ----------------------------------------------------------------------------

    def _handle(self, out: bytes, ev: int) -> None:
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(out)
            if transport.get_write_buffer_size() == 0:
                self._body_flushed()
        if ev & EV_DONE:
            self._result = self.core.take_result()
        if ev & EV_STARTTLS:
            transport.pause_reading()   # nothing more in plaintext; start_tls takes over
            self._starttls = True
        if ev & EV_FAILED:
            self._error = self._failed()
            transport.close()           # after any QUIT the core wrote
        elif ev & EV_CLOSED:
            transport.close()
        self._arm()
        self._wake()

    async def _start_tls(self) -> None:
        self._starttls = False
        if self._error is not None:     # the core failed in the same read
            raise self._error
        own = self._tls_context is None
        ctx = _opportunistic_context() if own else self._tls_context
        try:
            transport = await self.loop.start_tls(
                self._transport, self, ctx, server_hostname=self._server_hostname,   # type: ignore[arg-type]
                ssl_handshake_timeout=self.timeouts.ehlo)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            if self._error is not None:
                raise self._error from e
            self.core.lost(f"TLS handshake failed: {e}")
            self._error = self._failed()
            raise self._error from e
        if transport is None:
            raise self._failed()
        self._transport = transport
        self._watch_writes()
        cipher = transport.get_extra_info("cipher") or ("?", "?", 0)
        log.info("%s: %s established: %s with cipher %s", self.destination,
                 "Untrusted TLS connection (opportunistic, RFC 7435: peer not verified)"
                 if own else "TLS connection", cipher[1], cipher[0])
        transport.write(self.core.tls_started())
        self._arm()

    def _watch_writes(self) -> None:
        # limits 0/0: pause_writing() as soon as anything is buffered and
        # resume_writing() when the buffer is empty again -- that is when the
        # body has reached the kernel and the end-of-data timeout begins.
        # XXX: over TLS the SSL transports count only their own buffer, not
        # the socket transport's under them, so the end-of-data timeout
        # starts when TLS has taken the body (defaults are equal, 600 s).
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high=0, low=0)

    def _body_flushed(self) -> None:
        if self.core.timeout_name == "body":
            self.core.body_sent()
            self._arm()

    async def _wait_for(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._error is not None:
                raise self._error
            if self._closed:
                raise self._failed("connection closed")
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- timers and failures -----------------------------------------------------------

    def _arm(self) -> None:
        """(Re)start the timer of the current phase: on each new state and
        each reply (RFC 5321 4.5.3.2 timeouts are per command, not per session)."""
        key = (self.core.state, self.core.replies_seen)
        if key == self._timer_key:
            return
        self._timer_key = key
        self._cancel_timer()
        name = self.core.timeout_name
        if name is not None and not self._closed:
            self._timer = self.loop.call_later(getattr(self.timeouts, name), self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self.core.lost("timeout"):
            self._error = self._failed()
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    def _failed(self, what: str | None = None) -> SessionError:
        """A SessionError from the core's failure record."""
        if self._error is not None:
            return self._error
        failure = self.core.failure
        if failure is None:
            return SessionError(f"{self.destination}: {what or 'session closed'} while "
                                f"{self.core.phase}", phase=self.core.phase)
        reply, phase, permanent, reason, partial = failure
        r = _reply(reply)
        text = f"{self.destination}: {what or reason} while {phase}"
        if r is not None:
            text += f": {r.code} {r.status + ' ' if r.status else ''}{r.text}"
        return SessionError(text, phase=phase, reply=r, permanent=permanent,
                            recipients=[_reply(x) for x in partial or ()])

    def _bug(self) -> None:
        log.exception("%s: internal error in the SMTP client core; closing the session",
                      self.destination)
        phase = self.core.phase
        self.core.lost("internal error")
        self._error = self._error or SessionError(
            f"{self.destination}: internal error while {phase}", phase=phase)
        if self._transport is not None:
            self._transport.abort()
        self._wake()
