"""Type stub for mta._native.wire (native/wire/wire.pyx)."""
from typing import Callable, Final

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
    # (address, sender, relay_allowed) -> None | True | (reply name, reply line)
    rcpt_check: Callable[[str, str, bool], None | bool | tuple[str, bytes]] | None
    # (sender) -> None | (reply name, reply line): refuse MAIL while we cannot take mail
    mail_check: Callable[[str], None | tuple[str, bytes]] | None
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
    @property
    def held(self) -> int: ...
    def greeting(self) -> bytes: ...
    def feed(self, data: bytes) -> tuple[bytes, int]: ...
    def transaction(self) -> Transaction: ...
    def resume(self, reply: bytes) -> tuple[bytes, int]: ...
    def close_with(self, name: str) -> bytes: ...

# -- the SMTP client core (native/wire/client.pxi) --------------------------------

EV_READY: Final[int]
EV_STARTTLS: Final[int]
EV_DONE: Final[int]
EV_FAILED: Final[int]
EV_CLOSED: Final[int]
CLIENT_STATES: dict[int, str]
CLIENT_PHASES: dict[int, tuple[str, str | None]]
PHASE_LOCAL: Final[str]
CLIENT_LOCAL_REPLIES: dict[str, tuple[int, str, str]]

_Reply = tuple[int, str, str]
_Buffer = bytes | bytearray | memoryview

def dot_stuff(content: _Buffer) -> bytes: ...
def content_needs_8bit(content: _Buffer) -> bool: ...

class ClientCore:
    ehlo_name: str
    state: int
    esmtp: bool
    tls_active: bool
    capabilities: dict[str, str]
    size_limit: int
    messages_sent: int
    replies_seen: int
    # (reply or None, phase, permanent, reason, recipient replies so far or None)
    failure: tuple[_Reply | None, str, bool, str, list[_Reply | None] | None] | None
    def __init__(self, ehlo_name: str, tls: str = ...) -> None: ...
    @property
    def phase(self) -> str: ...
    @property
    def timeout_name(self) -> str | None: ...
    @property
    def reusable(self) -> bool: ...
    @property
    def closing(self) -> bool: ...
    def feed(self, data: _Buffer) -> tuple[bytes, int]: ...
    def start(self, mail_from: str, rcpts: list[tuple[str, str | None, str | None]],
              content: _Buffer, *, body_8bit: bool = ..., smtputf8: bool = ...,
              ret: str | None = ..., envid: str | None = ...) -> tuple[bytes, int]: ...
    def body_sent(self) -> None: ...
    def tls_started(self) -> bytes: ...
    def quit(self) -> bytes: ...
    def lost(self, reason: str) -> bool: ...
    def take_result(self) -> tuple[list[_Reply], _Reply | None, str] | None: ...
