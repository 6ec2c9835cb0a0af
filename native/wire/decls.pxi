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
