# Declarations of writer.h (our own C, not a library) for spool.pyx, its only user.
# writer.h is the reference for every field; keep the two in step.
from libc.stdint cimport uint64_t

cdef extern from "writer.h" nogil:
    ctypedef struct mta_rec:
        unsigned char *head             # writable; the thread stores the CRC into it
        size_t head_len                 # bytes of head
        const unsigned char *body       # NULL when body_len == 0
        size_t body_len                 # bytes of body
        size_t crc_offset               # where the LE crc32 goes in head
        uint64_t ticket                 # set by append, 1, 2, 3 ...
        uint64_t segment                # set by append
        uint64_t offset                 # set by append
        int err                         # on completion: 0 durable, else positive errno
        mta_rec *next                   # queue link

    ctypedef struct mta_writer_stats:
        uint64_t batches                # batches completed
        uint64_t records                # records in them
        uint64_t bytes                  # head + body bytes in them
        uint64_t syncs                  # segment FDATASYNCs
        uint64_t dir_syncs              # directory FSYNCs
        uint64_t short_writes           # short WRITEVs finished by pwritev
        uint64_t max_batch_records      # largest batch
        uint64_t failed_batches         # batches that failed
        uint64_t segment                # where the next append goes

    ctypedef struct mta_writer:
        pass                            # opaque

    int mta_writer_open(const char *directory, uint64_t first_segment,
                        uint64_t segment_bytes, unsigned max_batch, uint64_t lazy_ns,
                        const unsigned char *prologue, size_t prologue_len, mta_writer **out)
    int mta_writer_append(mta_writer *w, mta_rec *rec)
    int mta_writer_append_lazy(mta_writer *w, mta_rec *rec)
    mta_rec *mta_writer_take_done(mta_writer *w)
    void mta_writer_flush(mta_writer *w)
    uint64_t mta_writer_roll(mta_writer *w)
    void mta_writer_get_stats(mta_writer *w, mta_writer_stats *out)
    int mta_writer_eventfd(const mta_writer *w)
    int mta_writer_broken(mta_writer *w)
    int mta_writer_resume(mta_writer *w)
    void mta_writer_close(mta_writer *w)
    void mta_writer_free(mta_writer *w)
