# cython: language_level=3
"""mta._native.spool: the group-committing io_uring segment writer.

Where it sits: mta/spool/segments.py appends each accepted message here and
indexes it at the (segment, offset) append() returns; the listener answers
250 only when completed() reports the message's ticket with err 0, i.e. its
bytes, the segment's fdatasync and (for a new segment) the directory fsync
are done. One native thread (writer.c) syncs everything appended while the
previous sync ran as one batch, so the sync cost is shared by the batch.
append(..., lazy=True) is for records nobody waits on (tombstones, schedules):
they ride in the batch of the next plain append, or go lazy_delay seconds later.

Reads: nothing. Writes: "<directory>/%08d.seg", each created 0600 with
O_EXCL and opened by `prologue` (the spool's SEGMENT record), records
contiguous in append order after it; head[crc_offset:crc_offset+4] gets the
little-endian zlib crc32 of head[crc_offset+4:] + body before it is written.

Buffers are not copied: the head and body exports (Py_buffer) are held from
append() until completed() returns the ticket. Do not change them meanwhile
(a bytearray cannot be resized while exported, so the pointers stay valid).

Diagnostics (STYLE.md section 8):
- warning: a write or sync error completes every ticket of its batch (and of
  the records appended behind it) with a positive errno; append() then raises
  that OSError until resume(), after which records go to a fresh segment
  (after a failed fdatasync the failed segment's page cache is in an unknown
  state, so it is never written again; see writer.h).
- fatal: __init__ raises OSError (FileExistsError when first_segment exists).
- bug: RuntimeError for use after close(), ValueError for a bad crc_offset.
Short writes are finished synchronously (pwritev loop, then fdatasync), not
failed; see writer.h.
"""
import os

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t
from posix.unistd cimport read

from writer cimport (mta_rec, mta_writer, mta_writer_append, mta_writer_append_lazy,
                     mta_writer_close,
                     mta_writer_eventfd, mta_writer_flush, mta_writer_free,
                     mta_writer_get_stats, mta_writer_open, mta_writer_resume,
                     mta_writer_roll, mta_writer_stats, mta_writer_take_done)


ctypedef struct Pending:
    mta_rec rec         # first member: the C writer hands back mta_rec*, cast to Pending*
    Py_buffer head      # export of the head object, held until the ticket completes
    Py_buffer body      # export of the body object (valid when has_body)
    bint has_body       # body was not None


cdef object _oserror(int err):
    """The one place a native errno becomes an OSError (subclass picked by errno)."""
    if err < 0:
        err = -err
    return OSError(err, os.strerror(err))


cdef inline void _release(Pending *p) noexcept:
    PyBuffer_Release(&p.head)
    if p.has_body:
        PyBuffer_Release(&p.body)
    PyMem_Free(p)


cdef class SegmentWriter:
    """Appends records to spool segments; durable completions arrive via an eventfd."""

    cdef mta_writer *_w         # the C writer; kept after close() for eventfd/stats
    cdef bint _closed           # close() ran
    cdef list _leftover         # completions taken by close(), returned by completed()
    cdef readonly str directory  # where the segments are

    def __cinit__(self):
        self._w = NULL
        self._closed = False
        self._leftover = []

    def __init__(self, directory, first_segment, segment_bytes=64 << 20, max_batch=1024,
                 const unsigned char[::1] prologue=b"", double lazy_delay=0.0):
        cdef mta_writer *w = NULL
        cdef int rc
        if self._w != NULL:
            raise RuntimeError("SegmentWriter already initialised")
        if not 0 <= first_segment < 1 << 63:
            raise ValueError(f"first_segment {first_segment}: want 0 <= n < 2**63")
        if not 0 < segment_bytes < 1 << 63:
            raise ValueError(f"segment_bytes {segment_bytes}: want 0 < n < 2**63")
        if not 0 < max_batch <= 1 << 20:
            raise ValueError(f"max_batch {max_batch}: want 0 < n <= 2**20")
        if not 0.0 <= lazy_delay <= 60.0:
            raise ValueError(f"lazy_delay {lazy_delay}: want 0 <= seconds <= 60")
        cdef uint64_t c_lazy = <uint64_t>(lazy_delay * 1e9)
        cdef uint64_t c_first = first_segment
        cdef uint64_t c_bytes = segment_bytes
        cdef unsigned int c_batch = max_batch
        path = os.fsencode(directory)
        cdef const char *cpath = path
        cdef size_t c_plen = prologue.shape[0]
        cdef const unsigned char *c_pro = &prologue[0] if c_plen else NULL
        if c_plen >= segment_bytes:
            raise ValueError(f"prologue of {c_plen} bytes leaves no room in a {segment_bytes}-byte segment")
        with nogil:
            rc = mta_writer_open(cpath, c_first, c_bytes, c_batch, c_lazy, c_pro, c_plen, &w)
        if rc < 0:
            exc = _oserror(rc)
            exc.filename = os.fsdecode(path)
            raise exc
        self._w = w
        self.directory = os.fsdecode(path)

    def __dealloc__(self):
        cdef mta_rec *r
        cdef mta_rec *nxt
        if self._w == NULL:
            return
        with nogil:
            mta_writer_close(self._w)
        r = mta_writer_take_done(self._w)
        while r != NULL:
            nxt = r.next
            _release(<Pending *>r)
            r = nxt
        mta_writer_free(self._w)
        self._w = NULL

    cdef inline void _check_open(self) except *:
        if self._closed or self._w == NULL:
            raise RuntimeError("SegmentWriter is closed")

    @property
    def eventfd(self):
        """Readable when completed() has something; valid until the object dies."""
        if self._w == NULL:
            raise RuntimeError("SegmentWriter is not initialised")
        return mta_writer_eventfd(self._w)

    def append(self, head, body, Py_ssize_t crc_offset, bint lazy=False):
        """Queue head+body; returns (ticket, segment, offset), assigned at once so it can be
        indexed. lazy: nobody waits for it, so it may wait for the next batch (see above)."""
        cdef Pending *p
        cdef int rc
        self._check_open()
        p = <Pending *>PyMem_Malloc(sizeof(Pending))
        if p == NULL:
            raise MemoryError()
        try:
            PyObject_GetBuffer(head, &p.head, PyBUF_SIMPLE | PyBUF_WRITABLE)
        except BaseException:
            PyMem_Free(p)
            raise
        p.has_body = False
        if crc_offset < 0 or crc_offset + 4 > p.head.len:
            _release(p)
            raise ValueError(f"crc_offset {crc_offset}: need 0 <= crc_offset and "
                             f"crc_offset + 4 <= len(head) ({len(head)})")
        if body is not None:
            try:
                PyObject_GetBuffer(body, &p.body, PyBUF_SIMPLE)
            except BaseException:
                _release(p)
                raise
            p.has_body = True
        p.rec.head = <unsigned char *>p.head.buf
        p.rec.head_len = <size_t>p.head.len
        p.rec.body = <const unsigned char *>p.body.buf if p.has_body else NULL
        p.rec.body_len = <size_t>p.body.len if p.has_body else 0
        p.rec.crc_offset = <size_t>crc_offset
        rc = mta_writer_append_lazy(self._w, &p.rec) if lazy else mta_writer_append(self._w, &p.rec)
        if rc < 0:
            _release(p)
            if self._closed:
                raise RuntimeError("SegmentWriter is closed")   # close() from another thread won
            raise _oserror(rc)
        return (p.rec.ticket, p.rec.segment, p.rec.offset)

    def completed(self):
        """Drain the eventfd; [(ticket, err)] of finished batches in ticket order (err 0 = durable)."""
        cdef uint64_t counter
        cdef mta_rec *r
        cdef mta_rec *nxt
        cdef list out
        if self._w == NULL:
            return []
        out = self._leftover
        self._leftover = []
        if self._closed:
            return out
        # Eventfd first: a batch finishing between the two calls then leaves
        # the eventfd readable (a spurious wakeup) instead of a lost one.
        read(mta_writer_eventfd(self._w), &counter, sizeof(counter))
        r = mta_writer_take_done(self._w)
        while r != NULL:
            nxt = r.next
            out.append((r.ticket, r.err))
            _release(<Pending *>r)
            r = nxt
        return out

    def flush(self):
        """Block (GIL released) until every record appended so far has completed."""
        if self._w == NULL or self._closed:
            return
        with nogil:
            mta_writer_flush(self._w)

    def resume(self):
        """After a failed batch: accept appends again, into a fresh segment.
        Whether the fault cleared shows in the next batch's completions."""
        cdef int rc
        self._check_open()
        rc = mta_writer_resume(self._w)
        if rc < 0:
            raise _oserror(rc)

    def roll(self):
        """Make the next append start a new segment (no-op on an empty one); returns its number."""
        self._check_open()
        return mta_writer_roll(self._w)

    def stats(self):
        """Counters for metrics and tests; syncs counts segment FDATASYNCs only."""
        cdef mta_writer_stats s
        if self._w == NULL:
            raise RuntimeError("SegmentWriter is not initialised")
        mta_writer_get_stats(self._w, &s)
        return {"batches": s.batches, "records": s.records, "bytes": s.bytes,
                "syncs": s.syncs, "dir_syncs": s.dir_syncs,
                "short_writes": s.short_writes,
                "max_batch_records": s.max_batch_records,
                "failed_batches": s.failed_batches, "segment": s.segment}

    def close(self):
        """Flush, stop the thread and close the segment fds; idempotent."""
        cdef mta_rec *r
        cdef mta_rec *nxt
        if self._w == NULL or self._closed:
            return
        self._closed = True
        with nogil:
            mta_writer_close(self._w)
        r = mta_writer_take_done(self._w)
        while r != NULL:
            nxt = r.next
            self._leftover.append((r.ticket, r.err))
            _release(<Pending *>r)
            r = nxt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
