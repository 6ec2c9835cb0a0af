"""Moving a queued message between nodes (issue 15): POST /xfer, its payload, its client.

A drain (mta/control/drain.py) sends each queued message to another node's admin API as
one POST /xfer (operator token): the body is one line of JSON, a newline, then the
message content byte for byte (our Received header included):

    {"v": 1, "key": "...", "source": "node name",
     "envelope": {... the spool's envelope JSON (mta/model/envelope.py), with only the
                  recipients still pending ...},
     "entries": [{"domain": "example.org", "attempts": 3, "due": 1764650000.5,
                  "flags": 0, "reply": "451 4.7.1 try later"}, ...]}\\n<content>

The receiver keeps the message's id, so its age (ids are time-ordered: the expiry and
the delay DSN count from the id's time, mta/model/queued.py) carries over; tenant,
campaign, class, DSN parameters, SMTPUTF8, REQUIRETLS and sealed recipients (still
sealed) travel in the envelope; each entry (one recipient domain) gets its attempt count,
flags and next due time back the way a restart gives them (the scheduler's `saved`
states), and a SCHEDULE record of its own.

Exactly once, as far as two disks allow:
- the receiver answers 200 only once the MESSAGE record and the entries' SCHEDULE
  records are durable (the spool's batch fdatasync) and the transfer key is in its
  journal (xfer.keys in the spool directory: an intent line fsync'd before the store, a
  done line fsync'd after it, group-committed; see Journal), and only then lets
  delivery have the message;
- the sender tombstones its copy only after that 200;
- a transfer sent again (the sender crashed between the 200 and its tombstone, or lost
  the answer) carries the same key and is answered 200 {"status": "duplicate"} without a
  second copy: the key is in the journal (rebuilt at start: a key whose done line was
  lost to a crash counts when its message is live in the spool), or the id is live.
The key names the source's spool record, not only the message: "<id>.<segment nonce>.
<segment>.<offset>" (nonce: 8 random bytes per spool run, mta/spool/records.py). A message
moved A -> B -> A -> B is a new record on A the second time, so B does not take it for a
retry of the first move. The journal keeps keys for [delivery] max_age plus a day (a
retry later than that would be of an expired message), then drops them at start.

Sealed recipients: a node with a [privacy] keyring refuses (422) a message with a sealed
recipient its keyring cannot open (the sender keeps it); a node without one cannot tell
a sealed address from a clear one: give every node of a cluster the same keyring.

Trust: the route needs an operator token; the body is bounded ([admin] inject_max_size
for the content plus MAX_HEAD for the JSON line), every field is type- and size-checked,
and the envelope goes through Envelope.from_json like a spool record.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import orjson

from mta.control.body import BodyTooLarge, read_bounded
from mta.files import write_atomic
from mta.model.envelope import Envelope, EnvelopeError
from mta.model.ids import id_from_text
from mta.model.log_records import RecordType
from mta.model.sealed import Unsealable
from mta.spool import SpoolError
from mta.spool import records as rec
from mta.spool.recovery import Location, segment_path

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

log = logging.getLogger("mta.xfer")

PATH = "/xfer"
CONTENT_TYPE = "application/x-mta-xfer"
JOURNAL_NAME = "xfer.keys"        # in the spool directory
MAX_HEAD = 4 << 20                # the JSON line
MAX_ENTRIES = 10000
MAX_REPLY = rec.MAX_REPLY
_KEY = re.compile(r"[0-9a-f]{32}\.[0-9a-z]{1,16}\.\d{1,10}\.\d{1,10}\Z")
_JOURNAL_LINE = re.compile(rb"(\d{1,12}) ([ID]) (\S{1,128})\n")


class XferError(Exception):
    """A transfer that did not go through; `retry`: worth sending again later; `fatal`:
    no transfer to this target can go through (a refused token): stop the drain."""

    def __init__(self, text: str, retry: bool, fatal: bool = False):
        super().__init__(text)
        self.retry = retry
        self.fatal = fatal


@dataclass(slots=True)
class Entry:
    """One scheduled entry (the message's recipients at one domain) as it travels."""
    domain: str
    attempts: int = 0
    due: float = 0.0        # 0: due now
    flags: int = 0
    reply: str = ""


@dataclass(slots=True)
class Item:
    """One message on its way: what POST /xfer carries."""
    raw_id: bytes
    key: str
    envelope: Envelope      # only the recipients still pending
    content: bytes          # as stored (our Received header first)
    entries: list[Entry]
    queued: list[Any] = field(default_factory=list)   # the sender's QueuedMessages (live)

    def body(self, source: str) -> bytes:
        head = {"v": 1, "key": self.key, "source": source,
                "envelope": orjson.loads(self.envelope.to_json()),
                "entries": [{"domain": e.domain, "attempts": e.attempts, "due": e.due,
                             "flags": e.flags, "reply": e.reply} for e in self.entries]}
        return orjson.dumps(head) + b"\n" + self.content


def record_key(directory: str, loc: Location, raw_id: bytes) -> str:
    """The transfer key of the spool record at `loc` (see the module docstring)."""
    nonce = "v1"
    try:
        with open(segment_path(directory, loc.segment), "rb") as f:
            head = os.pread(f.fileno(), rec.HEADER_SIZE, loc.offset)
        if len(head) == rec.HEADER_SIZE and head[4] == rec.VERSION:
            nonce = rec.record_nonce(head, 0).hex()
    except OSError:
        pass
    return f"{raw_id.hex()}.{nonce}.{loc.segment}.{loc.offset}"


def pending_item(raw_id: bytes, key: str, envelope: Envelope, content: bytes,
                 done: set[int], entries: dict[str, Entry]) -> Item | None:
    """The Item for a message whose recipients `done` are finished: the envelope keeps the
    others (None when none is left); `entries` by recipient domain (a domain without one
    is due now)."""
    keep = [r for i, r in enumerate(envelope.recipients) if i not in done]
    if not keep:
        return None
    domains = dict.fromkeys(r.domain or "localhost" for r in keep)
    return Item(raw_id, key, replace(envelope, recipients=keep), content,
                [entries.get(d) or Entry(d) for d in domains])


async def send(session: aiohttp.ClientSession, url: str, token: str, item: Item,
               source: str, timeout: float = 60.0) -> str:
    """POST one item; "stored" or "duplicate", else XferError."""
    import aiohttp
    try:
        async with session.post(url.rstrip("/") + PATH, data=item.body(source),
                                headers={"Authorization": f"Bearer {token}",
                                         "Content-Type": CONTENT_TYPE},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.content.read(65536)
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise XferError(f"{url}: {type(exc).__name__}: {exc}", True) from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if status == 200 and data.get("status") in ("stored", "duplicate"):
        return data["status"]
    text = f"{url} answered {status}: {data.get('error') or raw[:200]!r}"
    # 401/403 (wrong token), 400 (refused payload), 413 (too big): sending again won't help
    # a target that drains itself takes nothing more: stop rather than retry each message
    fatal = status in (401, 403) or data.get("draining") is True
    raise XferError(text, not fatal and (status >= 500 or status in (408, 429)), fatal)


def relay(host: str, port: int, item: Item, helo: str | None, timeout: float = 60.0) -> str:
    """The SMTP fallback (blocking: run it in a thread): the message as a new transaction
    to the target's listener, "relayed" on its 250. The envelope's MAIL and RCPT
    parameters go along where the target offers the extension (DSN, SMTPUTF8, 8BITMIME);
    the target gives it a new id, so its age, attempts and schedule start again, and no
    key makes a repeat harmless: a crash between the 250 and the tombstone sends it twice.
    REQUIRETLS messages are not relayed (their TLS promise would rest on this hop)."""
    import smtplib
    env = item.envelope
    if env.requiretls:
        raise XferError("a REQUIRETLS message moves only over the admin API", False)
    try:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", helo or ""):
            helo = None     # e.g. an offline drain's "spool:/path": smtplib's FQDN instead
        with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout) as s:
            code, text = s.ehlo()
            if code != 250:
                raise XferError(f"EHLO: {code} {text!r}", code < 500)
            opts = []
            if env.smtputf8:
                if not s.has_extn("smtputf8"):
                    raise XferError("an SMTPUTF8 message, and the target offers no SMTPUTF8",
                                    False)
                opts.append("SMTPUTF8")
            if env.body == "8BITMIME" and s.has_extn("8bitmime"):
                opts.append("BODY=8BITMIME")
            dsn = s.has_extn("dsn")
            if dsn and env.ret:
                opts.append(f"RET={env.ret}")
            if dsn and env.envid:
                opts.append(f"ENVID={env.envid}")
            code, text = s.mail(env.sender, opts)
            if code != 250:
                raise XferError(f"MAIL: {code} {text!r}", code < 500)
            for r in env.recipients:
                ropts = []
                if dsn and r.notify:
                    ropts.append(f"NOTIFY={r.notify}")
                if dsn and r.orcpt:
                    ropts.append(f"ORCPT={r.orcpt}")
                code, text = s.rcpt(r.address, ropts)
                if code not in (250, 251):   # the message moves whole or not at all
                    s.rset()
                    raise XferError(f"RCPT {r.address}: {code} {text!r}", code < 500)
            s.data(item.content)
    except smtplib.SMTPResponseException as exc:
        raise XferError(f"{host}:{port}: {exc.smtp_code} {exc.smtp_error!r}",
                        exc.smtp_code < 500) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise XferError(f"{host}:{port}: {type(exc).__name__}: {exc}", True) from None
    return "relayed"


class Journal:
    """The receiver's transfer keys (xfer.keys in the spool directory), two lines per
    transfer: `TIME I KEY` (intent) made durable before the message is stored, and
    `TIME D KEY` (done) made durable before the 200 and before delivery may start. At
    start (`load(live)`, after the spool's recovery) a key with only its intent line is
    done if its message is live in the spool (the receiver died between the spool sync
    and the done line), else it was never stored and is forgotten. Since delivery starts
    only after the done line, "not live" cannot mean "stored and already delivered".
    Writes are group-committed: one fsync for every line waiting."""

    def __init__(self, directory: str, keep: float):
        self.path = os.path.join(directory, JOURNAL_NAME)
        self.keep = keep
        self.keys: set[str] = set()
        self._waiting: list[tuple[bytes, asyncio.Future]] = []
        self._writing = False

    def load(self, live: Callable[[bytes], bool]) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        cutoff = time.time() - self.keep
        done: dict[str, int] = {}
        intents: dict[str, int] = {}
        lines = 0
        for m in _JOURNAL_LINE.finditer(data):   # a torn last line does not match
            lines += 1
            t, key = int(m.group(1)), m.group(3).decode("ascii", "replace")
            (done if m.group(2) == b"D" else intents)[key] = t
        for key, t in intents.items():
            if key not in done and _KEY.match(key) and live(bytes.fromhex(key[:32])):
                done[key] = t     # stored before the crash: its done line was not written
        kept = {k: t for k, t in done.items() if t >= cutoff}
        self.keys = set(kept)
        if lines != len(kept):
            write_atomic(self.path, b"".join(f"{t} D {k}\n".encode("ascii")
                                             for k, t in kept.items()))
            log.info("xfer journal %s: %d keys kept, %d lines dropped (expired after %gs, "
                     "or transfers that never stored)", self.path, len(kept),
                     lines - len(kept), self.keep)

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def _write(self, kind: str, key: str) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append((f"{int(time.time())} {kind} {key}\n".encode("ascii"), fut))
        if not self._writing:
            self._writing = True
            loop.create_task(self._writer())
        await fut

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await loop.run_in_executor(None, self._append,
                                               b"".join(line for line, _ in batch))
                except OSError as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._writing = False

    async def intent(self, key: str) -> None:
        await self._write("I", key)

    async def done(self, key: str) -> None:
        await self._write("D", key)
        self.keys.add(key)


def _int(d: dict, name: str, lo: int, hi: int) -> int:
    v = d.get(name, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name}: an integer {lo}..{hi}")
    return v


def parse_body(body: bytes) -> tuple[str, str, bytes, Envelope, bytes, list[Entry]]:
    """-> (key, source, raw id, envelope, content, entries); ValueError naming the problem."""
    nl = body.find(b"\n", 0, MAX_HEAD + 1)
    if nl < 0:
        raise ValueError("no JSON line (or one over 4 MiB)")
    try:
        head = orjson.loads(body[:nl])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the first line is not JSON: {exc}") from None
    if not isinstance(head, dict) or head.get("v") != 1:
        raise ValueError("want a JSON object with \"v\": 1")
    key, source = head.get("key"), head.get("source", "")
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError("key: <id>.<nonce>.<segment>.<offset>")
    if not isinstance(source, str) or len(source) > 255:
        raise ValueError("source: a name of at most 255 characters")
    env = head.get("envelope")
    if not isinstance(env, dict):
        raise ValueError("envelope: a JSON object")
    try:
        envelope = Envelope.from_json(orjson.dumps(env))
        raw_id = id_from_text(envelope.id)
    except (EnvelopeError, ValueError, TypeError) as exc:
        raise ValueError(f"envelope: {exc}") from None
    if not key.startswith(envelope.id + "."):
        raise ValueError("the key does not name the envelope's id")
    if not envelope.recipients or not all(isinstance(r.address, str) and r.address
                                          for r in envelope.recipients):
        raise ValueError("envelope: no recipients")
    raw = head.get("entries", [])
    if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
        raise ValueError(f"entries: a list of at most {MAX_ENTRIES}")
    domains = {r.domain or "localhost" for r in envelope.recipients}
    entries = []
    for e in raw:
        if not isinstance(e, dict) or not isinstance(e.get("domain"), str):
            raise ValueError("entries: objects with a domain")
        due = e.get("due", 0.0)
        if not isinstance(due, (int, float)) or isinstance(due, bool) or not math.isfinite(due):
            raise ValueError("entries: due is a number")
        reply = e.get("reply", "")
        if not isinstance(reply, str):
            raise ValueError("entries: reply is text")
        if e["domain"] in domains:     # else no recipient of the message is there: ignored
            entries.append(Entry(e["domain"], _int(e, "attempts", 0, 1 << 30), float(due),
                                 _int(e, "flags", 0, 0xFFFFFFFF), reply[:MAX_REPLY]))
    return key, source, raw_id, envelope, body[nl + 1:], entries


class Receiver:
    """POST /xfer on the receiving node. `server` is the running mta.Server (its spool,
    delivery, logs, `draining` and `_stored`)."""

    def __init__(self, server: Any, max_size: int):
        self.server = server
        self.max_size = max_size + MAX_HEAD
        cfg = server.config
        self.journal = Journal(str(cfg.spool.directory), cfg.delivery.max_age + 86400.0)
        self.journal.load(server.spool.__contains__)
        self._busy: set[str] = set()     # keys being stored now
        self.received = 0
        self.duplicates = 0

    async def handle(self, request: web.Request) -> web.Response:
        srv = self.server
        if srv.draining:
            return _answer(503, error="this node is draining: it takes no transfers",
                           draining=True)
        try:
            body = await read_bounded(request.content, request.content_length, self.max_size)
        except BodyTooLarge:
            return _answer(413, error=f"larger than {self.max_size} bytes "
                                      "([admin] inject_max_size plus the JSON line)")
        try:
            key, source, raw_id, envelope, content, entries = parse_body(body)
        except ValueError as exc:
            return _answer(400, error=str(exc))
        ring = getattr(srv.feedback, "sealed", None)
        if ring is not None:   # sealed recipients stay sealed: this node must open them
            for r in envelope.recipients:
                try:
                    ring.open(r.address)
                except Unsealable as exc:
                    return _answer(422, error=f"recipient {r.address}: sealed, and this "
                                              f"node's keyring cannot open it ({exc})")
        spool = srv.spool
        if key in self.journal.keys or raw_id in spool:
            self.duplicates += 1
            return _answer(200, status="duplicate", id=envelope.id)
        if key in self._busy:
            return _answer(503, error="this transfer is being stored now; ask again")
        refused = spool.admission()
        if refused is not None:
            return _answer(507 if refused == "SPOOL_FULL" else 503,
                           error=f"not accepting mail now: {refused}")
        self._busy.add(key)
        # shielded: the admin API's request timeout (408) must not cut a transfer between
        # its spool sync and its hand-over to delivery; the sender's retry then finds it
        return await asyncio.shield(self._store(key, source, raw_id, envelope, content,
                                                entries))

    async def _store(self, key: str, source: str, raw_id: bytes, envelope: Envelope,
                     content: bytes, entries: list[Entry]) -> web.Response:
        srv, spool = self.server, self.server.spool
        try:
            try:
                await self.journal.intent(key)
            except OSError as exc:
                return _answer(503, error=f"cannot write the transfer journal: {exc}")
            if spool.admission() is not None or raw_id in spool:
                return _answer(503, error="not accepting mail now; ask again")
            stored = spool.store(raw_id, envelope, b"", content)
            now = time.time()
            for e in entries:
                idxs = [i for i, r in enumerate(envelope.recipients)
                        if (r.domain or "localhost") == e.domain]
                spool.note_schedule(raw_id, e.domain, e.attempts, e.due or now, flags=e.flags,
                                    pending=idxs, reply=e.reply)
            # now, before anything yields: the SCHEDULE records just noted go into a batch
            # whose future resolves once they are durable (nothing owed: no future)
            scheds = spool.remove([]) if entries else None
            try:
                await stored
            except SpoolError as exc:
                if scheds is not None:
                    scheds.add_done_callback(lambda f: f.exception())   # owed, retried
                return _answer(503, error=f"cannot store it now: {exc}")
            # durable: from here on the message is ours whatever else fails (a schedule
            # lost costs an early attempt; a done line lost is rebuilt at start)
            if scheds is not None:
                try:
                    await scheds
                except SpoolError as exc:
                    log.warning("xfer %s: schedules not durable yet: %s", envelope.id, exc)
            try:
                await self.journal.done(key)
            except OSError as exc:
                log.error("xfer %s: transfer journal: %s (rebuilt from the spool at start)",
                          envelope.id, exc)
        finally:
            self._busy.discard(key)
        self.received += 1
        states = {e.domain: (rec.Schedule(raw_id, e.domain, e.attempts, e.due, e.flags, now,
                                          (), {}, e.reply), None)
                  for e in entries if e.due > now or e.attempts or e.flags}
        sched = srv.delivery.scheduler
        sched.saved = {raw_id: states} if states else None
        try:
            srv._stored(raw_id, envelope)
        finally:
            sched.saved = None
        if srv.logs is not None:
            srv.logs.log(RecordType.TRANSFER, id=envelope.id, direction="in", peer=source,
                         key=key, recipients=len(envelope.recipients), size=len(content),
                         entries=[{"domain": e.domain, "attempts": e.attempts,
                                   "due": e.due or None} for e in entries])
        return _answer(200, status="stored", id=envelope.id)


def _answer(code: int, **fields: Any) -> web.Response:
    from aiohttp import web     # the daemon's side: `mta drain` (the sender) loads no server
    return web.Response(status=code, body=orjson.dumps(fields),
                        content_type="application/json")
