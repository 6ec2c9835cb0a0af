"""QueuedMessage: what a waiting message keeps in RAM (no I/O here).

One per (message, recipient domain): a message to three domains waits in
three scheduled queues. Everything else (sender, addresses, DSN parameters,
content) stays in the spool and is read when a delivery attempt starts.
The record itself is native (native/queues/queues.pyx): six fields and no
cyclic-GC header, so millions of queued messages neither cost a Python
object each nor slow down the garbage collector (bench/queue_scale.py).

Fields: id (16-byte spool id, time-ordered), queue (its ScheduledQueue),
rcpts (recipient indexes still to deliver), attempts (failed temporarily so
far), due (wall time of the next attempt, 0 while ready or in flight), flags
(DELAY_DSN_SENT).

InsertReason says why a message went into a scheduled queue; it ends up in
the log and in the scheduler's counters.
"""
import enum

from mta._native.queues import QueuedMessage

DELAY_DSN_SENT = 1   # flags bit: the one delay DSN for this entry went out


class InsertReason(str, enum.Enum):
    RECEIVED = "received"               # new message from reception
    RECOVERED = "recovered"             # found in the spool at start
    TRANSIENT_FAILURE = "transient"     # a 4xx or a connection problem; backing off
    READY_FULL = "ready_full"           # its ready queue was full: waits in the queue's backlog
    SUSPENDED = "suspended"             # its queue is suspended by the operator
    WARMUP = "warmup"                   # every source of its pool is at its warm-up cap


__all__ = ["DELAY_DSN_SENT", "InsertReason", "QueuedMessage"]
