"""Type stub for mta._native.wire (native/wire/wire.pyx)."""
from typing import Final

EV_NONE: Final[int]
EV_MESSAGE: Final[int]
EV_CLOSE: Final[int]
STATES: dict[int, str]

class InternalError(Exception): ...

class ServerSettings:
    hostname: str
    bare_mode: int
    max_message_size: int
    max_line_length: int
    max_recipients: int
    max_errors: int
    max_junk: int
    max_messages: int
    def __init__(self, hostname: str, replies: dict[str, bytes], *, bare_newline: str = ...,
                 max_message_size: int = ..., max_line_length: int = ..., max_recipients: int = ...,
                 max_errors: int = ..., max_junk_commands: int = ...,
                 max_messages_per_session: int = ...) -> None: ...

class Transaction:
    helo: str
    esmtp: bool
    mail_from: str
    size_hint: int
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    rcpts: list[tuple[str, str | None, str | None]]
    data: bytearray
    chunked: bool

class ServerCore:
    state: int
    rejections: list[tuple[str, str, list[str]]]
    def __init__(self, settings: ServerSettings, relay_allowed: bool) -> None: ...
    @property
    def in_content(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def greeting(self) -> bytes: ...
    def feed(self, data: bytes) -> tuple[bytes, int]: ...
    def transaction(self) -> Transaction: ...
    def resume(self, reply: bytes) -> tuple[bytes, int]: ...
    def close_with(self, name: str) -> bytes: ...
