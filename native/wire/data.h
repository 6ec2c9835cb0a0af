/*
 * data.h - SMTP DATA content scanner (RFC 5321 4.1.1.4, 4.5.2).
 *
 * Consumes raw bytes received after "354", removes dot-stuffing and finds the
 * end of data. Only <CR><LF>.<CR><LF> ends DATA: a bare CR or a bare LF is
 * never a line end for the terminator (SMTP smuggling, CVE-2023-51764/5/6).
 * Bare CR/LF are either counted (mode REJECT: the caller refuses the message
 * after end of data) or normalised (mode NORMALIZE: bare LF -> CRLF, bare CR
 * -> SP, as Postfix 3.9 smtpd_forbid_bare_newline=normalize plus
 * cleanup_replace_stray_cr_lf).
 *
 * Trust: every input byte comes from the network. Output never grows past
 * 2 * input + 2 bytes per call, which the caller reserves.
 */
#ifndef MTA_WIRE_DATA_H
#define MTA_WIRE_DATA_H

#include <stddef.h>

enum data_mode { DATA_REJECT = 0, DATA_NORMALIZE = 1 };

typedef struct {
    int state;          /* position relative to line starts and the terminator */
    int mode;           /* enum data_mode */
    size_t bare;        /* bare CR and bare LF seen so far */
    size_t size;        /* content bytes produced so far (after unstuffing) */
    size_t max_size;    /* content beyond this is dropped and `overflow` set */
    int overflow;       /* content exceeded max_size: keep scanning, store nothing */
} data_scan;

void data_scan_init(data_scan *s, int mode, size_t max_size);

/*
 * Scan in[0..n). Content goes to out (room for n + 2 bytes in REJECT mode,
 * 2*n + 2 in NORMALIZE mode, where a bare LF becomes CRLF);
 * *outlen receives how many bytes were written. Returns the number of input
 * bytes consumed: all n, or fewer when the terminator was found, in which
 * case *done is set to 1 and the return value counts through its final LF.
 */
size_t data_scan_run(data_scan *s, const char *in, size_t n,
                     char *out, size_t *outlen, int *done);

/*
 * BDAT chunks (RFC 3030) are raw: no stuffing, no terminator. Counts bare CR
 * and bare LF across chunk boundaries (*pending_cr carries a CR that ended
 * the previous chunk). In NORMALIZE mode writes the normalised chunk to out
 * (room for 2*n + 1 bytes); in REJECT mode out may be NULL and nothing is
 * written. Returns the bytes written.
 */
size_t chunk_scan(const char *in, size_t n, int mode, int *pending_cr,
                  size_t *bare, char *out);

#endif
