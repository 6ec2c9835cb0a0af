/*
 * pool.h - the thread pool of mta._native.dkim: threads-1 workers plus the
 * calling thread sign one batch of dkim_job (sign.h) per call.
 *
 * Where it sits: dkim.pyx keeps one pool per Pool object and calls
 * dkim_pool_run() without the GIL; each job is run by dkim_sign_job()
 * (sign.c). sign.h includes this header, so dkim.pyx sees one contract.
 *
 * Reads and writes: memory only (the caller's jobs, filled in place).
 *
 * Diagnostics: dkim_pool_new() returns 0 or a negative errno; job results
 * and errors are in the jobs. Nothing here prints or aborts.
 *
 * Threading: several threads may call dkim_pool_run() on one pool at once;
 * dkim_pool_free() must not race a running call (dkim.pyx ensures this).
 */
#ifndef MTA_DKIM_POOL_H
#define MTA_DKIM_POOL_H

#include <stddef.h>

struct dkim_job;                    /* sign.h */
typedef struct dkim_pool dkim_pool; /* opaque: worker threads */

/* Pool of threads-1 workers; the caller of dkim_pool_run is the last thread. */
int dkim_pool_new(int threads, dkim_pool **out);   /* 0 or negative errno */
void dkim_pool_run(dkim_pool *p, struct dkim_job *jobs, size_t n);
int dkim_pool_threads(const dkim_pool *p);
void dkim_pool_free(dkim_pool *p);                 /* joins the workers */

#endif
