/*
 * data.c - SMTP DATA content scanner; see data.h.
 *
 * One pass, one byte of look-behind kept in `state`. The common case (inside
 * a line) is a memchr-free tight loop copying until CR or LF.
 */
#include <string.h>

#include "data.h"

enum {
    S_LINE_START = 0,   /* after CRLF (or the 354): a '.' here may be stuffing or EOD */
    S_IN_LINE,          /* inside a line */
    S_CR,               /* saw CR inside a line; LF makes a line end */
    S_DOT,              /* saw '.' at a line start */
    S_DOT_CR,           /* saw ".\r" at a line start; LF ends data */
    S_AFTER_BARE,       /* after a bare LF: a '.' here is content, never EOD */
};

void data_scan_init(data_scan *s, int mode, size_t max_size)
{
    s->state = S_LINE_START;
    s->mode = mode;
    s->bare = 0;
    s->size = 0;
    s->max_size = max_size;
    s->overflow = 0;
}

/*
 * Length of the clean prefix of p[0..n): every CR in it is followed by LF, every
 * LF preceded by CR, and no line inside it starts with '.', CR or LF (those need
 * the state machine). *at_line_start is set when the prefix ends right after a
 * CRLF. Two memchr per line instead of a branch per byte: ~4x faster on text.
 */
static size_t clean_prefix(const char *p, size_t n, int *at_line_start)
{
    size_t pos = 0;

    *at_line_start = 0;
    for (;;) {
        const char *cr = memchr(p + pos, '\r', n - pos);
        size_t lim = cr ? (size_t)(cr - p) : n;
        const char *lf = memchr(p + pos, '\n', lim - pos);

        if (lf != NULL)
            return (size_t)(lf - p);        /* bare LF: the state machine decides */
        if (cr == NULL)
            return n;                       /* the rest is plain text */
        if (lim + 1 >= n || p[lim + 1] != '\n')
            return lim;                     /* CR at the end, or a bare CR */
        pos = lim + 2;
        if (pos == n || p[pos] == '.' || p[pos] == '\r' || p[pos] == '\n') {
            *at_line_start = 1;
            return pos;
        }
    }
}

/* Store a run of content; what is beyond max_size is counted, not stored. */
static size_t emit_run(data_scan *s, char *out, const char *in, size_t k)
{
    size_t room = s->size < s->max_size ? s->max_size - s->size : 0;
    size_t take = k < room ? k : room;

    memcpy(out, in, take);
    if (take < k)
        s->overflow = 1;
    s->size += k;
    return take;
}

/* Emit helpers: content beyond max_size is counted but not stored. */
#define EMIT(c) do { \
        if (s->size < s->max_size) out[o++] = (char)(c); else s->overflow = 1; \
        s->size++; } while (0)

size_t data_scan_run(data_scan *s, const char *in, size_t n,
                     char *out, size_t *outlen, int *done)
{
    size_t i = 0, o = 0;
    int st = s->state;
    int norm = s->mode == DATA_NORMALIZE;

    *done = 0;
    while (i < n) {
        unsigned char c = (unsigned char)in[i];
        switch (st) {
        case S_IN_LINE: {
            /* Fast path: copy whole clean lines at once. */
            int at_start;
            size_t k = clean_prefix(in + i, n - i, &at_start);
            o += emit_run(s, out + o, in + i, k);
            i += k;
            if (at_start) {
                st = S_LINE_START;
                break;
            }
            if (i == n)
                break;
            c = (unsigned char)in[i];
        }
            /* fall through */
        case S_LINE_START:
        case S_AFTER_BARE:
            if (c == '\r') {
                st = S_CR;
            } else if (c == '\n') {
                s->bare++;
                if (norm) { EMIT('\r'); EMIT('\n'); } else { EMIT('\n'); }
                st = S_AFTER_BARE;
            } else if (c == '.' && st == S_LINE_START) {
                st = S_DOT;
            } else {
                EMIT(c);
                st = S_IN_LINE;
            }
            i++;
            break;
        case S_CR:
            if (c == '\n') {
                EMIT('\r'); EMIT('\n');
                st = S_LINE_START;
                i++;
            } else {
                /* bare CR: not a line end; reprocess c inside the line */
                s->bare++;
                EMIT(norm ? ' ' : '\r');
                if (c == '\r') {
                    st = S_CR;          /* a new CR, maybe the start of CRLF */
                } else {
                    EMIT(c);
                    st = S_IN_LINE;
                }
                i++;
            }
            break;
        case S_DOT:
            if (c == '\r') {
                st = S_DOT_CR;
                i++;
            } else if (c == '\n') {
                /* ".<LF>" is not the terminator; keep the dot as content */
                s->bare++;
                EMIT('.');
                if (norm) { EMIT('\r'); EMIT('\n'); } else { EMIT('\n'); }
                st = S_AFTER_BARE;
                i++;
            } else {
                /* transparency (4.5.2): drop the stuffed dot, keep c */
                EMIT(c);
                st = S_IN_LINE;
                i++;
            }
            break;
        case S_DOT_CR:
            if (c == '\n') {
                i++;
                *done = 1;
                s->state = S_LINE_START;
                *outlen = o;
                return i;
            }
            /* ".<CR>" then something else: a bare CR after an unstuffed dot */
            s->bare++;
            EMIT(norm ? ' ' : '\r');
            if (c == '\r') {
                st = S_CR;
            } else {
                EMIT(c);
                st = S_IN_LINE;
            }
            i++;
            break;
        }
    }
    s->state = st;
    *outlen = o;
    return i;
}

size_t chunk_scan(const char *in, size_t n, int mode, int *pending_cr,
                  size_t *bare, char *out)
{
    size_t o = 0;
    int norm = mode == DATA_NORMALIZE && out != NULL;
    int cr = *pending_cr;

    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        if (cr) {
            cr = 0;
            if (c == '\n') {
                if (norm) { out[o++] = '\r'; out[o++] = '\n'; }
                continue;
            }
            (*bare)++;
            if (norm)
                out[o++] = ' ';
        }
        if (c == '\r') {
            cr = 1;
        } else if (c == '\n') {
            (*bare)++;
            if (norm) { out[o++] = '\r'; out[o++] = '\n'; }
        } else if (norm) {
            out[o++] = c;
        }
    }
    *pending_cr = cr;
    return o;
}
