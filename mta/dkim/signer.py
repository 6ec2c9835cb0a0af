"""DKIM signing keys, signature specs and the batch signer (RFC 6376, RFC 8463).

Where it sits: between the ready queue and the SMTP client. The delivery
side collects the messages it is about to send during one loop iteration
and signs them with one Signer.sign_batch_async() call (STYLE.md section 11);
the native module (mta._native.dkim) does the work on native threads with
the GIL released.

Reads: private key files (load_key), once, at start-up or reload.
Writes: nothing.

Line ends: a message is signed as the SMTP client will send it
(native/wire/stuff.h): a bare LF becomes CRLF, a bare CR becomes a space and
a missing final CRLF is added. sign() and sign_batch() return that repaired
message with the signatures prepended, because a signature must cover
exactly the bytes that are sent; send what they return.

Diagnostics (STYLE.md section 8):
- fatal: DkimConfigError for a key file or spec that cannot be used (names
  the file and what is wrong); raised by load_key() and SignSpec().
- warning: DkimError (scope "message") for a message that cannot be signed:
  malformed header block, no From. sign() raises it; sign_batch() returns it
  in that message's slot and signs the rest. PERMANENT says which reasons
  are permanent (the message itself is bad) and which temporary.
- bug: TypeError/ValueError for wrong argument types.

RFCs: 6376 (DKIM), 8463 (ed25519-sha256), 8301 (RSA keys >= 1024 bits),
5322 (header syntax).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

from mta._native import dkim as _dkim

__all__ = ["DEFAULT_HEADERS", "OVERSIGN", "DkimConfigError", "DkimError", "SignSpec", "Signer",
           "SigningKey", "dns_record", "keygen", "load_key"]

# RFC 6376 5.4.1: fields a signer should cover when present.
DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding", "list-id",
    "list-unsubscribe", "list-unsubscribe-post", "feedback-id")
# RFC 6376 8.15: listed once more than present, so a copy added in transit breaks the signature.
OVERSIGN: tuple[str, ...] = ("from", "to", "cc", "subject", "date", "reply-to")

CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
ALGORITHMS = {"rsa-sha256": "rsa-sha256", "rsa": "rsa-sha256",
              "ed25519-sha256": "ed25519-sha256", "ed25519": "ed25519-sha256"}
MIN_RSA_BITS = 1024             # RFC 8301 3.2: signers MUST use at least 1024 bits
MAX_RSA_BITS = 8192             # the native signature buffer holds 1024 octets

# Every native reason -> permanent? The message itself is bad (perm) or the
# signer ran short (temp). test_dkim.py checks every member of ERRORS is here.
PERMANENT: dict[str, bool] = {
    "no-separator": True,       # no empty line after the header block
    "no-colon": True,           # a header line that is no field and no continuation
    "leading-fold": True,       # the header block starts with white space
    "bad-name": True,           # a field name that is not printable ASCII
    "no-from": True,            # RFC 6376 5.4: From must be signed
    "multiple-from": True,      # RFC 5322 3.6: exactly one From
    "too-many-fields": True,    # more header fields than sign.h allows
    "too-many-signed": True,    # so many copies of a signed field that h= overflows
    "no-memory": False,         # malloc failed
    "crypto": False,            # libcrypto refused to hash or sign
}

_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\Z")
_HEADER_NAME = re.compile(r"[!-9<-~]{1,60}\Z")   # ftext without ';' (it would end h=)


class DkimConfigError(Exception):
    """Fatal: a key or signing spec that cannot be used; the text names the file."""


class DkimError(Exception):
    """A message that cannot be signed (scope "message"); .permanent from PERMANENT."""

    scope = "message"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"cannot DKIM-sign: {detail}")
        self.reason = reason                    # a key of PERMANENT
        self.detail = detail                    # one line, safe to log
        self.permanent = PERMANENT.get(reason, False)   # 5xx-class (True) or retry (False)


def _message_error(e: _dkim.MessageError) -> DkimError:
    return DkimError(e.reason, e.detail)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with the d= and s= it signs for."""

    domain: str                 # d=, lowercase A-label form
    selector: str               # s=
    algorithm: str              # a=: "rsa-sha256" | "ed25519-sha256"
    key: _dkim.Key = field(repr=False)  # native handle: the EVP_PKEY, parsed once
    path: str = ""              # file it came from, for messages

    @property
    def bits(self) -> int:
        """RSA modulus size, 256 for Ed25519."""
        return self.key.bits

    @property
    def public_b64(self) -> str:
        """The p= value for the DNS record."""
        return base64.b64encode(self.key.public_key()).decode("ascii")


def _domain(domain: str, what: str) -> str:
    try:
        ace = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise DkimConfigError(f"{what}: domain {domain!r} is not a valid domain name: {e}") from None
    if not _SELECTOR.match(ace) or "." not in ace:
        raise DkimConfigError(f"{what}: domain {domain!r} is not a valid domain name")
    return ace


def _parse_key(data: bytes, path: str) -> _dkim.Key:
    if b"-----BEGIN" not in data:
        # dkimpy / Exim style Ed25519 key file: the 32-octet seed in base64.
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) == 32:
            return _dkim.Key(seed, "ed25519-seed")
    try:
        return _dkim.Key(data, "pem")
    except _dkim.KeyLoadError as e:
        raise DkimConfigError(f"DKIM key {path}: {e}") from None


def load_key(path: str, domain: str, selector: str, algorithm: str | None = None) -> SigningKey:
    """Read a private key (PKCS#8 or traditional RSA PEM, or a base64 Ed25519 seed).

    algorithm None takes it from the key; otherwise it must match the key.
    Raises DkimConfigError naming the file: unreadable, not a private key,
    RSA below 1024 bits (RFC 8301), or the wrong algorithm.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise DkimConfigError(f"DKIM key {path}: cannot read: {e.strerror or e}") from None
    key = _parse_key(data, path)
    if algorithm is not None and ALGORITHMS.get(algorithm) is None:
        raise DkimConfigError(f"DKIM key {path}: algorithm {algorithm!r}: want one of "
                              f"{sorted(set(ALGORITHMS.values()))}")
    if algorithm is not None and ALGORITHMS[algorithm] != key.algorithm:
        kind = "an RSA" if key.algorithm == "rsa-sha256" else "an Ed25519"
        raise DkimConfigError(f"DKIM key {path}: is {kind} key, "
                              f"but algorithm {ALGORITHMS[algorithm]} was asked for")
    if key.algorithm == "rsa-sha256" and not MIN_RSA_BITS <= key.bits <= MAX_RSA_BITS:
        raise DkimConfigError(f"DKIM key {path}: is a {key.bits}-bit RSA key; want "
                              f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits (RFC 8301; 2048 recommended)")
    if not _SELECTOR.match(selector):
        raise DkimConfigError(f"DKIM key {path}: selector {selector!r} is not a DNS name")
    return SigningKey(_domain(domain, f"DKIM key {path}"), selector, key.algorithm, key, path)


@dataclass(frozen=True, slots=True)
class SignSpec:
    """One DKIM-Signature to add: which key, which fields, which canonicalisation."""

    key: SigningKey                             # d=, s=, a= and the private key
    headers: tuple[str, ...] = DEFAULT_HEADERS  # h= order; each listed as often as present
    oversign: tuple[str, ...] = OVERSIGN        # listed once more than present (absent: once)
    canon: str = "relaxed/relaxed"              # c=, header/body
    expire_after: int | None = None             # x= is t= plus this many seconds; t= always
    _native: _dkim.Spec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        what = f"DKIM spec for {self.key.selector}._domainkey.{self.key.domain}"
        if self.canon not in CANONICALIZATIONS:
            raise DkimConfigError(f"{what}: canon {self.canon!r}: want one of {CANONICALIZATIONS}")
        headers = tuple(h.lower() for h in self.headers)
        oversign = tuple(h.lower() for h in self.oversign)
        for h in headers + oversign:
            if not _HEADER_NAME.match(h):
                raise DkimConfigError(f"{what}: header name {h!r} is not a field name")
        if "from" not in headers + oversign:
            raise DkimConfigError(f"{what}: headers must include 'from' (RFC 6376 5.4)")
        if len(set(headers)) != len(headers):
            raise DkimConfigError(f"{what}: a header name is listed twice (use oversign)")
        if self.expire_after is not None and not 0 < self.expire_after < 1 << 40:
            raise DkimConfigError(f"{what}: expire_after {self.expire_after}: want seconds > 0")
        # Over-signed names not in headers are signed too, after the others.
        order = headers + tuple(h for h in dict.fromkeys(oversign) if h not in headers)
        hc, bc = self.canon.split("/")
        tags = (f"v=1;a={self.key.algorithm};c={self.canon};"
                f"d={self.key.domain};s={self.key.selector};").encode("ascii")
        native = _dkim.Spec(self.key.key, tags, tuple(h.encode("ascii") for h in order),
                            tuple(h.encode("ascii") for h in oversign), hc == "relaxed",
                            bc == "relaxed",
                            -1 if self.expire_after is None else self.expire_after)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "oversign", oversign)
        object.__setattr__(self, "_native", native)


class Signer:
    """Signs messages on `threads` threads (default os.cpu_count(), the caller included).

    sign_batch_async() runs sign_batch() in a small executor: the native call
    releases the GIL for the whole batch, so the loop keeps running while the
    executor thread and the native workers sign.
    """

    def __init__(self, threads: int | None = None) -> None:
        n = threads if threads is not None else (os.cpu_count() or 1)
        self._pool = _dkim.Pool(n)
        self._executor: ThreadPoolExecutor | None = None

    @property
    def threads(self) -> int:
        return self._pool.threads

    def sign(self, message: bytes, specs: Sequence[SignSpec]) -> bytes:
        """The message (line ends repaired) with one DKIM-Signature per spec prepended.

        Raises DkimError when the message cannot be signed.
        """
        result = self.sign_batch([message], [specs])[0]
        if isinstance(result, DkimError):
            raise result
        return result

    def sign_batch(self, messages: Sequence[bytes],
                   specs_per_message: Sequence[Sequence[SignSpec]], *,
                   headers_only: bool = False) -> list[bytes | DkimError]:
        """Sign many messages at once with the GIL released; one result per message.

        Each result is the signed message (as sign() returns it) or a
        DkimError for a message that cannot be signed; never raises for one.
        headers_only=True returns just the DKIM-Signature fields, to be sent in
        front of the message as given: this saves a copy of every message, and
        is right only when the message goes out through our SMTP client, whose
        line-end repair is the one signed here (test_dkim.py checks they agree).
        """
        if len(messages) != len(specs_per_message):
            raise ValueError(f"{len(messages)} messages but {len(specs_per_message)} spec lists")
        memo: dict[int, tuple[_dkim.Spec, ...]] = {}
        natives: list[Sequence[_dkim.Spec]] = []
        for specs in specs_per_message:
            t = memo.get(id(specs))
            if t is None:
                t = memo[id(specs)] = tuple(s._native for s in specs if s._native is not None)
            natives.append(t)
        out = self._pool.sign_batch(list(messages), natives, int(time.time()), not headers_only)
        return [r if type(r) is bytes else _message_error(r) for r in out]  # type: ignore[arg-type]

    async def sign_batch_async(self, messages: Sequence[bytes],
                               specs_per_message: Sequence[Sequence[SignSpec]], *,
                               headers_only: bool = False) -> list[bytes | DkimError]:
        """sign_batch() in this signer's executor (two threads: one batch may be
        signing while the next one is handed over); the loop runs meanwhile."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(2, thread_name_prefix="dkim")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self.sign_batch, messages, specs_per_message,
                                              headers_only=headers_only))

    def close(self) -> None:
        """Stop the native workers and the executor (a running batch finishes first)."""
        self._pool.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def keygen(algorithm: str = "rsa", bits: int = 2048) -> tuple[bytes, str]:
    """A new key: (PKCS#8 private key PEM, base64 public key for p=), via libcrypto."""
    alg = ALGORITHMS.get(algorithm)
    if alg is None:
        raise ValueError(f"algorithm {algorithm!r}: want 'rsa' or 'ed25519'")
    if alg == "rsa-sha256" and not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA bits {bits}: want {MIN_RSA_BITS} to {MAX_RSA_BITS}")
    pem = _dkim.keygen(alg.split("-")[0], bits)
    public = _dkim.Key(pem).public_key()
    return pem, base64.b64encode(public).decode("ascii")


def dns_record(selector: str, domain: str, algorithm: str, public_b64: str) -> str:
    """The zone-file line to publish: long values split into 255-octet strings (RFC 6376 3.6.2.2)."""
    alg = ALGORITHMS.get(algorithm)
    if alg is None:
        raise ValueError(f"algorithm {algorithm!r}: want 'rsa' or 'ed25519'")
    value = f"v=DKIM1; k={alg.split('-')[0]}; p={public_b64}"
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    name = f"{selector}._domainkey.{_domain(domain, 'dns_record')}."
    return f"{name} IN TXT {parts}"
