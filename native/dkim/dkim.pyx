# cython: language_level=3
"""mta._native.dkim: DKIM signing (RFC 6376, RFC 8463) on native threads.

Where it sits: mta/dkim/signer.py builds a Key per private key file and a
Spec per signature it wants, then hands batches of outgoing messages to
Pool.sign_batch(); the GIL is released while the batch is signed, by the
calling thread and threads-1 native workers together (sign.c).

Reads: nothing (keys arrive as bytes). Writes: nothing.

Buffers are not copied: each message's buffer export (Py_buffer) is held
for the duration of sign_batch(), so any bytes-like object works.

Diagnostics (STYLE.md section 8):
- warning: a message that cannot be signed yields a MessageError instance in
  its result slot (never raised; the rest of the batch is signed);
- fatal: Key() raises KeyLoadError for data that is no usable private key;
- bug: TypeError/ValueError for wrong argument types or sizes, RuntimeError
  for use after close().
Trust: message bytes came from the network; sign.h lists the limits.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy


# sign.h is our own C (not a library), declared here beside its only user.
cdef extern from "sign.h" nogil:
    enum:
        DKIM_RSA_SHA256
        DKIM_ED25519_SHA256
        DKIM_E_NO_SEPARATOR
        DKIM_E_NO_COLON
        DKIM_E_LEADING_FOLD
        DKIM_E_BAD_NAME
        DKIM_E_NO_FROM
        DKIM_E_MULTI_FROM
        DKIM_E_TOO_MANY_FIELDS
        DKIM_E_TOO_MANY_SIGNED
        DKIM_E_NOMEM
        DKIM_E_CRYPTO
        DKIM_KEY_OK
        DKIM_KEY_PUBLIC
        DKIM_KEY_GARBAGE
        DKIM_KEY_ENCRYPTED
        DKIM_KEY_UNSUPPORTED
        DKIM_KEY_NOMEM
        DKIM_MAX_NAMES
        DKIM_DETAIL

    ctypedef struct dkim_key:
        pass
    ctypedef struct dkim_pool:
        pass
    ctypedef struct dkim_hname:
        const char *name            # lowercase field name as written into h=
        size_t len                  # its length
        int oversign                # list once more than present
    ctypedef struct dkim_spec:
        dkim_key *key               # signing key
        int relaxed_header          # c= header part
        int relaxed_body            # c= body part
        const char *tags            # "v=1;a=...;c=...;d=...;s=...;"
        size_t tags_len             # bytes of tags
        const dkim_hname *names     # h= order
        size_t nnames               # how many
        int64_t expire_after        # x= offset, < 0 none
    ctypedef struct dkim_job:
        const unsigned char *msg    # message as given
        size_t len                  # its length
        const dkim_spec *const *specs   # signatures to add
        size_t nspecs               # how many
        int64_t now                 # t=
        char *sig                   # out: signature fields (malloc)
        size_t sig_len              # out: bytes of sig
        unsigned char *norm         # out: repaired message or NULL (malloc)
        size_t norm_len             # out: bytes of norm
        int err                     # out: enum dkim_err
        char detail[160]            # out: reason

    int dkim_key_load_pem(const char *pem, size_t len, dkim_key **out)
    int dkim_key_load_ed25519_seed(const unsigned char *seed, size_t len, dkim_key **out)
    int dkim_key_alg(const dkim_key *k)
    int dkim_key_bits(const dkim_key *k)
    long dkim_key_public(const dkim_key *k, unsigned char *out, size_t cap)
    void dkim_key_free(dkim_key *k)
    int dkim_keygen(int alg, int bits, char **pem, size_t *pem_len)
    int dkim_pool_new(int threads, dkim_pool **out)
    void dkim_pool_run(dkim_pool *p, dkim_job *jobs, size_t n)
    int dkim_pool_threads(const dkim_pool *p)
    void dkim_pool_free(dkim_pool *p)
    int dkim_canon_body(const unsigned char *body, size_t n, int relaxed, char **out, size_t *out_len)
    int dkim_canon_field(const char *field, size_t n, int relaxed, char **out, size_t *out_len)
    int dkim_repair(const unsigned char *msg, size_t n, unsigned char **out, size_t *out_len)
    int dkim_body_hash(const unsigned char *msg, size_t n, int relaxed, unsigned char *digest)
    int dkim_header_input(const unsigned char *msg, size_t n, int relaxed_header, const char *names,
                          size_t count, const char *field, size_t field_len, char **out,
                          size_t *out_len)
    long dkim_sign_prepared(dkim_key *k, const unsigned char *msg, size_t n, int relaxed_header,
                            const char *names, size_t count, const char *field, size_t field_len,
                            unsigned char *sig, size_t cap)


# Why a message was not signed: enum dkim_err -> reason (signer.py classifies each).
ERRORS = {
    DKIM_E_NO_SEPARATOR: "no-separator",
    DKIM_E_NO_COLON: "no-colon",
    DKIM_E_LEADING_FOLD: "leading-fold",
    DKIM_E_BAD_NAME: "bad-name",
    DKIM_E_NO_FROM: "no-from",
    DKIM_E_MULTI_FROM: "multiple-from",
    DKIM_E_TOO_MANY_FIELDS: "too-many-fields",
    DKIM_E_TOO_MANY_SIGNED: "too-many-signed",
    DKIM_E_NOMEM: "no-memory",
    DKIM_E_CRYPTO: "crypto",
}

_KEY_ERRORS = {
    DKIM_KEY_PUBLIC: ("public", "holds a public key or certificate, not a private key"),
    DKIM_KEY_GARBAGE: ("garbage", "holds no PEM private key"),
    DKIM_KEY_ENCRYPTED: ("encrypted", "is passphrase-protected (store the key unencrypted, mode 0600)"),
    DKIM_KEY_UNSUPPORTED: ("unsupported", "is neither an RSA nor an Ed25519 private key"),
}

_ALGS = {DKIM_RSA_SHA256: "rsa-sha256", DKIM_ED25519_SHA256: "ed25519-sha256"}

cdef unsigned char _empty[1]            # what an empty buffer's data pointer points at


cdef inline const unsigned char *_ptr(const unsigned char[::1] v) noexcept:
    return &v[0] if v.shape[0] else _empty


class MessageError(ValueError):
    """A message that cannot be signed; returned in its slot, never raised by sign_batch."""

    def __init__(self, int code, str detail):
        super().__init__(code, detail)
        self.code = code                # enum dkim_err
        self.reason = ERRORS[code]      # short name, see ERRORS
        self.detail = detail            # one line, safe to log

    def __str__(self):
        return self.detail


class KeyLoadError(ValueError):
    """Key data that is no usable private key; .reason names why."""

    def __init__(self, str reason, str text):
        super().__init__(text)
        self.reason = reason            # "public" | "garbage" | "encrypted" | "unsupported"


cdef class Key:
    """A private key parsed once into an EVP_PKEY; shared read-only by all threads."""

    cdef dkim_key *k                    # owned

    def __cinit__(self):
        self.k = NULL

    def __init__(self, data, str kind="pem"):
        """kind "pem": PKCS#8 or traditional RSA PEM; "ed25519-seed": the 32 raw octets."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef dkim_key *k = NULL
        cdef int rc
        if self.k != NULL:
            raise RuntimeError("Key already initialised")
        if kind == "pem":
            rc = dkim_key_load_pem(<const char *>_ptr(view), len(view), &k)
        elif kind == "ed25519-seed":
            rc = dkim_key_load_ed25519_seed(_ptr(view), len(view), &k)
        else:
            raise ValueError(f"kind {kind!r}: want 'pem' or 'ed25519-seed'")
        if rc == DKIM_KEY_NOMEM:
            raise MemoryError()
        if rc != DKIM_KEY_OK:
            raise KeyLoadError(*_KEY_ERRORS[rc])
        self.k = k

    def __dealloc__(self):
        dkim_key_free(self.k)
        self.k = NULL

    cdef dkim_key *_get(self) except NULL:
        if self.k == NULL:
            raise RuntimeError("Key is not initialised")
        return self.k

    @property
    def algorithm(self):
        """"rsa-sha256" or "ed25519-sha256" (the a= value)."""
        return _ALGS[dkim_key_alg(self._get())]

    @property
    def bits(self):
        """RSA modulus size, 256 for Ed25519."""
        return dkim_key_bits(self._get())

    def public_key(self):
        """The p= material before base64: SubjectPublicKeyInfo DER (RSA) or 32 octets (Ed25519)."""
        cdef long n = dkim_key_public(self._get(), NULL, 0)
        if n <= 0:
            raise MemoryError()
        out = PyBytes_FromStringAndSize(NULL, n)
        n = dkim_key_public(self.k, <unsigned char *>PyBytes_AS_STRING(out), n)
        if n <= 0:
            raise MemoryError()
        return out[:n]


cdef bint _name_ok(bytes name):
    # h= names: ftext (RFC 5322 3.6.8) without ';' (it would end the tag), short enough
    # for one folded line.
    if not 0 < len(name) <= 60:
        return False
    for c in name:
        if c < 33 or c > 126 or c == 58 or c == 59:
            return False
    return True


cdef class Spec:
    """One signature to add: key, canonicalisation, fixed tags, names for h=."""

    cdef dkim_spec s                    # what sign.c reads
    cdef dkim_hname *names              # owned array behind s.names
    cdef readonly Key key               # keeps the key alive as long as the spec
    cdef bytes _tags                    # backing store of s.tags
    cdef tuple _namebufs                # backing store of names[i].name

    def __cinit__(self):
        self.names = NULL

    def __init__(self, Key key not None, bytes tags not None, tuple headers not None,
                 oversign=(), bint relaxed_header=True, bint relaxed_body=True,
                 long long expire_after=-1):
        cdef Py_ssize_t i
        if self.names != NULL:
            raise RuntimeError("Spec already initialised")
        if not 0 < len(headers) <= DKIM_MAX_NAMES:
            raise ValueError(f"want 1 to {DKIM_MAX_NAMES} header names, got {len(headers)}")
        if b"\r" in tags or b"\n" in tags or not tags.endswith(b";"):
            raise ValueError(f"tags {tags!r}: want 'tag=value;' items without line ends")
        over = frozenset(bytes(n).lower() for n in oversign)
        bufs = tuple(bytes(n).lower() for n in headers)
        for n in bufs:
            if not _name_ok(n):
                raise ValueError(f"header name {n!r}: want 1-60 printable ASCII octets, no ':' ';'")
        self.names = <dkim_hname *>PyMem_Calloc(len(bufs), sizeof(dkim_hname))
        if self.names == NULL:
            raise MemoryError()
        for i, n in enumerate(bufs):
            self.names[i].name = PyBytes_AS_STRING(n)
            self.names[i].len = len(n)
            self.names[i].oversign = n in over
        self._namebufs = bufs
        self._tags = tags
        self.key = key
        self.s.key = key._get()
        self.s.relaxed_header = relaxed_header
        self.s.relaxed_body = relaxed_body
        self.s.tags = PyBytes_AS_STRING(tags)
        self.s.tags_len = len(tags)
        self.s.names = self.names
        self.s.nnames = len(bufs)
        self.s.expire_after = expire_after

    def __dealloc__(self):
        PyMem_Free(self.names)
        self.names = NULL


cdef class Pool:
    """threads-1 native workers; the thread calling sign_batch() is the last one."""

    cdef dkim_pool *p                   # NULL after close() once no call is running
    cdef int active                     # sign_batch() calls between nogil enter/exit
    cdef bint closing                   # close() ran; the last active call frees p

    def __cinit__(self):
        self.p = NULL
        self.active = 0
        self.closing = False

    def __init__(self, int threads):
        cdef dkim_pool *p = NULL
        cdef int rc
        if self.p != NULL:
            raise RuntimeError("Pool already initialised")
        if not 1 <= threads <= 1024:
            raise ValueError(f"threads {threads}: want 1 <= n <= 1024")
        with nogil:
            rc = dkim_pool_new(threads, &p)
        if rc < 0:
            raise OSError(-rc, "cannot start DKIM signing threads")
        self.p = p

    def __dealloc__(self):
        if self.p != NULL:
            with nogil:
                dkim_pool_free(self.p)
            self.p = NULL

    @property
    def threads(self):
        """Threads signing one batch, the caller included."""
        if self.p == NULL:
            raise RuntimeError("Pool is closed")
        return dkim_pool_threads(self.p)

    def close(self):
        """Stop the workers (after any running batch); later calls raise RuntimeError."""
        self.closing = True
        if self.p != NULL and self.active == 0:
            with nogil:
                dkim_pool_free(self.p)
            self.p = NULL

    def sign_batch(self, list messages not None, list specs not None, int64_t now,
                   bint signed_messages=False):
        """Sign messages[i] with every Spec in specs[i] (a sequence).

        Returns one item per message: the DKIM-Signature fields (CRLF-ended, in
        spec order), or with signed_messages=True those fields followed by the
        message after line-end repair; or a MessageError.
        """
        cdef Py_ssize_t n = len(messages), i, k, total = 0, got = 0
        cdef dkim_job *jobs = NULL
        cdef Py_buffer *views = NULL
        cdef const dkim_spec **ptrs = NULL
        cdef dkim_job *j
        cdef char *o
        cdef const unsigned char *body
        cdef size_t blen
        if self.p == NULL or self.closing:
            raise RuntimeError("Pool is closed")
        if len(specs) != n:
            raise ValueError(f"{n} messages but {len(specs)} spec lists")
        # Own references: the caller's lists may change while the GIL is released.
        keep = [tuple(s) for s in specs]
        for t in keep:
            for s in <tuple>t:
                if type(s) is not Spec:
                    raise TypeError(f"want Spec objects, got {type(s).__name__}")
            total += len(<tuple>t)
        out = [None] * n
        jobs = <dkim_job *>PyMem_Calloc(n if n else 1, sizeof(dkim_job))
        views = <Py_buffer *>PyMem_Calloc(n if n else 1, sizeof(Py_buffer))
        ptrs = <const dkim_spec **>PyMem_Malloc((total if total else 1) * sizeof(void *))
        try:
            if jobs == NULL or views == NULL or ptrs == NULL:
                raise MemoryError()
            total = 0
            for i in range(n):
                PyObject_GetBuffer(messages[i], &views[i], PyBUF_SIMPLE)
                got += 1
                jobs[i].msg = <const unsigned char *>views[i].buf
                jobs[i].len = views[i].len
                jobs[i].specs = &ptrs[total]
                jobs[i].nspecs = len(<tuple>keep[i])
                jobs[i].now = now
                for s in <tuple>keep[i]:
                    ptrs[total] = &(<Spec>s).s
                    total += 1
            self.active += 1
            with nogil:
                dkim_pool_run(self.p, jobs, n)
            self.active -= 1
            for i in range(n):
                j = &jobs[i]
                if j.err:
                    out[i] = MessageError(j.err, j.detail.decode("utf-8", "replace"))
                elif not signed_messages:
                    out[i] = PyBytes_FromStringAndSize(j.sig, j.sig_len)
                else:
                    if j.norm != NULL:
                        body = j.norm
                        blen = j.norm_len
                    else:
                        body = <const unsigned char *>views[i].buf
                        blen = <size_t>views[i].len
                    r = PyBytes_FromStringAndSize(NULL, j.sig_len + blen)
                    o = PyBytes_AS_STRING(r)
                    if j.sig_len:
                        memcpy(o, j.sig, j.sig_len)
                    if blen:
                        memcpy(o + j.sig_len, body, blen)
                    out[i] = r
        finally:
            if self.closing and self.active == 0 and self.p != NULL:
                with nogil:
                    dkim_pool_free(self.p)
                self.p = NULL
            if jobs != NULL:
                for i in range(n):
                    free(jobs[i].sig)
                    free(jobs[i].norm)
            for k in range(got):
                PyBuffer_Release(&views[k])
            PyMem_Free(jobs)
            PyMem_Free(views)
            PyMem_Free(ptrs)
        return out


def keygen(str algorithm, int bits=2048):
    """A new private key as PKCS#8 PEM; algorithm "rsa" (bits) or "ed25519"."""
    cdef char *pem = NULL
    cdef size_t n = 0
    cdef int rc, alg
    if algorithm == "rsa":
        alg = DKIM_RSA_SHA256
        if not 1024 <= bits <= 8192:
            raise ValueError(f"RSA bits {bits}: want 1024 <= bits <= 8192")
    elif algorithm == "ed25519":
        alg = DKIM_ED25519_SHA256
    else:
        raise ValueError(f"algorithm {algorithm!r}: want 'rsa' or 'ed25519'")
    with nogil:
        rc = dkim_keygen(alg, bits, &pem, &n)
    if rc != DKIM_KEY_OK:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(pem, n)
    finally:
        free(pem)


cdef bytes _take(char *p, size_t n, int rc):
    if rc < 0:
        free(p)
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(p, n) if p != NULL else b""
    finally:
        free(p)


def canon_body(const unsigned char[::1] body, bint relaxed):
    """Canonical body (RFC 6376 3.4.3/3.4.4) of raw body octets; bare LF ends a line."""
    cdef char *p = NULL
    cdef size_t n = 0
    rc = dkim_canon_body(_ptr(body), len(body),
                         relaxed, &p, &n)
    return _take(p, n, rc)


def canon_field(const unsigned char[::1] field, bint relaxed):
    """Canonical form (RFC 6376 3.4.1/3.4.2) of one raw header field "name:value"."""
    cdef char *p = NULL
    cdef size_t n = 0
    if b":" not in bytes(field):
        raise ValueError("a header field needs a colon")
    rc = dkim_canon_field(<const char *>_ptr(field), len(field), relaxed, &p, &n)
    return _take(p, n, rc)


def repair(const unsigned char[::1] message):
    """The message as it will be sent: bare LF -> CRLF, bare CR -> SP, final CRLF."""
    cdef unsigned char *p = NULL
    cdef size_t n = 0
    rc = dkim_repair(_ptr(message), len(message),
                     &p, &n)
    if rc == 0 and p == NULL:
        return bytes(message)
    return _take(<char *>p, n, rc)


def body_hash(const unsigned char[::1] message, bint relaxed):
    """Raw bh= digest of a CRLF message (header block, empty line, body)."""
    cdef unsigned char dg[32]
    rc = dkim_body_hash(_ptr(message),
                        len(message), relaxed, dg)
    if rc < 0:
        raise ValueError(f"cannot hash: {ERRORS.get(-rc, -rc)}")
    return PyBytes_FromStringAndSize(<char *>dg, 32)


def header_input(const unsigned char[::1] message, bint relaxed_header, list names not None,
                 bytes field not None):
    """What the header hash covers (RFC 6376 3.7): the fields named in h=, bottom-up,
    then `field` (the DKIM-Signature field with b= emptied, no final CRLF)."""
    cdef char *p = NULL
    cdef size_t n = 0
    joined = b"".join(bytes(x) + b"\0" for x in names)
    rc = dkim_header_input(_ptr(message), len(message), relaxed_header, joined, len(names),
                           field, len(field), &p, &n)
    if rc < 0:
        raise ValueError(f"cannot canonicalise: {ERRORS.get(-rc, -rc)}")
    return _take(p, n, 0)


def sign_prepared(Key key not None, const unsigned char[::1] message, bint relaxed_header,
                  list names not None, bytes field not None):
    """Raw b= over header_input(): the same header selection, canonicalisation and
    signing as sign_batch(), used to reproduce published signatures bit for bit."""
    cdef unsigned char sig[1024]
    joined = b"".join(bytes(n) + b"\0" for n in names)
    rc = dkim_sign_prepared(key._get(), _ptr(message),
                            len(message), relaxed_header, joined, len(names),
                            field, len(field), sig, sizeof(sig))
    if rc < 0:
        raise ValueError(f"cannot sign: {ERRORS.get(-rc, -rc)}")
    return PyBytes_FromStringAndSize(<char *>sig, rc)
