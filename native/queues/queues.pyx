# cython: language_level=3
"""mta._native.queues: the compact in-RAM record of a waiting message.

QueuedMessage is a C struct with a Python face: three object references and
three C numbers, no instance dict, and -- the point -- no cyclic-GC header
(@cython.no_gc): with ten million messages queued, every full collection of
Python's cycle collector would otherwise walk ten million records that can
never be part of a cycle (a QueuedMessage refers to its id, its scheduled
queue and a tuple of ints; nothing refers back to it but containers).
See mta/model/queued.py for the field meanings.
"""
cimport cython

from cpython.bytes cimport PyBytes_AS_STRING


@cython.no_gc
@cython.freelist(64)
cdef class QueuedMessage:
    cdef public bytes id        # 16-byte spool id (time-ordered: it holds the arrival time)
    cdef public object queue    # the ScheduledQueue it waits in
    cdef public tuple rcpts     # indexes into the envelope's recipients still to deliver
    cdef public int attempts    # delivery attempts that failed temporarily
    cdef public double due      # wall time of the next attempt; 0 while ready or in flight
    cdef public int flags       # DELAY_DSN_SENT

    def __init__(self, bytes msg_id, queue, tuple rcpts):
        if len(msg_id) != 16:
            raise ValueError("a spool id is 16 bytes")
        self.id = msg_id
        self.queue = queue
        self.rcpts = rcpts
        self.attempts = 0
        self.due = 0.0
        self.flags = 0

    @property
    def received(self):
        """Unix time the id was made (its first 48 bits are milliseconds)."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(self.id)
        cdef unsigned long long ms = 0
        for i in range(6):
            ms = (ms << 8) | p[i]
        return ms / 1000.0

    @property
    def id_text(self):
        return self.id.hex()

    def __repr__(self):
        return (f"<QueuedMessage {self.id.hex()} {self.queue.name} rcpts={self.rcpts} "
                f"attempts={self.attempts}>")
