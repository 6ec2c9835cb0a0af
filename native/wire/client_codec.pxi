# client_codec.pxi - the client core's wire codec. Part of wire.pyx.
#
# Out: command arguments checked for CR/LF/controls (no command injection),
# and message content through stuff.c (dot-stuffing, CRLF only, end of data).
# In: the server's replies (RFC 5321 4.2): "ddd-text" continuation lines,
# then one "ddd text" (or bare "ddd") last line; every line of a reply must
# carry the same code. Enhanced status codes (RFC 2034, RFC 3463) are taken
# from the start of the text; EHLO keywords (RFC 5321 4.1.1.1) from the
# lines after the first.
#
# Trust: every byte is from the remote server, which we distrust as much as
# our listener distrusts its clients. A reply is bounded (MAX_REPLY octets
# over all its lines); reply text is reduced to printable ASCII before it
# goes anywhere (logs, DSNs), so a server cannot inject control characters.
# A malformed or oversized reply fails the session; nothing here raises
# on peer input (only on bad arguments from our own caller: ValueError).

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.string cimport memcpy

cdef enum:
    MAX_REPLY = 65536   # octets of one reply over all its lines

# Byte -> byte table making peer text printable ASCII: TAB becomes a space,
# every other control or non-ASCII octet a '?'.
cdef bytes _PRINTABLE = bytes([0x20 if c == 9 else (c if 0x20 <= c < 0x7f else 0x3f)
                               for c in range(256)])


cdef inline bint _is_digit(int c):
    return 0x30 <= c <= 0x39


cdef Py_ssize_t _status_len(bytes text, int code_class):
    """Length of the enhanced status code (class.subject.detail, RFC 3463 2)
    that starts `text`, 0 if there is none or its class differs from the
    reply code's (a "250 5.0.0" is not trusted)."""
    cdef Py_ssize_t i = 0, n = len(text), field, digits
    if n < 5 or text[0] - 0x30 != code_class or text[1] != 0x2e:
        return 0
    i = 2
    for field in range(2):          # subject and detail: 1 to 3 digits each
        digits = 0
        while i < n and _is_digit(text[i]) and digits < 3:
            i += 1
            digits += 1
        if digits == 0:
            return 0
        if field == 0:
            if i >= n or text[i] != 0x2e:
                return 0
            i += 1
    if i < n and text[i] != 0x20:
        return 0
    return i


cdef tuple _make_reply(int code, list lines):
    """(code, enhanced status or "", text): the status comes from the first
    line and is stripped from every line that repeats it; the lines' texts
    are joined with single spaces."""
    cdef Py_ssize_t slen = _status_len(lines[0], code // 100)
    cdef bytes status = lines[0][:slen]
    parts = []
    for line in lines:
        if slen and line.startswith(status) and (len(line) == slen or line[slen] == 0x20):
            line = line[slen:]
        line = line.strip(b" \t")
        if line:
            parts.append(line.translate(_PRINTABLE))
    return code, status.decode("ascii"), b" ".join(parts).decode("ascii")


cdef dict _parse_ehlo(list lines):
    """EHLO keywords (upper case) -> their parameters ("" when none)."""
    caps = {}
    for line in lines[1:]:
        words = line.translate(_PRINTABLE).decode("ascii").split(None, 1)
        if words:
            caps[words[0].upper()] = words[1].strip() if len(words) > 1 else ""
    return caps


cdef Py_ssize_t _size_limit(dict caps):
    """RFC 1870 SIZE: the peer's fixed message size limit, 0 for none."""
    value = caps.get("SIZE")
    if value is None or not value.isdigit() or len(value) > 18:
        return 0
    return int(value)


# -- out: commands and content ----------------------------------------------------------

cdef bytes _wire_arg(str value, bint utf8, bint param, str what):
    """`value` encoded for a command line; ValueError on anything that could
    break the line (CR, LF, controls) -- a hook or a bad spool record must
    never turn into command injection. Parameters (`param`) are also
    spaceless ASCII (xtext, RFC 3461 4)."""
    cdef bytes raw = value.encode("utf-8" if utf8 else "ascii", "strict")
    cdef unsigned char c
    for c in raw:
        if c < 0x20 or c == 0x7f or (param and (c == 0x20 or c >= 0x80)):
            raise ValueError(f"{what} {value!r}: control, space or non-ASCII character")
    return raw


cdef extern from "Python.h":
    # raw forms, so a fresh bytes object can be filled, then shrunk in place
    PyObject *_bytes_new "PyBytes_FromStringAndSize"(const char *v, Py_ssize_t n) except NULL
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *b)
    int _bytes_resize "_PyBytes_Resize"(PyObject **b, Py_ssize_t n) except -1


cdef bytes _wire_content(object content, int flags, bytes before, bint bdat):
    """`before` + the content as it goes on the wire, in one allocation.

    DATA (flags STUFF_DOTS|STUFF_TERMINATE): dot-stuffed, CRLF only, ends
    with ".\r\n"; one pass into a worst-case buffer, shrunk in place. BDAT
    (flags 0, `bdat`): CRLF only, no stuffing, after its "BDAT <n> LAST" line,
    so the exact size is counted first; clean content is copied as it is."""
    cdef const unsigned char[::1] view = content
    cdef Py_ssize_t n = view.shape[0], head, size
    cdef const char *p = b""
    cdef size_t changes = 0
    cdef PyObject *raw
    if n:
        p = <const char *>&view[0]
    if bdat:
        size = <Py_ssize_t>stuff_size(p, <size_t>n, flags, &changes)
        before = before + b"BDAT %d LAST\r\n" % size
    else:
        size = <Py_ssize_t>stuff_bound(n)
    head = len(before)
    raw = _bytes_new(NULL, head + size)
    memcpy(_bytes_data(raw), PyBytes_AS_STRING(before), head)
    if bdat and changes == 0:
        memcpy(_bytes_data(raw) + head, p, n)
    else:
        size = <Py_ssize_t>stuff_copy(p, <size_t>n, flags, _bytes_data(raw) + head)
        _bytes_resize(&raw, head + size)   # frees raw and raises on failure
    out = <bytes>raw
    Py_DECREF(<object>raw)
    return out


def dot_stuff(content):
    """The octets sent after "354" for `content` (see stuff.h)."""
    return _wire_content(content, STUFF_DOTS | STUFF_TERMINATE, b"", False)


def content_needs_8bit(content):
    """True if any octet of `content` is >= 0x80 (needs 8BITMIME, RFC 6152)."""
    cdef const unsigned char[::1] view = content
    if view.shape[0] == 0:
        return False
    return c_needs_8bit(<const char *>&view[0], <size_t>view.shape[0]) != 0
