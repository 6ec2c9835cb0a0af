/*
 * pool.c - the native thread pool that signs a batch of DKIM jobs; see
 * pool.h for the API and sign.h for the job contract.
 *
 * Where it sits: dkim.pyx calls dkim_pool_run() without the GIL; the batch
 * is queued, threads-1 workers and the calling thread take jobs from it one
 * at a time (dkim_sign_job, sign.c), and the caller returns once every job
 * of its own batch is done. Batches from several calling threads are served
 * oldest first; a batch of one job, or a pool without workers, runs on the
 * caller alone.
 *
 * Reads and writes: memory only (the caller's jobs).
 *
 * Diagnostics: dkim_pool_new() returns a negative errno when memory or a
 * thread cannot be had; per-job failures are in the jobs (sign.h).
 *
 * Threading: workers block every signal (Python's main thread takes them)
 * and sleep on a condition variable between batches; dkim_pool_free() joins
 * them and must not race a running dkim_pool_run().
 */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "sign.h"

struct batch {
    dkim_job *jobs;             /* the caller's jobs */
    size_t n;                   /* how many */
    size_t next;                /* (mu) first job not yet taken */
    size_t done;                /* (mu) jobs finished */
    struct batch *link;         /* (mu) next batch with jobs left to take */
};

struct dkim_pool {
    pthread_mutex_t mu;         /* guards everything marked (mu) */
    pthread_cond_t work;        /* workers wait here for a batch */
    pthread_cond_t done;        /* callers wait here for their last jobs */
    struct batch *head;         /* (mu) batches with jobs left, oldest first */
    int stop;                   /* (mu) free() asked the workers to exit */
    int nworkers;               /* threads started */
    pthread_t *tids;            /* their ids */
};

/* Under mu: take job index from b; unlink b once its last job is taken. */
static size_t take(dkim_pool *p, struct batch *b)
{
    size_t i = b->next++;
    if (b->next == b->n) {
        struct batch **pp = &p->head;
        while (*pp && *pp != b)
            pp = &(*pp)->link;
        if (*pp)
            *pp = b->link;
    }
    return i;
}

static void *worker(void *arg)
{
    dkim_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        struct batch *b;
        size_t i;
        while (!p->stop && p->head == NULL)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->stop)
            break;
        b = p->head;
        i = take(p, b);
        pthread_mutex_unlock(&p->mu);
        dkim_sign_job(&b->jobs[i]);
        pthread_mutex_lock(&p->mu);
        if (++b->done == b->n)
            pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int dkim_pool_new(int threads, dkim_pool **out)
{
    dkim_pool *p = calloc(1, sizeof *p);
    sigset_t all, old;
    int rc = 0;
    if (p == NULL)
        return -ENOMEM;
    if (threads < 1)
        threads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    dkim_sha256();
    p->tids = calloc((size_t)threads, sizeof *p->tids);
    if (p->tids == NULL)
        rc = -ENOMEM;
    sigfillset(&all);               /* workers take no signals: Python's main thread does */
    pthread_sigmask(SIG_BLOCK, &all, &old);
    while (rc == 0 && p->nworkers < threads - 1) {
        rc = -pthread_create(&p->tids[p->nworkers], NULL, worker, p);
        if (rc == 0)
            p->nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        dkim_pool_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

void dkim_pool_run(dkim_pool *p, dkim_job *jobs, size_t n)
{
    struct batch b = {jobs, n, 0, 0, NULL};
    struct batch **pp;
    if (n == 0)
        return;
    if (n == 1 || p->nworkers == 0) {
        for (size_t i = 0; i < n; i++)
            dkim_sign_job(&jobs[i]);
        return;
    }
    pthread_mutex_lock(&p->mu);
    for (pp = &p->head; *pp; pp = &(*pp)->link)
        ;
    *pp = &b;
    pthread_cond_broadcast(&p->work);
    while (b.next < b.n) {          /* the caller works on its own batch too */
        size_t i = take(p, &b);
        pthread_mutex_unlock(&p->mu);
        dkim_sign_job(&jobs[i]);
        pthread_mutex_lock(&p->mu);
        b.done++;
    }
    while (b.done < b.n)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

int dkim_pool_threads(const dkim_pool *p) { return p->nworkers + 1; }

void dkim_pool_free(dkim_pool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nworkers; i++)
        pthread_join(p->tids[i], NULL);
    free(p->tids);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

