/*
 * sign.h - DKIM signing core of mta._native.dkim (RFC 6376, RFC 8463)
 *
 * Where it sits: mta/dkim/signer.py hands a batch of outgoing messages and
 * their signing specs to dkim.pyx, which fills one dkim_job per message and
 * calls dkim_pool_run() without the GIL. Each job: line-end repair (the same
 * repair the SMTP client would apply, native/wire/stuff.h), header block
 * parse, body hash per body canonicalisation, header hash over the fields
 * named in h= (bottom-up, over-signed names hash nothing), the DKIM-Signature
 * field itself with an empty b=, then RSA PKCS#1 v1.5 SHA-256 or Ed25519 over
 * the SHA-256 digest (RFC 8463 3) with libcrypto.
 *
 * Reads and writes: memory only. Results are malloc'd; the caller frees them.
 *
 * Diagnostics: a message that cannot be signed gets job->err (enum dkim_err)
 * and a one-line job->detail; the other jobs of the batch are unaffected.
 * Key loading returns an enum dkim_keyerr. Nothing here aborts or prints.
 *
 * Trust: messages were received from the network; every length is checked,
 * and header fields, h= entries and line lengths have hard limits.
 *
 * Threading: keys and specs are read-only once built and shared by all
 * threads (a key keeps a small mutex-guarded cache of libcrypto contexts).
 * A pool runs one batch per calling thread at a time; several threads may
 * call dkim_pool_run() on one pool at once.
 *
 * Files: sign.c (keys, the field, jobs, libcrypto), canon.c (line-end
 * repair and canonicalisation; internal API in canon.h), pool.c (the thread
 * pool; API in pool.h, included here). dkim.pyx includes only this header.
 */
#ifndef MTA_DKIM_SIGN_H
#define MTA_DKIM_SIGN_H

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

/* Signing algorithms (RFC 6376 3.3, RFC 8463 3). */
enum dkim_alg { DKIM_RSA_SHA256 = 1, DKIM_ED25519_SHA256 = 2 };

/* Why a message was not signed; names in dkim.pyx ERRORS, classified in signer.py. */
enum dkim_err {
    DKIM_OK = 0,
    DKIM_E_NO_SEPARATOR = 1,    /* no empty line ends the header block */
    DKIM_E_NO_COLON = 2,        /* a header line is neither a field nor a continuation */
    DKIM_E_LEADING_FOLD = 3,    /* the first header line starts with WSP */
    DKIM_E_BAD_NAME = 4,        /* field name empty or not ftext (RFC 5322 3.6.8) */
    DKIM_E_NO_FROM = 5,         /* no From field: it must be signed (RFC 6376 5.4) */
    DKIM_E_MULTI_FROM = 6,      /* more than one From field (RFC 5322 3.6) */
    DKIM_E_TOO_MANY_FIELDS = 7, /* more than DKIM_MAX_FIELDS header fields */
    DKIM_E_TOO_MANY_SIGNED = 8, /* h= would list more than DKIM_MAX_SIGNED names */
    DKIM_E_NOMEM = 9,           /* malloc failed */
    DKIM_E_CRYPTO = 10,         /* libcrypto refused to hash or sign */
    DKIM_E_COUNT = 11
};

/* Why a key could not be loaded. */
enum dkim_keyerr {
    DKIM_KEY_OK = 0,
    DKIM_KEY_PUBLIC = 1,        /* PEM holds a public key, not a private one */
    DKIM_KEY_GARBAGE = 2,       /* no PEM private key in the data */
    DKIM_KEY_ENCRYPTED = 3,     /* PEM is passphrase-protected */
    DKIM_KEY_UNSUPPORTED = 4,   /* a private key, but neither RSA nor Ed25519 */
    DKIM_KEY_NOMEM = 5          /* malloc or libcrypto allocation failed */
};

#define DKIM_MAX_FIELDS 4096    /* header fields per message */
#define DKIM_MAX_SIGNED 512     /* h= entries per signature */
#define DKIM_MAX_NAMES 64       /* distinct names per spec */
#define DKIM_DETAIL 160         /* room for dkim_job.detail */

typedef struct dkim_key dkim_key;   /* opaque: EVP_PKEY + context cache */

/* One header name a spec signs. */
typedef struct dkim_hname {
    const char *name;           /* lowercase field name as written into h= */
    size_t len;                 /* its length */
    int oversign;               /* list once more than present (RFC 6376 8.15) */
} dkim_hname;

/* One signature to add; built once by dkim.pyx, read-only afterwards. */
typedef struct dkim_spec {
    dkim_key *key;              /* signing key (algorithm comes from it) */
    int relaxed_header;         /* c= header part: 1 relaxed, 0 simple */
    int relaxed_body;           /* c= body part: 1 relaxed, 0 simple */
    const char *tags;           /* fixed tags, each ending in ';': "v=1;a=...;c=...;d=...;s=...;" */
    size_t tags_len;            /* bytes of tags */
    const dkim_hname *names;    /* names in h= order */
    size_t nnames;              /* how many (<= DKIM_MAX_NAMES) */
    int64_t expire_after;       /* x= is t + this; < 0 means no x= */
} dkim_spec;

/* One message of a batch: inputs, then what the thread filled in. */
typedef struct dkim_job {
    const unsigned char *msg;   /* the message as given (any line ends) */
    size_t len;                 /* its length */
    const dkim_spec *const *specs; /* signatures to add, in output order */
    size_t nspecs;              /* how many */
    int64_t now;                /* t= */
    char *sig;                  /* out: the DKIM-Signature fields, CRLF-terminated (malloc) */
    size_t sig_len;             /* out: bytes of sig */
    unsigned char *norm;        /* out: repaired message, NULL when msg was clean (malloc) */
    size_t norm_len;            /* out: bytes of norm */
    int err;                    /* out: enum dkim_err */
    char detail[DKIM_DETAIL];   /* out: one-line reason when err != 0 */
} dkim_job;

/* Keys. The _load functions set *out only on DKIM_KEY_OK. */
int dkim_key_load_pem(const char *pem, size_t len, dkim_key **out);
int dkim_key_load_ed25519_seed(const unsigned char *seed, size_t len, dkim_key **out);
int dkim_key_alg(const dkim_key *k);
int dkim_key_bits(const dkim_key *k);
/* DNS p= material: SubjectPublicKeyInfo DER (RSA) or the 32 raw octets (Ed25519).
 * Returns the length written (out NULL: needed), -1 on error. */
long dkim_key_public(const dkim_key *k, unsigned char *out, size_t cap);
void dkim_key_free(dkim_key *k);
/* New key (alg DKIM_RSA_SHA256 with bits, or DKIM_ED25519_SHA256) as PKCS#8 PEM
 * in *pem (malloc, NUL-terminated); returns DKIM_KEY_OK or DKIM_KEY_NOMEM. */
int dkim_keygen(int alg, int bits, char **pem, size_t *pem_len);

/* Sign one message (the pool calls this per job; usable alone, no threads). */
void dkim_sign_job(dkim_job *job);

/* Inside native/dkim, not for dkim.pyx: the SHA-256 method (an EVP_MD),
 * fetched once; dkim_pool_new() fetches it before starting its threads. */
struct evp_md_st;
const struct evp_md_st *dkim_sha256(void);

/* Test and tooling hooks over the same code the jobs use (dkim_canon_body,
 * dkim_canon_field, dkim_repair and dkim_header_input are in canon.c;
 * dkim_body_hash and dkim_sign_prepared in sign.c). */
/* Canonical body of raw body octets (bare LF ends a line, as go-msgauth). */
int dkim_canon_body(const unsigned char *body, size_t n, int relaxed, char **out, size_t *out_len);
/* Canonical form of one raw header field (name ":" value, folded, with or without CRLF). */
int dkim_canon_field(const char *field, size_t n, int relaxed, char **out, size_t *out_len);
/* Line-end repair (bare LF -> CRLF, bare CR -> SP, final CRLF); NULL *out when clean. */
int dkim_repair(const unsigned char *msg, size_t n, unsigned char **out, size_t *out_len);
/* bh= of a (clean CRLF) message: SHA-256 of the canonical body. */
int dkim_body_hash(const unsigned char *msg, size_t n, int relaxed, unsigned char digest[32]);
/* The header hash input (RFC 6376 3.7) for a prepared signature: `names` is
 * the h= list (count entries, each NUL-terminated, in sequence), `field` the
 * whole DKIM-Signature field with an empty b= value and no final CRLF.
 * *out is malloc'd; returns 0 or -err. */
int dkim_header_input(const unsigned char *msg, size_t n, int relaxed_header, const char *names,
                      size_t count, const char *field, size_t field_len, char **out, size_t *out_len);
/* b= over dkim_header_input(): writes the raw signature, returns its length or -err. */
long dkim_sign_prepared(dkim_key *k, const unsigned char *msg, size_t n, int relaxed_header,
                        const char *names, size_t count, const char *field, size_t field_len,
                        unsigned char *sig, size_t cap);

#endif
