/*
 * canon.h - what canon.c shares with sign.c inside mta._native.dkim:
 * growable buffers, output sinks, the parsed header block, and RFC 6376
 * canonicalisation into a sink or buffer. Not part of the dkim.pyx contract
 * (sign.h); the dkim_repair, dkim_canon_body, dkim_canon_field and
 * dkim_header_input hooks declared there are implemented in canon.c too.
 *
 * Where it sits: sign.c parses the header block once per job, hashes the
 * canonical body through a sink (bh=, RFC 6376 3.7) and builds the header
 * hash input into a buffer (RFC 6376 3.7, 5.4.2).
 *
 * Diagnostics: allocation failure sticks in buf.oom (later puts do nothing);
 * a failed digest update sticks in sink.err; dkim_parse_header() returns an
 * enum dkim_err and writes a one-line reason to detail.
 *
 * Trust: the message came from the network; see sign.h for the limits.
 */
#ifndef MTA_DKIM_CANON_H
#define MTA_DKIM_CANON_H

#include <stddef.h>

#include <openssl/evp.h>

#include "sign.h"

/* Growable buffer. */
struct buf {
    char *p;                    /* malloc'd bytes */
    size_t len;                 /* used */
    size_t cap;                 /* allocated */
    int oom;                    /* a reserve failed: contents are incomplete */
};

/* Output sink: a SHA-256 context or a buffer, staged. */
struct sink {
    EVP_MD_CTX *md;             /* hash into this, or ... */
    struct buf *out;            /* ... append here (test hooks) */
    size_t n;                   /* staged bytes */
    int err;                    /* EVP_DigestUpdate failed */
    unsigned char st[8192];     /* staging: canonical output comes in small pieces */
};

/* One header field of the message. */
struct field {
    const char *p;              /* first octet of the name */
    size_t len;                 /* whole field incl. continuation lines and final CRLF */
    size_t name_len;            /* name without WSP before the colon (obs-ftext) */
    size_t colon;               /* offset of the colon */
};

/* The header block, split into fields. */
struct parsed {
    struct field *f;            /* fields in message order (malloc'd; the caller frees) */
    size_t n;                   /* how many */
    size_t cap;                 /* allocated */
    size_t body;                /* offset of the body (after the empty line) */
};

/* One h= entry. */
struct hent {
    const char *name;           /* field name as written into h= */
    size_t len;                 /* its length */
};

/* Append n octets (nothing once b->oom is set). */
void dkim_buf_put(struct buf *b, const void *s, size_t n);

/* Pass the staged octets on to the digest or buffer. */
void dkim_sink_flush(struct sink *s);

/* Canonical body (RFC 6376 3.4.3, 3.4.4) of p[0..n) into s. Lines end at LF
 * (a CR before it is part of the line end); clean says p is CRLF-only text,
 * which takes the fast paths. The caller flushes s. */
void dkim_canon_body_to(struct sink *s, const unsigned char *p, size_t n, int relaxed,
                        int clean);

/* Header field names equal, ASCII case-insensitively (RFC 6376 3.4.2). */
int dkim_name_eq(const char *a, size_t al, const char *b, size_t bl);

/* Split the header block of m[0..n) into ps->f (reused and grown; ps->f and
 * ps->cap must start zeroed). Returns 0, or an enum dkim_err with detail
 * (DKIM_DETAIL bytes) set. */
int dkim_parse_header(const char *m, size_t n, struct parsed *ps, char *detail);

/* The input of the header hash (RFC 6376 3.7): each h= entry's field,
 * bottom-up per name (RFC 6376 5.4.2), absent instances hashing nothing;
 * then the signature field sig[0..sig_len) without its final CRLF. */
void dkim_header_input_to(struct buf *b, const struct parsed *ps, const struct hent *h,
                          size_t count, const char *sig, size_t sig_len, int relaxed);

#endif
