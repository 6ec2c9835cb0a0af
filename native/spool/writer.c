/*
 * writer.c - group-committing io_uring segment writer; see writer.h for the
 * contract, the error model and the threading rules.
 *
 * One batch, as the thread runs it:
 *   1. take every pending record (up to max_batch, and no more than the ring
 *      has SQEs for), drop the mutex;
 *   2. crc32 each record into its head;
 *   3. openat(O_CREAT|O_EXCL) each segment the batch starts, whose first
 *      WRITEV then begins with the prologue at offset 0;
 *   4. per touched segment, one chain: WRITEV (split at IOV_MAX iovecs or
 *      WRITE_MAX_BYTES) -> ... -> FSYNC(DATASYNC), linked with IOSQE_IO_LINK;
 *      plus an unlinked FSYNC of the directory when step 3 created a file;
 *   5. submit, reap every CQE, finish short writes synchronously;
 *   6. under the mutex: set rec->err, append to the done list, broadcast;
 *      then write 1 to the eventfd.
 * Appends made during 3-5 wait in the pending list for the next batch: that
 * is the group commit.
 *
 * Lazy records (append_lazy: bookkeeping nobody waits for, such as tombstones)
 * do not start a batch of their own at once: they wait up to lazy_ns for an
 * urgent record (a message a client waits on) or a flush() and ride in its
 * batch, so a relay under light load pays one fdatasync per accepted message
 * instead of two.
 *
 * A failed batch: its records and every record appended behind it fail
 * together (they were placed after bytes that are not on disk); the segments
 * it created are unlinked (they hold nothing acknowledged), the segment it
 * continued is closed for good (after a failed fdatasync its unsynced pages
 * cannot be trusted: "fsyncgate"), and the next append goes to a fresh
 * segment once resume() clears the error.
 */
#define _GNU_SOURCE
#include "writer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>
#include <zlib.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Cap per WRITEV: a CQE result is an int, and Linux caps one write at
 * MAX_RW_COUNT (~2 GiB); larger single iovecs come back short and are finished
 * by the pwritev loop. */
#define WRITE_MAX_BYTES ((size_t)1 << 30)

/* thread_idle: busy, waiting until a lazy deadline, waiting without one. */
enum { IDLE_NO, IDLE_TIMED, IDLE_UNTIMED };

static uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Smallest ring: a batch always fits one record (<= 3 SQEs), so this only
 * bounds how many segments one batch can touch. */
#define MIN_RING_ENTRIES 64u

enum op_kind { OP_WRITE, OP_DATASYNC, OP_DIRSYNC };

/* One SQE of the batch; user_data is its index in w->ops. */
struct op {
    enum op_kind kind;          /* what the SQE does */
    int fd;                     /* segment fd, or the directory fd */
    struct iovec *iov;          /* OP_WRITE: first iovec (inside w->iovs) */
    int iovcnt;                 /* OP_WRITE: number of iovecs */
    uint64_t off;               /* OP_WRITE: file offset */
    size_t expect;              /* OP_WRITE: bytes the iovecs hold */
    int res;                    /* CQE result (or -ECANCELED when never submitted) */
};

/* A segment the batch writes to. */
struct touched {
    uint64_t no;                /* segment number */
    int fd;                     /* open fd (O_WRONLY) */
    int created;                /* 1 when this batch created the file */
    unsigned first_op;          /* index of its first OP_WRITE in w->ops */
    unsigned nops;              /* writes + the datasync, a linked chain */
};

struct mta_writer {
    pthread_mutex_t mu;         /* guards everything marked (mu) */
    pthread_cond_t work_cv;     /* thread waits here for pending records or stop */
    pthread_cond_t done_cv;     /* flush() waits here for done_ticket */
    pthread_t thread;           /* the writer thread */
    int thread_started;         /* 1 between pthread_create and join */
    int thread_idle;            /* (mu) IDLE_* : how the thread waits on work_cv */
    int stopping;               /* (mu) close() asked the thread to exit */
    int closed;                 /* (mu) close() ran: appends fail with EPIPE */
    int broken;                 /* (mu) positive errno of the last failed batch until resume(), or 0 */

    mta_rec *pending_head;      /* (mu) appended, not yet taken by the thread */
    mta_rec *pending_tail;      /* (mu) last of pending, for O(1) append */
    mta_rec *done_head;         /* (mu) completed, not yet taken by the caller */
    mta_rec *done_tail;         /* (mu) last of done */
    uint64_t next_ticket;       /* (mu) ticket of the next append */
    uint64_t urgent_ticket;     /* (mu) every ticket <= this is written without delay */
    uint64_t lazy_deadline;     /* (mu) CLOCK_MONOTONIC ns by which pending lazy records go; 0: none */
    uint64_t lazy_ns;           /* how long a lazy record may wait for an urgent one */
    uint64_t done_ticket;       /* (mu) every ticket <= this is on the done list */

    uint64_t assign_seg;        /* (mu) segment the next append goes to */
    uint64_t assign_off;        /* (mu) offset the next append gets in it */
    uint64_t segment_bytes;     /* roll over before a record would cross this */
    unsigned max_batch;         /* most records per batch */
    unsigned char *prologue;    /* written at offset 0 of every segment created (may be NULL) */
    size_t prologue_len;        /* its bytes; the first record of a segment goes here */

    mta_writer_stats stats;     /* (mu) counters; stats.segment mirrors assign_seg */

    /* Thread-only state below: no lock. */
    int dirfd;                  /* O_DIRECTORY fd: openat base and dir-fsync target */
    int efd;                    /* eventfd the loop watches */
    int cur_fd;                 /* fd of the last segment written, or -1 */
    uint64_t cur_seg;           /* its number (valid when cur_fd >= 0) */
    struct io_uring ring;       /* submission/completion ring */
    int ring_ok;                /* ring initialised (needs queue_exit) */
    unsigned ring_entries;      /* SQ size; a batch never needs more SQEs */
    struct iovec *iovs;         /* 2 * max_batch + one prologue per segment, for the batch */
    struct op *ops;             /* ring_entries ops for the batch */
    struct touched *segs;       /* ring_entries / 2 touched segments */
};

static void seg_name(char *buf, size_t len, uint64_t no)
{
    snprintf(buf, len, "%08" PRIu64 ".seg", no);
}

/* ---- append side (caller threads) ------------------------------------- */

static int queue_rec(mta_writer *w, mta_rec *rec, int urgent)
{
    uint64_t len = (uint64_t)rec->head_len + rec->body_len;
    int rc = 0;

    pthread_mutex_lock(&w->mu);
    if (w->closed) {
        rc = -EPIPE;
    } else if (w->broken) {
        rc = -w->broken;
    } else {
        /* A record that would cross segment_bytes starts a new segment, unless
         * the current one is empty (then it gets a segment of its own). */
        if (w->assign_off > w->prologue_len && w->assign_off + len > w->segment_bytes) {
            w->assign_seg++;
            w->assign_off = w->prologue_len;
        }
        rec->ticket = w->next_ticket++;
        rec->segment = w->assign_seg;
        rec->offset = w->assign_off;
        rec->err = 0;
        rec->next = NULL;
        w->assign_off += len;
        w->stats.segment = w->assign_seg;
        if (w->pending_tail)
            w->pending_tail->next = rec;
        else
            w->pending_head = rec;
        w->pending_tail = rec;
        if (urgent || w->lazy_ns == 0) {
            w->urgent_ticket = rec->ticket;
            if (w->thread_idle != IDLE_NO)
                pthread_cond_signal(&w->work_cv);
        } else {
            if (w->lazy_deadline == 0)
                w->lazy_deadline = mono_ns() + w->lazy_ns;
            /* a thread waiting on a deadline already has one at least this early */
            if (w->thread_idle == IDLE_UNTIMED)
                pthread_cond_signal(&w->work_cv);
        }
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

int mta_writer_append(mta_writer *w, mta_rec *rec)
{
    return queue_rec(w, rec, 1);
}

int mta_writer_append_lazy(mta_writer *w, mta_rec *rec)
{
    return queue_rec(w, rec, 0);
}

mta_rec *mta_writer_take_done(mta_writer *w)
{
    mta_rec *list;

    pthread_mutex_lock(&w->mu);
    list = w->done_head;
    w->done_head = w->done_tail = NULL;
    pthread_mutex_unlock(&w->mu);
    return list;
}

void mta_writer_flush(mta_writer *w)
{
    pthread_mutex_lock(&w->mu);
    uint64_t target = w->next_ticket - 1;
    if (w->urgent_ticket < target) {    /* lazy records wait for nobody now */
        w->urgent_ticket = target;
        if (w->thread_idle != IDLE_NO)
            pthread_cond_signal(&w->work_cv);
    }
    while (w->thread_started && w->done_ticket < target)
        pthread_cond_wait(&w->done_cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

uint64_t mta_writer_roll(mta_writer *w)
{
    uint64_t no;

    pthread_mutex_lock(&w->mu);
    if (w->assign_off > w->prologue_len) {
        w->assign_seg++;
        w->assign_off = w->prologue_len;
        w->stats.segment = w->assign_seg;
    }
    no = w->assign_seg;
    pthread_mutex_unlock(&w->mu);
    return no;
}

void mta_writer_get_stats(mta_writer *w, mta_writer_stats *out)
{
    pthread_mutex_lock(&w->mu);
    *out = w->stats;
    pthread_mutex_unlock(&w->mu);
}

int mta_writer_eventfd(const mta_writer *w)
{
    return w->efd;
}

int mta_writer_broken(mta_writer *w)
{
    int b;

    pthread_mutex_lock(&w->mu);
    b = w->broken;
    pthread_mutex_unlock(&w->mu);
    return b;
}

int mta_writer_resume(mta_writer *w)
{
    int rc = 0;

    pthread_mutex_lock(&w->mu);
    if (w->closed)
        rc = -EPIPE;
    else
        w->broken = 0;      /* the failure already moved assignment to a fresh segment */
    pthread_mutex_unlock(&w->mu);
    return rc;
}

/* ---- batch (writer thread) -------------------------------------------- */

/* Detach up to max_batch pending records whose SQEs fit the ring.  Called with
 * mu held; returns the count, the list in *out. */
static unsigned take_batch(mta_writer *w, mta_rec **out)
{
    mta_rec *r = w->pending_head, *last = NULL;
    unsigned n = 0, sqes = 1;   /* 1: room for a directory FSYNC */
    unsigned run_iovs = 0;
    size_t run_bytes = 0;
    uint64_t seg = 0;

    while (r && n < w->max_batch) {
        unsigned niov = r->body_len ? 2 : 1;
        size_t bytes = r->head_len + r->body_len;
        unsigned need = 0;
        if (n == 0 || r->segment != seg) {
            need = 2;           /* a WRITEV and the segment's FDATASYNC */
            run_iovs = 1;       /* the prologue, if this batch creates the segment */
            run_bytes = w->prologue_len;
        } else if (run_iovs + niov > IOV_MAX || run_bytes + bytes > WRITE_MAX_BYTES) {
            need = 1;           /* one more WRITEV in the same chain */
            run_iovs = 0;
            run_bytes = 0;
        }
        if (sqes + need > w->ring_entries)
            break;
        sqes += need;
        run_iovs += niov;
        run_bytes += bytes;
        seg = r->segment;
        last = r;
        r = r->next;
        n++;
    }
    *out = w->pending_head;
    last->next = NULL;
    w->pending_head = r;
    if (!r)
        w->pending_tail = NULL;
    return n;
}

static void compute_crcs(mta_rec *r)
{
    for (; r; r = r->next) {
        size_t start = r->crc_offset + 4;
        uLong crc = crc32(0L, Z_NULL, 0);
        /* zlib takes uInt lengths: feed large buffers in pieces. */
        const unsigned char *p = r->head + start;
        size_t left = r->head_len - start;
        for (int part = 0; part < 2; part++) {
            while (left > 0) {
                uInt chunk = left > (1u << 30) ? (1u << 30) : (uInt)left;
                crc = crc32(crc, p, chunk);
                p += chunk;
                left -= chunk;
            }
            p = r->body;
            left = r->body_len;
        }
        unsigned char *dst = r->head + r->crc_offset;
        dst[0] = (unsigned char)(crc & 0xff);
        dst[1] = (unsigned char)((crc >> 8) & 0xff);
        dst[2] = (unsigned char)((crc >> 16) & 0xff);
        dst[3] = (unsigned char)((crc >> 24) & 0xff);
    }
}

/* Write iov[0..cnt) at off, skipping the first `done` bytes, synchronously.
 * Used to finish a short WRITEV and the writes its broken chain cancelled. */
static int write_rest(int fd, struct iovec *iov, int cnt, uint64_t off, size_t done)
{
    off += done;
    while (cnt > 0 && done >= iov->iov_len) {
        done -= iov->iov_len;
        iov++;
        cnt--;
    }
    if (cnt > 0) {
        iov->iov_base = (char *)iov->iov_base + done;
        iov->iov_len -= done;
    }
    while (cnt > 0) {
        ssize_t n = pwritev(fd, iov, cnt, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;         /* no progress: do not spin */
        off += (uint64_t)n;
        size_t k = (size_t)n;
        while (cnt > 0 && k >= iov->iov_len) {
            k -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= k;
        }
    }
    return 0;
}

/* Open the segments the batch starts and lay out its ops.  Returns 0 or a
 * positive errno (then nothing was submitted; files opened stay in w->segs). */
static int plan_batch(mta_writer *w, mta_rec *batch, unsigned *nsegs, unsigned *nops,
                      int *created)
{
    unsigned ns = 0, no = 0, ni = 0;
    struct touched *t = NULL;
    struct op *wop = NULL;

    *created = 0;
    for (mta_rec *r = batch; r; r = r->next) {
        size_t bytes = r->head_len + r->body_len;
        unsigned niov = r->body_len ? 2 : 1;
        if (!t || r->segment != t->no) {
            if (t)
                w->ops[no++] = (struct op){.kind = OP_DATASYNC, .fd = t->fd};
            t = &w->segs[ns++];
            *t = (struct touched){.no = r->segment, .fd = -1, .first_op = no};
            if (w->cur_fd >= 0 && w->cur_seg == r->segment) {
                t->fd = w->cur_fd;
            } else {
                char name[32];
                seg_name(name, sizeof name, r->segment);
                t->fd = openat(w->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
                if (t->fd < 0) {
                    int e = errno;
                    ns--;
                    *nsegs = ns;
                    return e;
                }
                t->created = 1;
                *created = 1;
                if (r->offset != w->prologue_len) {
                    ns--;       /* cannot happen: a segment's first record follows its prologue */
                    close(t->fd);
                    unlinkat(w->dirfd, name, 0);
                    *nsegs = ns;
                    return EIO;
                }
            }
            wop = NULL;
        }
        if (!wop || wop->iovcnt + (int)niov > IOV_MAX || wop->expect + bytes > WRITE_MAX_BYTES) {
            wop = &w->ops[no++];
            *wop = (struct op){.kind = OP_WRITE, .fd = t->fd, .iov = &w->iovs[ni],
                               .off = r->offset};
            if (t->created && r->offset == w->prologue_len && w->prologue_len) {
                w->iovs[ni++] = (struct iovec){.iov_base = w->prologue, .iov_len = w->prologue_len};
                wop->iovcnt = 1;
                wop->off = 0;
                wop->expect = w->prologue_len;
            }
        }
        w->iovs[ni++] = (struct iovec){.iov_base = r->head, .iov_len = r->head_len};
        if (r->body_len)
            w->iovs[ni++] = (struct iovec){.iov_base = (void *)r->body, .iov_len = r->body_len};
        wop->iovcnt += (int)niov;
        wop->expect += bytes;
    }
    w->ops[no++] = (struct op){.kind = OP_DATASYNC, .fd = t->fd};
    for (unsigned i = 0; i < ns; i++) {
        unsigned end = (i + 1 < ns) ? w->segs[i + 1].first_op : no;
        w->segs[i].nops = end - w->segs[i].first_op;
    }
    if (*created)
        w->ops[no++] = (struct op){.kind = OP_DIRSYNC, .fd = w->dirfd};
    *nsegs = ns;
    *nops = no;
    return 0;
}

/* Queue every op as an SQE, submit, and reap every CQE into op->res.  Ops
 * never submitted get -ECANCELED.  Returns 0 or a positive errno of the ring
 * itself (the op results are checked by the caller). */
static int run_ops(mta_writer *w, unsigned nsegs, unsigned nops, int created)
{
    unsigned queued = 0, submitted = 0, reaped = 0;
    int err = 0;

    for (unsigned i = 0; i < nops; i++)
        w->ops[i].res = -ECANCELED;
    for (unsigned s = 0; s < nsegs; s++) {
        struct touched *t = &w->segs[s];
        for (unsigned k = 0; k < t->nops; k++) {
            struct op *op = &w->ops[t->first_op + k];
            struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
            if (op->kind == OP_WRITE)
                io_uring_prep_writev(sqe, op->fd, op->iov, (unsigned)op->iovcnt, op->off);
            else
                io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
            if (k + 1 < t->nops)
                sqe->flags |= IOSQE_IO_LINK;   /* chain ends at the datasync */
            io_uring_sqe_set_data64(sqe, t->first_op + k);
            queued++;
        }
    }
    if (created) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
        io_uring_prep_fsync(sqe, w->dirfd, 0);
        io_uring_sqe_set_data64(sqe, nops - 1);
        queued++;
    }

    while (submitted < queued) {
        int n = io_uring_submit(&w->ring);
        if (n < 0) {
            if (n == -EINTR)
                continue;
            if ((n == -EAGAIN || n == -EBUSY) && reaped < submitted) {
                /* Kernel short of resources: reap one of ours, then retry. */
                struct io_uring_cqe *cqe;
                if (io_uring_wait_cqe(&w->ring, &cqe) == 0) {
                    w->ops[io_uring_cqe_get_data64(cqe)].res = cqe->res;
                    io_uring_cqe_seen(&w->ring, cqe);
                    reaped++;
                }
                continue;
            }
            /* XXX: SQEs still queued in the SQ ring would go out with the next
             * submit; the writer is broken from here on and submits nothing
             * else, so they are only dropped at queue_exit. */
            err = -n;
            break;
        }
        submitted += (unsigned)n;
        if (n == 0)
            break;
    }
    while (reaped < submitted) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(&w->ring, &cqe);
        if (rc == -EINTR)
            continue;
        if (rc < 0) {
            if (!err)
                err = -rc;
            break;  /* XXX: buffers may still be in flight; cannot happen short of a kernel bug */
        }
        w->ops[io_uring_cqe_get_data64(cqe)].res = cqe->res;
        io_uring_cqe_seen(&w->ring, cqe);
        reaped++;
    }
    if (!err && submitted < queued)
        err = EIO;
    return err;
}

/* Walk each chain: accept full writes, finish short ones, and sync by hand a
 * segment whose chain a short write cut.  Returns the batch errno or 0. */
static int check_ops(mta_writer *w, unsigned nsegs, unsigned nops, int created)
{
    int err = 0;

    for (unsigned s = 0; s < nsegs && !err; s++) {
        struct touched *t = &w->segs[s];
        int finished_by_hand = 0;
        for (unsigned k = 0; k < t->nops && !err; k++) {
            struct op *op = &w->ops[t->first_op + k];
            if (op->kind == OP_WRITE) {
                if (op->res >= 0 && (size_t)op->res == op->expect)
                    continue;
                if (op->res >= 0 || (op->res == -ECANCELED && finished_by_hand)) {
                    size_t done = op->res >= 0 ? (size_t)op->res : 0;
                    pthread_mutex_lock(&w->mu);
                    w->stats.short_writes += op->res >= 0;
                    pthread_mutex_unlock(&w->mu);
                    err = write_rest(op->fd, op->iov, op->iovcnt, op->off, done);
                    finished_by_hand = 1;
                    continue;
                }
                err = op->res == -ECANCELED ? EIO : -op->res;
            } else if (op->res < 0 && op->res != -ECANCELED) {
                err = -op->res;
            } else if (finished_by_hand) {
                /* Sync again even if the ring's FDATASYNC ran: a kernel that
                 * does not cut the link on a short write ran it before the
                 * bytes we wrote by hand. */
                while (fdatasync(op->fd) < 0) {
                    if (errno != EINTR) {
                        err = errno;
                        break;
                    }
                }
            } else if (op->res != 0) {
                err = EIO;      /* cancelled, yet no write of its chain failed */
            }
        }
    }
    if (!err && created && w->ops[nops - 1].res != 0)
        err = w->ops[nops - 1].res < 0 ? -w->ops[nops - 1].res : EIO;
    return err;
}

/* Write and sync one batch.  Afterwards only the newest touched segment stays
 * open: every older one had its last write synced by this batch. */
static int write_batch(mta_writer *w, mta_rec *batch, uint64_t *syncs, int *dirsync)
{
    unsigned nsegs = 0, nops = 0;
    int created = 0;
    int err;

    compute_crcs(batch);
    err = plan_batch(w, batch, &nsegs, &nops, &created);
    if (!err) {
        int ring_err = run_ops(w, nsegs, nops, created);
        err = check_ops(w, nsegs, nops, created);
        if (ring_err)
            err = ring_err;
        *syncs = nsegs;
        *dirsync = created;
    }
    for (unsigned s = 0; s < nsegs; s++) {
        struct touched *t = &w->segs[s];
        if (s + 1 == nsegs && !err) {
            if (w->cur_fd >= 0 && w->cur_fd != t->fd)
                close(w->cur_fd);
            w->cur_fd = t->fd;
            w->cur_seg = t->no;
        } else if (t->fd != w->cur_fd) {
            close(t->fd);
            if (err && t->created) {
                /* Only this failed batch's records are in it: nothing acknowledged. */
                char name[32];
                seg_name(name, sizeof name, t->no);
                unlinkat(w->dirfd, name, 0);
            }
        }
    }
    if (err && w->cur_fd >= 0) {
        close(w->cur_fd);       /* never written again: the next batch starts a fresh segment */
        w->cur_fd = -1;
    }
    return err;
}

static void *writer_main(void *arg)
{
    mta_writer *w = arg;

    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->stopping) {
            if (w->pending_head && w->urgent_ticket >= w->pending_head->ticket)
                break;  /* an urgent record (or a flush) waits: go now */
            if (w->pending_head) {
                /* only lazy records: wait for an urgent one until their deadline */
                if (mono_ns() >= w->lazy_deadline)
                    break;
                struct timespec until = {
                    .tv_sec = (time_t)(w->lazy_deadline / 1000000000u),
                    .tv_nsec = (long)(w->lazy_deadline % 1000000000u),
                };
                w->thread_idle = IDLE_TIMED;
                pthread_cond_timedwait(&w->work_cv, &w->mu, &until);
            } else {
                w->thread_idle = IDLE_UNTIMED;
                pthread_cond_wait(&w->work_cv, &w->mu);
            }
            w->thread_idle = IDLE_NO;
        }
        if (!w->pending_head)
            break;      /* stopping, and nothing left to write */

        mta_rec *batch;
        unsigned n = take_batch(w, &batch);
        if (!w->pending_head)
            w->lazy_deadline = 0;   /* else what is left was due by the same deadline */
        int err = w->broken;
        pthread_mutex_unlock(&w->mu);

        uint64_t syncs = 0, bytes = 0;
        int dirsync = 0;
        if (!err)
            err = write_batch(w, batch, &syncs, &dirsync);
        mta_rec *last = batch;
        for (mta_rec *r = batch; r; r = r->next) {
            r->err = err;
            bytes += r->head_len + r->body_len;
            last = r;
        }

        pthread_mutex_lock(&w->mu);
        uint64_t behind = 0;
        if (err) {
            w->broken = err;
            w->stats.failed_batches++;
            /* Records appended behind the failed batch fail with it: they were
             * placed after bytes that are not on disk. */
            if (w->pending_head) {
                last->next = w->pending_head;
                for (mta_rec *r = w->pending_head; r; r = r->next) {
                    r->err = err;
                    bytes += r->head_len + r->body_len;
                    behind++;
                    last = r;
                }
                w->pending_head = w->pending_tail = NULL;
                w->lazy_deadline = 0;
            }
            w->assign_seg++;
            w->assign_off = w->prologue_len;
            w->stats.segment = w->assign_seg;
        }
        if (w->done_tail)
            w->done_tail->next = batch;
        else
            w->done_head = batch;
        w->done_tail = last;
        w->done_ticket = last->ticket;
        w->stats.batches++;
        w->stats.records += n + behind;
        w->stats.bytes += bytes;
        w->stats.syncs += syncs;
        w->stats.dir_syncs += (uint64_t)dirsync;
        if (n > w->stats.max_batch_records)
            w->stats.max_batch_records = n;
        pthread_cond_broadcast(&w->done_cv);
        pthread_mutex_unlock(&w->mu);

        uint64_t one = 1;
        /* EAGAIN only if the counter would overflow: the reader is awake anyway. */
        ssize_t wr = write(w->efd, &one, sizeof one);
        (void)wr;

        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- lifecycle -------------------------------------------------------- */

static unsigned ring_size(unsigned max_batch)
{
    /* One segment's worth of WRITEVs at IOV_MAX iovecs each, doubled, plus
     * the syncs; at least MIN_RING_ENTRIES so rollovers fit too. */
    unsigned want = 2 * ((2 * max_batch + IOV_MAX - 1) / IOV_MAX) + 8;
    unsigned n = MIN_RING_ENTRIES;
    while (n < want && n < 4096)
        n <<= 1;
    return n;
}

int mta_writer_open(const char *directory, uint64_t first_segment,
                    uint64_t segment_bytes, unsigned max_batch, uint64_t lazy_ns,
                    const unsigned char *prologue, size_t prologue_len, mta_writer **out)
{
    pthread_condattr_t cattr;
    mta_writer *w;
    char name[32];
    struct stat st;
    int rc;

    if (segment_bytes == 0 || max_batch == 0)
        return -EINVAL;
    w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    w->dirfd = w->efd = w->cur_fd = -1;
    w->segment_bytes = segment_bytes;
    w->max_batch = max_batch;
    w->lazy_ns = lazy_ns;
    if (prologue_len) {
        w->prologue = malloc(prologue_len);
        if (!w->prologue) {
            free(w);
            return -ENOMEM;
        }
        memcpy(w->prologue, prologue, prologue_len);
        w->prologue_len = prologue_len;
    }
    w->assign_off = prologue_len;
    w->assign_seg = w->stats.segment = first_segment;
    w->next_ticket = 1;
    w->ring_entries = ring_size(max_batch);

    pthread_mutex_init(&w->mu, NULL);
    /* lazy deadlines are CLOCK_MONOTONIC: a wall-clock step must not stretch them */
    pthread_condattr_init(&cattr);
    pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->work_cv, &cattr);
    pthread_condattr_destroy(&cattr);
    pthread_cond_init(&w->done_cv, NULL);

    w->dirfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (w->dirfd < 0) {
        rc = -errno;
        goto fail;
    }
    seg_name(name, sizeof name, first_segment);
    if (fstatat(w->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        rc = -EEXIST;
        goto fail;
    }
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0) {
        rc = -errno;
        goto fail;
    }
    w->iovs = calloc(2 * (size_t)max_batch + w->ring_entries / 2, sizeof *w->iovs);
    w->ops = calloc(w->ring_entries, sizeof *w->ops);
    w->segs = calloc(w->ring_entries / 2, sizeof *w->segs);
    if (!w->iovs || !w->ops || !w->segs) {
        rc = -ENOMEM;
        goto fail;
    }
    rc = io_uring_queue_init(w->ring_entries, &w->ring, 0);
    if (rc < 0)
        goto fail;
    w->ring_ok = 1;
    rc = -pthread_create(&w->thread, NULL, writer_main, w);
    if (rc < 0)
        goto fail;
    w->thread_started = 1;
    *out = w;
    return 0;

fail:
    mta_writer_free(w);
    return rc;
}

void mta_writer_close(mta_writer *w)
{
    pthread_mutex_lock(&w->mu);
    int was_closed = w->closed;
    w->closed = 1;              /* no appends from here: flush target is final */
    pthread_mutex_unlock(&w->mu);
    if (was_closed)
        return;

    if (w->thread_started) {
        mta_writer_flush(w);
        pthread_mutex_lock(&w->mu);
        w->stopping = 1;
        pthread_cond_signal(&w->work_cv);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->thread, NULL);
        pthread_mutex_lock(&w->mu);
        w->thread_started = 0;
        pthread_mutex_unlock(&w->mu);
    }
    if (w->cur_fd >= 0)
        close(w->cur_fd);
    w->cur_fd = -1;
    if (w->ring_ok)
        io_uring_queue_exit(&w->ring);
    w->ring_ok = 0;
    if (w->dirfd >= 0)
        close(w->dirfd);
    w->dirfd = -1;
}

void mta_writer_free(mta_writer *w)
{
    if (!w)
        return;
    mta_writer_close(w);
    if (w->efd >= 0)
        close(w->efd);
    free(w->iovs);
    free(w->prologue);
    free(w->ops);
    free(w->segs);
    pthread_cond_destroy(&w->done_cv);
    pthread_cond_destroy(&w->work_cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
