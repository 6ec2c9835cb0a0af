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

import orjson

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1      # ~16 MiB, ~50 ms per check
_MAX_N, _MAX_R, _MAX_P = 1 << 20, 32, 16           # what a stored entry may ask for
_DKLEN = 32
MAX_USER = 256          # decoded user name bytes
MAX_PASSWORD = 1024     # decoded password bytes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,255}\Z")
_DOMAIN = re.compile(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)\Z")
_POOL_THREADS = 2


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


@dataclass(frozen=True, slots=True)
class User:
    name: str
    hash: str
    tenant: str | None
    domains: tuple[str, ...]

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
                if not isinstance(e.get("hash"), str) or not (tenant is None or isinstance(tenant, str)):
                    raise AuthError(f"user {name!r}: malformed entry")
                users[check_name(name)] = User(name, e["hash"], tenant,
                                               check_domains(list(e.get("domains") or [])))
        except orjson.JSONDecodeError as exc:
            raise AuthError(f"{path}: not JSON: {exc}") from None
        except (AuthError, AttributeError, TypeError) as exc:
            raise AuthError(f"{path}: {exc}") from None
        return cls(path, users)

    def save(self) -> None:
        doc = {"version": 1, "users": {u.name: {"hash": u.hash, "tenant": u.tenant,
                                                "domains": list(u.domains)}
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
        user = User(check_name(name), hash_password(password), tenant or None, check_domains(domains))
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
        self._failures: dict[str, list[float]] = {}   # ip -> [count, window end]
        self.succeeded = 0
        self.failed = 0

    def reload(self) -> str | None:
        """Read the file again (SIGHUP); the problem when it cannot be used (kept as was)."""
        try:
            self.users = UserFile.load(self.path).users
        except AuthError as exc:
            return str(exc)
        return None

    def locked(self, ip: str, now: float) -> bool:
        entry = self._failures.get(ip)
        if entry is None:
            return False
        if now >= entry[1]:
            del self._failures[ip]
            return False
        return entry[0] >= self.max_failures

    def _fail(self, ip: str, now: float) -> None:
        self.failed += 1
        entry = self._failures.get(ip)
        if entry is None or now >= entry[1]:
            if len(self._failures) >= 100_000:   # bounded: forget the oldest entries
                for old in list(self._failures)[:10_000]:
                    del self._failures[old]
            self._failures[ip] = [1, now + self.lockout]
        else:
            entry[0] += 1
            entry[1] = now + self.lockout   # each failure extends the window

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
        self._failures.pop(ip, None)
        self.succeeded += 1
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
        print(f"{u.name}\ttenant={u.tenant or '-'}\tdomains={','.join(u.domains)}")
    return 0
