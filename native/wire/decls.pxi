# decls.pxi - C declarations and states of the wire core. Part of wire.pyx.
# The C scanner (data.h) is our own code, declared here beside its only user.
# (No wire.pxd: nothing cimports these classes, so a .pxi keeps one module.)

cdef extern from "data.h":
    ctypedef struct data_scan:
        int state
        int mode
        size_t bare
        size_t size
        size_t max_size
        int overflow
    enum:
        DATA_REJECT
        DATA_NORMALIZE
    void data_scan_init(data_scan *s, int mode, size_t max_size)
    size_t data_scan_run(data_scan *s, const char *inp, size_t n,
                         char *out, size_t *outlen, int *done) nogil
    size_t chunk_scan(const char *inp, size_t n, int mode, int *pending_cr,
                      size_t *bare, char *out) nogil


# Session states (RFC 5321 3.3): every transition goes through _set_state.
cdef enum SessionState:
    ST_CONNECTED = 0    # greeting sent, no HELO/EHLO yet
    ST_READY = 1        # HELO/EHLO done, no transaction
    ST_MAIL = 2         # MAIL accepted, no recipient yet
    ST_RCPT = 3         # at least one recipient accepted
    ST_DATA = 4         # inside DATA content (after 354)
    ST_CHUNK = 5        # reading the octets of a BDAT chunk
    ST_PENDING = 6      # end of content reached; waiting for the spool's verdict
    ST_CLOSED = 7       # QUIT or a fatal limit: write out, then close


# Outbound content transformation (stuff.h, our own C): dot-stuffing and CRLF repair.
cdef extern from "stuff.h":
    enum:
        STUFF_DOTS
        STUFF_TERMINATE
    size_t stuff_bound(size_t n) nogil
    size_t stuff_size(const char *inp, size_t n, int flags, size_t *changes) nogil
    size_t stuff_copy(const char *inp, size_t n, int flags, char *out) nogil
    int c_needs_8bit "content_needs_8bit"(const char *p, size_t n) nogil


# Client states (RFC 5321 client side), named by the reply the client awaits;
# every transition goes through ClientCore._set_state (client.pxi).
cdef enum ClientState:
    CS_GREETING = 0     # connected, waiting for the 220 greeting
    CS_EHLO = 1         # EHLO sent
    CS_HELO = 2         # EHLO refused with 5xx, HELO sent
    CS_STARTTLS = 3     # STARTTLS sent, waiting for 220
    CS_TLS = 4          # the session layer is doing the TLS handshake
    CS_READY = 5        # idle: a transaction may start
    CS_RSET = 6         # RSET sent after an aborted transaction
    CS_MAIL = 7         # MAIL sent (with PIPELINING: the whole group)
    CS_RCPT = 8         # waiting for RCPT replies
    CS_DATA = 9         # DATA sent, waiting for 354
    CS_BODY = 10        # content written, maybe still in the transport buffer
    CS_DOT = 11         # waiting for the end-of-data (or BDAT LAST) reply
    CS_QUIT = 12        # QUIT sent
    CS_CLOSED = 13      # QUIT answered or the session failed
