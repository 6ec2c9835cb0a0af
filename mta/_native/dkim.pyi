"""Type stub for mta._native.dkim (native/dkim/dkim.pyx): DKIM signing on native threads."""
from collections.abc import Sequence
from typing import Final

from typing_extensions import Buffer

ERRORS: Final[dict[int, str]]  # enum dkim_err -> reason ("no-separator", "no-from", ...)

class MessageError(ValueError):
    code: int  # enum dkim_err
    reason: str  # ERRORS[code]
    detail: str  # one line, safe to log
    def __init__(self, code: int, detail: str) -> None: ...

class KeyLoadError(ValueError):
    reason: str  # "public" | "garbage" | "encrypted" | "unsupported"
    def __init__(self, reason: str, text: str) -> None: ...

class Key:
    def __init__(self, data: Buffer, kind: str = "pem") -> None: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def bits(self) -> int: ...
    def public_key(self) -> bytes: ...

class Spec:
    key: Key
    def __init__(
        self,
        key: Key,
        tags: bytes,
        headers: tuple[bytes, ...],
        oversign: Sequence[bytes] = (),
        relaxed_header: bool = True,
        relaxed_body: bool = True,
        expire_after: int = -1,
    ) -> None: ...

class Pool:
    def __init__(self, threads: int) -> None: ...
    @property
    def threads(self) -> int: ...
    def close(self) -> None: ...
    def sign_batch(
        self,
        messages: list[Buffer],
        specs: list[Sequence[Spec]],
        now: int,
        signed_messages: bool = False,
    ) -> list[bytes | MessageError]: ...

def keygen(algorithm: str, bits: int = 2048) -> bytes: ...
def canon_body(body: Buffer, relaxed: bool) -> bytes: ...
def canon_field(field: Buffer, relaxed: bool) -> bytes: ...
def repair(message: Buffer) -> bytes: ...
def body_hash(message: Buffer, relaxed: bool) -> bytes: ...
def header_input(message: Buffer, relaxed_header: bool, names: list[bytes], field: bytes) -> bytes: ...
def sign_prepared(key: Key, message: Buffer, relaxed_header: bool, names: list[bytes],
                  field: bytes) -> bytes: ...
