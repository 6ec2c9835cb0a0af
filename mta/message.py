"""QueuedMessage: what a waiting message keeps in RAM (no I/O here).

One per (message, recipient domain): a message to three domains waits in
three scheduled queues. Everything else (sender, addresses, DSN parameters,
content) stays in the spool and is read when a delivery attempt starts, so a
queued message costs about 200 bytes (measured by bench/queue_scale.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mta.ids import id_text, id_time

if TYPE_CHECKING:
    from mta.queues.scheduled import ScheduledQueue

DELAY_DSN_SENT = 1   # flags bit: the one delay DSN for this entry went out


class QueuedMessage:
    __slots__ = ("id", "queue", "rcpts", "attempts", "due", "flags")

    def __init__(self, msg_id: bytes, queue: ScheduledQueue, rcpts: tuple[int, ...]):
        self.id = msg_id             # 16-byte spool id (time-ordered: it holds the arrival time)
        self.queue = queue           # the scheduled queue it waits in
        self.rcpts = rcpts           # indexes into the envelope's recipients still to deliver
        self.attempts = 0            # delivery attempts that failed temporarily
        self.due = 0.0               # wall time of the next attempt; 0 while ready or in flight
        self.flags = 0               # DELAY_DSN_SENT

    @property
    def received(self) -> float:
        return id_time(self.id)

    @property
    def id_text(self) -> str:
        return id_text(self.id)

    def __repr__(self) -> str:
        return f"<QueuedMessage {self.id_text} {self.queue.name} rcpts={self.rcpts} attempts={self.attempts}>"
