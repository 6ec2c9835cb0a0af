# address.pxi - MAIL/RCPT path and parameter parsing (RFC 5321 4.1.2, RFC 3461,
# RFC 6152, RFC 6531, RFC 1870). Part of wire.pyx.
#
# Trust: the argument text is straight from the network. Every function
# returns either a value or the name of the reply to send (see mta/model/replies.py);
# none raises on bad input.

# atext (RFC 5322 3.2.3) plus '.', for unquoted local parts
cdef bytes _ATEXT = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                     b"!#$%&'*+-/=?^_`{|}~.")
# XXX: RFC 5321 caps the local part at 64 octets; VERP return paths of bulk
# senders exceed it, so we allow more (Postfix enforces no limit at all).
cdef enum:
    MAX_LOCAL = 256     # octets of a local part
    MAX_DOMAIN = 255    # octets of a domain (RFC 5321 4.5.3.1.2)
    MAX_ENVID = 100     # octets of a DSN ENVID (RFC 3461 4.4)


cdef inline bint _is_atext(int c, bint utf8):
    return (c >= 0x80 and utf8) or (c < 0x80 and _ATEXT.find(bytes((c,))) >= 0)


cdef object _check_local(bytes local, bint utf8):
    """None if `local` is a valid dot-string or quoted-string, else a reason."""
    cdef Py_ssize_t i, n = len(local)
    cdef int c
    if n == 0 or n > MAX_LOCAL:
        return "empty or too long"
    if local[0] == 0x22:  # quoted-string: qtext or quoted-pair, printable only
        if n < 2 or local[n - 1] != 0x22:
            return "unterminated quote"
        i = 1
        while i < n - 1:
            c = local[i]
            if c == 0x5c:  # backslash: quoted-pair
                i += 1
                if i >= n - 1:
                    return "bad quoted-pair"
                c = local[i]
            if c < 0x20 or c == 0x7f or (c >= 0x80 and not utf8):
                return "bad character"
            if c == 0x22 and local[i - 1] != 0x5c:
                return "stray quote"
            i += 1
        return None
    for i in range(n):
        if not _is_atext(local[i], utf8):
            return "bad character"
    return None


cdef object _check_domain(bytes domain, bint utf8):
    """None if `domain` is a hostname or an address literal, else a reason."""
    cdef Py_ssize_t n = len(domain)
    # unsigned: Cython iterates bytes as C char, which is signed on x86, and a
    # signed c made every UTF-8 domain fail the c >= 0x80 test below
    cdef unsigned char c
    if n == 0 or n > MAX_DOMAIN:
        return "empty or too long"
    if domain[0] == 0x5b:  # address literal [1.2.3.4] / [IPv6:...]
        if domain[n - 1] != 0x5d or n < 3:
            return "bad address literal"
        for c in domain[1:n - 1]:
            if c <= 0x20 or c >= 0x7f or c == 0x5b or c == 0x5d or c == 0x5c:
                return "bad address literal"
        return None
    for label in domain.split(b"."):
        if len(label) == 0 or len(label) > 63:
            return "bad label"
        for c in label:
            if not ((0x30 <= c <= 0x39) or (0x41 <= c <= 0x5a) or (0x61 <= c <= 0x7a)
                    or c == 0x2d or c == 0x5f or (c >= 0x80 and utf8)):
                return "bad character"
    return None


cdef Py_ssize_t _path_end(bytes arg):
    """Index of the '>' closing the path that starts at arg[0] == '<', or -1."""
    cdef Py_ssize_t i = 1, n = len(arg)
    cdef bint quoted = False
    while i < n:
        c = arg[i]
        if quoted and c == 0x5c:
            i += 2
            continue
        if c == 0x22:
            quoted = not quoted
        elif c == 0x3e and not quoted:
            return i
        i += 1
    return -1


cdef Py_ssize_t _route_colon(bytes inner):
    """Index of the ':' ending a source route (A-d-l) in `inner`, or -1.

    Only a colon before the last '@' counts, and none inside [...]."""
    cdef Py_ssize_t i, at = inner.rfind(b"@")
    cdef bint literal = False
    cdef unsigned char c
    for i in range(at if at > 0 else 0):
        c = inner[i]
        if c == 0x5b:
            literal = True
        elif c == 0x5d:
            literal = False
        elif c == 0x3a and not literal:
            return i
    return -1


cdef tuple _parse_path(bytes arg, bint is_sender, bint utf8_allowed):
    """Split '<path> params' -> (address str or None, params bytes, error reply name)."""
    cdef Py_ssize_t end
    cdef bytes inner, local, domain
    cdef bint utf8
    bad = "BAD_SENDER" if is_sender else "BAD_RECIPIENT"
    syntax = "SYNTAX_MAIL" if is_sender else "SYNTAX_RCPT"
    arg = arg.lstrip(b" ")  # a space after the colon is common and harmless
    if not arg.startswith(b"<"):
        return None, b"", syntax
    end = _path_end(arg)
    if end < 0:
        return None, b"", syntax
    inner = arg[1:end]
    rest = arg[end + 1:]
    if rest and not rest.startswith(b" "):
        return None, b"", syntax
    if inner == b"":
        return ("", rest, None) if is_sender else (None, b"", bad)
    # Source routes (<@a,@b:user@c>, RFC 5321 4.1.2 / C.) are accepted and
    # ignored; like OpenSMTPD we strip anything up to the first ':' outside a
    # quoted local part -- but only before the mailbox's '@' and outside an
    # address literal, so user@[IPv6:2001:db8::1] stays whole.
    if not inner.startswith(b'"'):
        colon = _route_colon(inner)
        if colon >= 0:
            inner = inner[colon + 1:]
    utf8 = False
    for c in inner:
        if c >= 0x80:
            utf8 = True
            break
    if utf8 and not utf8_allowed:
        return None, b"", "NEED_SMTPUTF8"
    at = inner.rfind(b"@")
    if at < 0:
        # RFC 5321 4.5.1: <postmaster> without a domain must be accepted
        if not is_sender and inner.lower() == b"postmaster":
            return "postmaster", rest, None
        return None, b"", bad
    local = inner[:at]
    domain = inner[at + 1:]
    if _check_local(local, utf8) is not None or _check_domain(domain, utf8) is not None:
        return None, b"", bad
    try:
        return inner.decode("utf-8" if utf8 else "ascii"), rest, None
    except UnicodeDecodeError:
        return None, b"", bad


cdef inline bint _is_hex(int h):
    return (0x30 <= h <= 0x39) or (0x41 <= h <= 0x46)


cdef bint _is_atom(bytes value):
    """RFC 5321 4.1.2 Atom (1*atext, ASCII, no '.'): the ORCPT addr-type (RFC 3461 4.2)."""
    cdef Py_ssize_t i, n = len(value)
    cdef unsigned char c
    for i in range(n):
        c = value[i]
        if c == 0x2e or not _is_atext(c, False):
            return False
    return n > 0


cdef bint _is_xtext(bytes value):
    """RFC 3461 4: xchar or '+' HEXCHAR HEXCHAR (uppercase hex)."""
    cdef Py_ssize_t i = 0, n = len(value)
    while i < n:
        c = value[i]
        if c == 0x2b:
            if i + 2 >= n or not (_is_hex(value[i + 1]) and _is_hex(value[i + 2])):
                return False
            i += 3
            continue
        if c < 33 or c > 126 or c == 0x3d:
            return False
        i += 1
    return n > 0


cdef object _split_params(bytes rest):
    """'K=V K2' -> dict upper-case key -> value bytes (b"" when none), or a reply name."""
    params = {}
    for tok in rest.split(b" "):
        if not tok:
            continue
        eq = tok.find(b"=")
        key = (tok if eq < 0 else tok[:eq]).upper()
        value = b"" if eq < 0 else tok[eq + 1:]
        if not key or (eq >= 0 and not value):
            return "PARAM_BAD"
        if key in params:
            return "PARAM_REPEATED"
        params[key] = value
    return params
