"""`mta drain`: stop a node's acceptance and move its queue to another node (issue 15).

Two ways, one transport (POST /xfer on the target's admin API, mta/control/xfer.py):

- maintenance: `mta drain --to URL --to-token-file F` asks the running daemon (POST
  /control/drain) to move its own queue; it prints progress from GET /drain until done.
  With [server] workers = N it asks every worker (each moves its own spool shard; --worker
  I: only that one) and prints their sum.
  The daemon (`Drainer`) first stops acceptance: listeners answer 421 and close idle
  sessions (as on SIGTERM), POST /inject answers 503, GET /ready 503 "draining". Then it
  stops delivery without dropping anything: the scheduler holds (no timer, nothing
  routed), ready queues give their messages back to their scheduled queues, every
  dispatcher's connection limit goes to 0, and deliveries in flight get up to
  [delivery] shutdown_grace to end (a deferral goes back to the queue with its new
  schedule). Then every queued entry is taken out, grouped by message and sent with its
  attempts and due time; the message is tombstoned after the target's 200 (stored or
  duplicate). A message that cannot be sent (target down after the retries, refused)
  goes back to its queue on hold and is counted as left; run the drain again. The node
  stays drained until it is restarted.
- after a node died: `mta drain --spool-dir DEAD --to URL --to-token-file F` reads a spool
  directory offline (mounted or copied; no daemon may run on it) through the spool's own
  recovery (Spool.open: the start-up scan, Corrupt records quarantined as at start; a
  process of this host holding a file of it open is refused, see spool_user) and
  sends every live message the same way, tombstoning each in that spool after its 200, so
  starting a daemon on it later does not deliver them again. The root spool of a node
  that ran N workers is drained shard by shard (wI). With --read-only (or on a
  read-only mount) nothing is written there: the scan quarantines into a temporary
  directory and the spool must never be started again.
Either way a run that stops half-way (kill -9, a lost target) is simply run again: what
was tombstoned is gone, what was sent but not tombstoned is answered "duplicate" by the
target (its transfer journal) and tombstoned then. Transfers go SEND_AT_ONCE at a time;
a transient failure (connection, 5xx) is retried with backoff RETRIES times.
Log: a Transfer record per moved message (direction "out"); stdout: progress lines and
a summary.
SMTP fallback: `--to smtp://host:port` relays each message to the target's listener as a
new transaction (MAIL/RCPT parameters kept where the target offers them), tombstoned on
its 250. The target gives it a new id: attempts, schedule and age start again there, and
nothing makes a repeat harmless (a crash between the 250 and the tombstone sends it
twice). REQUIRETLS messages stay (use the admin API).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson

from mta.control.views import DrainProgress as Progress
from mta.control.xfer import (
    Entry,
    Item,
    XferError,
    pending_item,
    record_key,
    relay,
    send,
)
from mta.model.log_records import RecordType
from mta.model.queued import InsertReason
from mta.queues.select import Selector
from mta.spool import Spool
from mta.spool import records as rec
from mta.spool.recovery import Location, scan, segment_path

if TYPE_CHECKING:
    from aiohttp import web

    from mta.config import Config
    from mta.model.queued import QueuedMessage

log = logging.getLogger("mta.drain")

SEND_AT_ONCE = 8            # transfers in flight
RETRIES = 5                 # attempts per message on a transient failure
BACKOFF = 1.0               # seconds before the second attempt, doubling


def _smtp_target(url: str) -> tuple[str, int] | None:
    """(host, port) of an smtp://host[:port] target; None for the admin API's URL."""
    if not url.startswith("smtp://"):
        return None
    host, _, port = url[len("smtp://"):].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return url[len("smtp://"):].rstrip("/"), 25
    return host.strip("[]"), int(port)


async def _send_all(items, url: str, token: str, source: str, progress: Progress,
                    moved: Callable[[Item, str], Any], kept: Callable[[Item], Any]) -> None:
    """Send every item (an iterable), SEND_AT_ONCE at a time, to the admin API at `url`
    (or relay it to smtp://host:port); `moved` after the target took it (awaited when it
    returns an awaitable), `kept` when the item stays."""
    import aiohttp
    gate = asyncio.Semaphore(SEND_AT_ONCE)
    fatal: list[str] = []
    loop = asyncio.get_running_loop()
    smtp = _smtp_target(url)

    async def one(deliver: Callable[[Item], Any], item: Item) -> None:
        try:
            delay = BACKOFF
            for attempt in range(RETRIES):
                if fatal:
                    break
                try:
                    status = await deliver(item)
                except XferError as exc:
                    if not exc.retry:
                        if exc.fatal:
                            fatal.append(str(exc))
                        progress.error(f"{item.raw_id.hex()}: {exc}")
                        break
                    if attempt == RETRIES - 1:
                        progress.error(f"{item.raw_id.hex()}: {exc} (gave up after "
                                       f"{RETRIES} attempts)")
                        break
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                if status == "duplicate":
                    progress.duplicate += 1
                    progress.moved += 1
                else:
                    progress.stored += 1
                    progress.moved += 1
                done = moved(item, status)
                if asyncio.iscoroutine(done):
                    await done
                return
            progress.left += 1
            kept(item)
        finally:
            gate.release()

    async with aiohttp.ClientSession() as session:
        if smtp is not None:
            def deliver(item: Item):
                return loop.run_in_executor(None, relay, *smtp, item, source)
        else:
            def deliver(item: Item):
                return send(session, url, token, item, source)
        tasks = []
        for item in items:
            await gate.acquire()
            if fatal:
                gate.release()
                progress.left += 1
                kept(item)
                continue
            tasks.append(asyncio.ensure_future(one(deliver, item)))
        await asyncio.gather(*tasks)
    if fatal:
        progress.error(f"stopped: {fatal[0]}")


def _log_out(logs, item: Item, status: str, peer: str) -> None:
    if logs is not None:
        logs.log(RecordType.TRANSFER, id=item.envelope.id, direction="out", peer=peer,
                 key=item.key, status=status, recipients=len(item.envelope.recipients),
                 size=len(item.content),
                 entries=[{"domain": e.domain, "attempts": e.attempts, "due": e.due or None}
                          for e in item.entries])


# -- the running daemon ---------------------------------------------------------------------

class Drainer:
    """POST /control/drain {"to": URL, "token": TOKEN} and GET /drain on a running daemon.
    `server` is the mta.Server (listeners, delivery, spool, logs, admin)."""

    def __init__(self, server: Any):
        self.server = server
        self.progress = Progress()
        self._task: asyncio.Task | None = None
        self._due: dict[int, float] = {}   # id(entry) -> its due time, while moving

    def install(self, admin: Any) -> None:
        admin.actions["/control/drain"] = self.start
        admin.routes["/drain"] = lambda rest: self.progress.to_json() if not rest else None

    def start(self, args: dict) -> dict:
        to, token = args.get("to"), args.get("token")
        if not isinstance(to, str) or not to.startswith(("http://", "https://", "smtp://")):
            raise ValueError("to: the target's admin API URL (http://host:port), or "
                             "smtp://host:port (relay: the schedule is lost)")
        if not isinstance(token, str) or (not token and not to.startswith("smtp://")):
            raise ValueError("token: the target's admin token")
        if self._task is not None and not self._task.done():
            raise ValueError(f"a drain to {self.progress.target} is running")
        self.progress = Progress(state="stopping", target=to, started=time.time())
        self._task = asyncio.get_running_loop().create_task(self._run(to, token))
        return self.progress.to_json()

    async def _run(self, to: str, token: str) -> None:
        p = self.progress
        try:
            self._stop_accepting()
            p.in_flight = await self._stop_delivering()
            p.state = "moving"
            groups = self._take_all()
            p.total = len(groups)
            log.info("drain: moving %d messages to %s", p.total, to)
            await _send_all(self._items(groups), to, token, self.server.config.server.hostname,
                            p, self._moved, self._kept)
            p.state = "done"
        except Exception as exc:   # a bug: the messages not moved stay queued and held
            log.exception("drain to %s failed", to)
            p.error(f"drain failed: {exc}")
            p.state = "failed"
        p.finished = time.time()
        log.info("drain to %s %s: %d stored, %d duplicate, %d left, %d in flight", to, p.state,
                 p.stored, p.duplicate, p.left, p.in_flight)

    def _stop_accepting(self) -> None:
        srv = self.server
        srv.draining = True
        for listener in srv.listeners:
            listener.drain()
        if srv.admin is not None:
            srv.admin.handlers[("POST", "/inject")] = _refuse_inject

    async def _stop_delivering(self) -> int:
        """Hold everything in the scheduler; wait for deliveries in flight -> how many did
        not end within [delivery] shutdown_grace (they settle later, here)."""
        eng = self.server.delivery
        sched = eng.scheduler
        sched.stop()
        sched.hold = True
        for d in list(eng.dispatchers.values()):
            for msg in d.ready.drain():
                sched.make_ready(msg, InsertReason.RECOVERED)   # hold: into its backlog
            d.set_limits(dataclasses.replace(d.limits, connection_limit=0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server.config.delivery.shutdown_grace
        while eng.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for d in list(eng.dispatchers.values()):   # given back while we waited
            for msg in d.ready.drain():
                sched.make_ready(msg, InsertReason.RECOVERED)
        return eng.in_flight

    def _take_all(self) -> dict[bytes, list[QueuedMessage]]:
        """Every waiting entry, by message; a message with an entry still in flight (or
        in the bounce intake) stays, whole."""
        eng = self.server.delivery
        groups: dict[bytes, list[QueuedMessage]] = {}
        # take() marks wheel entries stale (due 0): their due times first
        self._due = {id(m): m.due for m, where in eng.scheduler.waiting() if where == "scheduled"}
        for msg in eng.scheduler.take(Selector(all=True)):
            groups.setdefault(msg.id, []).append(msg)
        open_entries = eng.outcomes.open_entries
        for msg_id in [i for i, g in groups.items() if open_entries.get(i, len(g)) > len(g)]:
            for msg in groups.pop(msg_id):
                eng.scheduler.make_ready(msg, InsertReason.RECOVERED)
            self.progress.left += 1
        return groups

    def _items(self, groups: dict[bytes, list[QueuedMessage]]):
        spool = self.server.spool
        for msg_id, entries in groups.items():
            try:
                envelope, content = spool.read(msg_id)
                loc = spool.location(msg_id)
            except (KeyError, OSError, ValueError) as exc:
                self.progress.error(f"{msg_id.hex()}: cannot read it from the spool: {exc}")
                self._kept_entries(entries)
                self.progress.left += 1
                continue
            replies = {s.domain: s.reply for s in spool.schedules(msg_id)}
            pending = {i for m in entries for i in m.rcpts}
            done = set(range(len(envelope.recipients))) - pending
            by_domain = {m.queue.domain: Entry(m.queue.domain, m.attempts,
                                               self._due.get(id(m), 0.0), m.flags,
                                               replies.get(m.queue.domain, ""))
                         for m in entries}
            item = pending_item(msg_id, record_key(spool.directory, loc, msg_id), envelope,
                                bytes(content), done, by_domain)
            if item is None:
                continue
            item.queued = entries
            yield item

    async def _moved(self, item: Item, status: str) -> None:
        eng = self.server.delivery
        for msg in item.queued:
            eng.scheduler.finished(msg)
        eng.outcomes.open_entries.pop(item.raw_id, None)
        _log_out(self.server.logs, item, status, self.progress.target)
        try:
            await self.server.spool.remove([item.raw_id])
        except OSError as exc:   # owed: written once the spool can write
            self.progress.error(f"{item.raw_id.hex()}: tombstone not durable yet: {exc}")

    def _kept(self, item: Item) -> None:
        self._kept_entries(item.queued)

    def _kept_entries(self, entries: list[QueuedMessage]) -> None:
        for msg in entries:
            self.server.delivery.scheduler.make_ready(msg, InsertReason.RECOVERED)


async def _refuse_inject(request: web.Request) -> web.Response:
    from aiohttp import web
    if request.body_exists:
        await request.read()
    return web.Response(status=503, body=orjson.dumps(
        {"error": "this node is draining: it takes no mail"}),
        content_type="application/json", headers={"Retry-After": "60"})


# -- a dead node's spool, offline ----------------------------------------------------------

def _offline_items(found, read: Callable[[bytes], bytes], directory: str, progress: Progress):
    for msg_id, loc in found.messages.items():
        envelope = found.envelopes[msg_id]
        done = set(found.done_rcpts.get(msg_id, ()))
        entries = {}
        for domain, (state, _) in found.schedules.get(msg_id, {}).items():
            done.update(state.finished)
            entries[domain] = Entry(domain, state.attempts, state.due, state.flags, state.reply)
        try:
            content = read(msg_id)
        except (OSError, ValueError) as exc:
            progress.error(f"{msg_id.hex()}: cannot read it: {exc}")
            progress.left += 1
            continue
        item = pending_item(msg_id, record_key(directory, loc, msg_id), envelope, content,
                            done, entries)
        if item is not None:
            yield item


def _read_record(directory: str, loc: Location) -> bytes:
    """The content of the MESSAGE record at `loc`, checked (as Spool.read does)."""
    with open(segment_path(directory, loc.segment), "rb") as f:
        buf = os.pread(f.fileno(), loc.length, loc.offset)
    rec.parse_header(buf, 0, len(buf))
    rec.check_crc(buf, 0, loc.length)
    _, _, content_at = rec.parse_message(buf, 0, loc.length)
    return buf[content_at:]


def spool_user(directory: str, nested: bool = True) -> int | None:
    """The pid of another process on this host with `directory` or a file in it open (a
    daemon running on the spool: its writer keeps the directory open), else None. Linux
    /proc; a spool mounted from a dead machine has none here. `nested` False: only the
    directory and its segment files count (a spool root, whose workers hold their shards
    and the shared tables under it)."""
    top = os.path.realpath(directory)
    root = top + os.sep
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:          # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target == top or (target.startswith(root) and (nested or (
                    os.path.dirname(target) == top and target.endswith(".seg")))):
                return pid      # the writer holds the directory
    return None


async def drain_spool(directory: str, to: str, token: str, *, read_only: bool = False,
                      source: str = "", report: Callable[[Progress], None] | None = None,
                      logs: Any = None) -> Progress:
    """Move every live message of the spool `directory` to `to` (see the module docstring)."""
    p = Progress(state="moving", target=to, started=time.time())
    source = source or f"spool:{os.path.abspath(directory)}"
    loop = asyncio.get_running_loop()
    spool = None
    if not read_only:
        spool = Spool(directory)
        try:
            found = spool.open(loop)
        except OSError as exc:
            log.warning("drain: %s is not writable (%s): reading it without marking what "
                        "moved", directory, exc.strerror or exc)
            spool = None
    if spool is None:
        with tempfile.TemporaryDirectory(prefix="mta-drain-") as quarantine:
            found = scan(directory, quarantine)
    for bad in found.corrupt:
        p.error(f"corrupt record in segment {bad.segment} at {bad.offset}: {bad.reason}")
    p.total = len(found.messages)
    if report is not None:
        report(p)

    if spool is not None:
        def read(msg_id: bytes) -> bytes:
            return bytes(spool.read(msg_id)[1])
    else:
        def read(msg_id: bytes) -> bytes:
            return _read_record(directory, found.messages[msg_id])

    async def moved(item: Item, status: str) -> None:
        _log_out(logs, item, status, to)
        if spool is not None:
            await spool.remove([item.raw_id])
        if report is not None:
            report(p)

    try:
        await _send_all(_offline_items(found, read, directory, p), to, token, source, p,
                        moved, lambda item: None)
    finally:
        if spool is not None:
            await spool.close()
    p.state, p.finished = "done", time.time()
    return p


# -- the command ----------------------------------------------------------------------------

def _token(args: argparse.Namespace) -> str:
    from mta.control.token import TokenError, read_token
    path = args.to_token_file
    if path is None and _smtp_target(args.to) is not None:
        return ""
    if path is None:
        raise SystemExit("mta drain needs --to-token-file: the target node's admin token "
                         "file (an operator token)")
    try:
        return read_token(path)
    except FileNotFoundError:
        raise SystemExit(f"mta drain: no token file {path}") from None
    except TokenError as exc:
        raise SystemExit(f"mta drain: {exc}") from None


def _offline_logs(args: argparse.Namespace):
    """A LogWriter on the config's [log] directory, file drain.jsonl (a daemon may write
    mta.jsonl there); None, with a warning, when there is none to write to."""
    from mta.logs.writer import LogWriter
    try:
        config = args.load_config(args)
        return LogWriter(str(config.log.directory), "drain", host=config.server.hostname)
    except Exception as exc:   # no config, no permission: moving mail matters more
        print(f"mta drain: warning: no Transfer records ({exc})", file=sys.stderr)
        return None


def _line(p: Progress) -> str:
    return (f"drain to {p.target}: {p.state}: {p.moved}/{p.total} moved ({p.stored} stored, "
            f"{p.duplicate} already there), {p.left} left")


def _summary(p: Progress) -> int:
    for e in p.errors:
        print(f"  error: {e}")
    took = (p.finished or time.time()) - p.started
    print(f"summary: {p.moved} of {p.total} messages moved to {p.target} in {took:.1f}s "
          f"({p.stored} stored, {p.duplicate} already there); {p.left} left here"
          + (f"; {p.in_flight} deliveries were still in flight" if p.in_flight else ""),
          flush=True)
    return 0 if p.state == "done" and not p.left and not p.in_flight else 1


def _shards(directory: str) -> list[str]:
    """The spool directories under `directory`: itself, or, for the root spool of a node
    that ran [server] workers = N (no segment of its own), each worker's shard wI."""
    try:
        names = os.listdir(directory)
    except OSError:
        return [directory]
    if any(n.endswith(".seg") for n in names):
        return [directory]
    shards = sorted((n for n in names if n[:1] == "w" and n[1:].isdigit()
                     and os.path.isdir(os.path.join(directory, n))), key=lambda n: int(n[1:]))
    return [os.path.join(directory, n) for n in shards] or [directory]


def _combined(parts: list[Progress]) -> Progress:
    """Several workers' (or shards') progress as one."""
    if len(parts) == 1:
        return parts[0]
    states = {p.state for p in parts}
    state = next((s for s in ("stopping", "moving", "idle", "failed") if s in states), "done")
    return Progress(state, parts[0].target, *(sum(getattr(p, f) for p in parts)
                                              for f in ("total", "stored", "duplicate", "left",
                                                        "in_flight")),
                    min(p.started for p in parts), max(p.finished for p in parts),
                    [e for p in parts for e in p.errors])


def _cmd_drain(args: argparse.Namespace) -> int:
    token = _token(args)
    if args.spool_dir:
        return _drain_offline(args, token)
    from mta.control.client import admin_request
    config = args.load_config(args)
    configs = [config]
    if getattr(args, "worker", None) is None and config.server.workers > 1:
        configs = []     # every worker process: its admin API and its spool shard
        for i in range(config.server.workers):
            args.worker = i
            configs.append(args.load_config(args))
        args.worker = None
    for cfg in configs:
        status, data = admin_request(cfg, "/control/drain", {"to": args.to, "token": token})
        if status != 200:
            print(f"mta: {data.get('error') if isinstance(data, dict) else data}",
                  file=sys.stderr)
            return 1
    shown = ""
    while True:
        parts = []
        for cfg in configs:
            status, data = admin_request(cfg, "/drain")
            if status != 200 or not isinstance(data, dict):
                print(f"mta: GET /drain answered {status}", file=sys.stderr)
                return 1
            parts.append(Progress(**{k: v for k, v in data.items() if k != "moved"}))
        p = _combined(parts)
        line = _line(p)
        if line != shown:
            print(line, flush=True)
            shown = line
        if p.state in ("done", "failed"):
            return _summary(p)
        time.sleep(0.5)


def _drain_offline(args: argparse.Namespace, token: str) -> int:
    shards = _shards(str(args.spool_dir))
    for shard in shards:
        pid = spool_user(shard)
        if pid is not None:
            print(f"mta drain: process {pid} has {shard} open (a daemon running on it?): "
                  "stop it first, or drain it live with `mta drain -c ITS_CONFIG`",
                  file=sys.stderr)
            return 1
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or p.moved + p.left >= p.total:
            last[0] = now
            print(_line(p), flush=True)

    async def run() -> list[Progress]:
        logs = _offline_logs(args)
        done = []
        try:
            for shard in shards:
                if len(shards) > 1:
                    print(f"spool shard {shard}:", flush=True)
                done.append(await drain_spool(shard, args.to, token, read_only=args.read_only,
                                              report=report, logs=logs))
        finally:
            if logs is not None:
                logs.close()
        return done

    import uvloop
    p = _combined(uvloop.run(run()))
    print(_line(p), flush=True)
    return _summary(p)


def add_parser(sub, with_config: Callable[[argparse.ArgumentParser], None],
               load: Callable[[argparse.Namespace], Config]) -> None:
    sp = sub.add_parser(
        "drain", help="stop this node's acceptance and move its queue to another node "
                      "(the running daemon's, or with --spool-dir a dead node's spool, offline)")
    sp.add_argument("--to", required=True, metavar="URL",
                    help="the target node's admin API, e.g. http://10.0.0.2:8025; or "
                         "smtp://HOST:PORT to relay to its listener instead (attempts, "
                         "schedule and age start again there; at least once, not exactly)")
    sp.add_argument("--to-token-file", metavar="FILE",
                    help="the target node's admin token file (an operator token)")
    sp.add_argument("--read-only", action="store_true",
                    help="with --spool-dir: write nothing into that spool (moved messages are "
                         "not tombstoned there: never start a daemon on it again)")
    with_config(sp)
    sp.set_defaults(func=_cmd_drain, load_config=load)
