"""The embeddable core: `Server` wires config, spool, logs, delivery and listeners.

An asyncio program starts and stops it and injects into it without the CLI
(`mta serve` is a thin shell around it, see daemon.py):

    async with mta.Server(mta.load_config()) as server:
        msg_id = await server.inject("a@example.com", ["b@example.org"], content)

Start order: logs, spool (recovery scan: Corrupt records are logged), feedback
(classifier, suppression list), the delivery engine (recovered messages are queued
again; recovered returned mail goes to the bounce intake again), the admin API, the
one-click unsubscribe endpoint, then listeners; stop order is the reverse, letting sessions that wait for a spool
sync get their reply first. `reload()` (SIGHUP, POST /control/reload) applies a new
config checked as at start, keeping restart-only keys (schema `restart=True`) and the
old config whole when the new one has problems; `drain()` (SIGTERM) refuses new
connections with 421 and lets messages in progress, in and out, finish before stop().
Diagnostics: start() raises OSError (cannot bind, cannot open the spool) and
ConfigError (a piece built from the config refuses it: a DKIM key, a rule or shaping
file, a pool hook, the unsubscribe TLS files, the admin token file); those pieces are
built by the module functions below, which `mta check-config` (mta/preflight.py) calls
too; everything after start is logged, not raised.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable

from mta.config import Config, ConfigError
from mta.config.keyring import KeyringError, load_keyring
from mta.config.load import DEFAULT_CONFIG_PATH, load_config
from mta.config.schema import SECTIONS, keys_of
from mta.control.actions import DEFAULT_DURATION, Controls
from mta.control.admin import AdminServer
from mta.control.adopt import adopt
from mta.control.dashboard import install as install_dashboard
from mta.control.drain import Drainer
from mta.control.fanout import NodeFanout
from mta.control.inject import Injector
from mta.control.metrics import Metrics
from mta.control.metrics import handler as metrics_handler
from mta.control.nodeview import SIBLING_TIMEOUT
from mta.control.token import TokenError, load_or_create_token, load_tokens_file, token_path
from mta.control.views import view_routes
from mta.control.xfer import PATH as XFER_PATH
from mta.control.xfer import Receiver
from mta.delivery.engine import DeliveryEngine
from mta.dkim.batcher import SigningBatcher
from mta.dkim.domains import DkimStage, SigningDomains
from mta.dkim.signer import DkimConfigError, Signer
from mta.egress.pools import Egress, EgressError
from mta.egress.shaping import Shaping, ShapingError
from mta.feedback.bounce import RulesError
from mta.feedback.intake import BounceIntake
from mta.feedback.rcpt_policy import RecipientPolicy
from mta.feedback.state import Feedback
from mta.feedback.suppression import KeyFileError
from mta.feedback.suppression.shared import STREAM as SUPPRESSION_STREAM
from mta.feedback.unsubscribe import UnsubscribeServer
from mta.ingest.listener import Listener
from mta.ingest.local import LocalSubmission
from mta.ingest.peer_table import PeerTable
from mta.ingest.reception import Reception
from mta.ingest.scan import Scanning
from mta.logs.hooks import HookError, Webhooks, build_webhooks
from mta.logs.looplag import LoopLag
from mta.logs.privacy import Privacy
from mta.logs.writer import LogWriter
from mta.model.envelope import Envelope
from mta.model.log_records import RecordType
from mta.model.node import WorkerSlot
from mta.model.queued import InsertReason
from mta.queues.select import Selector
from mta.spool import Spool

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("mta.server")


# --- construction from the config -------------------------------------------------------
# The pieces start() builds that can refuse a config, as functions so `mta check-config`
# (mta/preflight.py) builds them through the same code without binding a socket or
# opening the spool. Each raises ConfigError naming the file and the problem.


def signing_domains(config: Config) -> SigningDomains | None:
    """Every [[dkim]] key loaded and checked (a missing, garbage or public-only key file,
    a bad policy hook); None when nothing is signed."""
    if not config.dkim:
        return None
    try:
        return SigningDomains(config.dkim, config.signing.policy)
    except DkimConfigError as exc:
        raise ConfigError([str(exc)], config.origin) from None


def build_feedback(config: Config) -> Feedback:
    """The classifier (bounce rule files), suppression list and key, VERP settings."""
    try:
        return Feedback(config)
    except RulesError as exc:
        raise ConfigError([f"[bounces] rules: {exc}"], config.origin) from None
    except KeyFileError as exc:
        raise ConfigError([f"[suppression] key_file: {exc}"], config.origin) from None
    except ValueError as exc:
        raise ConfigError([f"[bounces] verp_prefix: {exc}"], config.origin) from None


def build_delivery(config: Config, spool: Spool, logs: LogWriter | None,
                   inject: Callable[..., Any], dkim: DkimStage | None = None,
                   feedback: Feedback | None = None,
                   worker: WorkerSlot | None = None) -> DeliveryEngine:
    """The delivery engine: sources, pools, pool hook, shaping files, resolver settings.
    Construction reads the spool object only once started, so an unopened Spool will do."""
    try:
        return DeliveryEngine(config, spool, logs, inject, dkim, feedback, worker=worker)
    except (EgressError, ShapingError, ValueError) as exc:
        # a pool hook or shaping file; the resolver's (no nameserver in resolv.conf)
        raise ConfigError([str(exc)], config.origin) from None


def unsubscribe_tls(config: Config) -> "ssl.SSLContext | None":
    """The one-click endpoint's TLS context when [unsubscribe] tls_cert is set."""
    u = config.unsubscribe
    if u.listen is None or not u.tls_cert:
        return None
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(u.tls_cert, u.tls_key)
    except (OSError, ssl.SSLError) as exc:   # OSError's filename is not set here
        why = exc.strerror or exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise ConfigError([f"[unsubscribe] tls_cert {u.tls_cert}, tls_key {u.tls_key}: "
                           f"{why or exc}"], config.origin) from None
    return ctx


def log_name(worker: WorkerSlot | None) -> str:
    """The log file's name without .jsonl: mta, or mta.wN for worker N of several."""
    return "mta" if worker is None or worker.count == 1 else f"mta.w{worker.index}"


def webhooks(config: Config, worker: WorkerSlot | None = None) -> Webhooks | None:
    """The [[webhook]] tables (mta/logs/hooks.py) with their authorization and CA files
    read; None when there are none. Cursors live in <spool directory>/webhooks; each
    worker process tails its own log file."""
    if not config.webhook:
        return None
    try:
        return build_webhooks(config.webhook,
                              os.path.join(str(config.log.directory), f"{log_name(worker)}.jsonl"),
                              os.path.join(str(config.spool.directory), "webhooks"),
                              config.server.hostname)
    except HookError as exc:
        raise ConfigError([f"[[webhook]] {exc}"], config.origin) from None


class Server:
    def __init__(self, config: Config, worker: WorkerSlot | None = None):
        self.config = config
        # which node and worker process this is (mta/supervisor.py starts several)
        self.worker = worker or (WorkerSlot(node=config.server.node) if config.server.node
                                 else WorkerSlot())
        sp = config.spool
        self.spool = Spool(str(sp.directory), segment_size=sp.segment_size,
                           max_batch=sp.max_batch, hot_cache=sp.hot_cache,
                           min_free_space=sp.min_free_space, min_free_percent=sp.min_free_percent,
                           max_queued_messages=sp.max_queued_messages,
                           reserve_space=sp.reserve_space,
                           bookkeeping_delay=sp.bookkeeping_delay)
        self.logs: LogWriter | None = None
        self.reception: Reception | None = None
        self.local: LocalSubmission | None = None
        self.delivery: DeliveryEngine | None = None
        self.admin: AdminServer | None = None
        self.listeners: list[Listener] = []
        self.peers: PeerTable | None = None
        self.dkim: DkimStage | None = None
        self._signer: Signer | None = None
        self.feedback: Feedback | None = None
        self.intake: BounceIntake | None = None
        self.unsubscribe: UnsubscribeServer | None = None
        self.controls: Controls | None = None   # operator controls, kept in the spool directory
        # reads the config file again for a reload: daemon.py passes the CLI's loader (its
        # flags included); by default the file the config came from
        self.loader = self._load_again
        # header fields reception copies for egress rules: fixed at start (Reception)
        self._rule_headers = {r.header for r in config.egress_rule if r.header}
        self.draining = False
        self.webhooks: Webhooks | None = None   # log records to HTTP hooks (stats())
        self.metrics: Metrics | None = None     # GET /metrics (with the admin API)
        self.loop_lag = LoopLag()               # how late a 100 ms timer runs (GET /metrics)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        hooks = webhooks(self.config, self.worker)
        self.logs = LogWriter(str(self.config.log.directory), log_name(self.worker),
                              max_buffer=self.config.log.max_buffer,
                              mode=int(self.config.log.mode, 8), host=self.config.server.hostname)
        if hooks is not None:   # they tail the log file: never in the way of mail
            self.webhooks = hooks
            hooks.start(loop)
        found = self.spool.open(loop)
        for bad in found.corrupt + found.torn:
            self.logs.log(RecordType.CORRUPT, segment=bad.segment, offset=bad.offset,
                          length=bad.length, reason=bad.reason, saved_as=bad.saved_as,
                          torn=bad in found.torn)
        log.info("spool %s: %d messages recovered, %d corrupt records, %d torn tails",
                 self.config.spool.directory, len(found.messages), len(found.corrupt), len(found.torn))
        self.dkim = self._dkim_stage(loop)
        self.feedback = build_feedback(self.config)
        self.feedback.start(loop)
        # hashed addresses in the records use the suppression key, so they join its entries
        self.logs.privacy = Privacy.make(self.config.log.recipient_privacy,
                                         self.config.log.sender_privacy, self.feedback.hash_address)
        self.reception = Reception(self.config, self.spool, self.logs)
        if self.feedback.suppressions is not None or self.feedback.bounce_domain \
                or self.feedback.sealed is not None:    # sealed: refused at RCPT if they do not open
            self.reception.policy = RecipientPolicy(self.feedback)
        if self.dkim is not None and self.dkim.stage == "reception":
            self.reception.dkim = self.dkim
        if self.config.scan:
            self.reception.scan = Scanning(self.config.scan, self.logs)
        self.local = LocalSubmission(self.reception)
        try:
            self.delivery = build_delivery(self.config, self.spool, self.logs,
                                           self.local.submit_kept, self.dkim, self.feedback,
                                           worker=self.worker)
        except ConfigError:
            await self.spool.close()
            raise
        self.delivery.start(loop)
        self.feedback.site_of = self.delivery.resolver.cached_site_name
        self._share_suppression(loop)
        if self.feedback.bounce_domain:
            self.intake = BounceIntake(self.config, self.feedback, self.spool, self.logs)
            self.intake.on_done = self._intake_done
            if self.reception.policy is not None:
                self.reception.policy.bounce_full = self.intake.full
            self.intake.start(loop)     # recovered returned mail is only queued: listeners open now
        # operator state (holds, suspensions, rebinds, shaping overrides) and each deferred
        # entry's schedule apply to the recovered messages as they are queued again
        self.controls = Controls(self.delivery, self.config.spool.directory)
        self.controls.restore()
        if self.reception.scan is not None:   # "hold" verdicts: an operator hold on the id
            controls = self.controls
            self.reception.scan.hold = lambda raw_id: controls.hold(Selector(id=raw_id))
            self.reception.scan.unhold = lambda raw_id: controls.release(Selector(id=raw_id))
        self.delivery.adaptive.persist(self.config.spool.directory)   # adaptive actions in force
        self.delivery.scheduler.saved = found.schedules
        self.reception.on_stored = self._stored
        for msg_id in found.messages:
            self._stored(msg_id, found.envelopes[msg_id], found.done_rcpts.get(msg_id),
                         InsertReason.RECOVERED)
        self.delivery.scheduler.saved = None
        found.envelopes.clear()  # the queue keeps compact records; envelopes stay on disk
        found.schedules.clear()
        admin_token = ""
        try:
            if self.config.admin.listen is not None:
                controls = self.controls
                try:
                    token = admin_token = load_or_create_token(token_path(self.config))
                except TokenError as exc:
                    raise ConfigError([f"[admin] token_file: {exc}"], self.config.origin) from None
                self.admin = AdminServer(
                    view_routes(self.delivery),
                    {"/control/suspend": lambda a: controls.suspend(
                        str(a.get("kind")), str(a.get("name")), str(a.get("site") or ""),
                        float(a.get("duration") or DEFAULT_DURATION)),
                     "/control/resume": lambda a: controls.resume(
                        str(a.get("kind")), str(a.get("name")), str(a.get("site") or "")),
                     "/control/rebind": lambda a: controls.rebind(str(a.get("queue")),
                                                                  str(a.get("pool"))),
                     "/control/reload": lambda a: self.reload()},
                    token=token, tokens=self._admin_tokens(), ready=self.unready,
                    max_body=self.config.admin.max_body, timeout=self.config.admin.timeout,
                    max_connections=self.config.admin.max_connections)
                self.admin.actions.update(controls.actions())   # queue surgery, limits
                self._admin_metrics_and_inject(self.admin)
                install_dashboard(self.admin)                   # GET /dashboard (static)
                await self.admin.start(*self.config.admin.listen)
                self._admin_node(self.admin)
            await self._start_unsubscribe()
            host_dir = self.worker.host_dir(self.config.spool.directory)
            if self.worker.count > 1 and self.config.listener:
                # per-IP connection and AUTH failure limits hold for the node, not per worker
                self.peers = PeerTable(host_dir / "shared-peers", self.worker)
                self.peers.start()
            for cfg in self.config.listener:
                listener = Listener(cfg, self.reception, loop, self.peers)
                await listener.start()
                self.listeners.append(listener)
            if self.worker.index == 0:   # spools a change of [server] workers left behind
                adopt(host_dir, self.config,
                      self.admin.address if self.admin is not None else None, admin_token)
        except BaseException:
            await self.stop()
            raise
        self.loop_lag.start(loop)     # from now on (start itself blocks: rule files, recovery)

    def _share_suppression(self, loop: asyncio.AbstractEventLoop) -> None:
        """[cluster] share_suppression: worker 0 exchanges the host's suppression entries
        with the other nodes (one per node: the store is the host's, every worker's)."""
        shared, c = self.delivery.shared if self.delivery else None, self.config.cluster
        if shared is None or not c.share_suppression or self.worker.index != 0 \
                or self.feedback is None:
            return
        stream = shared.stream(SUPPRESSION_STREAM, c.suppression_stream_length)
        if stream is not None:
            self.feedback.share(stream, self.worker.node, loop)

    def _admin_metrics_and_inject(self, admin: AdminServer) -> None:
        """GET /metrics (mta/control/metrics.py) and POST /inject (mta/control/inject.py)."""
        a = self.config.admin
        self.metrics = Metrics(self, a.metrics_top_sites)
        admin.handlers[("GET", "/metrics")] = metrics_handler(self.metrics)
        if a.metrics_public:
            admin.public.add("/metrics")
        injector = Injector(self.reception, max_size=a.inject_max_size,
                            max_recipients=a.inject_max_recipients,
                            max_template=a.inject_max_template)
        admin.handlers[("POST", "/inject")] = injector.handle
        # drain and move (issue 15): POST /xfer takes another node's queued message,
        # POST /control/drain moves this node's queue away, GET /drain shows progress
        admin.handlers[("POST", XFER_PATH)] = Receiver(self, a.inject_max_size).handle
        Drainer(self).install(admin)

    def _admin_node(self, admin: AdminServer) -> None:
        """?node=1 (mta/control/nodeview.py): with [server] workers > 1 this worker's admin
        API answers for the node, asking every worker at its admin port (port 0: the
        workers' ports are not known, and ?node=1 answers for this worker alone)."""
        listen = self.config.admin.listen
        if self.worker.count <= 1 or admin.address is None or not listen or not listen[1]:
            return
        host, port = admin.address
        admin.node = NodeFanout(host, self.worker.admin_ports(port),
                                timeout=min(SIBLING_TIMEOUT, 0.8 * self.config.admin.timeout))

    def _admin_tokens(self) -> dict[str, str]:
        """[admin] tokens_file's tokens (token -> role); ConfigError when unusable."""
        path = self.config.admin.tokens_file
        if path is None:
            return {}
        try:
            return load_tokens_file(path)
        except TokenError as exc:
            raise ConfigError([f"[admin] tokens_file: {exc}"], self.config.origin) from None

    def unready(self) -> str | None:
        """Why the daemon does not accept mail now (GET /ready answers 503 with it), or None:
        draining, a listener not open, or the spool refusing (its admission reply)."""
        if self.draining:
            return "draining"
        if not self.listeners or any(lst.address is None for lst in self.listeners):
            return "listeners not open"
        why = self.spool.admission()
        if why is not None:
            return f"spool refuses mail: {why}"
        return None

    def _stored(self, msg_id: bytes, envelope: Envelope, done: set[int] | None = None,
                reason: InsertReason = InsertReason.RECEIVED) -> None:
        """A durable message (new or recovered): recipients at the bounce domain go to
        the intake first (parsed off the loop); the message reaches delivery, for its
        other recipients or its tombstone, only once the intake is done with it."""
        if self.intake is not None:
            idxs = [i for i in self.intake.bounce_indexes(envelope) if not done or i not in done]
            if idxs:
                self.intake.submit(msg_id, idxs, (done, reason))
                return
        self.delivery.submit(msg_id, envelope, done, reason)

    def _intake_done(self, msg_id: bytes, envelope: Envelope, idxs: list[int], after: tuple) -> None:
        """The intake finished recipients `idxs`: a tombstone when none is left, else a
        RCPTS_DONE record (a restart must not parse it again) and delivery of the rest."""
        done, reason = after
        done = set(done or ()) | set(idxs)
        if len(done) < len(envelope.recipients):
            self.spool.finish_recipients(msg_id, idxs)
        self.delivery.submit(msg_id, envelope, done, reason)

    async def _start_unsubscribe(self) -> None:
        u = self.config.unsubscribe
        if u.listen is None:
            return
        if self.feedback.suppressions is None:
            log.warning("[unsubscribe] listen is set but [suppression] is disabled: "
                        "no unsubscribe endpoint")
            return
        ctx = unsubscribe_tls(self.config)
        self.unsubscribe = UnsubscribeServer(self.feedback.suppressions, self.feedback.key,
                                             *u.listen, ssl_context=ctx, logs=self.logs,
                                             store=self.feedback.add_hash)
        await self.unsubscribe.start()

    def _dkim_stage(self, loop: asyncio.AbstractEventLoop) -> DkimStage | None:
        """Load every DKIM key now: a bad key or policy hook is fatal at start."""
        domains = signing_domains(self.config)
        if domains is None:
            return None
        self._signer = Signer(self.config.signing.threads or None)
        return DkimStage(domains, SigningBatcher(self._signer, loop), self.config.signing.stage,
                         self.config.signing.on_error)

    async def stop(self) -> None:
        self.loop_lag.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
            self.webhooks = None
        if self.local is not None:
            self.local.closing()
        for listener in self.listeners:
            await listener.stop()
        self.listeners.clear()
        if self.peers is not None:
            self.peers.close()
            self.peers = None
        if self.unsubscribe is not None:
            await self.unsubscribe.stop()
            self.unsubscribe = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.intake is not None:
            await self.intake.stop()
        if self.feedback is not None:   # its stream is the cluster backend's connection
            await self.feedback.stop_sharing()
        if self.delivery is not None:
            await self.delivery.stop()
        if self.local is not None:
            await self.local.stop()
        await self.spool.close()
        if self.feedback is not None:
            self.feedback.close()
            self.feedback = None
        if self._signer is not None:
            self._signer.close()
            self._signer = None
        if self.logs is not None:
            self.logs.close()
            self.logs = None

    # -- reload and drain ---------------------------------------------------------------

    def reload(self, config: Config | None = None) -> dict[str, object]:
        """Apply a new config (default: read again through `loader`) if it passes the
        checks start does; else keep the old one whole. Returns (and logs) what happened:
        {"applied", "problems", "restart": keys whose change waits for a restart}."""
        if self.delivery is None or self.logs is None or self.draining:
            why = "the daemon is stopping" if self.draining else "the daemon is not running"
            log.warning("reload refused: %s", why)
            return {"applied": False, "problems": [why], "restart": []}
        if config is None:
            try:
                config = self.loader()
            except ConfigError as exc:
                return self._refused(exc.problems)
        merged, restart = keep_restart_keys(self.config, config)
        for key in restart:
            log.warning("reload: %s changed; it needs a restart, keeping the running value", key)
        problems: list[str] = []
        try:
            shaping = Shaping.load(merged.egress.shaping, dataclasses.asdict(merged.delivery))
        except ShapingError as exc:
            problems.append(str(exc))
        try:
            egress = Egress(merged)
        except EgressError as exc:
            problems.append(str(exc))
        domains = None
        if merged.dkim or self.dkim is not None:
            try:
                domains = SigningDomains(merged.dkim, merged.signing.policy)
            except DkimConfigError as exc:
                problems.append(str(exc))
        keyring = None     # the recipient keyring file again (a key rotation needs no restart)
        if self.feedback is not None and self.feedback.sealed is not None \
                and merged.privacy.keyring is not None:
            try:
                keyring = load_keyring(merged.privacy.keyring)
            except KeyringError as exc:
                problems.append(f"[privacy] keyring: {exc}")
        if problems:
            return self._refused(problems)
        if self.feedback is not None:   # the rule files, now rather than at the next look
            try:
                self.feedback.classifier.reload_if_changed()
            except RulesError as exc:   # nothing was applied yet: refuse the whole reload
                return self._refused([f"[bounces] rules: {exc}"])
        self.delivery.reconfigure(merged, shaping, egress)
        if keyring is not None and self.feedback is not None and self.feedback.sealed is not None:
            self.feedback.sealed.replace(keyring)   # in place: reception, delivery, intake hold it
        for header in sorted({r.header for r in merged.egress_rule if r.header}
                             - self._rule_headers):
            restart.append(f"egress_rule header {header}")
            log.warning("reload: an [[egress_rule]] matches header %s, which reception "
                        "copies from messages only after a restart: the rule matches no "
                        "message until then", header)
        if self.dkim is not None and domains is not None:
            self.dkim.domains = domains
            self.dkim.on_error = merged.signing.on_error
        elif merged.dkim:
            restart.append("dkim (signing was off at start)")
            log.warning("reload: [[dkim]] tables added to a daemon started without any: "
                        "signing starts after a restart")
        for listener in self.listeners:   # TLS certificates and AUTH users: the files again
            for problem in listener.reload():
                log.warning("reload: %s; keeping what was loaded before", problem)
        self.logs.reopen(mode=int(merged.log.mode, 8), max_buffer=merged.log.max_buffer)
        self.config = merged
        log.info("reload: applied %s%s", merged.origin,
                 f" (needs a restart: {', '.join(restart)})" if restart else "")
        self.logs.log(RecordType.RELOAD, origin=merged.origin, applied=True, problems=[],
                      restart=restart)
        return {"applied": True, "problems": [], "restart": restart}

    def _load_again(self) -> Config:
        origin = self.config.origin
        if origin == "<string>":
            raise ConfigError(["the config was given as text: no file to read again"], origin)
        return load_config(None if origin == str(DEFAULT_CONFIG_PATH) else origin)

    def _refused(self, problems: list[str]) -> dict[str, object]:
        for p in problems:
            log.error("reload refused, the running config stays: %s", p)
        if self.logs is not None:
            self.logs.reopen()   # a SIGHUP after logrotate still moves to the new file
            self.logs.log(RecordType.RELOAD, origin=self.config.origin, applied=False,
                          problems=problems, restart=[])
        return {"applied": False, "problems": problems, "restart": []}

    def drain(self) -> None:
        """Start shutting down gracefully: new connections get 421, idle sessions 421,
        sessions in a message finish it; no delivery starts, those in flight go on."""
        self.draining = True
        for listener in self.listeners:
            listener.drain()
        if self.delivery is not None:
            self.delivery.drain()

    @property
    def busy(self) -> int:
        """After drain(): sessions and deliveries still finishing."""
        n = sum(listener.busy for listener in self.listeners)
        return n + (self.delivery.in_flight if self.delivery is not None else 0)

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of each listener (port 0 in the config is resolved)."""
        return [lst.address for lst in self.listeners if lst.address is not None]

    async def inject(self, sender: str, recipients: Iterable[str], content: bytes, *,
                     client: str = "127.0.0.1") -> str:
        """Spool and queue a message without SMTP; returns its id once it is durable.

        `content` is the RFC 5322 message with CRLF line ends. Raises
        mta.spool.SpoolError when the spool write failed, and
        mta.ingest.scan.ContentRefused when a [[scan]] table of the message's tenant
        refused it (its `reply`: 550 5.7.1, or 451 4.7.1 with `permanent` False); a
        "hold" verdict returns the id of a held message, a "drop" an id never stored.
        """
        if self.local is None:
            raise RuntimeError("Server.inject() before start()")
        return await self.local.submit(sender, recipients, content, client=client)


# What reload() applies to the running daemon, by "section.key" ("section.*": every key of
# it): [delivery] keys that are shaping keys (mta/egress/shaping.KEYS) go through the new
# Shaping; the rest as reload() says. Every other key must be restart=True in the schema
# (tests/test_reload_config.py checks that each key is one or the other).
RELOADED = frozenset({
    "log.max_buffer", "log.mode",
    "delivery.ehlo_name", "delivery.shutdown_grace", "delivery.connection_limit",
    "delivery.max_deliveries_per_connection", "delivery.max_recipients_per_transaction",
    "delivery.tls", "delivery.idle_timeout", "delivery.retry_initial", "delivery.retry_max",
    "egress.default_pool", "egress.default_class", "egress.shaping", "egress.pool_hook",
    "source.*", "pool.*", "egress_rule.*", "queue_class.*",
    "signing.on_error", "signing.policy", "dkim.*", "adaptive.*",
    "warmup.major", "warmup.small", "warmup.default", "warmup.hour_divisor",
    "warmup.max_bounce_rate", "warmup.max_complaint_rate", "warmup.max_deferral_rate",
    "warmup.min_volume", "warmup.on_breach",
})


def keep_restart_keys(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running value of every restart-only key that differs, and the
    names of those keys ("spool.directory", "listener[0].port", "listener": a table
    added or removed)."""
    changed: list[str] = []
    sections: dict[str, object] = {}
    for sec in SECTIONS:
        ov, nv = getattr(old, sec.name), getattr(new, sec.name)
        keys = keys_of(sec.cls)
        restart = [k for k, spec in keys.items() if spec.restart]
        if not restart:
            sections[sec.name] = nv
            continue
        if not sec.many:
            diff = [k for k in restart if getattr(ov, k) != getattr(nv, k)]
            changed += [f"{sec.name}.{k}" for k in diff]
            sections[sec.name] = dataclasses.replace(nv, **{k: getattr(ov, k) for k in diff})
            continue
        # tables of a restart-only array (listeners) stay as they run
        if len(ov) != len(nv):
            changed.append(sec.name)
        for i, (a, b) in enumerate(zip(ov, nv)):
            changed += [f"{sec.name}[{i}].{k}" for k in restart if getattr(a, k) != getattr(b, k)]
        sections[sec.name] = ov
    return dataclasses.replace(new, **sections), changed
