/*
 * sign.c - DKIM keys, the DKIM-Signature field, one job from start to end,
 * and the libcrypto calls (SHA-256, RSA PKCS#1 v1.5, Ed25519); see sign.h
 * for the contract, the error model and the threading rules.
 *
 * One job, as a thread runs it (pool.c, or a caller alone):
 *   1. repair line ends exactly as the SMTP client will (bare LF -> CRLF,
 *      bare CR -> SP, final CRLF), copying only when something changes
 *      (dkim_repair, canon.c);
 *   2. split the header block into fields (folded lines joined), refusing a
 *      block without an empty line, a line without a colon, a bad name
 *      (dkim_parse_header, canon.c);
 *   3. per spec: bh= (each body canonicalisation hashed at most once), the
 *      h= list (present names, over-signed names once more), the
 *      DKIM-Signature field folded at 78 columns up to "b=", the header hash
 *      input (RFC 6376 3.7, canon.c), SHA-256, then the signature (RFC 6376
 *      3.3 / RFC 8463 3: both algorithms sign the SHA-256 digest);
 *   4. append the field with the folded b= value to the job's output.
 *
 * Diagnostics: job->err and job->detail, key loading's enum dkim_keyerr;
 * libcrypto's error queue is cleared after every failure, never printed.
 */
#define _GNU_SOURCE
#include "sign.h"

#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "canon.h"

#define LINE_MAX_COLS 78        /* RFC 5322 2.1.1 SHOULD, for the field we write */
#define KEY_CACHE 64            /* idle libcrypto contexts kept per key */

#define FAIL(code, ...) do { snprintf(detail, DKIM_DETAIL, __VA_ARGS__); return (code); } while (0)

/* ---- libcrypto lookups done once ------------------------------------------ */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static EVP_MD *g_sha256;        /* explicitly fetched: no per-call implicit fetch */

static void init_once(void) { g_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL); }

const EVP_MD *dkim_sha256(void)
{
    pthread_once(&g_once, init_once);
    return g_sha256 ? g_sha256 : EVP_sha256();
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
            || EVP_PKEY_CTX_set_signature_md(c, dkim_sha256()) <= 0) {
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
        dkim_buf_put(f->b, "\r\n ", 3);
        f->col = 1;
    } else if (space) {
        dkim_buf_put(f->b, " ", 1);
        f->col++;
    }
    dkim_buf_put(f->b, s, n);
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
    if (!EVP_DigestInit_ex2(md, dkim_sha256(), NULL))
        return -DKIM_E_CRYPTO;
    dkim_canon_body_to(&s, body, n, relaxed, clean);
    dkim_sink_flush(&s);
    if (s.err || !EVP_DigestFinal_ex(md, dg, NULL))
        return -DKIM_E_CRYPTO;
    return 0;
}

static int digest(EVP_MD_CTX *md, const void *p, size_t n, unsigned char dg[32])
{
    return EVP_DigestInit_ex2(md, dkim_sha256(), NULL) && EVP_DigestUpdate(md, p, n)
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
            times += dkim_name_eq(ps->f[j].p, ps->f[j].name_len, hn->name, hn->len);
        if (times > DKIM_MAX_SIGNED - count)
            FAIL(DKIM_E_TOO_MANY_SIGNED, "h= would list more than %d names", DKIM_MAX_SIGNED);
        for (t = 0; t < times; t++, count++) {
            h[count].name = hn->name;
            h[count].len = hn->len;
        }
    }
    dkim_buf_put(&sig, "DKIM-Signature:", 15);
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
    dkim_header_input_to(&hd, ps, h, count, sig.p, sig.len, sp->relaxed_header);
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
            dkim_buf_put(&sig, "\r\n ", 3);
            f.col = 1;
            continue;
        }
        if (room > (size_t)elen - i)
            room = (size_t)elen - i;
        dkim_buf_put(&sig, enc + i, room);
        f.col += room;
        i += room;
    }
    dkim_buf_put(&sig, "\r\n", 2);
    dkim_buf_put(out, sig.p, sig.len);
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
    if ((rc = dkim_parse_header((const char *)m, n, &ps, j->detail)) != 0)
        goto done;
    for (i = 0; i < ps.n; i++)
        from += dkim_name_eq(ps.f[i].p, ps.f[i].name_len, "from", 4);
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


/* ---- hooks --------------------------------------------------------------------- */

int dkim_body_hash(const unsigned char *msg, size_t n, int relaxed, unsigned char dg[32])
{
    struct parsed ps = {0};
    char detail[DKIM_DETAIL];
    EVP_MD_CTX *md;
    int rc = dkim_parse_header((const char *)msg, n, &ps, detail);
    free(ps.f);
    if (rc)
        return -rc;
    if ((md = EVP_MD_CTX_new()) == NULL)
        return -DKIM_E_NOMEM;
    rc = body_hash(md, msg + ps.body, n - ps.body, relaxed, 0, dg);
    EVP_MD_CTX_free(md);
    return rc;
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
    if (cap < k->sig_max || !EVP_Digest(hd, len, dg, NULL, dkim_sha256(), NULL))
        rc = -DKIM_E_CRYPTO;
    else if ((rc = key_sign(k, dg, sig)) < 0)
        rc = -DKIM_E_CRYPTO;
    ERR_clear_error();
    free(hd);
    return rc;
}
