/*
 * sign.c - DKIM canonicalisation, hashing, signing and the signing thread
 * pool; see sign.h for the contract, the error model and the threading rules.
 *
 * One job, as a thread runs it:
 *   1. repair line ends exactly as the SMTP client will (bare LF -> CRLF,
 *      bare CR -> SP, final CRLF), copying only when something changes;
 *   2. split the header block into fields (folded lines joined), refusing a
 *      block without an empty line, a line without a colon, a bad name;
 *   3. per spec: bh= (each body canonicalisation hashed at most once), the
 *      h= list (present names, over-signed names once more), the
 *      DKIM-Signature field folded at 78 columns up to "b=", the header hash
 *      input (RFC 6376 3.7), SHA-256, then the signature (RFC 6376 3.3 /
 *      RFC 8463 3: both algorithms sign the SHA-256 digest);
 *   4. append the field with the folded b= value to the job's output.
 */
#define _GNU_SOURCE
#include "sign.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define LINE_MAX_COLS 78        /* RFC 5322 2.1.1 SHOULD, for the field we write */
#define KEY_CACHE 64            /* idle libcrypto contexts kept per key */
#define SINK_DIRECT 256         /* pieces this long skip the staging buffer */
#define IS_WSP(c) ((c) == ' ' || (c) == '\t')

/* ---- libcrypto lookups done once ------------------------------------------ */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static EVP_MD *g_sha256;        /* explicitly fetched: no per-call implicit fetch */

static void init_once(void) { g_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL); }

static const EVP_MD *sha256(void)
{
    pthread_once(&g_once, init_once);
    return g_sha256 ? g_sha256 : EVP_sha256();
}

/* ---- growable buffer ------------------------------------------------------- */

struct buf {
    char *p;                    /* malloc'd bytes */
    size_t len;                 /* used */
    size_t cap;                 /* allocated */
    int oom;                    /* a reserve failed: contents are incomplete */
};

static int buf_reserve(struct buf *b, size_t more)
{
    size_t cap;
    char *np;
    if (b->oom)
        return -1;
    if (more <= b->cap - b->len)
        return 0;
    if (more > SIZE_MAX / 4 - b->len)
        goto oom;
    cap = b->cap ? b->cap : 512;
    while (cap - b->len < more)
        cap *= 2;
    np = realloc(b->p, cap);
    if (np == NULL)
        goto oom;
    b->p = np;
    b->cap = cap;
    return 0;
oom:
    b->oom = 1;
    return -1;
}

static void buf_put(struct buf *b, const void *s, size_t n)
{
    if (n && buf_reserve(b, n) == 0) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

/* ---- output sink: a SHA-256 context or a buffer, staged -------------------- */

struct sink {
    EVP_MD_CTX *md;             /* hash into this, or ... */
    struct buf *out;            /* ... append here (test hooks) */
    size_t n;                   /* staged bytes */
    int err;                    /* EVP_DigestUpdate failed */
    unsigned char st[8192];     /* staging: canonical output comes in small pieces */
};

static void sink_raw(struct sink *s, const void *p, size_t n)
{
    if (s->md == NULL)
        buf_put(s->out, p, n);
    else if (n && !EVP_DigestUpdate(s->md, p, n))
        s->err = 1;
}

static void sink_flush(struct sink *s)
{
    sink_raw(s, s->st, s->n);
    s->n = 0;
}

/* Large pieces (unchanged spans of the message) are hashed in place. */
static void sink_write(struct sink *s, const void *p, size_t n)
{
    if (n >= SINK_DIRECT || n > sizeof s->st - s->n) {
        sink_flush(s);
        if (n >= SINK_DIRECT) {
            sink_raw(s, p, n);
            return;
        }
    }
    memcpy(s->st + s->n, p, n);
    s->n += n;
}

/* ---- line-end repair (the SMTP client's, native/wire/stuff.h) -------------- */

/* 1 when every CR in p[0..n) is followed by LF and every LF preceded by CR.
 * The common case (a clean message) is decided 64 octets per step. */
static int crlf_clean(const unsigned char *p, size_t n)
{
    size_t i = 0;
#if defined(__SSE2__)
    uint64_t carry = 0;         /* the octet before the block is a CR */
    const __m128i kcr = _mm_set1_epi8('\r'), klf = _mm_set1_epi8('\n');
    for (; i + 64 <= n; i += 64) {
        uint64_t cr = 0, lf = 0;
        for (int k = 0; k < 4; k++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i + 16 * k));
            cr |= (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, kcr)) << (16 * k);
            lf |= (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, klf)) << (16 * k);
        }
        if (lf != ((cr << 1) | carry))
            return 0;
        carry = cr >> 63;
    }
    if (carry && (i >= n || p[i] != '\n'))
        return 0;
#endif
    for (; i < n; i++) {
        if (p[i] == '\n' && (i == 0 || p[i - 1] != '\r'))
            return 0;
        if (p[i] == '\r' && (i + 1 == n || p[i + 1] != '\n'))
            return 0;
    }
    return 1;
}

int dkim_repair(const unsigned char *m, size_t n, unsigned char **out, size_t *out_len)
{
    size_t i, extra = 0, o = 0;
    int ends = n >= 2 && m[n - 2] == '\r' && m[n - 1] == '\n';
    unsigned char *d;
    *out = NULL;
    *out_len = n;
    if ((n == 0 || ends) && crlf_clean(m, n))
        return 0;
    for (i = 0; i < n; i++)
        extra += m[i] == '\n' && (i == 0 || m[i - 1] != '\r');
    if (n && m[n - 1] != '\n')      /* after repair the last octet is LF iff it was */
        extra += 2;
    d = malloc(n + extra ? n + extra : 1);
    if (d == NULL)
        return -ENOMEM;
    for (i = 0; i < n; i++) {
        unsigned char c = m[i];
        if (c == '\n' && (i == 0 || m[i - 1] != '\r')) {
            d[o++] = '\r';
            d[o++] = '\n';
        } else if (c == '\r' && (i + 1 == n || m[i + 1] != '\n')) {
            d[o++] = ' ';
        } else {
            d[o++] = c;
        }
    }
    if (n && m[n - 1] != '\n') {
        d[o++] = '\r';
        d[o++] = '\n';
    }
    *out = d;
    *out_len = o;
    return 0;
}

/* ---- body canonicalisation (RFC 6376 3.4.3, 3.4.4) ------------------------- */

/* Reduce WSP runs to one SP in a line whose last octet is not WSP. */
static void relaxed_line(struct sink *s, const unsigned char *p, const unsigned char *e)
{
    while (p < e) {
        const unsigned char *r = p;
        /* A single SP followed by non-WSP is kept as is; r[1] exists because
         * the line does not end in WSP. */
        while (r < e && !(*r == '\t' || (*r == ' ' && IS_WSP(r[1]))))
            r++;
        sink_write(s, p, (size_t)(r - p));
        if (r == e)
            return;
        while (r < e && IS_WSP(*r))
            r++;
        sink_write(s, " ", 1);
        p = r;
    }
}

/* Offset of the first WSP in p[0..n) that relaxed canonicalisation changes:
 * a TAB, or a SP followed by WSP or CR (a run, or trailing WSP). */
static size_t find_wsp_run(const unsigned char *p, size_t n)
{
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i sp = _mm_set1_epi8(' '), tab = _mm_set1_epi8('\t'), cr = _mm_set1_epi8('\r');
    for (; i + 17 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 1));
        __m128i nx = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(b, sp), _mm_cmpeq_epi8(b, tab)),
                                  _mm_cmpeq_epi8(b, cr));
        __m128i bad = _mm_or_si128(_mm_cmpeq_epi8(a, tab), _mm_and_si128(_mm_cmpeq_epi8(a, sp), nx));
        int m = _mm_movemask_epi8(bad);
        if (m)
            return i + (size_t)__builtin_ctz((unsigned)m);
    }
#endif
    for (; i < n; i++)
        if (p[i] == '\t' || (p[i] == ' ' && (i + 1 == n || IS_WSP(p[i + 1]) || p[i + 1] == '\r')))
            return i;
    return n;
}

/* Relaxed body of clean CRLF text ending in CRLF: blank lines at the end
 * dropped first, then the unchanged spans between WSP runs are hashed in
 * place. Same output as the line loop below, several times faster. */
static void relaxed_clean(struct sink *s, const unsigned char *b, size_t n)
{
    const unsigned char *e = b + n, *span, *q;
    while (e > b) {                     /* e[-2..e) is CRLF here */
        q = e - 2;
        while (q > b && IS_WSP(q[-1]))
            q--;
        if (q != b && q[-1] != '\n')
            break;
        e = q;                          /* a blank last line: drop it */
    }
    for (span = q = b; q < e;) {
        const unsigned char *r;
        q += find_wsp_run(q, (size_t)(e - q));
        if (q >= e)
            break;
        sink_write(s, span, (size_t)(q - span));
        for (r = q; r < e && IS_WSP(*r); r++)
            ;
        if (r < e && *r != '\r')
            sink_write(s, " ", 1);      /* inside a line: one SP; at its end: nothing */
        span = q = r;
    }
    sink_write(s, span, (size_t)(e - span));
}

/* Lines end at LF (a CR before it is part of the line end); empty lines at
 * the end are dropped; a final partial line is completed with CRLF, which is
 * what transmission does to it. */
static void canon_body(struct sink *s, const unsigned char *p, size_t n, int relaxed, int clean)
{
    const unsigned char *end = p + n;
    size_t empty = 0;
    int any = 0;
    if (clean && !relaxed) {
        /* CRLF-only text ending in CRLF: the canonical body is a prefix. */
        size_t m = n;
        while (m >= 2 && p[m - 2] == '\r' && p[m - 1] == '\n')
            m -= 2;
        sink_write(s, m ? (const char *)p : "\r\n", m ? m + 2 : 2);
        return;
    }
    if (clean && (n == 0 || (n >= 2 && p[n - 2] == '\r' && p[n - 1] == '\n'))) {
        relaxed_clean(s, p, n);
        return;
    }
    while (p < end) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *le = nl ? nl : end;
        const unsigned char *next = nl ? nl + 1 : end;
        if (nl && le > p && le[-1] == '\r')
            le--;
        if (relaxed)
            while (le > p && IS_WSP(le[-1]))
                le--;
        if (le == p) {
            empty++;
        } else {
            for (; empty; empty--)
                sink_write(s, "\r\n", 2);
            if (relaxed)
                relaxed_line(s, p, le);
            else
                sink_write(s, p, (size_t)(le - p));
            sink_write(s, "\r\n", 2);
            any = 1;
        }
        p = next;
    }
    if (!any && !relaxed)
        sink_write(s, "\r\n", 2);   /* simple: an empty body is one CRLF */
}

/* ---- header block ----------------------------------------------------------- */

struct field {
    const char *p;              /* first octet of the name */
    size_t len;                 /* whole field incl. continuation lines and final CRLF */
    size_t name_len;            /* name without WSP before the colon (obs-ftext) */
    size_t colon;               /* offset of the colon */
};

struct parsed {
    struct field *f;            /* fields in message order */
    size_t n;                   /* how many */
    size_t cap;                 /* allocated */
    size_t body;                /* offset of the body (after the empty line) */
};

static int name_eq(const char *a, size_t al, const char *b, size_t bl)
{
    size_t i;
    if (al != bl)
        return 0;
    for (i = 0; i < al; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x != y && (x | 0x20) != (y | 0x20))
            return 0;
        if (x != y && !((x | 0x20) >= 'a' && (x | 0x20) <= 'z'))
            return 0;
    }
    return 1;
}

#define FAIL(code, ...) do { snprintf(detail, DKIM_DETAIL, __VA_ARGS__); return (code); } while (0)

static int parse_header(const char *m, size_t n, struct parsed *ps, char *detail)
{
    size_t pos = 0, line = 0;
    ps->n = 0;
    for (;;) {
        const char *nl = pos < n ? memchr(m + pos, '\n', n - pos) : NULL;
        size_t ll, i, nlen;
        const char *colon;
        line++;
        if (nl == NULL)
            FAIL(DKIM_E_NO_SEPARATOR, "no empty line ends the header block");
        ll = (size_t)(nl - (m + pos)) + 1;
        if (ll == 1 || (ll == 2 && m[pos] == '\r')) {   /* (a bare LF only from hooks) */
            ps->body = pos + ll;
            return 0;
        }
        if (IS_WSP(m[pos])) {
            if (ps->n == 0)
                FAIL(DKIM_E_LEADING_FOLD, "header line 1 starts with white space");
            ps->f[ps->n - 1].len += ll;
            pos += ll;
            continue;
        }
        colon = memchr(m + pos, ':', ll);
        if (colon == NULL)
            FAIL(DKIM_E_NO_COLON, "header line %zu has no colon", line);
        nlen = (size_t)(colon - (m + pos));
        while (nlen && IS_WSP(m[pos + nlen - 1]))
            nlen--;
        for (i = 0; i < nlen; i++) {
            unsigned char c = (unsigned char)m[pos + i];
            if (c < 33 || c > 126)
                break;
        }
        if (nlen == 0 || i < nlen)
            FAIL(DKIM_E_BAD_NAME, "header line %zu: field name is not printable ASCII", line);
        if (ps->n == ps->cap) {
            size_t cap = ps->cap ? ps->cap * 2 : 32;
            struct field *nf;
            if (ps->n >= DKIM_MAX_FIELDS)
                FAIL(DKIM_E_TOO_MANY_FIELDS, "more than %d header fields", DKIM_MAX_FIELDS);
            if ((nf = realloc(ps->f, cap * sizeof *nf)) == NULL)
                FAIL(DKIM_E_NOMEM, "out of memory");
            ps->f = nf;
            ps->cap = cap;
        }
        ps->f[ps->n++] = (struct field){m + pos, ll, nlen, (size_t)(colon - (m + pos))};
        pos += ll;
    }
}

/* ---- header canonicalisation (RFC 6376 3.4.1, 3.4.2) ----------------------- */

static void canon_field(struct buf *b, const char *f, size_t len, size_t name_len, size_t colon,
                        int relaxed)
{
    const char *v = f + colon + 1, *e = f + len;
    char *o;
    int started = 0, sp = 0;
    if (!relaxed) {
        buf_put(b, f, len);
        return;
    }
    if (buf_reserve(b, len + 2))
        return;
    o = b->p + b->len;
    for (size_t i = 0; i < name_len; i++) {
        char c = f[i];
        *o++ = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    *o++ = ':';
    for (; v < e; v++) {
        char c = *v;
        if (c == '\n' || (c == '\r' && v + 1 < e && v[1] == '\n'))
            continue;                   /* unfold */
        if (IS_WSP(c)) {
            sp = started;
            continue;
        }
        if (sp)
            *o++ = ' ';
        sp = 0;
        started = 1;
        *o++ = c;
    }
    *o++ = '\r';
    *o++ = '\n';
    b->len = (size_t)(o - b->p);
}

/* The input of the header hash: each h= entry's field, bottom-up per name
 * (RFC 6376 5.4.2), absent instances hashing nothing; then the signature
 * field without its final CRLF. */
struct hent { const char *name; size_t len; };

static void header_input(struct buf *b, const struct parsed *ps, const struct hent *h, size_t count,
                         const char *sig, size_t sig_len, int relaxed)
{
    long last = -1;                     /* field index the previous entry took */
    for (size_t i = 0; i < count; i++) {
        long k;
        size_t skip = 0, j;
        if (i && last >= 0 && name_eq(h[i].name, h[i].len, h[i - 1].name, h[i - 1].len)) {
            k = last - 1;               /* same name again: continue upward */
        } else if (i && last < 0 && name_eq(h[i].name, h[i].len, h[i - 1].name, h[i - 1].len)) {
            continue;                   /* none left of this name */
        } else {
            for (j = 0; j < i; j++)     /* earlier, non-adjacent uses of the name */
                skip += name_eq(h[i].name, h[i].len, h[j].name, h[j].len);
            k = (long)ps->n - 1;
        }
        for (; k >= 0; k--) {
            const struct field *f = &ps->f[k];
            if (name_eq(f->p, f->name_len, h[i].name, h[i].len) && skip-- == 0)
                break;
        }
        last = k;
        if (k >= 0) {
            const struct field *f = &ps->f[k];
            canon_field(b, f->p, f->len, f->name_len, f->colon, relaxed);
        }
    }
    if (relaxed) {
        const char *colon = memchr(sig, ':', sig_len);
        size_t c = colon ? (size_t)(colon - sig) : 0, nl = c;
        while (nl && IS_WSP(sig[nl - 1]))
            nl--;
        canon_field(b, sig, sig_len, nl, c, 1);
        if (!b->oom)
            b->len -= 2;                /* no CRLF after the signature field */
    } else {
        buf_put(b, sig, sig_len);
    }
}

/* ---- keys ------------------------------------------------------------------- */

struct dkim_key {
    EVP_PKEY *pkey;             /* the private key, parsed once */
    int alg;                    /* enum dkim_alg */
    int bits;                   /* modulus bits (RSA) or 256 (Ed25519) */
    size_t sig_max;             /* EVP_PKEY_get_size */
    pthread_mutex_t mu;         /* guards cache/ncache */
    int ncache;                 /* idle contexts in cache */
    void *cache[KEY_CACHE];     /* EVP_PKEY_CTX (RSA) or EVP_MD_CTX (Ed25519), sign-initialised */
};

static int no_passphrase(char *buf, int size, int rw, void *u)
{
    (void)buf; (void)size; (void)rw; (void)u;
    return -1;                  /* never prompt on a terminal */
}

static int key_wrap(EVP_PKEY *pk, dkim_key **out)
{
    dkim_key *k;
    int alg = EVP_PKEY_is_a(pk, "RSA") ? DKIM_RSA_SHA256
            : EVP_PKEY_is_a(pk, "ED25519") ? DKIM_ED25519_SHA256 : 0;
    if (alg == 0) {
        EVP_PKEY_free(pk);
        return DKIM_KEY_UNSUPPORTED;
    }
    k = calloc(1, sizeof *k);
    if (k == NULL || pthread_mutex_init(&k->mu, NULL) != 0) {
        free(k);
        EVP_PKEY_free(pk);
        return DKIM_KEY_NOMEM;
    }
    k->pkey = pk;
    k->alg = alg;
    k->bits = EVP_PKEY_get_bits(pk);
    k->sig_max = (size_t)EVP_PKEY_get_size(pk);
    *out = k;
    return DKIM_KEY_OK;
}

int dkim_key_load_pem(const char *pem, size_t len, dkim_key **out)
{
    BIO *bio;
    EVP_PKEY *pk;
    if (len > INT_MAX)
        return DKIM_KEY_GARBAGE;
    bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL)
        return DKIM_KEY_NOMEM;
    pk = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    ERR_clear_error();
    if (pk != NULL)
        return key_wrap(pk, out);
    if (memmem(pem, len, "ENCRYPTED", 9))
        return DKIM_KEY_ENCRYPTED;
    if (memmem(pem, len, "PUBLIC KEY-----", 15) || memmem(pem, len, "CERTIFICATE-----", 16))
        return DKIM_KEY_PUBLIC;
    return DKIM_KEY_GARBAGE;
}

int dkim_key_load_ed25519_seed(const unsigned char *seed, size_t len, dkim_key **out)
{
    EVP_PKEY *pk;
    if (len != 32)
        return DKIM_KEY_GARBAGE;
    pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, len);
    ERR_clear_error();
    return pk ? key_wrap(pk, out) : DKIM_KEY_GARBAGE;
}

int dkim_key_alg(const dkim_key *k) { return k->alg; }
int dkim_key_bits(const dkim_key *k) { return k->bits; }

long dkim_key_public(const dkim_key *k, unsigned char *out, size_t cap)
{
    if (k->alg == DKIM_ED25519_SHA256) {
        size_t n = cap;
        if (out == NULL)
            return 32;
        if (!EVP_PKEY_get_raw_public_key(k->pkey, out, &n))
            return -1;
        return (long)n;
    } else {
        int need = i2d_PUBKEY(k->pkey, NULL);
        unsigned char *p = out;
        if (need <= 0 || out == NULL || (size_t)need > cap)
            return need <= 0 ? -1 : need;
        return i2d_PUBKEY(k->pkey, &p);
    }
}

static void ctx_free(const dkim_key *k, void *c)
{
    if (k->alg == DKIM_RSA_SHA256)
        EVP_PKEY_CTX_free(c);
    else
        EVP_MD_CTX_free(c);
}

void dkim_key_free(dkim_key *k)
{
    if (k == NULL)
        return;
    for (int i = 0; i < k->ncache; i++)
        ctx_free(k, k->cache[i]);
    pthread_mutex_destroy(&k->mu);
    EVP_PKEY_free(k->pkey);
    free(k);
}

static void *ctx_new(dkim_key *k)
{
    if (k->alg == DKIM_RSA_SHA256) {
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
        if (c == NULL || EVP_PKEY_sign_init(c) <= 0
            || EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_PADDING) <= 0
            || EVP_PKEY_CTX_set_signature_md(c, sha256()) <= 0) {
            EVP_PKEY_CTX_free(c);
            return NULL;
        }
        return c;
    } else {
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        if (c == NULL || EVP_DigestSignInit_ex(c, NULL, NULL, NULL, NULL, k->pkey, NULL) <= 0) {
            EVP_MD_CTX_free(c);
            return NULL;
        }
        return c;
    }
}

/* Sign a SHA-256 digest; contexts are reused (both calls may be repeated on
 * an initialised context, as openssl speed does). Returns the length or -1. */
static long key_sign(dkim_key *k, const unsigned char dg[32], unsigned char *sig)
{
    void *c = NULL;
    size_t len = k->sig_max;
    int ok;
    pthread_mutex_lock(&k->mu);
    if (k->ncache)
        c = k->cache[--k->ncache];
    pthread_mutex_unlock(&k->mu);
    if (c == NULL && (c = ctx_new(k)) == NULL)
        return -1;
    if (k->alg == DKIM_RSA_SHA256)
        ok = EVP_PKEY_sign(c, sig, &len, dg, 32) > 0;
    else
        ok = EVP_DigestSign(c, sig, &len, dg, 32) > 0;
    if (!ok) {
        ctx_free(k, c);
        ERR_clear_error();
        return -1;
    }
    pthread_mutex_lock(&k->mu);
    if (k->ncache < KEY_CACHE) {
        k->cache[k->ncache++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&k->mu);
    if (c)
        ctx_free(k, c);
    return (long)len;
}

int dkim_keygen(int alg, int bits, char **pem, size_t *pem_len)
{
    EVP_PKEY *pk = alg == DKIM_RSA_SHA256 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits)
                                          : EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    BIO *bio = BIO_new(BIO_s_mem());
    char *data;
    long n;
    int rc = DKIM_KEY_NOMEM;
    *pem = NULL;
    if (pk && bio && PEM_write_bio_PrivateKey(bio, pk, NULL, NULL, 0, NULL, NULL)
        && (n = BIO_get_mem_data(bio, &data)) > 0 && (*pem = malloc((size_t)n + 1)) != NULL) {
        memcpy(*pem, data, (size_t)n);
        (*pem)[n] = 0;
        *pem_len = (size_t)n;
        rc = DKIM_KEY_OK;
    }
    BIO_free(bio);
    EVP_PKEY_free(pk);
    ERR_clear_error();
    return rc;
}

/* ---- the DKIM-Signature field ----------------------------------------------- */

struct fold { struct buf *b; size_t col; };

/* Add a word; fold before it when the line would pass 78 columns. */
static void fold_word(struct fold *f, const char *s, size_t n, int space)
{
    if (f->col + (size_t)space + n > LINE_MAX_COLS && f->col > 1) {
        buf_put(f->b, "\r\n ", 3);
        f->col = 1;
    } else if (space) {
        buf_put(f->b, " ", 1);
        f->col++;
    }
    buf_put(f->b, s, n);
    f->col += n;
}

static int b64(const unsigned char *in, size_t n, char *out)
{
    return EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

static int body_hash(EVP_MD_CTX *md, const unsigned char *body, size_t n, int relaxed, int clean,
                     unsigned char dg[32])
{
    struct sink s;              /* not zero-initialised: st is 8 KB */
    s.md = md;
    s.out = NULL;
    s.n = 0;
    s.err = 0;
    if (!EVP_DigestInit_ex2(md, sha256(), NULL))
        return -DKIM_E_CRYPTO;
    canon_body(&s, body, n, relaxed, clean);
    sink_flush(&s);
    if (s.err || !EVP_DigestFinal_ex(md, dg, NULL))
        return -DKIM_E_CRYPTO;
    return 0;
}

static int digest(EVP_MD_CTX *md, const void *p, size_t n, unsigned char dg[32])
{
    return EVP_DigestInit_ex2(md, sha256(), NULL) && EVP_DigestUpdate(md, p, n)
        && EVP_DigestFinal_ex(md, dg, NULL);
}

static int sign_one(EVP_MD_CTX *md, const dkim_spec *sp, const struct parsed *ps,
                    const unsigned char *m, size_t n, char bh[2][48], int64_t now, struct buf *out,
                    char *detail)
{
    struct hent h[DKIM_MAX_SIGNED];
    size_t count = 0, i, j, t;
    struct buf sig = {0}, hd = {0};
    struct fold f = {&sig, 15};
    unsigned char dg[32], raw[1024];
    char word[64], enc[1400];
    const char *tag = sp->tags, *tend = sp->tags + sp->tags_len;
    long slen;
    int rb = sp->relaxed_body ? 1 : 0, rc = 0, elen;
    if (bh[rb][0] == 0) {
        if (body_hash(md, m + ps->body, n - ps->body, rb, 1, dg) < 0) {
            ERR_clear_error();
            FAIL(DKIM_E_CRYPTO, "body hash failed (libcrypto)");
        }
        b64(dg, 32, bh[rb]);
    }
    for (i = 0; i < sp->nnames; i++) {
        const dkim_hname *hn = &sp->names[i];
        size_t times = hn->oversign ? 1 : 0;
        for (j = 0; j < ps->n; j++)
            times += name_eq(ps->f[j].p, ps->f[j].name_len, hn->name, hn->len);
        if (times > DKIM_MAX_SIGNED - count)
            FAIL(DKIM_E_TOO_MANY_SIGNED, "h= would list more than %d names", DKIM_MAX_SIGNED);
        for (t = 0; t < times; t++, count++) {
            h[count].name = hn->name;
            h[count].len = hn->len;
        }
    }
    buf_put(&sig, "DKIM-Signature:", 15);
    while (tag < tend) {
        const char *semi = memchr(tag, ';', (size_t)(tend - tag));
        size_t tl = semi ? (size_t)(semi - tag) + 1 : (size_t)(tend - tag);
        fold_word(&f, tag, tl, 1);
        tag += tl;
    }
    fold_word(&f, word, (size_t)snprintf(word, sizeof word, "t=%" PRId64 ";", now), 1);
    if (sp->expire_after >= 0)
        fold_word(&f, word, (size_t)snprintf(word, sizeof word, "x=%" PRId64 ";",
                                             now + sp->expire_after), 1);
    for (i = 0; i < count; i++) {
        size_t wl = 0;
        if (i == 0)
            word[wl++] = 'h', word[wl++] = '=';
        if (h[i].len > sizeof word - 4)
            continue;               /* cannot happen: names are <= 60 (dkim.pyx) */
        memcpy(word + wl, h[i].name, h[i].len);
        wl += h[i].len;
        word[wl++] = i + 1 < count ? ':' : ';';
        fold_word(&f, word, wl, i == 0);
    }
    fold_word(&f, word, (size_t)snprintf(word, sizeof word, "bh=%s;", bh[rb]), 1);
    fold_word(&f, "b=", 2, 1);
    header_input(&hd, ps, h, count, sig.p, sig.len, sp->relaxed_header);
    if (sig.oom || hd.oom) {
        rc = DKIM_E_NOMEM;
        goto done;
    }
    if (!digest(md, hd.p, hd.len, dg) || sp->key->sig_max > sizeof raw
        || (slen = key_sign(sp->key, dg, raw)) < 0) {
        ERR_clear_error();
        rc = DKIM_E_CRYPTO;
        goto done;
    }
    elen = b64(raw, (size_t)slen, enc);
    for (i = 0; i < (size_t)elen;) {
        size_t room = f.col < LINE_MAX_COLS ? LINE_MAX_COLS - f.col : 0;
        if (room == 0) {
            buf_put(&sig, "\r\n ", 3);
            f.col = 1;
            continue;
        }
        if (room > (size_t)elen - i)
            room = (size_t)elen - i;
        buf_put(&sig, enc + i, room);
        f.col += room;
        i += room;
    }
    buf_put(&sig, "\r\n", 2);
    buf_put(out, sig.p, sig.len);
    if (sig.oom || out->oom)
        rc = DKIM_E_NOMEM;
done:
    if (rc)
        snprintf(detail, DKIM_DETAIL, rc == DKIM_E_NOMEM ? "out of memory"
                                                         : "signing failed (libcrypto)");
    free(sig.p);
    free(hd.p);
    return rc;
}

void dkim_sign_job(dkim_job *j)
{
    struct parsed ps = {0};
    struct buf out = {0};
    const unsigned char *m = j->msg;
    size_t n = j->len, i, from = 0;
    char bh[2][48] = {{0}, {0}};
    EVP_MD_CTX *md = NULL;
    int rc = DKIM_E_NOMEM;
    j->sig = NULL;
    j->sig_len = 0;
    snprintf(j->detail, DKIM_DETAIL, "out of memory");
    if (dkim_repair(j->msg, j->len, &j->norm, &j->norm_len) < 0)
        goto done;
    if (j->norm) {
        m = j->norm;
        n = j->norm_len;
    }
    if ((rc = parse_header((const char *)m, n, &ps, j->detail)) != 0)
        goto done;
    for (i = 0; i < ps.n; i++)
        from += name_eq(ps.f[i].p, ps.f[i].name_len, "from", 4);
    if (from != 1) {
        rc = from ? DKIM_E_MULTI_FROM : DKIM_E_NO_FROM;
        snprintf(j->detail, DKIM_DETAIL, from ? "%zu From header fields" : "no From header field",
                 from);
        goto done;
    }
    if (j->nspecs && (md = EVP_MD_CTX_new()) == NULL)
        rc = DKIM_E_NOMEM;
    for (i = 0; i < j->nspecs && rc == 0; i++)
        rc = sign_one(md, j->specs[i], &ps, m, n, bh, j->now, &out, j->detail);
done:
    EVP_MD_CTX_free(md);
    free(ps.f);
    j->err = rc;
    if (rc) {
        free(out.p);
        free(j->norm);
        j->norm = NULL;
        j->norm_len = 0;
    } else {
        j->sig = out.p;
        j->sig_len = out.len;
    }
}

/* ---- the pool ---------------------------------------------------------------- */

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
    sha256();
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

/* ---- hooks --------------------------------------------------------------------- */

int dkim_canon_body(const unsigned char *body, size_t n, int relaxed, char **out, size_t *out_len)
{
    struct buf b = {0};
    struct sink s = {.out = &b};
    canon_body(&s, body, n, relaxed, 0);
    sink_flush(&s);
    *out = b.p;
    *out_len = b.len;
    return b.oom ? -ENOMEM : 0;
}

int dkim_canon_field(const char *field, size_t n, int relaxed, char **out, size_t *out_len)
{
    struct buf b = {0};
    const char *colon = memchr(field, ':', n);
    size_t c, nl;
    if (colon == NULL)
        return -EINVAL;
    c = nl = (size_t)(colon - field);
    while (nl && IS_WSP(field[nl - 1]))
        nl--;
    canon_field(&b, field, n, nl, c, relaxed);
    *out = b.p;
    *out_len = b.len;
    return b.oom ? -ENOMEM : 0;
}

int dkim_body_hash(const unsigned char *msg, size_t n, int relaxed, unsigned char dg[32])
{
    struct parsed ps = {0};
    char detail[DKIM_DETAIL];
    EVP_MD_CTX *md;
    int rc = parse_header((const char *)msg, n, &ps, detail);
    free(ps.f);
    if (rc)
        return -rc;
    if ((md = EVP_MD_CTX_new()) == NULL)
        return -DKIM_E_NOMEM;
    rc = body_hash(md, msg + ps.body, n - ps.body, relaxed, 0, dg);
    EVP_MD_CTX_free(md);
    return rc;
}

int dkim_header_input(const unsigned char *msg, size_t n, int relaxed_header, const char *names,
                      size_t count, const char *field, size_t field_len, char **out, size_t *out_len)
{
    struct parsed ps = {0};
    struct buf hd = {0};
    struct hent h[DKIM_MAX_SIGNED];
    char detail[DKIM_DETAIL];
    int rc = parse_header((const char *)msg, n, &ps, detail);
    if (rc == 0 && count > DKIM_MAX_SIGNED)
        rc = DKIM_E_TOO_MANY_SIGNED;
    for (size_t i = 0; rc == 0 && i < count; names += h[i++].len + 1)
        h[i] = (struct hent){names, strlen(names)};
    if (rc == 0)
        header_input(&hd, &ps, h, count, field, field_len, relaxed_header);
    if (hd.oom)
        rc = DKIM_E_NOMEM;
    free(ps.f);
    if (rc)
        free(hd.p);
    *out = rc ? NULL : hd.p;
    *out_len = rc ? 0 : hd.len;
    return -rc;
}

long dkim_sign_prepared(dkim_key *k, const unsigned char *msg, size_t n, int relaxed_header,
                        const char *names, size_t count, const char *field, size_t field_len,
                        unsigned char *sig, size_t cap)
{
    char *hd;
    size_t len;
    unsigned char dg[32];
    long rc = dkim_header_input(msg, n, relaxed_header, names, count, field, field_len, &hd, &len);
    if (rc < 0)
        return rc;
    if (cap < k->sig_max || !EVP_Digest(hd, len, dg, NULL, sha256(), NULL))
        rc = -DKIM_E_CRYPTO;
    else if ((rc = key_sign(k, dg, sig)) < 0)
        rc = -DKIM_E_CRYPTO;
    ERR_clear_error();
    free(hd);
    return rc;
}
