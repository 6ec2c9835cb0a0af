"""Listening sockets: accept limits, relay control, idle sweeping, shutdown.

One Listener per [[listener]] table. It owns the sockets (SO_REUSEPORT, so
more workers can share a port later), counts connections in total and per
client IP, and sweeps sessions once a second for idle and DATA timeouts
(one timer for all sessions instead of a timer reset per read).
Draining (SIGTERM, see daemon.py): `drain()` keeps the socket open but answers
every new connection `421 4.3.2 <host> Service shutting down` and closes it, ends
idle sessions with the same 421 at once, and lets a session inside DATA (or whose
message is being stored) finish that message, get its reply, then the 421.
TLS and AUTH: with `tls_cert` the listener holds a ServerTls (tls.py) and offers
STARTTLS, or with tls = "implicit" speaks TLS from the first byte; with `auth_users`
an Authenticator (auth.py) for AUTH over TLS. reload() (SIGHUP) reads the
certificate, key and credentials file again.
Diagnostics: start() raises OSError naming the address when it cannot bind; the
constructor raises ConfigError for a TLS or AUTH setting that cannot work.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import TYPE_CHECKING

from mta.config import ConfigError
from mta.ingest.auth import Authenticator, AuthError
from mta.ingest.peer_table import LocalPeerCounts
from mta.ingest.session import SmtpSession
from mta.ingest.settings import server_settings
from mta.ingest.tls import ServerTls
from mta.model.networks import contains

if TYPE_CHECKING:
    from mta.config import ListenerConfig
    from mta.ingest.peer_table import PeerTable
    from mta.ingest.reception import Reception

_SWEEP_INTERVAL = 1.0


class Listener:
    def __init__(self, cfg: ListenerConfig, reception: Reception, loop: asyncio.AbstractEventLoop,
                 peers: PeerTable | None = None):
        self.cfg = cfg
        self.reception = reception
        self.loop = loop
        self.hostname = cfg.hostname
        self.name = f"{cfg.address}:{cfg.port}"  # the listener's name in logs
        self.implicit_tls = cfg.tls == "implicit"
        self.handshake_timeout = min(cfg.idle_timeout, 60.0)
        self.tls, self.authenticator = listener_security(cfg)
        self.settings = server_settings(
            cfg.hostname, cfg.banner, bare_newline=cfg.bare_newline,
            max_message_size=cfg.max_message_size, max_line_length=cfg.max_line_length,
            max_recipients=cfg.max_recipients, max_errors=cfg.max_errors,
            max_junk_commands=cfg.max_junk_commands,
            max_messages_per_session=cfg.max_messages_per_session,
            starttls=self.tls is not None and not self.implicit_tls,
            auth=self.authenticator is not None, require_tls=cfg.require_tls,
            scram=self.authenticator is not None and self.authenticator.scram_for_all)
        if reception.policy is not None:   # bounce domain / suppression at RCPT
            self.settings.rcpt_check = reception.policy.rcpt_check
        self.settings.mail_check = reception.mail_check   # spool and memory backpressure
        self._relay = [ipaddress.ip_network(n) for n in cfg.relay_cidrs]
        self._relay_cache: dict[str, bool] = {}
        self.sessions: set[SmtpSession] = set()
        # connections and AUTH failures per client IP: with several workers the node's
        # (peer_table.py), not this process's alone
        self.counts = peers.view(self.name) if peers is not None else LocalPeerCounts()
        if self.authenticator is not None:
            self.authenticator.counts = self.counts
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.address: tuple[str, int] | None = None   # bound address (port 0 resolved)
        self.draining = False     # shutting down: new connections and idle sessions get 421

    def reload(self) -> list[str]:
        """SIGHUP: read the certificate, key and credentials file again; the problems
        (each keeps what was loaded before)."""
        problems = []
        if self.tls is not None:
            problem = self.tls.reload()
            if problem:
                problems.append(f"listener {self.name}: {problem}")
        if self.authenticator is not None:
            problem = self.authenticator.reload()
            if problem:
                problems.append(f"listener {self.name}: auth_users: {problem}")
        return problems

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.cfg.address else socket.AF_INET
        try:
            tls = {} if not self.implicit_tls else {   # TLS from the first byte
                "ssl": self.tls.front(), "ssl_handshake_timeout": self.handshake_timeout}
            self._server = await self.loop.create_server(
                lambda: SmtpSession(self), self.cfg.address, self.cfg.port, family=family,
                reuse_address=True, reuse_port=True, backlog=4096, **tls)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.name}: {exc.strerror}") from None
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def drain(self) -> None:
        """Refuse new connections with 421 and end idle sessions; sessions in the middle of
        a message finish it first (the session closes after its reply, see
        SmtpSession._on_stored, and the sweep catches the rest)."""
        self.draining = True
        self._close_idle()

    @property
    def busy(self) -> int:
        """Sessions still open (while draining: those finishing a message)."""
        return len(self.sessions)

    def _close_idle(self) -> None:
        for s in list(self.sessions):
            if not s.storing and not s.in_content:
                s.close_with("SHUTDOWN")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let messages being stored get their reply, close the rest."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + grace
        while any(s.storing for s in self.sessions) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for s in list(self.sessions):
            if not s.storing:
                s.close_with("SHUTDOWN")
        if self._server is not None:
            await self._server.wait_closed()

    # -- used by sessions -----------------------------------------------------------

    def admit(self, session: SmtpSession) -> str | None:
        """Count a new connection; the reply name when it must be refused."""
        ip = session.peer_ip
        if self.draining:
            return "SHUTDOWN"
        if len(self.sessions) >= self.cfg.max_connections:
            return "TOO_MANY_CONNECTIONS"
        if not self.counts.connect(ip, self.cfg.max_connections_per_ip):
            return "TOO_MANY_FROM_IP"
        self.sessions.add(session)
        return None

    def forget(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.counts.disconnect(session.peer_ip)

    def relay_allowed(self, ip: str) -> bool:
        hit = self._relay_cache.get(ip)
        if hit is None:
            hit = contains(self._relay, ip)
            if len(self._relay_cache) < 100_000:
                self._relay_cache[ip] = hit
        return hit

    def _sweep(self) -> None:
        now = self.loop.time()
        idle, data = self.cfg.idle_timeout, self.cfg.data_timeout
        for s in list(self.sessions):
            # a session the memory governor holds waits on us: the governor bounds it
            if not s.storing and not s.memory_paused and s.idle_for(now) > s.timeout_limit(idle, data):
                s.close_with("TIMEOUT")
        if self.draining:
            self._close_idle()
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)


def listener_security(cfg: ListenerConfig, origin: str = "the config"
                      ) -> tuple[ServerTls | None, Authenticator | None]:
    """The listener's certificate and AUTH users, loaded; ConfigError naming the problem
    (also `mta check-config`, mta/preflight.py)."""
    where = f"listener {cfg.address}:{cfg.port}"
    tls = authenticator = None
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise ConfigError([f"{where}: tls_cert and tls_key go together"], origin)
        try:
            tls = ServerTls(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"{where}: tls_cert {cfg.tls_cert}, tls_key {cfg.tls_key}: "
                               f"{exc}"], origin) from None
    elif cfg.tls == "implicit" or cfg.require_tls or cfg.auth_users:
        raise ConfigError([f"{where}: tls = \"implicit\", require_tls and auth_users "
                           "need tls_cert and tls_key"], origin)
    if cfg.auth_users:
        try:
            authenticator = Authenticator(cfg.auth_users, cfg.auth_concurrency,
                                          cfg.auth_max_failures, cfg.auth_lockout)
        except AuthError as exc:
            raise ConfigError([f"{where}: auth_users: {exc}"], origin) from None
    return tls, authenticator
