"""SMTP AUTH users: the credentials file, scrypt hashes, and the verifier listeners use.

Where it sits: a listener with `auth_users` builds one Authenticator (listener.py); the
session (session.py) hands it each finished AUTH exchange (the native core collects the
SASL lines, RFC 4954) and gets back the user or the refusal reply name. `mta user
add|remove|list|passwd` (user_cli at the end) edits the file.

The file: JSON, mode 0600 (load() refuses a file group or others may read or write),
written whole to a temporary file and renamed. {"version": 1, "users": {name: {"hash":
"scrypt$N$r$p$salt$key" (base64 salt and key; the cost parameters stored per entry, so
older entries keep verifying after the default changes), "tenant": str or null,
"domains": [sender domains, "*" for any]}}}.

SCRAM-SHA-256 (RFC 5802, RFC 7677): entries written by `mta user add|passwd` since it
exists also hold "scram": "scram-sha-256$ITERATIONS$salt$StoredKey$ServerKey" (base64),
what the server side of SCRAM needs (it never sees the password). Entries without it
(older files) still load and verify PLAIN and LOGIN; SCRAM fails for them until their
password is set again, and a listener offers SCRAM-SHA-256 in EHLO only when every user
of its file has the keys (it accepts the mechanism either way). The exchange
(ScramServer): client-first (gs2 header "n,," or "y,,", no channel binding, an authzid
only equal to the user), server-first (our nonce, the salt, the iterations), client-final
(the proof), then the server signature in a 334 challenge answered by an empty line
(RFC 4954 has no success data in 235), then 235. An unknown user gets a salt derived from
a per-process secret and fails at the proof, like a wrong password. The stored keys are
derived from the SASLprep form of the password (RFC 4013, `saslprep`), as clients derive
theirs; a password SASLprep refuses (control characters, for one) gets no SCRAM keys.

Each user is bound to a tenant (an authenticated message's envelope tenant, whatever
its X-Tenant header says) and to the domains its MAIL FROM may use (others: 550 5.7.1;
the null sender is allowed: bounces spoof nobody).

Trust: the SASL responses are network bytes: base64 only, decoded sizes bounded, a
user name checked before it is looked up. Verification runs scrypt (deliberately slow
and memory hungry) in a small shared thread pool, at most `concurrency` at once per
listener, never on the event loop; an unknown user costs the same scrypt as a known
one, hashes are compared in constant time. Failures are counted per client IP: after
`max_failures` within the lockout window the IP gets 454 4.7.0 to every AUTH, without a
password check, until the lockout ends (the native core also counts every failure
towards the listener's max_errors).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from mta.ingest.peer_table import LocalPeerCounts

if TYPE_CHECKING:
    from mta.ingest.peer_table import PeerCounts

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1      # ~16 MiB, ~50 ms per check
_MAX_N, _MAX_R, _MAX_P = 1 << 20, 32, 16           # what a stored entry may ask for
_DKLEN = 32
MAX_USER = 256          # decoded user name bytes
MAX_PASSWORD = 1024     # decoded password bytes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,255}\Z")
_DOMAIN = re.compile(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)\Z")
_POOL_THREADS = 2
SCRAM_ITERATIONS = 32768         # PBKDF2-HMAC-SHA256 rounds in new entries (RFC 7677: >= 4096)
_SCRAM_MIN_I, _SCRAM_MAX_I = 4096, 1 << 22
MAX_SCRAM_MESSAGE = 2048         # decoded client-first / client-final bytes
SCRAM = b"SCRAM-SHA-256"


class AuthError(ValueError):
    """A credentials file or an entry that cannot be used; the message names it."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_password(password: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=256 * n * r + (1 << 20))
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """True when `password` matches the stored `encoded` hash (constant-time compare)."""
    try:
        scheme, n_s, r_s, p_s, salt_s, key_s = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, key = base64.b64decode(salt_s, validate=True), base64.b64decode(key_s, validate=True)
    except (ValueError, binascii.Error):
        return False
    if scheme != "scrypt" or not (2 <= n <= _MAX_N and n & (n - 1) == 0) \
            or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P or not key:
        return False
    got = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=len(key),
                         maxmem=256 * n * r + (1 << 20))
    return hmac.compare_digest(got, key)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep of a stored string (unassigned code points refused); ValueError
    when it is refused."""
    import stringprep
    import unicodedata
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text
                     if not stringprep.in_table_b1(c))
    out = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
                  stringprep.in_table_a1)
    for c in out:
        if any(t(c) for t in prohibited):
            raise ValueError(f"SASLprep refuses the character U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in out):      # RFC 3454 6: bidirectional text
        if any(stringprep.in_table_d2(c) for c in out) or not (
                stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("SASLprep refuses this mix of right-to-left and left-to-right text")
    return out


def scram_keys(password: bytes, salt: bytes | None = None,
               iterations: int = SCRAM_ITERATIONS) -> str:
    """The stored SCRAM-SHA-256 entry for `password` (RFC 5802 3)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    return f"scram-sha-256${iterations}${_b64(salt)}${_b64(stored)}${_b64(server)}"


def parse_scram(entry: str) -> tuple[int, bytes, bytes, bytes]:
    """(iterations, salt, StoredKey, ServerKey) of a stored entry; AuthError when malformed."""
    try:
        scheme, i_s, salt_s, stored_s, server_s = entry.split("$")
        i = int(i_s)
        salt, stored, server = (base64.b64decode(x, validate=True) for x in (salt_s, stored_s, server_s))
    except (ValueError, binascii.Error):
        raise AuthError("malformed scram entry") from None
    if scheme != "scram-sha-256" or not _SCRAM_MIN_I <= i <= _SCRAM_MAX_I or not salt \
            or len(stored) != 32 or len(server) != 32:
        raise AuthError("malformed scram entry")
    return i, salt, stored, server


@dataclass(frozen=True, slots=True)
class User:
    name: str
    hash: str
    tenant: str | None
    domains: tuple[str, ...]
    scram: str | None = None      # "scram-sha-256$i$salt$StoredKey$ServerKey" (None: older entry)

    def sender_allowed(self, sender: str) -> bool:
        """MAIL FROM `sender` may be used by this user (the null sender always)."""
        if not sender or "*" in self.domains:
            return True
        return sender.rpartition("@")[2].lower() in self.domains


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AuthError(f"user name {name!r}: letters, digits and . _ @ + = - only "
                        "(starting with a letter or digit), at most 256")
    return name


def check_domains(domains: list[str]) -> tuple[str, ...]:
    out = []
    for d in domains:
        d = d.strip().lower().rstrip(".")
        if not _DOMAIN.match(d):
            raise AuthError(f"sender domain {d!r} is not a domain name (or *)")
        out.append(d)
    if not out:
        raise AuthError("a user needs at least one sender domain (or * for any)")
    return tuple(out)


class UserFile:
    """The credentials file, read whole (a few thousand users at most)."""

    def __init__(self, path: Path | str, users: dict[str, User] | None = None):
        self.path = Path(path)
        self.users: dict[str, User] = users or {}

    @classmethod
    def load(cls, path: Path | str, missing_ok: bool = False) -> UserFile:
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if missing_ok:
                return cls(path)
            raise AuthError(f"{path}: no such credentials file (create it with `mta user add`)") from None
        except OSError as exc:
            raise AuthError(f"{path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                raise AuthError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}; a credentials "
                                "file must be readable by its owner only (chmod 600)")
            if st.st_size > 64 << 20:
                raise AuthError(f"{path}: larger than 64 MiB")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        finally:
            os.close(fd)
        try:
            doc = orjson.loads(raw) if raw.strip() else {"version": 1, "users": {}}
            if not isinstance(doc, dict) or doc.get("version") != 1 \
                    or not isinstance(doc.get("users"), dict):
                raise AuthError("not a version 1 credentials file")
            users = {}
            for name, e in doc["users"].items():
                tenant = e.get("tenant")
                scram = e.get("scram")
                if not isinstance(e.get("hash"), str) or not (tenant is None or isinstance(tenant, str)) \
                        or not (scram is None or isinstance(scram, str)):
                    raise AuthError(f"user {name!r}: malformed entry")
                if scram is not None:
                    try:
                        parse_scram(scram)
                    except AuthError:
                        raise AuthError(f"user {name!r}: malformed scram entry") from None
                users[check_name(name)] = User(name, e["hash"], tenant,
                                               check_domains(list(e.get("domains") or [])), scram)
        except orjson.JSONDecodeError as exc:
            raise AuthError(f"{path}: not JSON: {exc}") from None
        except (AuthError, AttributeError, TypeError) as exc:
            raise AuthError(f"{path}: {exc}") from None
        return cls(path, users)

    def save(self) -> None:
        doc = {"version": 1, "users": {u.name: {"hash": u.hash, "tenant": u.tenant,
                                                "domains": list(u.domains),
                                                **({"scram": u.scram} if u.scram else {})}
                                       for u in sorted(self.users.values(), key=lambda u: u.name)}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def set(self, name: str, password: bytes, tenant: str | None, domains: list[str]) -> User:
        if not password or len(password) > MAX_PASSWORD:
            raise AuthError(f"a password must have 1 to {MAX_PASSWORD} bytes")
        try:
            scram = scram_keys(saslprep(password.decode("utf-8")).encode("utf-8"))
        except (UnicodeDecodeError, ValueError):   # a SCRAM client could not use it either
            scram = None
        user = User(check_name(name), hash_password(password), tenant or None, check_domains(domains),
                    scram)
        self.users[name] = user
        return user


# -- verification at AUTH ----------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_DUMMY_HASH: str | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="mta-auth")
    return _pool


def _verify(password: bytes, stored: str | None) -> bool:
    """In a pool thread: an unknown user (None) costs the same scrypt as a known one."""
    global _DUMMY_HASH
    if stored is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hash_password(b"\0")
        verify_password(password, _DUMMY_HASH)
        return False
    return verify_password(password, stored)


def decode_sasl(mech: bytes, responses: list[bytes]) -> tuple[str, bytes] | None:
    """(user name, password) from the client's base64 responses; None when malformed."""
    try:
        parts = [b"" if r == b"=" else base64.b64decode(r, validate=True) for r in responses]
    except (binascii.Error, ValueError):
        return None
    if mech == b"PLAIN":
        fields = parts[0].split(b"\0") if len(parts) == 1 else []
        if len(fields) != 3:
            return None
        authzid, user, password = fields
        if authzid and authzid != user:   # no proxy authorisation
            return None
    elif mech == b"LOGIN" and len(parts) == 2:
        user, password = parts
    else:
        return None
    if not user or len(user) > MAX_USER or len(password) > MAX_PASSWORD:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def _saslname(raw: bytes) -> str | None:
    """RFC 5802 5.1 saslname: "=2C" is ",", "=3D" is "=", any other "=" is an error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "=":
            esc = text[i + 1:i + 3]
            if esc not in ("2C", "3D"):
                return None
            out.append("," if esc == "2C" else "=")
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _b64_response(line: bytes, limit: int = MAX_SCRAM_MESSAGE) -> bytes | None:
    if line == b"=":
        return b""
    if len(line) > (limit + 2) // 3 * 4:
        return None
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


class ScramServer:
    """The server side of one SCRAM-SHA-256 exchange (RFC 5802 5, RFC 7677)."""

    __slots__ = ("user", "keys", "gs2", "first_bare", "server_first", "nonce", "signature")

    def __init__(self):
        self.user: User | None = None
        self.keys: tuple[int, bytes, bytes, bytes] | None = None
        self.gs2 = b""
        self.first_bare = b""
        self.server_first = b""
        self.nonce = b""
        self.signature = b""

    def first(self, client_first: bytes, users: dict[str, User], secret: bytes,
              snonce: bytes | None = None) -> bytes | None:
        """server-first-message for `client_first`; None when malformed. `snonce`: our
        part of the nonce (default 24 random base64 characters; tests pass RFC vectors)."""
        if len(client_first) > MAX_SCRAM_MESSAGE:
            return None
        parts = client_first.split(b",", 2)
        if len(parts) != 3 or parts[0] not in (b"n", b"y"):
            return None     # "p=...": channel binding is not offered
        authzid = parts[1]
        bare = parts[2]
        fields = bare.split(b",")
        if len(fields) < 2 or not fields[0].startswith(b"n=") or not fields[1].startswith(b"r="):
            return None     # "m=" (a mandatory extension) lands here too
        name = _saslname(fields[0][2:])
        cnonce = fields[1][2:]
        if not name or len(name.encode()) > MAX_USER or not cnonce \
                or not all(0x21 <= b <= 0x7E and b != 0x2C for b in cnonce):
            return None
        if authzid:
            if not authzid.startswith(b"a=") or _saslname(authzid[2:]) != name:
                return None   # no proxy authorisation
        user = users.get(name)
        keys = None
        if user is not None and user.scram is not None:
            try:
                keys = parse_scram(user.scram)
            except AuthError:
                keys = None
        if keys is None:    # unknown (or no SCRAM keys): a stable fake salt, fails at the proof
            user = None
            fake = hmac.digest(secret, name.encode("utf-8"), "sha256")
            keys = (SCRAM_ITERATIONS, fake[:16], bytes(32), bytes(32))
        self.user, self.keys = user, keys
        salt_i = keys
        self.gs2 = parts[0] + b"," + authzid + b","
        self.first_bare = bare
        self.nonce = cnonce + (snonce or base64.b64encode(secrets.token_bytes(18)))
        self.server_first = (b"r=" + self.nonce + b",s=" + base64.b64encode(salt_i[1])
                             + b",i=" + str(salt_i[0]).encode())
        return self.server_first

    def final(self, client_final: bytes) -> tuple[User | None, bytes | None]:
        """(user, server-final-message) when the proof holds; (None, None) when it does not
        or the message is malformed."""
        if len(client_final) > MAX_SCRAM_MESSAGE or not self.server_first:
            return None, None
        head, sep, proof_b64 = client_final.rpartition(b",p=")
        fields = head.split(b",")
        if not sep or len(fields) < 2 or not fields[0].startswith(b"c=") \
                or not fields[1].startswith(b"r="):
            return None, None
        try:
            binding = base64.b64decode(fields[0][2:], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (binascii.Error, ValueError):
            return None, None
        if not hmac.compare_digest(binding, self.gs2) or not hmac.compare_digest(fields[1][2:], self.nonce) \
                or len(proof) != 32:
            return None, None
        auth_message = self.first_bare + b"," + self.server_first + b"," + head
        if self.keys is None:
            return None, None
        _, _, stored, server = self.keys
        signature = hmac.digest(stored, auth_message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored) or self.user is None:
            return None, None
        self.signature = hmac.digest(server, auth_message, "sha256")
        return self.user, b"v=" + base64.b64encode(self.signature)


class Authenticator:
    """One listener's AUTH verifier: its users, failure counts per IP, a concurrency cap."""

    def __init__(self, path: Path, concurrency: int = 4, max_failures: int = 5,
                 lockout: float = 60.0):
        self.path = path
        self.users = UserFile.load(path).users
        self.concurrency = concurrency
        self.max_failures = max_failures
        self.lockout = lockout
        self._sem: asyncio.Semaphore | None = None
        # failures per client IP: the listener's counts (the node's with several workers)
        self.counts: PeerCounts | LocalPeerCounts = LocalPeerCounts()
        self.succeeded = 0
        self.failed = 0
        self._secret = secrets.token_bytes(32)   # fake SCRAM salts of unknown users

    @property
    def scram_for_all(self) -> bool:
        """Every user has SCRAM keys: the listener may offer SCRAM-SHA-256 in EHLO."""
        return bool(self.users) and all(u.scram for u in self.users.values())

    def scram(self, responses: list[bytes], ip: str,
              exchange: ScramServer | None) -> tuple[str, object]:
        """One SCRAM-SHA-256 step (the responses so far, from the native core): ("challenge",
        base64 bytes, then call again with one more response), ("ok", User) or ("fail",
        the refusal reply name). Cheap (HMACs): runs on the loop."""
        now = time.monotonic()
        step = len(responses)
        if step == 1 and self.locked(ip, now):
            self._fail(ip, now)
            return "fail", "AUTH_TEMP"
        if exchange is None or step > 3:
            return "fail", "AUTH_BAD_RESPONSE"
        raw = _b64_response(responses[-1])
        if raw is None:
            self._fail(ip, now)
            return "fail", "AUTH_BAD_RESPONSE"
        if step == 1:
            server_first = exchange.first(raw, self.users, self._secret)
            if server_first is None:
                self._fail(ip, now)
                return "fail", "AUTH_BAD_RESPONSE"
            return "challenge", base64.b64encode(server_first)
        if step == 2:
            user, server_final = exchange.final(raw)
            if user is None or server_final is None:
                self._fail(ip, now)
                return "fail", "AUTH_FAILED"
            return "challenge", base64.b64encode(server_final)
        if raw or exchange.user is None or not exchange.signature:
            self._fail(ip, now)
            return "fail", "AUTH_BAD_RESPONSE"
        self._succeeded(ip)
        return "ok", exchange.user

    def reload(self) -> str | None:
        """Read the file again (SIGHUP); the problem when it cannot be used (kept as was)."""
        try:
            self.users = UserFile.load(self.path).users
        except AuthError as exc:
            return str(exc)
        return None

    def locked(self, ip: str, now: float) -> bool:
        return self.counts.locked(ip, now, self.max_failures)

    def _succeeded(self, ip: str) -> None:
        self.succeeded += 1
        self.counts.succeeded(ip)

    def _fail(self, ip: str, now: float) -> None:
        self.failed += 1
        self.counts.failed(ip, now, self.lockout)

    async def check(self, mech: bytes, responses: list[bytes], ip: str) -> tuple[User | None, str]:
        """(user, "AUTH_OK") or (None, the refusal reply name)."""
        now = time.monotonic()
        if self.locked(ip, now):
            self._fail(ip, now)
            return None, "AUTH_TEMP"
        creds = decode_sasl(mech, responses)
        if creds is None:
            self._fail(ip, now)
            return None, "AUTH_BAD_RESPONSE"
        name, password = creds
        user = self.users.get(name)
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        async with self._sem:
            ok = await asyncio.get_running_loop().run_in_executor(
                _executor(), _verify, password, user.hash if user is not None else None)
        if not ok or user is None:
            self._fail(ip, time.monotonic())
            return None, "AUTH_FAILED"
        self._succeeded(ip)
        return user, "AUTH_OK"


# -- `mta user` --------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("user", help="SMTP AUTH users: add, remove, list, passwd")
    p.add_argument("--file", required=True, help="the credentials file (a listener's auth_users)")
    usub = p.add_subparsers(dest="user_command", required=True)
    a = usub.add_parser("add", help="add a user (the password from the terminal, or stdin)")
    a.add_argument("name")
    a.add_argument("--tenant", default="", help="tenant of the user's messages")
    a.add_argument("--domain", action="append", default=[], required=True,
                   help="sender domain the user may use in MAIL FROM (repeat; * for any)")
    a.set_defaults(func=_cmd_add)
    r = usub.add_parser("remove", help="remove a user")
    r.add_argument("name")
    r.set_defaults(func=_cmd_remove)
    ls = usub.add_parser("list", help="users, their tenants and sender domains")
    ls.set_defaults(func=_cmd_list)
    pw = usub.add_parser("passwd", help="set a user's password")
    pw.add_argument("name")
    pw.set_defaults(func=_cmd_passwd)


def _read_password() -> bytes:
    import getpass
    import sys
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise SystemExit("mta user: the passwords differ")
        return first.encode("utf-8")
    line = sys.stdin.buffer.readline(MAX_PASSWORD + 2)
    return line.rstrip(b"\r\n")


def _load(args) -> UserFile:
    try:
        return UserFile.load(args.file, missing_ok=True)
    except AuthError as exc:
        raise SystemExit(f"mta user: {exc}") from None


def _cmd_add(args) -> int:
    f = _load(args)
    if args.name in f.users:
        raise SystemExit(f"mta user: {args.name} exists (use passwd)")
    try:
        f.set(args.name, _read_password(), args.tenant, args.domain)
    except AuthError as exc:
        raise SystemExit(f"mta user: {exc}") from None
    f.save()
    return 0


def _cmd_passwd(args) -> int:
    f = _load(args)
    user = f.users.get(args.name)
    if user is None:
        raise SystemExit(f"mta user: no user {args.name}")
    try:
        f.set(user.name, _read_password(), user.tenant, list(user.domains))
    except AuthError as exc:
        raise SystemExit(f"mta user: {exc}") from None
    f.save()
    return 0


def _cmd_remove(args) -> int:
    f = _load(args)
    if f.users.pop(args.name, None) is None:
        raise SystemExit(f"mta user: no user {args.name}")
    f.save()
    return 0


def _cmd_list(args) -> int:
    for u in sorted(_load(args).users.values(), key=lambda u: u.name):
        old = "" if u.scram else "\tno SCRAM keys (passwd sets them)"   # an entry from before SCRAM
        print(f"{u.name}\ttenant={u.tenant or '-'}\tdomains={','.join(u.domains)}{old}")
    return 0
