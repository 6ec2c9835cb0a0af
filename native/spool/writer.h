/*
 * writer.h - group-committing io_uring segment writer (C core of mta._native.spool)
 *
 * Where it sits: SMTP sessions hand finished messages to mta/spool/segments.py,
 * which appends them here.  append() assigns (segment, offset) at once, under a
 * mutex; a native thread takes every record appended while the previous batch
 * was syncing, writes them with linked io_uring WRITEVs, syncs each touched
 * segment with FDATASYNC (and the directory with FSYNC when a segment file was
 * created), then moves the tickets to the done list and writes 1 to an eventfd
 * so the asyncio loop can answer 250 to the whole batch.
 *
 * Reads: nothing.  Writes: "<directory>/%08llu.seg" files (0600), created with
 * O_EXCL and never reopened for append; each starts with the caller's prologue
 * (the spool's SEGMENT record, mta/spool/records.py), written with the
 * segment's first batch.
 *
 * Diagnostics: every function returns 0 or a negative errno.  A failed write or
 * sync completes every ticket of its batch, and of every record appended behind
 * it, with that errno and makes the writer broken: appends return the same
 * negative errno until resume().  The failed segment is never written again
 * (after a failed fdatasync the page cache state is unknown; see the 2018
 * "fsyncgate" thread, https://lwn.net/Articles/752063/): segments the batch
 * created are unlinked (they hold nothing acknowledged), and after resume()
 * the next append starts a fresh segment.  Records acknowledged before were
 * made durable by an earlier, successful fdatasync.
 *
 * Short writes are finished, not failed: the rest of the run is written with a
 * synchronous pwritev() loop and the segment is synced with fdatasync(); only
 * an error from that loop fails the batch (RLIMIT_FSIZE gives exactly this:
 * a short write, then EFBIG).
 *
 * Threading: append/take_done/roll/stats/flush may be called from any thread;
 * open/close/free from one owner.  The writer thread touches only the raw
 * pointers in mta_rec, never Python objects, so it runs without the GIL.
 */
#ifndef MTA_SPOOL_WRITER_H
#define MTA_SPOOL_WRITER_H

#include <stddef.h>
#include <stdint.h>

/* One record: head followed by body, contiguous on disk.  The caller owns the
 * struct and both buffers until the record comes back from take_done(). */
typedef struct mta_rec {
    unsigned char *head;        /* writable; the thread stores the CRC into it */
    size_t head_len;            /* bytes of head; >= crc_offset + 4 */
    const unsigned char *body;  /* may be NULL when body_len == 0 */
    size_t body_len;            /* bytes of body */
    size_t crc_offset;          /* crc32 (LE) of head[crc_offset+4:] + body goes here */
    uint64_t ticket;            /* set by append: 1, 2, 3 ... in append order */
    uint64_t segment;           /* set by append: segment number of the record */
    uint64_t offset;            /* set by append: byte offset inside that segment */
    int err;                    /* set on completion: 0 = durable, else positive errno */
    struct mta_rec *next;       /* queue link (pending, batch, then done list) */
} mta_rec;

/* Counters for stats(); a snapshot copied under the mutex. */
typedef struct mta_writer_stats {
    uint64_t batches;           /* batches completed (ok or failed) */
    uint64_t records;           /* records in those batches */
    uint64_t bytes;             /* head + body bytes in those batches */
    uint64_t syncs;             /* FDATASYNCs of segment files (one per touched segment per batch) */
    uint64_t dir_syncs;         /* FSYNCs of the directory (batches that created a segment) */
    uint64_t short_writes;      /* WRITEVs that came back short and were finished by pwritev */
    uint64_t max_batch_records; /* largest batch seen */
    uint64_t failed_batches;    /* batches that failed (write, sync or create error) */
    uint64_t segment;           /* segment the next append goes to unless it rolls over */
} mta_writer_stats;

typedef struct mta_writer mta_writer;

/* Open `directory`, check first_segment does not exist (-EEXIST), create the
 * ring and eventfd and start the thread.  prologue (copied; may be NULL when
 * prologue_len is 0) opens every segment; records start after it.  lazy_ns:
 * how long a record from append_lazy() may wait for an urgent one to share its
 * batch (0: lazy records are urgent).  *out is set only on success. */
int mta_writer_open(const char *directory, uint64_t first_segment,
                    uint64_t segment_bytes, unsigned max_batch, uint64_t lazy_ns,
                    const unsigned char *prologue, size_t prologue_len, mta_writer **out);

/* Assign ticket, segment and offset to rec and queue it.  Never blocks on I/O.
 * Returns -EPIPE after close, or the writer's negative errno once broken. */
int mta_writer_append(mta_writer *w, mta_rec *rec);

/* The same for a record nobody waits on: it is written with the next batch an
 * urgent append or a flush() starts, or lazy_ns after it was appended,
 * whichever comes first.  Completion, ordering and errors as for append(). */
int mta_writer_append_lazy(mta_writer *w, mta_rec *rec);

/* Detach the done list (ticket order); NULL when empty.  Read the eventfd
 * before calling this, or a wakeup can be lost. */
mta_rec *mta_writer_take_done(mta_writer *w);

/* Block until every record appended before the call is on the done list
 * (lazy ones too: flush() makes them urgent). */
void mta_writer_flush(mta_writer *w);

/* Make the next append start a new segment; returns its number.  A segment
 * that has no record yet is not skipped, so numbers stay dense. */
uint64_t mta_writer_roll(mta_writer *w);

void mta_writer_get_stats(mta_writer *w, mta_writer_stats *out);

/* Non-blocking eventfd, readable when take_done() has something. */
int mta_writer_eventfd(const mta_writer *w);

/* Errno that broke the writer (positive), or 0. */
int mta_writer_broken(mta_writer *w);

/* Accept appends again after a failed batch (they go to a fresh segment);
 * the next batch shows whether the condition cleared.  -EPIPE after close. */
int mta_writer_resume(mta_writer *w);

/* Flush, stop and join the thread, close the segment fds, the directory and the
 * ring.  The eventfd and the done list stay until free.  Idempotent. */
void mta_writer_close(mta_writer *w);

/* close() then free everything but the records still on the done list, which
 * belong to the caller: take them first. */
void mta_writer_free(mta_writer *w);

#endif /* MTA_SPOOL_WRITER_H */
