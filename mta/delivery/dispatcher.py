"""Dispatcher: the connections of one ready queue (egress source x site).

Opens connections while messages wait and fewer than `connection_limit` are
open, tries the site's MX hosts in order (next host on connection failure or
a 4xx/5xx greeting), reuses each connection for up to
`max_deliveries_per_connection` messages, and keeps an idle connection for
`idle_timeout` in case more arrive. When no host of the site can be reached,
every message waiting in the ready queue is deferred (site scope), not only
the one in hand.
Reads message content from the spool (page cache) per attempt.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mta.delivery.client import SessionError, SmtpClient, Timeouts
from mta.delivery.outcome import Attempt
from mta.dkim.signer import DkimError

if TYPE_CHECKING:
    from mta.config import DeliveryConfig
    from mta.delivery.outcome import Outcomes
    from mta.dkim.domains import DkimStage
    from mta.egress.sites import Site
    from mta.message import QueuedMessage
    from mta.queues.ready import ReadyQueue
    from mta.spool import Spool

log = logging.getLogger("mta.dispatcher")


class Dispatcher:
    def __init__(self, ready: ReadyQueue, *, source_ip: str | None, cfg: DeliveryConfig,
                 spool: Spool, outcomes: Outcomes, loop: asyncio.AbstractEventLoop,
                 dkim: DkimStage | None = None):
        self.ready = ready
        self.dkim = dkim if dkim is not None and dkim.stage == "delivery" else None
        self.source_ip = source_ip
        self.cfg = cfg
        self.spool = spool
        self.outcomes = outcomes
        self.loop = loop
        self.timeouts = Timeouts(connect=cfg.connect_timeout, greeting=cfg.command_timeout,
                                 ehlo=cfg.command_timeout, mail=cfg.command_timeout,
                                 rcpt=cfg.command_timeout, data=cfg.command_timeout,
                                 body=cfg.data_timeout, end_of_data=cfg.data_timeout)
        self.active = 0                                # open or opening connections
        self._idle: list[asyncio.Future] = []          # workers waiting for a message
        self.tasks: set[asyncio.Task] = set()
        self.sent = 0

    @property
    def site(self) -> Site:
        return self.ready.site

    def wake(self) -> None:
        """Messages were added: hand one to an idle connection or open another."""
        while self._idle and len(self.ready):
            fut = self._idle.pop()
            if not fut.done():
                fut.set_result(None)
                return
        if len(self.ready) > len(self._idle) and self.active < self.cfg.connection_limit:
            self.active += 1
            task = self.loop.create_task(self._worker())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for fut in self._idle:
            if not fut.done():
                fut.set_result(None)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- one connection -----------------------------------------------------------------

    async def _worker(self) -> None:
        client: SmtpClient | None = None
        try:
            msg = self.ready.pop()
            if msg is None:
                return
            try:
                client = await self._connect()
            except SessionError as exc:
                self._site_failure(msg, exc)
                return
            sent = 0
            while msg is not None:
                if not await self._deliver(client, msg):
                    return  # the session died; _deliver deferred what it held
                sent += 1
                if not client.reusable or sent >= self.cfg.max_deliveries_per_connection:
                    break
                msg = self.ready.pop() or await self._wait_for_message()
            await client.quit()
            client = None
        finally:
            if client is not None:
                client.abort()
            self.active -= 1
            if len(self.ready):
                self.wake()

    async def _wait_for_message(self) -> QueuedMessage | None:
        """Keep the connection for up to idle_timeout; None when nothing came."""
        deadline = self.loop.time() + self.cfg.idle_timeout
        while (left := deadline - self.loop.time()) > 0:
            fut = self.loop.create_future()
            self._idle.append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if fut in self._idle:
                    self._idle.remove(fut)
            msg = self.ready.pop()
            if msg is not None:
                return msg
            # woken, but another connection took the message first: wait on
        return None

    async def _connect(self) -> SmtpClient:
        last: SessionError | None = None
        for host in self.site.hosts:
            for address in host.addresses:
                try:
                    client = await SmtpClient.connect(
                        address, self.site.port, source=self.source_ip,
                        ehlo_name=self.cfg.ehlo_name, timeouts=self.timeouts, tls=self.cfg.tls)
                    client.mx_name = host.name  # type: ignore[attr-defined]
                    return client
                except SessionError as exc:
                    last = exc
                    log.info("%s: %s [%s]:%d: %s", self.ready.name, host.name, address,
                             self.site.port, exc)
        raise last or SessionError(f"no address for any MX of {self.site.name}", phase="connecting")

    def _attempt(self, client: SmtpClient | None) -> Attempt:
        at = Attempt(self.ready.source, self.site.name)
        if client is not None:
            at.mx = getattr(client, "mx_name", "")
            at.ip = client.peer[0]
        return at

    def _site_failure(self, first: QueuedMessage, exc: SessionError) -> None:
        """No MX host took a connection: defer everything waiting for this site."""
        code, status, text = _error_reply(exc)
        for msg in [first, *self.ready.drain()]:
            at = self._attempt(None)
            self.outcomes.defer(msg, None, list(msg.rcpts), code, status, text, at)
            self.outcomes.settle(msg, None, list(msg.rcpts))

    async def _deliver(self, client: SmtpClient, msg: QueuedMessage) -> bool:
        """One message over an open session; False when the session died."""
        try:
            env, content = self.spool.read(msg.id)
        except KeyError:
            return True  # finished meanwhile (e.g. removed by the operator)
        at = self._attempt(client)
        idxs = list(msg.rcpts)
        if self.dkim is not None:
            specs = self.dkim.domains.for_message(content, env)
            if specs:
                try:
                    content = await self.dkim.batcher.sign(bytes(content), specs)
                except DkimError as exc:
                    if self.dkim.on_error == "defer":
                        self.outcomes.defer(msg, env, idxs, 451, "4.7.0", str(exc), at)
                        self.outcomes.settle(msg, env, idxs)
                        return True
                    log.warning("%s: sending unsigned: %s", msg.id_text, exc)
        body_8bit = env.get("body") == "8BITMIME"   # the client core also scans the bytes
        step = self.cfg.max_recipients_per_transaction
        retry: list[int] = []
        for start in range(0, len(idxs), step):
            chunk = idxs[start:start + step]
            rcpts = [tuple(env["rcpts"][i]) for i in chunk]
            try:
                result = await client.send(env["sender"], rcpts, content, body_8bit=body_8bit,
                                           smtputf8=bool(env.get("smtputf8")), ret=env.get("ret"),
                                           envid=env.get("envid"))
            except SessionError as exc:
                # A 5xx already given to a recipient stands (bounce it); everything
                # else of the message is retried, delivered or not (at-least-once).
                refused = [(i, r) for i, r in zip(chunk, exc.recipients)
                           if r is not None and r.code >= 500]
                if refused:
                    self.outcomes.transaction(msg, env, [i for i, _ in refused],
                                              [r for _, r in refused], None, at)
                gone = {i for i, _ in refused}
                rest = [i for i in idxs[start:] if i not in gone]
                code, status, text = _error_reply(exc)
                self.outcomes.defer(msg, env, rest, code, status, text, at)
                self.outcomes.settle(msg, env, retry + rest)
                return False
            retry += self.outcomes.transaction(msg, env, chunk, result.recipients, result.data, at)
        self.sent += 1
        self.outcomes.settle(msg, env, retry)
        return True


def _error_reply(exc: SessionError) -> tuple[int, str, str]:
    if exc.reply is not None:
        code = exc.reply.code if exc.reply.code < 500 else 451  # session trouble is retried
        return code, exc.reply.status or "4.4.2", f"{exc.phase}: {exc.reply.text}"
    return 451, "4.4.1", f"{exc.phase}: {exc}"
