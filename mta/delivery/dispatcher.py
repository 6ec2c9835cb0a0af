"""Dispatcher: the connections of one ready queue (egress source x site).

Opens connections while messages wait and fewer than `connection_limit` are
open, tries the site's MX hosts in order (next host on connection failure or
a 4xx/5xx greeting), reuses each connection for up to
`max_deliveries_per_connection` messages, and keeps an idle connection for
`idle_timeout` in case more arrive. The limits can change while it runs
(`set_limits`, pushed by the engine from mta/egress/limits.py): connections
above a lowered limit close after the message in hand, or at once when idle.
When no host of the site can be reached,
every message waiting in the ready queue is deferred (site scope), not only
the one in hand.
Replies are not looked at here: Outcomes' observers see every attempt result, and adaptive
delivery (mta/egress/adaptive.py, wired in mta/delivery/adapt.py) pauses this (source, site)
through `suspended_until` or changes its limits through `set_limits` (the shaping
`backoff_on` shorthand is one of its rules); `adaptive_hold` asks whether a popped message's
queue is held at this provider.
Reads message content from the spool (page cache) per attempt.
With a bounce domain and `[bounces] verp`, MAIL FROM is the recipient's signed VERP
address (one recipient per transaction); the envelope in the spool keeps the
original sender. With `[unsubscribe] add_headers`, a message sent to one
recipient gets RFC 8058 List-Unsubscribe fields (before DKIM signs it).
Sealed recipients (`[privacy] keyring`): the envelope keeps the sealed local part; _deliver
opens it in memory for RCPT TO, the VERP MAC and the unsubscribe token, and replaces the
clear address in remote replies by the sealed one before Outcomes log or bounce them.
A recipient whose key id is no longer in the keyring is deferred (451 4.3.0), not
bounced: putting the key back delivers it; it bounces only when it expires.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from mta.delivery.client import SessionError, SmtpClient, Timeouts
from mta.delivery.private_headers import PrivateHeaders
from mta.delivery.tls_policy import NO_POLICY, DomainPolicy, Refusal, TlsPolicy
from mta.dkim.signer import DkimError
from mta.egress.limits import retune
from mta.egress.throttle import Throttle
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.sealed import Unsealable, redact
from mta.queues.retry import RetryPolicy

if TYPE_CHECKING:
    from mta.config import DeliveryConfig
    from mta.delivery.budget import ConnectionBudget, SiteState
    from mta.egress.pools import Source
    from mta.egress.shaping import Limits
    from mta.delivery.outcome import Outcomes
    from mta.dkim.domains import DkimStage
    from mta.feedback.state import Feedback
    from mta.egress.sites import Site
    from mta.model.queued import QueuedMessage
    from mta.queues.ready import ReadyQueue
    from mta.queues.scheduled import ScheduledQueue
    from mta.spool import Spool

log = logging.getLogger("mta.dispatcher")

SPOOL_RECHECK = 0.5   # seconds between looks at a spool that cannot write (Spool.writable)


class Dispatcher:
    def __init__(self, ready: ReadyQueue, *, source: Source, limits: Limits, site_state: SiteState,
                 budget: ConnectionBudget, cfg: DeliveryConfig, spool: Spool, outcomes: Outcomes,
                 loop: asyncio.AbstractEventLoop, hold_back: Callable[[QueuedMessage], None],
                 dkim: DkimStage | None = None, feedback: Feedback | None = None,
                 private_headers: PrivateHeaders | None = None,
                 adaptive_hold: Callable[[ScheduledQueue, Dispatcher], bool] | None = None,
                 tls_policy: TlsPolicy | None = None,
                 clock: Callable[[], float] = time.time):
        self.ready = ready
        # MTA-STS / DANE per recipient domain; None when inactive or for a configured
        # route / smarthost ("[host]:port": the operator's choice): no lookups at all
        self.tls_policy = (tls_policy if tls_policy is not None and tls_policy.active
                           and not ready.site.name.startswith("[") else None)
        self.private_headers = private_headers   # X-Tenant & co. removed before sending
        self.clock = clock            # wall time; throttles and timers use loop time
        self.hold_back = hold_back    # a message of a suspended queue goes back to wait there
        # adaptive delivery: True when a queue is held at this provider (it suspended it)
        self.adaptive_hold = adaptive_hold
        self.verp = feedback if feedback is not None and feedback.verp else None
        # sealed recipients (mta/model/sealed.py): opened here, in memory, per attempt
        self.sealed = getattr(feedback, "sealed", None)
        # a message signed at reception cannot take new header fields without breaking
        # its signature (List-Unsubscribe is in the signed set), so none are added then
        self.unsubscribe = (feedback if feedback is not None and feedback.add_headers
                            and not (dkim is not None and dkim.stage == "reception") else None)
        self.dkim = dkim if dkim is not None and dkim.stage == "delivery" else None
        self.source = source
        self.limits = limits
        self.site_state = site_state
        self.budget = budget
        self.cfg = cfg
        self.spool = spool
        self.outcomes = outcomes
        self.loop = loop
        self.retry = RetryPolicy(limits.retry_initial, limits.retry_max, cfg.max_age)
        self.msg_throttle = Throttle(limits.max_message_rate) if limits.max_message_rate else None
        self.backoffs = 0             # times adaptive delivery paused this (source, site)
        self.conn_throttle = (Throttle(limits.max_connection_rate)
                              if limits.max_connection_rate else None)
        self.timeouts = Timeouts(connect=cfg.connect_timeout, greeting=cfg.command_timeout,
                                 ehlo=cfg.command_timeout, mail=cfg.command_timeout,
                                 rcpt=cfg.command_timeout, data=cfg.command_timeout,
                                 body=cfg.data_timeout, end_of_data=cfg.data_timeout)
        self.active = 0                                # open or opening connections
        self.peak = 0                                  # most connections open at once
        self._idle: list[asyncio.Future] = []          # workers waiting for a message
        self.tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.suspended_until = 0.0                     # operator: this (source, site) pair
        self._timer: asyncio.TimerHandle | None = None
        self.last_busy = clock()                       # last time it had work (reaping)
        # shared connection leases (mta/delivery/cluster.py PathLeases); None: local only
        self.cluster = None

    @property
    def site(self) -> Site:
        return self.ready.site

    def paused_until(self, now: float) -> float:
        """Wall time until which this pair, its source or its site is suspended (0: running)."""
        until = max(self.suspended_until, self.source.suspended_until,
                    self.site_state.suspended_until)
        return until if until > now else 0.0

    def _paused(self) -> float:
        """paused_until(now) without reading the clock when nothing is suspended."""
        if self.suspended_until or self.source.suspended_until or self.site_state.suspended_until:
            return self.paused_until(self.clock())
        return 0.0

    def idle_since(self, now: float) -> float:
        """Seconds with no message, connection, timer or pause; 0 while it has any."""
        if len(self.ready) or self.active or self._timer is not None or self.ready.lanes \
                or self.paused_until(now):
            self.last_busy = now
            return 0.0
        return now - self.last_busy

    def wake(self) -> None:
        """Messages were added: hand one to an idle connection or open another."""
        if not self.spool.writable:
            self.wake_at(SPOOL_RECHECK)
            return
        until = self._paused()
        if until:
            self.wake_at(until - self.clock())
            return
        while self._idle and len(self.ready):
            fut = self._idle.pop()
            if not fut.done():
                fut.set_result(None)
                return
        if len(self.ready) <= len(self._idle) or self.active >= self.limits.connection_limit:
            return
        if self.cluster is not None and self.cluster.held():
            return      # the cluster is at a limit: the retry timer looks again
        site = self.site_state
        if site.connection_limit is not None and site.active >= site.connection_limit:
            # woken when a connection to the site closes; ask an idle one to close now
            site.blocked[self] = None
            _release_one_idle(site.dispatchers)
            return
        if not self.budget.available():
            self.budget.wait(self, self.wake)
            _release_one_idle(site.dispatchers)
            return
        self.budget.take()
        site.active += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        task = self.loop.create_task(self._worker())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def set_limits(self, limits: Limits) -> None:
        """New shaping for this path while it runs. Throttles keep their tokens; above a
        lowered connection_limit idle connections close now, busy ones after the message
        in hand, and none opens; a raised one opens connections for what waits now."""
        old, self.limits = self.limits, limits
        if (limits.retry_initial, limits.retry_max) != (old.retry_initial, old.retry_max):
            self.retry = RetryPolicy(limits.retry_initial, limits.retry_max, self.cfg.max_age)
        now = self.loop.time()
        self.msg_throttle = retune(self.msg_throttle, limits.max_message_rate, now)
        self.conn_throttle = retune(self.conn_throttle, limits.max_connection_rate, now)
        if self.active > limits.connection_limit:
            self.close_idle(self.active - limits.connection_limit)
        for _ in range(min(len(self.ready), limits.connection_limit - self.active)):
            self.wake()

    def _over_limit(self) -> bool:
        """More connections open than the limits allow now (they were lowered)."""
        site = self.site_state
        return self.active > self.limits.connection_limit or (
            site.connection_limit is not None and site.active > site.connection_limit)

    def close_idle(self, n: int) -> int:
        """Ask up to `n` idle connections to close (they find they are over the limit);
        returns how many were asked."""
        asked = 0
        for fut in self._idle:
            if asked < n and not fut.done():
                fut.set_result(None)
                asked += 1
        return asked

    def release_idle(self) -> None:
        """Idle connections look again now (a pause closes them)."""
        for fut in list(self._idle):
            if not fut.done():
                fut.set_result(None)

    def wake_at(self, delay: float) -> None:
        """Look again after `delay` seconds (suspension end, throttle refill)."""
        if self._timer is None:
            self._timer = self.loop.call_later(max(0.001, delay), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.release_idle()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- one connection -----------------------------------------------------------------

    async def _worker(self) -> None:
        client: SmtpClient | None = None
        lease = None
        try:
            if self.cluster is not None:    # a lease on the path and site, cluster-wide
                lease = await self.cluster.acquire()
                if lease is None:
                    return
            msg = self._next()
            if msg is None:
                return
            if self.conn_throttle is not None:
                await self._pace(self.conn_throttle)
            try:
                client = await self._connect(msg)
            except SessionError as exc:
                self._site_failure(msg, exc)
                return
            sent = 0
            while msg is not None:
                if not await self._deliver(client, msg):
                    return  # the session died; _deliver deferred what it held
                sent += 1
                if not client.reusable or sent >= self.limits.max_deliveries_per_connection \
                        or self._paused() or self._over_limit():
                    break
                msg = self._next() or await self._wait_for_message()
            await client.quit()
            client = None
        finally:
            if client is not None:
                client.abort()
            if lease is not None:
                lease.release()
            self.active -= 1
            self.site_state.active -= 1
            self.budget.give_back()
            self.last_busy = self.clock()
            if len(self.ready):
                self.wake()
            blocked = self.site_state.blocked
            while blocked:                                  # a site-wide slot is free
                other = next(iter(blocked))
                del blocked[other]
                if len(other.ready):
                    other.wake()
                    break

    def _next(self) -> QueuedMessage | None:
        """Pop the next message, sending those of a suspended scheduled queue back to wait.

        None while the spool cannot write: a message delivered now could not be
        tombstoned, and a restart would deliver it again."""
        if not self.spool.writable:
            self.wake_at(SPOOL_RECHECK)
            return None
        while (msg := self.ready.pop()) is not None:
            until = msg.queue.suspended_until
            if until and until > self.clock():
                self.hold_back(msg)
                continue
            if self.adaptive_hold is not None and self.adaptive_hold(msg.queue, self):
                self.hold_back(msg)
                continue
            return msg
        if len(self.ready) and self.ready.wait_hint:      # a class lane's rate limit
            self.wake_at(self.ready.wait_hint)
        return None

    async def _pace(self, throttle: Throttle) -> None:
        while (wait := throttle.delay(self.loop.time())) > 0:
            await asyncio.sleep(wait)

    async def _wait_for_message(self) -> QueuedMessage | None:
        """Keep the connection for up to idle_timeout; None when nothing came."""
        deadline = self.loop.time() + self.limits.idle_timeout
        while (left := deadline - self.loop.time()) > 0:
            if self.site_state.blocked or self.budget.contended:
                return None   # another source waits for this connection's slot
            fut = self.loop.create_future()
            self._idle.append(fut)
            # A plain timer, not asyncio.wait_for: with thousands of sources most
            # messages find their connection idle, and wait_for costs a task each.
            timer = self.loop.call_later(left, _release, fut)
            try:
                await fut
            finally:
                timer.cancel()
                if fut in self._idle:
                    self._idle.remove(fut)
            if self._paused() or self._over_limit():
                return None
            msg = self._next()
            if msg is not None:
                return msg
            # woken, but another connection took the message first: wait on
        return None

    async def _policy(self, domain: str) -> DomainPolicy:
        """The recipient domain's TLS policy (a dict lookup once cached); none for routes."""
        tp = self.tls_policy
        if tp is None:
            return NO_POLICY
        return tp.cached(domain) or await tp.for_domain(domain)

    async def _connect(self, msg: QueuedMessage, requiretls: bool = False,
                       skip: tuple[str, str, Refusal] | None = None) -> SmtpClient:
        """A session to the first MX host that takes one and meets the TLS policy of the
        message's domain (MTA-STS, DANE, the shaping `tls`). With `requiretls`, also
        verified TLS and REQUIRETLS offered (RFC 8689 4.2.1), `skip` (mx, address, why)
        being a session already found wanting; when every host refused on policy the
        SessionError carries 550 5.7.30, when one could not be reached a retry."""
        last: SessionError | None = None
        refused = skip is not None      # REQUIRETLS: some host was refused on policy...
        unreachable = False             # ...and none failed in a way that may pass
        if skip is not None:
            last = _policy_error(skip[0], skip[2])
        port = self.source.port or self.site.port
        mode = self.limits.tls
        tp = self.tls_policy
        policy = await self._policy(msg.queue.domain) if tp is not None else NO_POLICY
        flags: list[bool] = []      # (requiretls, tls_optional) of the message in hand

        def envelope_flags() -> list[bool]:
            if not flags:       # read only when a policy decision needs it
                try:
                    env = self.spool.envelope(msg.id)
                    flags.extend((env.requiretls, env.tls_optional))
                except KeyError:
                    flags.extend((False, False))
            return flags

        plain_ok = mode == "opportunistic-fallback"
        for host in self.site.hosts:
            if tp is not None and policy.sts is not None:
                ref = tp.host_allowed(policy, host.name)
                if ref is not None and not envelope_flags()[1]:
                    tp.record(policy, [], ref, mx=host.name, sending_ip=self.source.address or "")
                    last = _policy_error(host.name, ref)
                    log.info("%s: %s: %s", self.ready.name, host.name, ref.text())
                    continue
            tlsa: list = []
            if tp is not None and host.name:
                # DANE only for an MX of a DNSSEC-secure MX RRset (RFC 7672 2.2); a failed
                # DNSSEC lookup defers (unless TLS-Required: No)
                tlsa, ref = await tp.dane_for(policy, host.name)
                if ref is not None and not envelope_flags()[1]:
                    unreachable = True          # DNS trouble: may pass later
                    last = _policy_error(host.name, ref)
                    log.info("%s: %s: %s", self.ready.name, host.name, ref.text())
                    continue
            need_tls = requiretls or mode in ("required", "verified") or (
                tp is not None and tp.requires_tls(policy, tlsa))
            for address in host.addresses:
                if skip is not None and (host.name, address) == skip[:2]:
                    continue
                try:
                    client = await self._open(address, port, "off" if mode == "off"
                                              else "opportunistic")
                except SessionError as exc:
                    # no plaintext fallback for REQUIRETLS mail in hand (unless TLS-Required: No)
                    if not plain_ok or need_tls or exc.phase not in TLS_PHASES or (
                            envelope_flags()[0] and not envelope_flags()[1]):
                        last = exc
                        unreachable = True
                        log.info("%s: %s [%s]:%d: %s", self.ready.name, host.name, address,
                                 port, exc)
                        continue
                    # RFC 7435 fallback: the handshake broke, no policy needs TLS
                    log.info("%s: %s [%s]:%d: %s; again without TLS", self.ready.name,
                             host.name, address, port, exc)
                    try:
                        client = await self._open(address, port, "off")
                    except SessionError as exc2:
                        last = exc2
                        unreachable = True
                        continue
                client.mx_name = host.name
                client.tlsa = tlsa
                ref = None
                if need_tls and not client.tls:
                    ref = Refusal("dane" if tlsa else "mta-sts" if policy.enforce else mode,
                                  "starttls-not-supported",
                                  f"TLS is required for this destination and {host.name} "
                                  f"[{address}] did not offer STARTTLS")
                elif tp is not None or mode == "verified" or requiretls:
                    ref = (tp or _NO_TP).check(policy, client, tlsa,
                                               verified=mode == "verified" or requiretls)
                if tp is not None and tp.reports is not None:
                    tp.record(policy, tlsa, ref, mx=host.name, ip=address,
                              sending_ip=client.local[0])
                if ref is not None and envelope_flags()[1]:
                    ref = None          # TLS-Required: No (RFC 8689 5): policies do not apply
                if ref is None and requiretls and "REQUIRETLS" not in client.capabilities:
                    ref = Refusal("requiretls", "requiretls-not-supported",
                                  f"{host.name} does not offer REQUIRETLS")
                if ref is not None:
                    client.abort()
                    refused = True
                    last = _policy_error(host.name, ref)
                    log.info("%s: %s [%s]:%d: %s", self.ready.name, host.name, address,
                             port, ref.text())
                    continue
                return client
        if requiretls and refused and not unreachable:
            # RFC 8689 4.2.1 and 6 (X.7.30): no MX host of the domain can carry it
            text = f"REQUIRETLS support required: no MX host of {msg.queue.domain} meets it"
            raise SessionError(text, phase="checking TLS policy", reply=RemoteReply(
                550, "5.7.30", f"{text} (last: {last.reply.text if last and last.reply else last})"))
        raise last or SessionError(f"no address for any MX of {self.site.name}", phase="connecting")

    async def _open(self, address: str, port: int, tls: str) -> SmtpClient:
        return await SmtpClient.connect(
            address, port, source=self.source.address, ehlo_name=self.source.ehlo_name,
            timeouts=self.timeouts, tls=tls)

    async def _tls_refusal(self, client: SmtpClient, msg: QueuedMessage, requiretls: bool,
                           tls_optional: bool) -> Refusal | None:
        """Does this session meet the TLS policy of this message (its domain's MTA-STS,
        the MX's DANE, shaping `tls` = verified, REQUIRETLS)? None: send it."""
        if tls_optional:            # RFC 8689 5: TLS-Required: No overrides policies
            return None
        mode = self.limits.tls
        tp = self.tls_policy
        if tp is None and mode != "verified" and not requiretls:
            return None
        policy = await self._policy(msg.queue.domain)
        # DANE as this message's domain sees the MX (the session may have been opened for
        # another domain of the site, whose MX RRset was insecure): a cached dict lookup
        tlsa, ref = await tp.dane_for(policy, client.mx_name) if tp is not None else ([], None)
        if ref is None:
            ref = (tp or _NO_TP).check(policy, client, tlsa,
                                       verified=mode == "verified" or requiretls)
        if ref is None and requiretls and "REQUIRETLS" not in client.capabilities:
            ref = Refusal("requiretls", "requiretls-not-supported",
                          f"{client.mx_name} does not offer REQUIRETLS")
        if ref is not None and requiretls and ref.policy != "requiretls":
            ref = Refusal("requiretls", ref.result, ref.text())
        return ref

    async def _requiretls_elsewhere(self, client: SmtpClient, msg: QueuedMessage, env,
                                    at: Attempt, ref: Refusal) -> bool:
        """REQUIRETLS mail the session in hand cannot carry goes over a connection of its
        own to another MX host that meets it (RFC 8689 4.2.1); bounced 5.7.30 when every
        host was refused on policy, deferred when one could not be reached. The session
        in hand stays up for the other mail (True). The extra connection is short-lived
        and not counted against the connection limits."""
        try:
            other = await self._connect(msg, requiretls=True,
                                        skip=(client.mx_name, client.peer[0], ref))
        except SessionError as exc:
            reply = exc.reply if exc.reply is not None and exc.reply.code >= 500 \
                else _error_reply(exc)
            self.outcomes.apply(AttemptResult.all(msg, env, at, reply), self.retry)
            return True
        ok = False
        try:
            ok = await self._deliver(other, msg)
            if ok:
                await other.quit()
        finally:
            if not ok:
                other.abort()
        return True

    def _attempt(self, client: SmtpClient | None) -> Attempt:
        at = Attempt(self.source.name, self.site.name)
        if client is not None:
            at.mx = client.mx_name
            at.ip = client.peer[0]
        return at

    def _site_failure(self, first: QueuedMessage, exc: SessionError) -> None:
        """No MX host took a connection: defer everything waiting for this site."""
        reply = _error_reply(exc)
        for msg in [first, *self.ready.drain()]:
            try:   # the envelope alone: the records name each recipient, tenant and campaign
                env = self.spool.envelope(msg.id)
            except KeyError:
                continue   # finished meanwhile (e.g. deleted by the operator)
            self.outcomes.apply(AttemptResult.all(msg, env, self._attempt(None), reply),
                                self.retry)

    async def _deliver(self, client: SmtpClient, msg: QueuedMessage) -> bool:
        """One message over an open session; False when the session died."""
        try:
            env, content = self.spool.read(msg.id)
        except KeyError:
            return True  # finished meanwhile (e.g. removed by the operator)
        at = self._attempt(client)
        idxs = list(msg.rcpts)
        # sealed recipients: index -> clear address, in memory for this attempt only
        clear: dict[int, str] = {}
        unopened: list[tuple[int, RemoteReply]] = []
        if self.sealed is not None:
            for i in idxs:
                a = env.recipients[i].address
                if a.startswith("e1"):
                    try:
                        c = self.sealed.open(a)
                    except Unsealable as exc:
                        unopened.append((i, RemoteReply(451, "4.3.0", "sealed recipient does not "
                                                        f"open with this keyring: {exc}")))
                        continue
                    if c is not None:
                        clear[i] = c
            if unopened:
                gone = {i for i, _ in unopened}
                idxs = [i for i in idxs if i not in gone]
                if not idxs:
                    self.outcomes.apply(AttemptResult(msg, env, at, unopened), self.retry)
                    return True
        if self.private_headers is not None:
            content = self.private_headers.strip(content)
        # one-click unsubscribe for mail to one recipient; never on null-sender mail (DSNs)
        if self.unsubscribe is not None and len(idxs) == 1 and env.sender:
            try:
                content = self.unsubscribe.with_unsubscribe(
                    content, clear.get(idxs[0]) or env.recipients[idxs[0]].address, env.tenant)
            except ValueError as exc:   # e.g. a base_url that is not https
                log.warning("%s: no List-Unsubscribe: %s", msg.id_text, exc)
        if self.dkim is not None:
            specs = self.dkim.domains.for_message(content, env)
            if specs:
                try:
                    content = await self.dkim.batcher.sign(bytes(content), specs)
                except DkimError as exc:
                    if self.dkim.on_error == "defer":
                        self.outcomes.apply(AttemptResult.all(
                            msg, env, at, RemoteReply(451, "4.7.0", str(exc))), self.retry)
                        return True
                    log.warning("%s: sending unsigned: %s", msg.id_text, exc)
        requiretls = env.requiretls
        tls_optional = env.tls_optional
        tp = self.tls_policy
        if requiretls or self.limits.tls == "verified" or (tp is not None and _policy_applies(
                tp._cache.get(msg.queue.domain), client)):    # one dict lookup without a policy
            ref = await self._tls_refusal(client, msg, requiretls, tls_optional)
            if ref is not None and requiretls:
                # RFC 8689 4.2.1: try the other MX hosts before bouncing (5.7.30)
                log.info("%s: REQUIRETLS not met by %s: %s; trying the other MX hosts",
                         msg.id_text, client.destination, ref.text())
                return await self._requiretls_elsewhere(client, msg, env, at, ref)
            if ref is not None:
                # a policy failure of other mail is retried (4.7.5)
                reply = RemoteReply(451, "4.7.4" if ref.result == "starttls-not-supported"
                                    else "4.7.5", ref.text())
                log.info("%s: not sent over %s: %s", msg.id_text, client.destination, ref.text())
                self.outcomes.apply(AttemptResult.all(msg, env, at, reply), self.retry)
                return True
        body_8bit = env.body == "8BITMIME"   # the client core also scans the bytes
        step = self.limits.max_recipients_per_transaction
        verp = self.verp if self.verp is not None and env.sender else None
        if verp is not None:
            step = 1    # the return path names one recipient
        if self.msg_throttle is not None:
            await self._pace(self.msg_throttle)
        if self.site_state.throttle is not None:
            await self._pace(self.site_state.throttle)
        replies: list[tuple[int, RemoteReply]] = unopened
        for start in range(0, len(idxs), step):
            chunk = idxs[start:start + step]
            # the native client core takes (address, NOTIFY, ORCPT) as the SMTP core gave them
            chosen = [env.recipients[i] for i in chunk]
            rcpts = [(clear.get(i) or r.address, r.notify, r.orcpt) for i, r in zip(chunk, chosen)]
            try:
                # bound to the envelope's form: a sealed recipient's return path names
                # its sealed form, so returned reports can be logged under it (trust.py)
                sender = (verp.verp_sender(msg.id, chunk[0], chosen[0].address, msg.received)
                          if verp else env.sender)
                result = await client.send(sender, rcpts, content, body_8bit=body_8bit,
                                           smtputf8=env.smtputf8, ret=env.ret, envid=env.envid,
                                           requiretls=requiretls and not tls_optional)
            except SessionError as exc:
                # A 5xx already given to a recipient stands (bounce it); everything
                # else of the message is retried, delivered or not (at-least-once).
                refused = [(i, r) for i, r in zip(chunk, exc.recipients)
                           if r is not None and r.code >= 500]
                gone = {i for i, _ in refused}
                error = _error_reply(exc)
                replies += refused
                replies += [(i, error) for i in idxs[start:] if i not in gone]
                if clear:
                    replies = _redacted(replies, clear, env)
                self.outcomes.apply(AttemptResult(msg, env, at, replies), self.retry)
                return False
            replies += zip(chunk, result.finals())
        self.sent += 1
        if clear:
            replies = _redacted(replies, clear, env)
        self.outcomes.apply(AttemptResult(msg, env, at, replies), self.retry)
        return True


TLS_PHASES = ("performing the TLS handshake", "sending STARTTLS")
_NO_TP = TlsPolicy(None, mta_sts=False, dane=False)     # verified-only checks (system trust)


def _policy_applies(policy: DomainPolicy | None, client: SmtpClient) -> bool:
    """The message's domain may have a policy this session must meet: not looked up yet,
    an MTA-STS policy, a secure MX RRset naming the session's MX (DANE may apply whatever
    the domain the session was opened for), or a failed DNSSEC lookup (the lookup at
    connect refreshes a policy whose cache time is over)."""
    return policy is None or policy.sts is not None or bool(policy.dnssec_error) or (
        policy.dane_mx is not None and client.mx_name in policy.dane_mx)


def _policy_error(host: str, ref: Refusal) -> SessionError:
    """A host refused by TLS policy: deferred with 4.7.5 (not enough security)."""
    status = "4.7.4" if ref.result == "starttls-not-supported" else "4.7.5"
    return SessionError(f"{host}: {ref.text()}", phase="checking TLS policy",
                        reply=RemoteReply(451, status, ref.text()))


def _release_one_idle(dispatchers: list[Dispatcher]) -> None:
    """Wake one idle connection of the site; it closes and frees its slot."""
    for d in dispatchers:
        for fut in d._idle:
            if not fut.done():
                fut.set_result(None)
                return


def _release(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _redacted(replies: list[tuple[int, RemoteReply]], clear: dict[int, str],
              env) -> list[tuple[int, RemoteReply]]:
    """Replies with every clear address of this attempt replaced by its sealed form
    (servers echo recipients; a data reply is shared by all, so each is checked against
    all): what Outcomes log, count and quote in DSNs never holds a clear address."""
    pairs = [(c, env.recipients[i].address) for i, c in clear.items()]
    out = []
    for i, r in replies:
        text = r.text
        for c, sealed in pairs:
            text = redact(text, c, sealed)
        out.append((i, r if text == r.text else RemoteReply(r.code, r.status, text)))
    return out


def _error_reply(exc: SessionError) -> RemoteReply:
    """What a session error means for the recipients it left undecided: a retry."""
    if exc.reply is not None:
        code = exc.reply.code if exc.reply.code < 500 else 451  # session trouble is retried
        return RemoteReply(code, exc.reply.status or "4.4.2", f"{exc.phase}: {exc.reply.text}")
    return RemoteReply(451, "4.4.1", f"{exc.phase}: {exc}")
