"""Reception: turns a finished SMTP transaction into a durable spooled message.

Where it sits: between the session (end of data) and the spool. It gives the
message its SpoolId, prepends our Received trace header (RFC 5321 4.4),
records the envelope (sender, recipients with DSN NOTIFY/ORCPT, RET, ENVID,
client, tenant, campaign and queue class from the configured X-headers,
and the headers egress rules look at), stores it, and
resolves to the reply line: 250 with the id once the batch is durable, 451
4.3.0 when the spool write failed (the text never carries the OS error).
It writes the Reception and Rejection log records. Also the path of local
submission (local.py: `Server.inject()` and DSNs; no SMTP session, protocol "local").
It holds what all listeners share at MAIL: the memory governor for buffered
content (governor.py) and the spool's admission, asked through `mail_check`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from mta.ingest.governor import DataMemory
from mta.ingest.tls import tls_fields, tls_optional
from mta.model.envelope import Envelope, Recipient
from mta.model.ids import id_text, new_id
from mta.model.log_records import RecordType
from mta.model.replies import REPLIES, reply

if TYPE_CHECKING:
    from mta.config import Config
    from mta.feedback.rcpt_policy import RecipientPolicy
    from mta.ingest.scan import Scanning
    from mta.logs.writer import LogWriter
    from mta.spool import Spool

log = logging.getLogger("mta.reception")
_HEADER_SCAN = 64 << 10   # tenant/campaign headers are looked for in the first 64 KiB


class Peer(NamedTuple):
    """Who handed a transaction over, as values: reception knows no SMTP session."""
    ip: str          # client address
    port: int        # client port
    listener: str    # name of the listener it came in on


class Stored(NamedTuple):
    id: str                   # text form of the spool id
    raw_id: bytes             # the 16-byte id
    envelope: Envelope        # what was stored with the message
    durable: asyncio.Future   # resolves when the spool batch is on disk


class Reception:
    def __init__(self, config: Config, spool: Spool, logs: LogWriter | None):
        self.hostname = config.server.hostname
        self.spool = spool
        self.logs = logs if config.log.reception_log else None
        self._rejection_logs = logs
        # (Envelope field, header regex): tenant, campaign and class name scheduled queues;
        # "h:<name>" keys collect the headers [[egress_rule]]s match on.
        wanted = [("tenant", config.reception.tenant_header),
                  ("campaign", config.reception.campaign_header),
                  ("queue_class", config.reception.class_header)]
        wanted += sorted({("h:" + r.header, r.header) for r in config.egress_rule if r.header})
        self._x_headers = [(name, re.compile(rb"(?im)^" + re.escape(h.encode()) + rb":[ \t]*([^\r\n]*)"))
                           for name, h in wanted if h]
        self._date_sec = -1
        self._date = ""
        self.accepted = 0            # messages acknowledged with 250 since start
        self.received: dict[str, int] = {}   # listener name -> messages accepted (/metrics)
        # Called with (raw id, envelope) once a message is durable: the delivery engine.
        self.on_stored: Callable[[bytes, Envelope], None] | None = None
        # DKIM at reception (signing.stage = "reception"): sign before the spool write.
        self.dkim: Any = None
        # Suppression and the bounce domain (mta/feedback/rcpt_policy.py); None: neither.
        self.policy: RecipientPolicy | None = None
        # Content scanning ([[scan]] tables, mta/ingest/scan.py); None: off.
        self.scan: Scanning | None = None
        self.memory = DataMemory(config.server.data_memory_budget, config.server.data_memory_wait)

    def mail_check(self, sender: str) -> tuple[str, bytes] | None:
        """The native core's MAIL hook: a refusal while the spool or the memory budget
        cannot take another message (452/451, the client retries), else None."""
        name = self.spool.admission()   # free space, queue size, a failed write
        if name is None:
            if not self.memory.full:
                return None
            name = "MEMORY_FULL"
        return name, reply(name)

    def _now_rfc5322(self) -> str:
        now = int(time.time())
        if now != self._date_sec:   # formatting costs ~10 us: once per second
            self._date_sec, self._date = now, formatdate(now, localtime=True)
        return self._date

    def _x_values(self, content) -> dict[str, Any]:
        """Envelope field -> value of the X-headers reception is configured to read, and
        tls_optional for a "TLS-Required: No" header field."""
        out: dict[str, Any] = {}
        end = content.find(b"\r\n\r\n", 0, _HEADER_SCAN)   # copy the header block only
        stop = end + 2 if end >= 0 else _HEADER_SCAN
        if tls_optional(content, stop):   # RFC 8689 5: "TLS-Required: No" (tls.py)
            out["tls_optional"] = True
        if not self._x_headers:
            return out
        head = bytes(content[:stop])
        for name, rx in self._x_headers:
            m = rx.search(head)
            if m:
                value = m.group(1).strip().decode("utf-8", "replace")[:200]
                if name.startswith("h:"):
                    out.setdefault("headers", {})[name[2:]] = value
                else:
                    out[name] = value
        return out

    # HTTP injection (mta/control/inject.py) reads the X-headers and logs Suppressed
    # records as SMTP reception does
    x_values = _x_values

    @property
    def rejection_logs(self) -> LogWriter | None:
        return self._rejection_logs

    def trace_header(self, env: Envelope) -> bytes:
        lines = (f"Received: from {env.helo or 'unknown'} ([{env.client_ip}])\r\n\tby {self.hostname}"
                 f" (mta) with {env.protocol} id {env.id}")
        if len(env.recipients) == 1:
            lines += f"\r\n\tfor <{env.recipients[0].address}>"
        return (lines + "; " + self._now_rfc5322() + "\r\n").encode("utf-8", "replace")

    def new_envelope(self, sender: str, recipients: list[Recipient], content, *, helo: str,
                     client_ip: str, client_port: int, listener: str, protocol: str,
                     x_values: dict[str, Any] | None = None, body: str = "",
                     smtputf8: bool = False, ret: str | None = None,
                     envid: str | None = None) -> tuple[bytes, Envelope]:
        """A new message's raw id and envelope with its MAIL parameters; `x_values`: its
        X-header values when already scanned. store() sets the size."""
        raw_id = new_id()
        return raw_id, Envelope(id_text(raw_id), sender, recipients, helo, client_ip, client_port,
                                listener, protocol, time.time(), 0, body, smtputf8, ret, envid,
                                **(self._x_values(content) if x_values is None else x_values))

    def store(self, raw_id: bytes, envelope: Envelope, content) -> Stored:
        """Spool a message under our Received header (counted in its size)."""
        trace = self.trace_header(envelope)
        envelope.size = len(trace) + len(content)
        return Stored(envelope.id, raw_id, envelope,
                      self.spool.store(raw_id, envelope, trace, content))

    def accept(self, txn, peer: Peer) -> asyncio.Future:
        """Store `txn`; the returned future resolves to the reply line to send."""
        x_values = self._x_values(txn.data)   # one header scan for the filter and the envelope
        tls_fields(txn, x_values)   # REQUIRETLS, TLS-Required: No, the AUTH user's tenant
        if self.policy is not None and self.policy.suppressions is not None \
                and not self.policy.suppressions.empty():
            refusal = self._drop_suppressed(txn, peer, x_values.get("tenant"))
            if refusal is not None:
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(refusal)
                return fut
        protocol = ("UTF8SMTP" if txn.smtputf8 else "ESMTP") if txn.esmtp else "SMTP"
        if txn.tls and txn.esmtp:   # RFC 3848: ESMTPS, ESMTPSA (UTF8SMTPS, UTF8SMTPSA)
            protocol += "SA" if txn.authed else "S"
        raw_id, envelope = self.new_envelope(
            txn.mail_from, [Recipient(a, n, o) for a, n, o in txn.rcpts], txn.data,
            helo=txn.helo, client_ip=peer.ip, client_port=peer.port,
            listener=peer.listener, protocol=protocol, x_values=x_values,
            body=txn.body_type, smtputf8=txn.smtputf8, ret=txn.ret, envid=txn.envid)
        if self.scan is not None:   # content scanning (mta/ingest/scan.py), before signing
            policy = self.scan.policy_for(envelope.tenant)
            if policy is not None:
                return self.scan.check(policy, txn.data, raw_id, envelope,
                                       lambda content: self._sign_and_store(
                                           txn, peer, content, raw_id, envelope))
        return self._sign_and_store(txn, peer, txn.data, raw_id, envelope)

    def _sign_and_store(self, txn, peer: Peer, content, raw_id: bytes,
                        envelope: Envelope) -> asyncio.Future:
        if self.dkim is not None:
            specs = self.dkim.domains.for_message(content, envelope)
            if specs:   # signing adds no X-header: the envelope stays as it is
                return self._sign_then_accept(txn, peer, content, specs, raw_id, envelope)
        return self._accept(txn, peer, content, raw_id, envelope)

    def _drop_suppressed(self, txn, peer: Peer, tenant: str | None) -> bytes | None:
        """Remove recipients suppressed for this tenant (known only now) or, with
        on_match = "drop", in any scope; a reply when none is left."""
        if self.policy.reject and not tenant:
            return None   # global and domain scopes were refused at RCPT
        dropped = self.policy.filter(txn.rcpts, txn.mail_from, tenant)
        for addr, scope, reason in dropped:
            if self._rejection_logs is not None:
                self._rejection_logs.log(RecordType.SUPPRESSED, sender=txn.mail_from,
                                         recipient=addr, scope=scope, reason=reason,
                                         client_ip=peer.ip,
                                         listener=peer.listener)
        if txn.rcpts:
            return None
        if self.policy.reject:   # after DATA only the whole message can be refused
            self._log_rejection("SUPPRESSED", txn.mail_from, [a for a, _, _ in dropped],
                                peer.ip, peer.listener)
            return reply("SUPPRESSED", dropped[0][0].encode("ascii", "replace").decode(),
                         dropped[0][2])
        # "drop": the client sees an ordinary acceptance; nothing is stored
        return reply("QUEUED", id_text(new_id()))

    def _sign_then_accept(self, txn, peer: Peer, content, specs: list, raw_id: bytes,
                          envelope: Envelope) -> asyncio.Future:
        result = asyncio.get_running_loop().create_future()

        def signed(fut: asyncio.Future) -> None:
            exc = fut.exception()
            if exc is not None and self.dkim.on_error == "defer":
                log.warning("refusing for now, cannot sign: %s", exc)
                result.set_result(reply("DKIM_DEFER"))
                return
            if exc is not None:
                log.warning("accepting unsigned: %s", exc)
            inner = self._accept(txn, peer, content if exc is not None else fut.result(),
                                 raw_id, envelope)
            inner.add_done_callback(lambda f: result.set_result(f.result()))

        self.dkim.batcher.sign(bytes(content), specs).add_done_callback(signed)
        return result

    def _accept(self, txn, peer: Peer, content, raw_id: bytes,
                envelope: Envelope) -> asyncio.Future:
        started = time.perf_counter()  # uvloop's loop.time() has only ms resolution
        stored = self.store(raw_id, envelope, content)
        msg_id = stored.id
        result = asyncio.get_running_loop().create_future()

        def done(fut: asyncio.Future) -> None:
            exc = fut.exception()
            if exc is not None:
                log.error("spool write failed for %s from %s: %s", msg_id, peer.ip, exc)
                self._log_rejection("SPOOL_ERROR", txn.mail_from,
                                    [r.address for r in envelope.recipients],
                                    peer.ip, peer.listener)
                result.set_result(reply("SPOOL_ERROR"))
                return
            # the reply first: nothing after durability (queueing, logging) may hold it back
            result.set_result(reply("QUEUED", msg_id))
            self.durable(stored, latency_ms=round((time.perf_counter() - started) * 1000, 3))

        stored.durable.add_done_callback(done)
        return result

    def durable(self, stored: Stored, latency_ms: float | None = None) -> None:
        """A stored message is on disk: count it, queue it, write its Reception record."""
        self.accepted += 1
        env = stored.envelope
        received = self.received
        received[env.listener] = received.get(env.listener, 0) + 1
        if self.on_stored is not None:
            self.on_stored(stored.raw_id, env)
        if self.logs is not None:
            self.logs.log(RecordType.RECEPTION, id=stored.id, sender=env.sender,
                          recipients=[r.address for r in env.recipients], size=env.size,
                          client_ip=env.client_ip, client_port=env.client_port,
                          helo=env.helo, listener=env.listener, tenant=env.tenant,
                          campaign=env.campaign, protocol=env.protocol,
                          started=env.received, latency_ms=latency_ms)

    def log_rejections(self, peer: Peer, rejections: list) -> None:
        for name, sender, rcpts in rejections:
            self._log_rejection(name, sender, rcpts, peer.ip, peer.listener)

    def _log_rejection(self, name: str, sender: str, rcpts: list, ip: str, listener: str) -> None:
        if self._rejection_logs is None:
            return
        r = REPLIES[name]
        self._rejection_logs.log(RecordType.REJECTION, sender=sender, recipients=rcpts,
                                 client_ip=ip, listener=listener, code=r.code, status=r.status,
                                 reason=name.lower())
