"""The persistent suppression list: addresses we must not send to, stored as keyed hashes.

Sits beside delivery: the listener (or the scheduler) calls `check` for every recipient
at RCPT time; bounce/ARF processing, the RFC 8058 unsubscribe server and the operator
(`mta suppress`) call `add`. One SQLite file in WAL mode, so the daemon and the CLI can
use it at once (readers never block; writers wait up to `busy_timeout`).

Privacy: an address is reduced to HMAC-SHA256(secret, normalised address) before it
touches the store. The raw address is never written to the database nor logged here;
free text given as an entry's source has anything shaped like an address redacted.
Without the key file the hashes cannot be tested against a list of guesses.

Speed: `check` consults an in-memory filter of 64-bit hash prefixes (a sorted array
plus a small set of recent additions, 8 bytes per entry) and goes to SQLite only when
the prefix is present; most recipients are not suppressed and never touch SQLite. Our
own writes update the filter at once; writes by other processes (the CLI) are noticed
through `PRAGMA data_version` at most `refresh_interval` seconds later.
See bench/suppression_bench.py for the numbers.

Reads/writes: the store file (+ -wal, -shm) and the key file (created 0600 if missing).
Diagnostics: KeyFileError (fatal, names the file) for a missing/unreadable/wrong-size
key; ValueError for a malformed address, scope, hash or expiry; sqlite3.Error passes
through (e.g. "database is locked" after busy_timeout).
"""
from __future__ import annotations

import array
import bisect
import hashlib
import logging
import os
import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from mta.files import create_once

log = logging.getLogger("mta.feedback.suppression")

KEY_SIZE = 32
HASH_PREFIX = "hmac-sha256:"
REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual", "import")
_HEX_HASH = re.compile(r"hmac-sha256:([0-9a-f]{64})\Z")
_SCOPE = re.compile(r"(global|tenant:[^\s]{1,255}|domain:[^\s]{1,255})\Z")
_REASON = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
_ADDRESSISH = re.compile(r"[^\s<>\"',;:()\[\]]+@[^\s<>\"',;:()\[\]]+")
_MERGE_AT = 4096   # recent additions kept in a set before they are merged into the array

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    hash    BLOB NOT NULL,      -- HMAC-SHA256(secret, normalised address), 32 bytes
    scope   TEXT NOT NULL,      -- global | tenant:<name> | domain:<sender domain>
    reason  TEXT NOT NULL,      -- hard_bounce | complaint | unsubscribe | manual | import ...
    source  TEXT NOT NULL,      -- status/category/feedback type; never an address
    created INTEGER NOT NULL,   -- unix time
    expires INTEGER,            -- unix time, NULL = never
    seq     INTEGER NOT NULL,   -- write generation, for other processes' incremental reload
    PRIMARY KEY (hash, scope)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppression_seq ON suppression (seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('seq', 0);
-- for sharing with other nodes (shared.py): removals, which leave no row to publish ...
CREATE TABLE IF NOT EXISTS removed (hash BLOB NOT NULL, scope TEXT, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS removed_seq ON removed (seq);
-- ... the write generations that applied other nodes' entries (never published again) ...
CREATE TABLE IF NOT EXISTS shared_in (seq INTEGER PRIMARY KEY);
-- ... and where publishing and reading stand, committed with what they describe
CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class KeyFileError(Exception):
    """The suppression key file is missing, unreadable or not 32 bytes."""


@dataclass(frozen=True, slots=True)
class Entry:
    hash: str               # "hmac-sha256:<64 hex>": the address's keyed hash, never the address
    scope: str              # "global", "tenant:<name>" or "domain:<sender domain>"
    reason: str             # why: hard_bounce, complaint, unsubscribe, manual, import, ...
    source: str             # detail (status, category, feedback type), addresses redacted
    created: int            # unix time the entry was written
    expires: int | None     # unix time it stops applying; None = never

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Change:
    """One change to the store as another node learns it (shared.py): an entry added or
    replaced, or a removal (`removal`; scope None: every scope of the hash)."""
    seq: int                # write generation (0 for a change read from another node)
    hash: bytes             # 32 bytes
    scope: str | None
    removal: bool = False
    reason: str = ""
    created: int = 0
    expires: int | None = None
    source: str = ""        # the entry's source text when applied here

    @property
    def position(self) -> tuple[int, bytes, str]:
        """Where a reader of `changes_since` stands after this change."""
        return (self.seq, self.hash, self.scope or "")


# --- key file -------------------------------------------------------------------------

def load_key(path: str | os.PathLike) -> bytes:
    """Read an existing key file; KeyFileError naming the file otherwise."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"suppression key file {p}: cannot read: {exc.strerror or exc}") from None
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"suppression key file {p}: got {len(data)} bytes, want {KEY_SIZE} "
                           "(a raw random key; do not edit it)")
    return data


def load_or_create_key(path: str | os.PathLike) -> bytes:
    """Return the key in `path`, creating 32 random bytes (mode 0600) if it does not exist.

    Created atomically: written and fsync'd under a temporary name, then hard-linked to
    the final name, which fails if another process got there first (we then use theirs).
    A half-written key is never visible, and an existing key is never replaced.
    """
    p = Path(path)
    if p.exists():
        return load_key(p)
    key = secrets.token_bytes(KEY_SIZE)
    try:
        if not create_once(p, key):
            return load_key(p)   # another process made it first: theirs stands
    except OSError as exc:
        raise KeyFileError(f"suppression key file {p}: cannot create: {exc.strerror or exc}") from None
    log.info("created suppression key file %s", p)
    return key


# --- normalisation and hashing --------------------------------------------------------

def normalise_domain(domain: str) -> str:
    """Lowercase; IDNA A-label for a UTF-8 name; as-is lowercase when IDNA refuses it."""
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower()
    import idna
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain.lower()


def normalise(address: str) -> str:
    """The form that is hashed: stripped, no angle brackets, lowercased, A-label domain.

    The local part is lowercased too although RFC 5321 2.4 lets it be case-sensitive:
    practically every mailbox provider treats it case-insensitively, and a suppression
    that misses on case (mail to a complainer) is worse than one that over-matches.
    +tags are kept: a user may unsubscribe one tagged address and keep the others.
    """
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    local, at, domain = a.rpartition("@")
    if not at or not local or not domain.strip():
        raise ValueError("not an address: want local@domain")
    return f"{local.lower()}@{normalise_domain(domain)}"


_PADS: dict[bytes, tuple[Any, Any]] = {}   # key -> SHA-256 states after ipad / opad


def address_hash(key: bytes, address: str) -> bytes:
    """HMAC-SHA256(key, normalised address): the only form an address is stored in.

    RFC 2104 by hand with the key's inner and outer pad states kept (copying a
    hash state is cheaper than hmac.digest's per-call key setup; this runs per RCPT).
    """
    pads = _PADS.get(key)
    if pads is None:
        k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        pads = _PADS[key] = (hashlib.sha256(bytes(b ^ 0x36 for b in k)),
                             hashlib.sha256(bytes(b ^ 0x5C for b in k)))
    inner = pads[0].copy()
    inner.update(normalise(address).encode("utf-8", "surrogatepass"))
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def hash_text(h: bytes) -> str:
    return HASH_PREFIX + h.hex()


def parse_hash(h: str | bytes) -> bytes:
    """Accept the exported text form "hmac-sha256:<hex>" or 32 raw bytes."""
    if isinstance(h, (bytes, bytearray)):
        if len(h) != 32:
            raise ValueError(f"got a {len(h)}-byte hash, want 32")
        return bytes(h)
    m = _HEX_HASH.match(h.strip().lower())
    if not m:
        raise ValueError("not a hash of the form hmac-sha256:<64 hex digits>")
    return bytes.fromhex(m.group(1))


def check_scope(scope: str) -> str:
    """Validate and normalise a scope ("domain:" names are lowercased/A-labels)."""
    if not _SCOPE.match(scope):
        raise ValueError(f"bad scope {scope!r}: want global, tenant:<name> or domain:<domain>")
    if scope.startswith("domain:"):
        return "domain:" + normalise_domain(scope[7:])
    return scope


def check_reason(reason: str) -> str:
    if not _REASON.match(reason):
        raise ValueError(f"bad reason {reason!r}: want a short lowercase word such as "
                         + ", ".join(REASONS))
    return reason


def _redact(text: str) -> str:
    # Sources are often SMTP replies or report fields ("550 5.1.1 <x@y>: unknown"): keep
    # the status, never the address.
    return _ADDRESSISH.sub("[address]", text)[:500]


def _prefix(h: bytes) -> int:
    return int.from_bytes(h[:8], "big")


# --- the store ------------------------------------------------------------------------

def _private(db: Path) -> None:
    """Make the store and its WAL and shared-memory files 0600: they name who complained
    or unsubscribed. SQLite gives the WAL and SHM it creates the database file's mode, so
    creating that file 0600 first is enough; files of an older release are tightened."""
    os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        try:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
        except FileNotFoundError:
            pass


def _set_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    """PRAGMA journal_mode=WAL, retried: switching a new file to WAL needs an exclusive
    lock and SQLite answers "database is locked" at once, without its busy handler, while
    another connection holds the file (worker processes starting together)."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class SuppressionList:
    """One SQLite suppression store. Use one instance per thread (sqlite3 connections
    are not shared across threads); any number of processes may open the same file."""

    def __init__(self, path: str | os.PathLike, key: bytes, *, busy_timeout: float = 5.0,
                 synchronous: str = "FULL", refresh_interval: float = 1.0, private: bool = True):
        # synchronous=FULL: a suppression we acknowledged survives a power cut (WAL with
        # NORMAL may lose the last commits); bulk work goes through one transaction.
        if len(key) != KEY_SIZE:
            raise KeyFileError(f"suppression key: got {len(key)} bytes, want {KEY_SIZE}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.path = Path(path)
        self._key = key
        self.refresh_interval = refresh_interval
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if private:
            # private=False for a second connection in a process that has one open: closing
            # any descriptor of the file drops every POSIX lock the process holds on it
            # (SQLite's too), and another process could then delete the live WAL
            _private(self.path)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        _set_wal(self._db, busy_timeout)
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self._filter = array.array("Q")   # sorted 64-bit hash prefixes
        self._recent: set[int] = set()    # prefixes added since the last merge
        self._seq = 0                     # highest seq loaded into the filter
        self._data_version = -1
        self._next_refresh = 0.0
        self.last_batch: tuple[int, list[bytes]] = (0, [])   # (seq, hashes) of add_many's last write
        self.foreign = 0          # prefixes `refresh` found that this connection did not write
        self.last_foreign: set[int] = set()   # ... since the holder last emptied it
        self._reload()

    # -- transactions

    def _write(self) -> "_Tx":
        return _Tx(self._db)

    def _bump_seq(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'seq'")
        return self._db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]

    # -- filter maintenance

    def _reload(self) -> None:
        """Rebuild the prefix filter from the whole table (start, or after removals
        elsewhere made it grow stale; stale prefixes only cost a SQLite lookup)."""
        self._db.execute("BEGIN")
        try:
            seq = self._db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]
            prefixes = sorted(_prefix(h) for (h,) in self._db.execute("SELECT hash FROM suppression"))
        finally:
            self._db.execute("COMMIT")
        self._filter = array.array("Q", prefixes)
        self._recent = set()
        self._seq = seq
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]

    def _remember(self, prefix: int) -> None:
        if self._has(prefix):
            return
        self._recent.add(prefix)
        if len(self._recent) >= _MERGE_AT:
            # Timsort merges the two sorted runs in linear time.
            self._filter = array.array("Q", sorted([*self._filter, *self._recent]))
            self._recent = set()

    def refresh(self) -> bool:
        """Pick up entries written by other processes (the CLI, another worker); True
        when some were new to the filter."""
        self._next_refresh = time.monotonic() + self.refresh_interval
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        self._data_version = version
        self._db.execute("BEGIN")
        try:
            seq = self._db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]
            rows = self._db.execute("SELECT hash FROM suppression WHERE seq > ?",
                                    (self._seq,)).fetchall()
        finally:
            self._db.execute("COMMIT")
        # one merge for the lot (an import of 300,000 entries elsewhere: not 70 merges)
        new = {p for p in (_prefix(h) for (h,) in rows) if not self._has(p)}
        if len(new) + len(self._recent) >= _MERGE_AT:
            self._filter = array.array("Q", sorted([*self._filter, *self._recent, *new]))
            self._recent = set()
        else:
            self._recent |= new
        self._seq = seq
        self.foreign += len(new)
        self.last_foreign |= new
        return bool(new)

    def learn_prefixes(self, prefixes: Iterable[int], seq: int) -> None:
        """A few prefixes another connection found (see `adopt` for many)."""
        for p in prefixes:
            self._remember(p)
        self._seq = max(self._seq, seq)

    def refresh_elsewhere(self) -> None:
        """Never `refresh` on this connection: another (the writer thread's) reads others'
        entries and hands them over (`adopt`), so `check` never runs that read."""
        self.refresh_interval = float("inf")
        self._next_refresh = float("inf")

    def snapshot(self) -> array.array:
        """Every prefix the filter holds, as one sorted array (for `adopt` elsewhere)."""
        return array.array("Q", sorted([*self._filter, *self._recent]))

    def adopt(self, prefixes: array.array, seq: int) -> None:
        """Take another connection's filter (`snapshot`, built off the event loop by the
        suppression writer thread after it picked up other processes' entries); what this
        one learned meanwhile and the snapshot lacks is kept."""
        old = self._recent
        self._filter = prefixes
        self._recent = set()
        self._recent = {p for p in old if not self._has(p)}
        self._seq = max(self._seq, seq)

    def _has(self, p: int) -> bool:
        if p in self._recent:
            return True
        f = self._filter
        i = bisect.bisect_left(f, p)
        return i < len(f) and f[i] == p

    # -- API

    def hash(self, address: str) -> str:
        """The exported form of an address's hash (for logs and tokens)."""
        return hash_text(address_hash(self._key, address))

    def add(self, address: str, scope: str = "global", reason: str = "manual",
            expires: int | None = None, note: str = "") -> Entry:
        """Suppress `address` in `scope` (replacing an entry for the same scope).
        `note` becomes the entry's source text (addresses in it are redacted)."""
        return self.add_hash(address_hash(self._key, address), scope, reason, expires, note)

    def add_hash(self, h: str | bytes, scope: str = "global", reason: str = "manual",
                 expires: int | None = None, note: str = "", created: int | None = None) -> Entry:
        """Suppress an already-hashed address (from an export, a token, another node)."""
        raw = parse_hash(h)
        row = self._row(raw, scope, reason, note, created, expires)
        with self._write():
            seq = self._bump_seq()
            self._db.execute("INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (*row, seq))
        self._after_own_write(seq, [raw])
        return Entry(hash_text(raw), *row[1:])

    def add_many(self, items: Iterable[tuple[str, str, str, int | None, str]]) -> int:
        """Add (address or exported hash, scope, reason, expires, note) entries in ONE transaction (one
        fsync): the daemon batches what bounces and complaints produce in a burst.
        Bad items (not an address, bad scope) are skipped and logged; returns how many
        were written."""
        rows = []
        for address, scope, reason, expires, note in items:
            try:
                # an exported hash ("hmac-sha256:<hex>", no "@") stands for its address
                raw = (parse_hash(address) if address.startswith(HASH_PREFIX) and "@" not in address
                       else address_hash(self._key, address))
                rows.append(self._row(raw, scope, reason, note, None, expires))
            except ValueError as exc:
                log.warning("suppression entry skipped (%s, %s): %s", scope, reason, exc)
        if not rows:
            return 0
        with self._write():
            seq = self._bump_seq()
            self._db.executemany("INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(*row, seq) for row in rows])
        self.last_batch = (seq, [row[0] for row in rows])
        self._after_own_write(*self.last_batch)
        return len(rows)

    def learn(self, seq: int, added: Iterable[bytes]) -> None:
        """Entries another connection of this process just committed (the suppression
        writer thread, mta/feedback/suppression/writer.py) at write generation `seq`:
        visible to `check` at once, without waiting for `refresh`."""
        for raw in added:
            self._remember(_prefix(raw))
        if seq == self._seq + 1:
            self._seq = seq

    def _row(self, raw: bytes, scope: str, reason: str, note: str, created: int | None,
             expires: int | None) -> tuple:
        if expires is not None and (not isinstance(expires, int) or expires <= 0):
            raise ValueError(f"bad expiry {expires!r}: want a unix time or None")
        return (raw, check_scope(scope), check_reason(reason), _redact(note),
                int(time.time()) if created is None else int(created), expires)

    def _after_own_write(self, seq: int, added: Iterable[bytes] = ()) -> None:
        for raw in added:
            self._remember(_prefix(raw))
        if seq == self._seq + 1:
            self._seq = seq   # nobody else wrote since our last look: nothing else to load
        else:
            self.refresh()

    def remove(self, address: str, scope: str | None = None) -> int:
        """Remove the address from `scope` (from every scope when None); returns the count."""
        return self.remove_hash(address_hash(self._key, address), scope)

    def remove_hash(self, h: str | bytes, scope: str | None = None) -> int:
        raw = parse_hash(h)
        with self._write():
            seq = self._bump_seq()
            scope = None if scope is None else check_scope(scope)
            cur = self._delete(raw, scope)
            # other nodes learn removals from here (shared.py); a few bytes per removal
            self._db.execute("INSERT INTO removed VALUES (?, ?, ?)", (raw, scope, seq))
        # The prefix stays in the filter: a false positive costs one SQLite lookup.
        self._after_own_write(seq)
        return cur.rowcount

    def _delete(self, raw: bytes, scope: str | None) -> sqlite3.Cursor:
        if scope is None:
            return self._db.execute("DELETE FROM suppression WHERE hash = ?", (raw,))
        return self._db.execute("DELETE FROM suppression WHERE hash = ? AND scope = ?",
                                (raw, scope))

    # -- sharing with other nodes (mta/feedback/suppression/shared.py)

    def changes_since(self, after: tuple[int, bytes, str], limit: int) -> list[Change]:
        """This host's own changes after position `after` (a `Change.position`), in
        write order, at most `limit`: entries written here (not those applied from other
        nodes) and removals. A generation larger than `limit` (an import) is read in parts."""
        seq, h, scope = after
        self._db.execute("BEGIN")    # one snapshot for both: no generation slips between
        try:
            rows = self._db.execute(
                "SELECT seq, hash, scope, reason, created, expires FROM suppression"
                " WHERE (seq, hash, scope) > (?, ?, ?) AND seq NOT IN (SELECT seq FROM"
                " shared_in) ORDER BY seq, hash, scope LIMIT ?", (seq, h, scope, limit)).fetchall()
            gone = self._db.execute(
                "SELECT seq, hash, scope FROM removed WHERE (seq, hash, coalesce(scope, '')) >"
                " (?, ?, ?) ORDER BY seq LIMIT ?", (seq, h, scope, limit)).fetchall()
        finally:
            self._db.execute("COMMIT")
        changes = [Change(s, raw, sc, reason=r, created=c, expires=x)
                   for s, raw, sc, r, c, x in rows]
        changes += [Change(s, raw, sc, removal=True) for s, raw, sc in gone]
        changes.sort(key=lambda c: c.position)
        return changes[:limit]

    def apply_shared(self, changes: list[Change], cursor: tuple[str, str]
                     ) -> tuple[int, list[bytes]]:
        """Other nodes' changes, in one transaction with the reader's cursor (name, value):
        a restart neither applies them twice nor skips any. An entry replaces one of the
        same hash and scope only when it suppresses longer (no expiry beats any), so
        nodes that exchange entries agree whatever order they arrive in. Returns the write
        generation and the hashes added (for `learn`); (0, []) when there was nothing to
        apply (only the cursor moved)."""
        if not changes:
            self.set_cursor(*cursor)
            return 0, []
        added: list[bytes] = []
        with self._write():
            seq = self._bump_seq()
            self._db.execute("INSERT INTO shared_in VALUES (?)", (seq,))
            for c in changes:
                if c.removal:
                    self._delete(c.hash, c.scope)
                    continue
                self._db.execute(
                    "INSERT INTO suppression VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (hash, scope) DO UPDATE SET reason = excluded.reason,"
                    " source = excluded.source, created = excluded.created,"
                    " expires = excluded.expires, seq = excluded.seq"
                    " WHERE suppression.expires IS NOT NULL AND (excluded.expires IS NULL"
                    " OR excluded.expires > suppression.expires)",
                    (c.hash, c.scope, c.reason, _redact(c.source), c.created, c.expires, seq))
                added.append(c.hash)
            self._db.execute("INSERT OR REPLACE INTO cursor VALUES (?, ?)", cursor)
        self._after_own_write(seq, added)
        return seq, added

    def cursor(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM cursor WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_cursor(self, name: str, value: str, forget_before: int = 0) -> None:
        """Save a cursor; with `forget_before`, also drop the removals and applied
        generations below that generation (published: nobody reads them again)."""
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO cursor VALUES (?, ?)", (name, value))
            if forget_before:
                self._db.execute("DELETE FROM removed WHERE seq < ?", (forget_before,))
                self._db.execute("DELETE FROM shared_in WHERE seq < ?", (forget_before,))

    def generation(self) -> int:
        """The store's current write generation (every process's writes counted)."""
        return self._db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]

    def check(self, address: str, tenant: str | None = None,
              sender_domain: str | None = None) -> Entry | None:
        """The entry that suppresses `address` for this tenant/sender domain, or None.
        Matches global, tenant:<tenant> and domain:<sender_domain>; expired entries
        do not count. Order of preference when several match: global, tenant, domain."""
        if self.empty():
            return None       # an empty list matches nothing: skip normalising and the HMAC
        return self.check_hash(address_hash(self._key, address), tenant, sender_domain)

    def empty(self) -> bool:
        """No entry at all (cheap: the in-memory filter, refreshed as `check` does)."""
        if time.monotonic() >= self._next_refresh:
            self.refresh()
        return not self._filter and not self._recent

    def check_hash(self, h: str | bytes, tenant: str | None = None,
                   sender_domain: str | None = None) -> Entry | None:
        raw = h if isinstance(h, bytes) and len(h) == 32 else parse_hash(h)
        if time.monotonic() >= self._next_refresh:
            self.refresh()
        if not self._has(_prefix(raw)):
            return None
        scopes = ["global"]
        if tenant:
            scopes.append("tenant:" + tenant)
        if sender_domain:
            scopes.append("domain:" + normalise_domain(sender_domain))
        row = self._db.execute(
            "SELECT scope, reason, source, created, expires FROM suppression"
            f" WHERE hash = ? AND scope IN ({','.join('?' * len(scopes))})"
            " AND (expires IS NULL OR expires > ?)"
            " ORDER BY CASE WHEN scope = 'global' THEN 0 WHEN scope LIKE 'tenant:%' THEN 1 ELSE 2 END"
            " LIMIT 1", (raw, *scopes, int(time.time()))).fetchone()
        return Entry(hash_text(raw), *row) if row else None

    def export(self, scope: str | None = None) -> Iterator[Entry]:
        """Every entry (hashes only), optionally of one scope, expired ones included."""
        sql = "SELECT hash, scope, reason, source, created, expires FROM suppression"
        args: tuple = ()
        if scope is not None:
            sql, args = sql + " WHERE scope = ?", (check_scope(scope),)
        for h, *rest in self._db.execute(sql + " ORDER BY hash, scope", args):
            yield Entry(hash_text(h), *rest)

    def import_lines(self, lines: Iterable[str], scope: str = "global", reason: str = "import",
                     expires: int | None = None, note: str = "import") -> dict[str, int]:
        """Add one entry per line, in one transaction. A line is an address, an exported
        hash ("hmac-sha256:<hex>"), or a JSON line from `export` (restored as it was:
        its own scope, reason, source, created and expires). Blank lines and lines
        starting with '#' are skipped. Returns counts: addresses, hashes, entries, invalid.
        Invalid lines are counted, never logged (they may be addresses)."""
        import orjson
        counts = {"addresses": 0, "hashes": 0, "entries": 0, "invalid": 0}
        rows = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("{"):
                    e = orjson.loads(line)
                    rows.append(self._row(parse_hash(e["hash"]), e["scope"], e["reason"],
                                          e.get("source", ""), e.get("created"), e.get("expires")))
                    counts["entries"] += 1
                elif line.lower().startswith(HASH_PREFIX):
                    rows.append(self._row(parse_hash(line), scope, reason, note, None, expires))
                    counts["hashes"] += 1
                else:
                    rows.append(self._row(address_hash(self._key, line), scope, reason, note,
                                          None, expires))
                    counts["addresses"] += 1
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                counts["invalid"] += 1
        if rows:
            with self._write():
                seq = self._bump_seq()
                self._db.executemany("INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     [(*r, seq) for r in rows])
            self._after_own_write(seq, (r[0] for r in rows))
        log.info("suppression import: %s", counts)
        return counts

    def purge_expired(self, now: int | None = None) -> int:
        """Delete entries whose expiry has passed; returns how many."""
        with self._write():
            seq = self._bump_seq()
            cur = self._db.execute("DELETE FROM suppression WHERE expires IS NOT NULL AND expires <= ?",
                                   (int(time.time()) if now is None else now,))
        self._after_own_write(seq)
        return cur.rowcount

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM suppression").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SuppressionList":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): take the write lock up front so a
    concurrent writer waits on busy_timeout instead of failing mid-transaction."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
