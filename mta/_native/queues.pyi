"""Type stub for mta._native.queues (native/queues/queues.pyx)."""
from typing import Any

class QueuedMessage:
    id: bytes
    queue: Any
    rcpts: tuple[int, ...]
    attempts: int
    due: float
    flags: int
    def __init__(self, msg_id: bytes, queue: Any, rcpts: tuple[int, ...]) -> None: ...
    @property
    def received(self) -> float: ...
    @property
    def id_text(self) -> str: ...
