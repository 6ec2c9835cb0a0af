/*
 * stuff.h - outbound SMTP content transformation (RFC 5321 4.5.2, 2.3.8).
 *
 * Turns a message as stored (CRLF line ends, unstuffed) into the octets the
 * SMTP client writes after "354" (or after "BDAT n LAST", without dots):
 *   - transparency: a line starting with '.' gets another '.';
 *   - line ends: only CRLF is ever emitted. A bare LF becomes CRLF (the
 *     line end a Unix-minded receiver would have seen); a bare CR becomes a
 *     space, as our listener's bare_newline = "normalize" mode and Postfix's
 *     cleanup_replace_stray_cr_lf do. A bare CR is not a line end for RFC 5321,
 *     so making it one would change the message's structure (a header would
 *     split in two); dropping it would join words. Either way a bare CR or LF
 *     never reaches the peer, so a receiver that takes "<LF>.<LF>" or
 *     "<CR>.<CR>" for end of data cannot be smuggled a second message
 *     (CVE-2023-51764/5/6).
 *   - a non-empty message that does not end with CRLF gets one, and with
 *     STUFF_TERMINATE the end-of-data line ".\r\n" follows. An empty message
 *     is just ".\r\n".
 *
 * The input is ours (the spool), but it came from the network once: nothing
 * here assumes it is well formed. Pure C, no allocation: the caller gives
 * stuff_copy() a stuff_bound() buffer (or asks stuff_size() first).
 */
#ifndef MTA_WIRE_STUFF_H
#define MTA_WIRE_STUFF_H

#include <stddef.h>

#define STUFF_DOTS 1        /* double a '.' that starts a line (DATA; not BDAT) */
#define STUFF_TERMINATE 2   /* append the end-of-data line ".\r\n" */

/*
 * Exact output size for in[0..n) under `flags`. *changes receives the number
 * of repairs (bare CR, bare LF, missing final CRLF); 0 means the content is
 * already clean CRLF text, so with flags == 0 it can be sent as is.
 */
size_t stuff_size(const char *in, size_t n, int flags, size_t *changes);

/* Room stuff_copy() may need for n input octets (the worst case). */
#define stuff_bound(n) (2 * (size_t)(n) + 5)

/*
 * Write the transformed content to out, which has stuff_size() octets (or
 * stuff_bound() when the size is not known yet); returns the size written.
 */
size_t stuff_copy(const char *in, size_t n, int flags, char *out);

/* 1 if any octet is >= 0x80 (the body needs 8BITMIME, RFC 6152), else 0. */
int content_needs_8bit(const char *p, size_t n);

#endif
