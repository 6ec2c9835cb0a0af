"""Feedback state shared by reception, delivery and the bounce intake (issue 5).

One `Feedback` per Server holds what those stages share: the reply classifier
(mta/feedback/bounce, operator rule files re-read on a timer), the suppression list
(mta/feedback/suppression, one SQLite connection used from the loop thread only), the
secret that signs VERP return paths and unsubscribe tokens (the suppression key
file), and counters of hard bounces and complaints per (source, site) for the
shaping layer and the admin API. It decides nothing about SMTP itself: the
recipient policy (mta/feedback/rcpt_policy.py), Outcomes, the Dispatcher and the
intake (mta/feedback/intake.py) call it.

Threads: the suppression list's read connection (`check`, at RCPT and per delivery)
belongs to the loop thread; once `start` ran, every entry `suppress` adds is written
by the store's writer thread (mta/feedback/suppression/writer.py: batched, one
transaction and fsync per batch, bounded queue), so no SQLite commit or lock wait
happens on the loop. `committed()` is how a caller waits until what it added is on
disk (the bounce intake, before it finishes a returned message). Without `start`
(tools, tests without a loop) entries are written at once on the caller's thread.
With [cluster] backend = "redis", `share` (worker 0 of the node) exchanges the store's
entries with the other nodes (mta/feedback/suppression/shared.py).

Diagnostics: a bad rule file (RulesError) or VERP prefix (ValueError) at start
becomes a ConfigError in Server; a bad
rule file later is logged and the previous rules stay in force. A failing
suppression write is logged, never raised into delivery.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Callable

from mta.config import ConfigError
from mta.config.keyring import KeyringError, load_keyring
from mta.feedback import verp
from mta.feedback.bounce import Classifier, RulesError
from mta.feedback.suppression import SuppressionList, address_hash, hash_text, load_or_create_key
from mta.feedback.suppression.shared import SuppressionSync
from mta.feedback.suppression.writer import SuppressionWriter
from mta.feedback.unsubscribe import list_unsubscribe_headers
from mta.model.networks import contains

if TYPE_CHECKING:
    from mta.config import Config
    from mta.egress.shared.base import RecordStream

log = logging.getLogger("mta.feedback.state")

RULES_RELOAD_INTERVAL = 3.0        # seconds between mtime checks of the operator rule files
WRITE_INTERVAL = 0.05              # least time between two suppression batch writes (fsyncs)
MAX_RCPT_INDEX = 99_999            # [[listener]] max_recipients is at most 100,000
_LIST_UNSUB = re.compile(rb"(?im)^list-unsubscribe:")


class Feedback:
    def __init__(self, config: Config):
        b, s, u = config.bounces, config.suppression, config.unsubscribe
        self.classifier = Classifier(b.rules, b.policy_hard)    # raises RulesError on a bad file
        self.bounce_domain = b.domain.strip().lower()
        self.verp_prefix = b.verp_prefix.lower()
        self.verp = bool(self.bounce_domain and b.verp)
        self.verp_expiry = b.verp_expiry
        self.trusted_fbl_sources = b.trusted_fbl_sources
        if self.verp and b.verp_expiry <= config.delivery.max_age:
            # a bounce for the last attempt would find its return path already expired
            problem = (f"bounces.verp_expiry: {b.verp_expiry:g}s is not longer than "
                       f"delivery.max_age ({config.delivery.max_age:g}s) (allowed: max_age "
                       "plus time for late bounces and complaints)")
            raise ConfigError([problem], config.origin)
        # sealed recipients (mta/model/sealed.py): opened in memory at RCPT (suppression
        # check) and right before RCPT TO; None: "e1..." local parts are ordinary ones
        self.sealed = None
        if config.privacy.keyring is not None:
            try:
                self.sealed = load_keyring(config.privacy.keyring)
            except KeyringError as exc:
                raise ConfigError([f"privacy.keyring: {exc}"], config.origin) from None
        self.on_match = s.on_match
        self.hard_bounce_expiry = s.hard_bounce_expiry
        self.complaint_scope = s.complaint_scope
        self.add_headers = bool(u.add_headers and u.base_url)
        self.base_url = u.base_url
        hashed_logs = "hashed" in (config.log.recipient_privacy, config.log.sender_privacy)
        need_key = (s.enabled or self.bounce_domain or u.listen is not None or self.add_headers
                    or hashed_logs)
        self.key = load_or_create_key(s.key_file) if need_key else b""
        if self.verp:   # a bad prefix fails here, at start, not at the first send
            verp.encode(bytes(16), MAX_RCPT_INDEX, "postmaster@" + self.bounce_domain,
                        time.time() + self.verp_expiry, self.key, self.verp_prefix,
                        self.bounce_domain)
        self.suppressions = SuppressionList(s.store, self.key) if s.enabled else None
        # (source, site) -> counters, shown by the operator views (mta/control/views.py)
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: {"hard_bounces": 0, "complaints": 0})
        # called with (source, site) after each complaint is counted: what adapts to
        # complaint rates (rate rules, warm-up) watches here
        self.complaint_observers: list[Callable[[str, str], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[tuple[str, str, str, int | None, str]] = []   # not yet written
        self._flush: asyncio.Handle | None = None
        self._last_write = float("-inf")
        self.store_path = s.store
        self.writer: SuppressionWriter | None = None      # from start() on
        self._ticket = 0          # entries handed to the writer
        self._written = 0         # ... of which committed
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self.suppress_dropped = 0     # entries refused by a full writer queue (logged)
        self.sync: SuppressionSync | None = None     # entries shared with other nodes (share)
        # domain -> site name from the resolver's cache (set by Server once delivery runs)
        self.site_of: Callable[[str], str | None] = lambda domain: None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(RULES_RELOAD_INTERVAL, self._reload, loop)
        if self.suppressions is not None and self.writer is None:
            self.write_pending()      # anything added before the loop ran
            reader = self.suppressions
            self.writer = SuppressionWriter(
                self.store_path, self.key,
                on_commit=lambda ticket, seq, hashes: loop.call_soon_threadsafe(
                    self._committed, ticket, seq, hashes),
                # other processes' entries: read and merged in the thread, adopted here
                on_filter=lambda prefixes, seq, whole: loop.call_soon_threadsafe(
                    reader.adopt if whole else reader.learn_prefixes, prefixes, seq),
                refresh_interval=reader.refresh_interval)
            self.writer.start()
            reader.refresh_elsewhere()

    def share(self, stream: RecordStream, node: str, loop: asyncio.AbstractEventLoop) -> None:
        """Exchange suppression entries with the other nodes through `stream` (after
        `start`; one process per node: the store is the host's)."""
        if self.writer is None or self.suppressions is None or self.sync is not None:
            return
        self.sync = SuppressionSync(stream, self.writer, self.suppressions, self.key, node)
        self.sync.start(loop)

    async def stop_sharing(self) -> None:
        """Before the cluster backend closes (the stream is its connection)."""
        if self.sync is not None:
            await self.sync.close()

    def _reload(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self.classifier.reload_if_changed():
                log.info("bounce rules reloaded")
        except RulesError as exc:   # classify.py logged it too; the old rules stay
            log.error("bad bounce rule file, previous rules kept: %s", exc)
        except Exception:
            log.exception("bounce rules reload failed, previous rules kept")
        self._timer = loop.call_later(RULES_RELOAD_INTERVAL, self._reload, loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush is not None:
            self._flush.cancel()
        self.write_pending()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for _, waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        if self.suppressions is not None:
            self.suppressions.close()
            self.suppressions = None

    # -- suppression ---------------------------------------------------------------------

    def suppress(self, address: str, scope: str, reason: str, expires: int | None = None,
                 note: str = "") -> bool:
        """Queue an entry for the next batch write; False when suppression is disabled
        (or the writer's queue is full: logged and counted in `suppress_dropped`).

        Writes are batched: the writer thread writes whatever queued meanwhile in one
        SQLite transaction, one fsync, off the loop. Until its batch is committed an
        entry is not yet visible to `check`; `committed()` waits for that. (Before
        `start`, with a running loop, entries are batched on the loop thread within
        WRITE_INTERVAL; without a loop they are written at once.)"""
        if self.suppressions is None or not address:
            return False
        # a sealed recipient is suppressed under its clear address (what RCPT checks);
        # the clear text lives in memory until the batch write hashes it
        item = (self.clear_address(address), scope, reason, expires, note[:200])
        if self.writer is not None:
            ticket = self.writer.submit(item)
            if ticket is None:
                self.suppress_dropped += 1
                if self.suppress_dropped & (self.suppress_dropped - 1) == 0:   # 1, 2, 4, 8 ...
                    log.error("suppression writer queue full (%d entries): %d entries not "
                              "stored so far", self.writer.max_pending, self.suppress_dropped)
                return False
            self._ticket = ticket
            return True
        self._pending.append(item)
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:    # no loop (tools, tests): write at once
                self.write_pending()
                return True
            wait = self._last_write + WRITE_INTERVAL - loop.time()
            self._flush = (loop.call_later(wait, self.write_pending) if wait > 0
                           else loop.call_soon(self.write_pending))
        return True

    def _committed(self, ticket: int, seq: int, hashes: list[bytes]) -> None:
        """(loop thread) The writer committed every entry up to `ticket`."""
        if self.suppressions is not None:
            self.suppressions.learn(seq, hashes)
        self._written = max(self._written, ticket)
        while self._waiters and self._waiters[0][0] <= self._written:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def committed(self) -> asyncio.Future | None:
        """None when every entry added so far is on disk; else a future that is done once
        they are (the writer thread's commit; it waits while the store cannot be written)."""
        if self.writer is None:
            if self._pending:
                self.write_pending()
            return None
        if self._ticket <= self._written:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self._ticket, waiter))
        return waiter

    async def add_hash(self, h: str, scope: str, reason: str, note: str = "") -> bool:
        """Suppress an exported hash and wait until it is committed (the unsubscribe
        server answers only then); False when suppression is off or the queue is full."""
        if not self.suppress(h, scope, reason, None, note):
            return False
        wait = self.committed()
        if wait is not None:
            await wait
        return True

    def write_busy(self) -> bool:
        """The writer's queue is half full: returned mail should wait (451) for now."""
        return self.writer is not None and self.writer.pending >= self.writer.max_pending // 2

    def write_pending(self) -> int:
        """Write the queued entries now (also called at shutdown)."""
        self._flush = None
        pending, self._pending = self._pending, []
        if not pending or self.suppressions is None:
            return 0
        try:
            loop = asyncio.get_running_loop()
            self._last_write = loop.time()
        except RuntimeError:      # at shutdown, outside the loop
            pass
        try:
            return self.suppressions.add_many(pending)
        except sqlite3.Error as exc:
            log.error("cannot write %d suppression entries: %s", len(pending), exc)
            return 0

    def hash_address(self, address: str) -> str:
        """An address as the suppression list exports it ("hmac-sha256:<hex>"), for logs
        (a sealed recipient's hash is its clear address's, so it joins the list)."""
        return hash_text(address_hash(self.key, self.clear_address(address)))

    def clear_address(self, address: str) -> str:
        """The clear form of a sealed recipient (mta/model/sealed.py), in memory only;
        any other address, or one that does not open, as it is."""
        if self.sealed is None or not address.startswith("e1"):
            return address
        try:
            return self.sealed.open(address) or address
        except ValueError:   # Unsealable
            return address

    def sealed_forms(self, address: str, limit: int) -> list[str]:
        """What a clear address named by a returned report seals to under each key (for
        mta/feedback/trust.py); [] without a keyring."""
        return self.sealed.sealed_forms(address, limit) if self.sealed is not None else []

    def hard_bounce(self, address: str, source: str, site: str, note: str = "") -> bool:
        self.counts[(source, site)]["hard_bounces"] += 1
        expiry = self.hard_bounce_expiry
        expires = int(time.time() + expiry) if expiry else None
        return self.suppress(address, "global", "hard_bounce", expires, note)

    def complaint(self, address: str, tenant: str | None, source: str, site: str) -> str | None:
        """Suppress after a complaint; returns the scope used (None: not suppressed)."""
        self.counts[(source, site)]["complaints"] += 1
        for observe in self.complaint_observers:
            observe(source, site)
        scope = f"tenant:{tenant}" if tenant and self.complaint_scope == "tenant" else "global"
        return scope if self.suppress(address, scope, "complaint") else None

    def site_for(self, address: str | None) -> str:
        """The site an address's mail goes to when known, else its domain."""
        domain = (address or "").rpartition("@")[2].lower()
        return self.site_of(domain) or domain

    # -- outbound ------------------------------------------------------------------------

    def verp_sender(self, msg_id: bytes, index: int, recipient: str, received: float) -> str:
        """The return path for one recipient. It expires `verp_expiry` after the
        message's reception, not after this attempt, so it stays the same across retries
        (greylisting keys on it) and outlives the last attempt (max_age)."""
        return verp.encode(msg_id, index, recipient, received + self.verp_expiry, self.key,
                           self.verp_prefix, self.bounce_domain)

    def verp_token(self, address: str) -> verp.Token | None:
        """The unverified token in one of our return paths (see mta/feedback/trust.py)."""
        if not self.bounce_domain:
            return None
        return verp.parse(address, self.verp_prefix, self.bounce_domain)

    def verify_verp(self, token: verp.Token, recipient: str, now: float) -> str:
        return verp.verify(token, recipient, self.key, now)

    def trusted_fbl(self, client_ip: str | None) -> bool:
        """Did a [bounces] trusted_fbl_sources client deliver the report?"""
        return contains(self.trusted_fbl_sources, client_ip)

    def with_unsubscribe(self, content, address: str, tenant: str | None):
        """`content` with RFC 8058 headers for `address`, unless it has List-Unsubscribe.
        The headers go below our leading trace fields (Received stays on top)."""
        end = content.find(b"\r\n\r\n")
        head = bytes(content[:end + 2 if end >= 0 else len(content)])
        if _LIST_UNSUB.search(head):
            return content
        scope = f"tenant:{tenant}" if tenant else "global"
        fields = list_unsubscribe_headers(address, scope, self.key, self.base_url)
        block = "".join(f"{k}: {v}\r\n" for k, v in fields).encode("ascii")
        pos = 0
        while head.startswith(b"Received:", pos):     # skip our trace field(s) and folds
            nl = head.find(b"\r\n", pos)
            while nl >= 0 and head[nl + 2:nl + 3] in (b" ", b"\t"):
                nl = head.find(b"\r\n", nl + 2)
            if nl < 0:
                break
            pos = nl + 2
        return bytes(content[:pos]) + block + bytes(content[pos:])
