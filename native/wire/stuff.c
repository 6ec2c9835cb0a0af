/*
 * stuff.c - outbound dot-stuffing and line-end repair; see stuff.h.
 *
 * One routine does both the sizing and the copying pass (out == NULL only
 * counts), so the two can never disagree. Most content needs no change at
 * all, so the hot path (clean_run) copies runs that go out unchanged; on
 * x86-64 it takes 16 octets per step with SSE2 (base ISA, no dispatch),
 * copying each block while testing it, and clean_scalar() is the plain
 * reference it falls back to. DATA needs one pass into a stuff_bound()
 * buffer; stuff_size() is for callers that need the size first (BDAT).
 */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "stuff.h"

/*
 * Scalar reference for clean_run(): the length of the longest prefix of
 * p[0..n) that goes out unchanged -- ordinary octets and CRLF pairs, except
 * a CRLF followed by a '.' to stuff. It stops at a bare CR, a bare LF, or
 * the CR of such a CRLF. Copies the prefix to out unless out is NULL.
 */
static inline size_t clean_scalar(const char *p, size_t n, int dots, char *out)
{
    size_t i;
    for (i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\r') {
            if (i + 1 >= n || p[i + 1] != '\n' || (dots && i + 2 < n && p[i + 2] == '.'))
                return i;
            if (out) {
                out[i] = '\r';
                out[i + 1] = '\n';
            }
            i++;
        } else if (c == '\n') {
            return i;           /* a paired LF was taken with its CR */
        } else if (out) {
            out[i] = c;
        }
    }
    return n;
}

#if defined(__SSE2__)
/* Bit j set where octet j of the 64 at p equals c. */
static inline uint64_t mask64(const __m128i v[4], char c)
{
    const __m128i k = _mm_set1_epi8(c);
    return (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v[0], k))
        | (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v[1], k)) << 16
        | (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v[2], k)) << 32
        | (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v[3], k)) << 48;
}
#endif

/*
 * clean_scalar() 64 octets at a time (four SSE2 registers, one 64-bit mask
 * per octet class). A block is taken whole when every CR in it is followed
 * by LF, every LF preceded by CR, and no LF is followed by a '.' (dots).
 * One octet of look-ahead decides a pair or a dot straddling the block's
 * end; a CR in bit 63 is carried as a bit into the next block, whose LF in
 * bit 0 it pairs with. `i` always advances by 64: making it depend on the
 * octets would chain every block's loads to the block before. A block with
 * anything else goes to clean_scalar(), restarted on a pair boundary, which
 * finds the exact stop.
 *
 * Stores copy octets of p[0..n) at the same offsets, so even the octets a
 * block copies past the stop land inside the final output (every input
 * octet yields at least one output octet) and are overwritten later.
 */
static inline size_t clean_run(const char *p, size_t n, int dots, char *out)
{
    size_t i = 0;
    uint64_t carry = 0;         /* the octet before the block is a paired CR */
#if defined(__SSE2__)
    for (; i + 65 <= n; i += 64) {
        __m128i v[4];
        uint64_t mcr, mlf, bad, lf_next, dot_next;
        for (int b = 0; b < 4; b++) {
            v[b] = _mm_loadu_si128((const __m128i *)(const void *)(p + i + 16 * b));
            if (out)
                _mm_storeu_si128((__m128i *)(void *)(out + i + 16 * b), v[b]);
        }
        mcr = mask64(v, '\r');
        mlf = mask64(v, '\n');
        lf_next = p[i + 64] == '\n';
        bad = (mlf & ~((mcr << 1) | carry))             /* LF without CR before */
            | (mcr & ~((mlf >> 1) | lf_next << 63));    /* CR without LF after */
        if (dots) {                                     /* '.' right after an LF */
            dot_next = p[i + 64] == '.';
            bad |= ((mlf << 1) & mask64(v, '.')) | (mlf >> 63 & dot_next);
            /* (an LF straddling the edge is the next block's bit 0, checked there) */
        }
        if (bad != 0)
            break;
        carry = mcr >> 63;
    }
#endif
    i -= (size_t)carry;         /* restart on the CR of a straddling pair */
    return i + clean_scalar(p + i, n - i, dots, out ? out + i : NULL);
}

/*
 * The transformation. With out == NULL only counts. Inlined into both
 * callers so the compiler drops the `out` tests from each.
 */
static inline __attribute__((always_inline))
size_t stuff_run(const char *in, size_t n, int flags, char *out, size_t *changes)
{
    size_t i = 0, o = 0, fixes = 0;
    int dots = flags & STUFF_DOTS;

#define PUT(c) do { if (out) out[o] = (char)(c); o++; } while (0)
    if (n > 0 && dots && in[0] == '.')
        PUT('.');               /* RFC 5321 4.5.2: the receiver drops it */
    while (i < n) {
        size_t k = clean_run(in + i, n - i, dots, out ? out + o : NULL);
        o += k;
        i += k;
        if (i == n)
            break;
        /* in[i] is a bare CR, a bare LF or a CRLF with a '.' after it */
        if (in[i] == '\r' && (i + 1 >= n || in[i + 1] != '\n')) {
            PUT(' ');           /* bare CR: a space, never a line end */
            fixes++;
            i++;
            continue;
        }
        if (in[i] == '\r')
            i += 2;             /* CRLF */
        else {
            fixes++;            /* bare LF: becomes CRLF */
            i++;
        }
        PUT('\r');
        PUT('\n');
        if (dots && i < n && in[i] == '.')
            PUT('.');
    }
    /* a last LF always ends in CRLF; anything else (a bare CR too) needs one */
    if (n > 0 && in[n - 1] != '\n') {
        PUT('\r');
        PUT('\n');
        fixes++;
    }
    if (flags & STUFF_TERMINATE) {
        PUT('.');
        PUT('\r');
        PUT('\n');
    }
#undef PUT
    if (changes != NULL)
        *changes = fixes;
    return o;
}

size_t stuff_size(const char *in, size_t n, int flags, size_t *changes)
{
    return stuff_run(in, n, flags, NULL, changes);
}

size_t stuff_copy(const char *in, size_t n, int flags, char *out)
{
    /* out has stuff_bound(n) octets: 2 per input octet at most (a stuffed
     * dot, or CRLF for a bare LF), then the final CRLF and ".\r\n". */
    return stuff_run(in, n, flags, out, NULL);
}

int content_needs_8bit(const char *p, size_t n)
{
    const uint64_t high = 0x8080808080808080ULL;
    uint64_t a, b, c, d;
    size_t i = 0;

    /* 32 octets per step; memcpy makes the unaligned loads legal and free */
    for (; i + 32 <= n; i += 32) {
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8);
        memcpy(&d, p + i + 24, 8);
        if ((a | b | c | d) & high)
            return 1;
    }
    for (; i + 8 <= n; i += 8) {
        memcpy(&a, p + i, 8);
        if (a & high)
            return 1;
    }
    for (; i < n; i++)
        if ((unsigned char)p[i] & 0x80)
            return 1;
    return 0;
}
