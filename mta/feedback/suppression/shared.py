"""Suppression entries shared across the nodes of a cluster (issue 15).

The store (store.py) is one SQLite file per host: the workers of a host share it, but
with [cluster] backend = "redis" an address that hard-bounced on node 1 must not keep
getting mail from node 2. So worker 0 of every node runs one `SuppressionSync`:
- publish: the host's own changes (entries written by any local process: hard bounces,
  complaints, unsubscribes, `mta suppress add|import`; removals by `mta suppress
  remove`) are read from the store by write generation (`changes_since`) and appended
  to the stream `<key_prefix>suppression`, bounded by an approximate length ([cluster]
  suppression_stream_length). The store is the outbox: what was committed while Redis
  was away is simply read later, nothing waits in memory. The position reached is kept
  in the store (cursor "published"); a crash between the append and that write sends
  a batch twice, which is harmless (applying an entry is idempotent). Sharing starts at
  the store's generation of that first start: older entries are not published (copy
  them once with `mta suppress export | mta suppress import` on a node that shares).
- apply: the stream is read after the cursor "stream", also kept in the store and
  written in the same transaction as the entries it read, so a restart resumes exactly
  and a node that was away catches up while the stream still holds its position. Every
  record is input from elsewhere: checked like the store checks its own (hash, scope,
  reason, times), a bad one skipped and counted, never fatal. Records this node
  published are skipped (its node name); entries applied here are never published
  again (their generation is in `shared_in`): no echo.
- keys: an entry is HMAC(key, address), meaningful only under the same key. Records
  carry a key id (16 hex digits of SHA-256 over a label and the key, never the key); a
  record with another key id is skipped and counted, with one warning.
Both directions run in the store's writer thread (writer.py `call`): the loop never
waits on SQLite; Redis calls go through the cluster backend (mta/egress/shared), whose
one-line reports cover Redis going away and coming back. When records after the reader's
cursor may be gone (the stream trimmed past it, or lost with a redis-server restart), one
warning says so and reading goes on from the oldest record left.

Reads/writes: the store (through the writer thread) and the Redis stream.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote, unquote

from mta.egress.shared.base import RecordStream, StreamRead, stream_id
from mta.feedback.suppression.store import (
    Change,
    SuppressionList,
    check_reason,
    check_scope,
)

if TYPE_CHECKING:
    from mta.feedback.suppression.writer import SuppressionWriter

log = logging.getLogger("mta.feedback.suppression")

STREAM = "suppression"      # the stream's name under [cluster] key_prefix
VERSION = "1"
POLL = 1.0                  # seconds between rounds when there was nothing to do
BATCH = 500                 # changes published, and records read, per round
PUBLISHED, READ = "published", "stream"    # the store's cursors
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_KEY_ID = re.compile(r"[0-9a-f]{16}\Z")
_TIME = re.compile(r"[0-9]{1,12}\Z")
_NODE = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}\Z")
_T = TypeVar("_T")


class Malformed(ValueError):
    """A record that is not a suppression change this version understands."""


class ForeignKey(ValueError):
    """A record hashed under another suppression key."""


def key_id(key: bytes) -> str:
    """A short public name of the key: equal keys, equal ids (the key never leaves)."""
    return hashlib.sha256(b"mta suppression key id\0" + key).hexdigest()[:16]


def encode(change: Change, node: str, kid: str) -> dict[str, str]:
    """One change as a stream record: short ASCII fields (scope and node %-encoded)."""
    fields = {"v": VERSION, "op": "del" if change.removal else "add", "h": change.hash.hex(),
              "s": quote(change.scope or "", safe=":@._-+"), "n": quote(node, safe="._-"),
              "k": kid}
    if not change.removal:
        fields |= {"r": change.reason, "c": str(change.created),
                   "x": "" if change.expires is None else str(change.expires)}
    return fields


def decode(fields: dict[str, str] | None, kid: str) -> tuple[Change, str]:
    """A record read from the stream as (change, publishing node); ForeignKey when it was
    hashed under another key, Malformed for anything else wrong with it."""
    if fields is None:
        raise Malformed("too large or not a map of strings")
    if fields.get("v") != VERSION:
        raise Malformed("unknown version")
    theirs = fields.get("k", "")
    if not _KEY_ID.match(theirs):
        raise Malformed("no key id")
    if theirs != kid:
        raise ForeignKey(theirs)
    op, h = fields.get("op"), fields.get("h", "")
    if op not in ("add", "del") or not _HEX64.match(h):
        raise Malformed("bad operation or hash")
    try:
        node = unquote(fields.get("n", ""), errors="strict")
        scope_text = unquote(fields.get("s", ""), errors="strict")
        if not _NODE.match(node):
            raise Malformed("bad node name")
        if op == "del":
            scope = check_scope(scope_text) if scope_text else None
            return Change(0, bytes.fromhex(h), scope, removal=True), node
        created, expires = fields.get("c", ""), fields.get("x", "")
        if not _TIME.match(created) or not (expires == "" or _TIME.match(expires)):
            raise Malformed("bad times")
        until = int(expires) if expires else None
        if until == 0:
            raise Malformed("bad times")
        return Change(0, bytes.fromhex(h), check_scope(scope_text),
                      reason=check_reason(fields.get("r", "")), created=int(created),
                      expires=until, source=f"shared by node {node}"), node
    except UnicodeDecodeError:
        raise Malformed("not UTF-8") from None
    except Malformed:
        raise
    except ValueError as exc:      # the store's own checks (scope, reason)
        raise Malformed(str(exc)) from None


def _position_text(pos: tuple[int, bytes, str]) -> str:
    return f"{pos[0]}:{pos[1].hex()}:{pos[2]}"


def _position(text: str) -> tuple[int, bytes, str]:
    seq, h, scope = text.split(":", 2)
    return int(seq), bytes.fromhex(h), scope


@dataclass(slots=True)
class SyncStats:
    """What /metrics shows (mta/control/metrics.py)."""
    published: int = 0          # changes appended to the stream
    imported: int = 0           # other nodes' changes applied to the store
    malformed: int = 0          # records skipped: shape, size, scope, reason, times
    foreign_key: int = 0        # records skipped: another suppression key
    lag: float = 0.0            # seconds between the newest record and the one read last


class SuppressionSync:
    """Publishes this host's suppression changes and applies other nodes' (see above);
    one per node (worker 0), on the loop, with the store's writer thread doing SQLite."""

    def __init__(self, stream: RecordStream, writer: SuppressionWriter,
                 reader: SuppressionList, key: bytes, node: str, *, poll: float = POLL,
                 batch: int = BATCH) -> None:
        self.stream = stream
        self.writer = writer
        self.reader = reader          # the loop's read connection: learns what was applied
        self.kid = key_id(key)
        self.node = node
        self.poll = poll
        self.batch = batch
        self.stats = SyncStats()
        self._published: tuple[int, bytes, str] | None = None   # loaded in the first round
        self._cursor: str | None = None
        self._warned_key = False
        self._warned_trim = False
        self._task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())

    @property
    def ready(self) -> bool:
        """Both positions are known (a first start publishes what is committed after)."""
        return self._published is not None and self._cursor is not None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _in_thread(self, fn: Callable[[SuppressionList], _T]) -> _T:
        return await asyncio.wrap_future(self.writer.call(fn))

    async def _run(self) -> None:
        failures = 0
        while True:
            busy = False
            try:
                busy = await self.publish()
                busy = await self.apply() or busy
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:    # noqa: BLE001 - a locked store, a closed writer: again later
                failures += 1
                if failures & (failures - 1) == 0:    # 1, 2, 4, 8 ...
                    log.warning("shared suppression: %s: %s (trying again)",
                                type(exc).__name__, exc)
            await asyncio.sleep(0 if busy else self.poll)

    # -- this host's changes out

    async def publish(self) -> bool:
        """One batch of this host's changes to the stream; True when more may wait."""
        if self._published is None:
            self._published = await self._in_thread(self._start_position)
        after = self._published
        changes = await self._in_thread(lambda st: st.changes_since(after, self.batch))
        if not changes:
            return False
        if not await self.stream.add([encode(c, self.node, self.kid) for c in changes]):
            return False        # Redis away (reported by the backend): read again later
        pos = self._published = changes[-1].position
        self.stats.published += len(changes)
        await self._in_thread(lambda st: st.set_cursor(PUBLISHED, _position_text(pos),
                                                       forget_before=pos[0]))
        return len(changes) == self.batch

    @staticmethod
    def _start_position(store: SuppressionList) -> tuple[int, bytes, str]:
        text = store.cursor(PUBLISHED)
        if text is not None:
            try:
                return _position(text)
            except ValueError:
                log.warning("shared suppression: bad published cursor %r: starting anew", text)
        # first start: what is in the store now stays here (docs: export/import it once)
        pos = (store.generation() + 1, b"", "")
        store.set_cursor(PUBLISHED, _position_text(pos))
        return pos

    # -- other nodes' changes in

    async def apply(self) -> bool:
        """One read of the stream, applied to the store; True when more may wait."""
        if self._cursor is None:
            saved = await self._in_thread(lambda st: st.cursor(READ))
            if saved is not None and stream_id(saved) is None:
                log.warning("shared suppression: bad stream cursor %r: reading from the "
                            "oldest record", saved)
                saved = None
            self._cursor = saved or "0-0"
        got = await self.stream.read(self._cursor, self.batch)
        if got is None:
            return False        # Redis away (reported by the backend)
        self._check_trimmed(got)
        if got.records:
            changes = self._accepted(got)
            last = got.records[-1][0]
            seq, added = await self._in_thread(
                lambda st: st.apply_shared(changes, (READ, last)))
            if added:
                self.reader.learn(seq, added)
            self.stats.imported += len(changes)
            self._cursor = last
        newest, mine = stream_id(got.last), stream_id(self._cursor)
        if newest is not None and mine is not None:
            self.stats.lag = max(0.0, (newest[0] - mine[0]) / 1000)
        return len(got.records) == self.batch

    def _accepted(self, got: StreamRead) -> list[Change]:
        now = time.time()
        changes = []
        for _, fields in got.records:
            try:
                change, node = decode(fields, self.kid)
            except ForeignKey as exc:
                self.stats.foreign_key += 1
                if not self._warned_key:
                    self._warned_key = True
                    log.warning("shared suppression: entries from another node were hashed "
                                "under another suppression key (key id %s, ours %s) and are "
                                "ignored: nodes must share the suppression key file "
                                "([suppression] key_file)", exc, self.kid)
                continue
            except Malformed as exc:
                self.stats.malformed += 1
                n = self.stats.malformed
                if n & (n - 1) == 0:
                    log.warning("shared suppression: record skipped (%s); %d so far", exc, n)
                continue
            if node == self.node:
                continue        # published here, read back
            if change.expires is not None and change.expires <= now:
                continue
            changes.append(change)
        return changes

    def _check_trimmed(self, got: StreamRead) -> None:
        if not got.gap or self._warned_trim:
            return
        self._warned_trim = True
        log.warning("shared suppression: records after this node's position (%s) are gone "
                    "from the stream (trimmed past it, or the stream was lost; the oldest "
                    "left is %s): entries other nodes published then are missing here; "
                    "reading goes on (to recover them: mta suppress export on another node, "
                    "import here)", self._cursor, got.first or "none")
