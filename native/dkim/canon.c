/*
 * canon.c - line-end repair, header block parsing and RFC 6376
 * canonicalisation (simple and relaxed, header and body) for DKIM signing;
 * see canon.h for the shared types and sign.h for the contract.
 *
 * Where it sits: sign.c runs one job as repair -> dkim_parse_header ->
 * dkim_canon_body_to (into a SHA-256 sink, for bh=) -> dkim_header_input_to
 * (the header hash input) -> sign; the dkim_canon_* and dkim_header_input
 * hooks run the same code into a buffer for tests and tooling.
 *
 * Reads and writes: memory only. Canonical output goes to a sink (a
 * libcrypto digest or a growable buffer) in small pieces, staged 8 KB at a
 * time; unchanged spans of the message are hashed in place.
 *
 * Diagnostics: dkim_parse_header() returns an enum dkim_err with a one-line
 * detail; buffers record allocation failure in buf.oom and sinks a digest
 * failure in sink.err, which the caller checks once at the end.
 *
 * Trust: the message came from the network; every length is checked and
 * the header block has DKIM_MAX_FIELDS fields at most.
 *
 * RFCs: RFC 6376 3.4 (canonicalisation), 3.7 and 5.4.2 (header hash input);
 * line-end repair as the SMTP client applies it (native/wire/stuff.h,
 * RFC 5321 2.3.8).
 */
#include "canon.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define SINK_DIRECT 256         /* pieces this long skip the staging buffer */
#define IS_WSP(c) ((c) == ' ' || (c) == '\t')

/* ---- growable buffer ------------------------------------------------------- */

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

void dkim_buf_put(struct buf *b, const void *s, size_t n)
{
    if (n && buf_reserve(b, n) == 0) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

/* ---- output sink: a SHA-256 context or a buffer, staged -------------------- */

static void sink_raw(struct sink *s, const void *p, size_t n)
{
    if (s->md == NULL)
        dkim_buf_put(s->out, p, n);
    else if (n && !EVP_DigestUpdate(s->md, p, n))
        s->err = 1;
}

void dkim_sink_flush(struct sink *s)
{
    sink_raw(s, s->st, s->n);
    s->n = 0;
}

/* Large pieces (unchanged spans of the message) are hashed in place. */
static void sink_write(struct sink *s, const void *p, size_t n)
{
    if (n >= SINK_DIRECT || n > sizeof s->st - s->n) {
        dkim_sink_flush(s);
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
void dkim_canon_body_to(struct sink *s, const unsigned char *p, size_t n, int relaxed,
                        int clean)
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

int dkim_name_eq(const char *a, size_t al, const char *b, size_t bl)
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

int dkim_parse_header(const char *m, size_t n, struct parsed *ps, char *detail)
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
        dkim_buf_put(b, f, len);
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
void dkim_header_input_to(struct buf *b, const struct parsed *ps, const struct hent *h,
                          size_t count, const char *sig, size_t sig_len, int relaxed)
{
    long last = -1;                     /* field index the previous entry took */
    for (size_t i = 0; i < count; i++) {
        long k;
        size_t skip = 0, j;
        if (i && last >= 0 && dkim_name_eq(h[i].name, h[i].len, h[i - 1].name, h[i - 1].len)) {
            k = last - 1;               /* same name again: continue upward */
        } else if (i && last < 0
                   && dkim_name_eq(h[i].name, h[i].len, h[i - 1].name, h[i - 1].len)) {
            continue;                   /* none left of this name */
        } else {
            for (j = 0; j < i; j++)     /* earlier, non-adjacent uses of the name */
                skip += dkim_name_eq(h[i].name, h[i].len, h[j].name, h[j].len);
            k = (long)ps->n - 1;
        }
        for (; k >= 0; k--) {
            const struct field *f = &ps->f[k];
            if (dkim_name_eq(f->p, f->name_len, h[i].name, h[i].len) && skip-- == 0)
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
        dkim_buf_put(b, sig, sig_len);
    }
}

/* ---- hooks --------------------------------------------------------------------- */

int dkim_canon_body(const unsigned char *body, size_t n, int relaxed, char **out, size_t *out_len)
{
    struct buf b = {0};
    struct sink s = {.out = &b};
    dkim_canon_body_to(&s, body, n, relaxed, 0);
    dkim_sink_flush(&s);
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
int dkim_header_input(const unsigned char *msg, size_t n, int relaxed_header, const char *names,
                      size_t count, const char *field, size_t field_len, char **out, size_t *out_len)
{
    struct parsed ps = {0};
    struct buf hd = {0};
    struct hent h[DKIM_MAX_SIGNED];
    char detail[DKIM_DETAIL];
    int rc = dkim_parse_header((const char *)msg, n, &ps, detail);
    if (rc == 0 && count > DKIM_MAX_SIGNED)
        rc = DKIM_E_TOO_MANY_SIGNED;
    for (size_t i = 0; rc == 0 && i < count; names += h[i++].len + 1)
        h[i] = (struct hent){names, strlen(names)};
    if (rc == 0)
        dkim_header_input_to(&hd, &ps, h, count, field, field_len, relaxed_header);
    if (hd.oom)
        rc = DKIM_E_NOMEM;
    free(ps.f);
    if (rc)
        free(hd.p);
    *out = rc ? NULL : hd.p;
    *out_len = rc ? 0 : hd.len;
    return -rc;
}
