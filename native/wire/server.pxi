# server.pxi - the SMTP server session core. Part of wire.pyx.

class InternalError(Exception):
    """A bug: an illegal state transition. Closes the session, not the daemon."""


# Legal transitions (RFC 5321 3.3, 4.1.4); anything else is a bug.
cdef dict _TRANSITIONS = {
    ST_CONNECTED: {ST_READY, ST_CLOSED},
    ST_READY: {ST_READY, ST_MAIL, ST_CLOSED},
    ST_MAIL: {ST_READY, ST_MAIL, ST_RCPT, ST_CLOSED},
    ST_RCPT: {ST_READY, ST_RCPT, ST_DATA, ST_CHUNK, ST_CLOSED},
    ST_DATA: {ST_READY, ST_PENDING, ST_CLOSED},
    ST_CHUNK: {ST_READY, ST_RCPT, ST_PENDING, ST_CLOSED, ST_CHUNK},
    ST_PENDING: {ST_READY, ST_CLOSED},
    ST_CLOSED: set(),
}

# Command table: verb -> (code, junk-counted). Junk commands are those a
# client can repeat without ever sending mail (Postfix smtpd_junk_command_limit).
cdef enum CommandCode:
    C_HELO = 1
    C_EHLO = 2
    C_MAIL = 3
    C_RCPT = 4
    C_DATA = 5
    C_BDAT = 6
    C_RSET = 7
    C_NOOP = 8
    C_QUIT = 9
    C_VRFY = 10
    C_HELP = 11
    C_NOTIMPL = 12      # recognised, refused with 502
    C_STARTTLS = 13     # RFC 3207, when the listener has a certificate
    C_AUTH = 14         # RFC 4954, PLAIN, LOGIN and SCRAM-SHA-256, over TLS only
cdef dict _COMMANDS = {
    b"HELO": (C_HELO, False), b"EHLO": (C_EHLO, False),
    b"MAIL": (C_MAIL, False), b"RCPT": (C_RCPT, False),
    b"DATA": (C_DATA, False), b"BDAT": (C_BDAT, False),
    b"RSET": (C_RSET, True), b"NOOP": (C_NOOP, True),
    b"QUIT": (C_QUIT, False), b"VRFY": (C_VRFY, True),
    b"HELP": (C_HELP, True),
    b"STARTTLS": (C_STARTTLS, False), b"AUTH": (C_AUTH, False),
    # recognised but not offered
    b"EXPN": (C_NOTIMPL, True), b"ETRN": (C_NOTIMPL, True), b"TURN": (C_NOTIMPL, True),
}

# Server events beyond EV_NONE/EV_MESSAGE/EV_CLOSE (wire.pyx). EV_STARTTLS (client.pxi, 8):
# 220 written, input after the STARTTLS line discarded: do the handshake, then tls_started().
EV_AUTH = 128       # an AUTH exchange is complete: verify auth_request, then auth_done()
# the same values as C constants, for ServerCore.hold (compared without Python objects)
cdef enum:
    H_MESSAGE = 1       # EV_MESSAGE
    H_STARTTLS = 8      # EV_STARTTLS
    H_AUTH = 128        # EV_AUTH


cdef str _printable(bytes raw, Py_ssize_t limit=255):
    """Peer text made safe to echo in a reply: printable ASCII only."""
    return "".join(chr(c) if 0x21 <= c <= 0x7e else "?" for c in raw[:limit])


cdef class ServerSettings:
    """Per-listener limits and the encoded reply table, built once per listener."""

    cdef readonly str hostname          # our name in replies
    cdef readonly int bare_mode         # DATA_REJECT or DATA_NORMALIZE
    cdef readonly Py_ssize_t max_message_size
    cdef readonly Py_ssize_t max_line_length
    cdef readonly int max_recipients
    cdef readonly int max_errors
    cdef readonly int max_junk
    cdef readonly int max_messages
    cdef dict replies                   # name -> encoded reply line (bytes)
    # RCPT policy hook (suppression, the bounce domain), None when there is none so the
    # common path costs one pointer test: (address, sender, relay_allowed) -> None (the
    # relay check decides), True (accept from any client) or (reply name, reply line).
    cdef public object rcpt_check
    # MAIL admission hook (spool backpressure, the DATA memory budget), None when unset:
    # (sender) -> None (go on) or (reply name, reply line) to refuse the transaction.
    cdef public object mail_check
    cdef public bint starttls           # offer STARTTLS (a certificate, a plaintext listener)
    cdef public bint require_tls        # MAIL before TLS -> 530 5.7.0
    cdef public bint auth               # offer AUTH PLAIN LOGIN once the session is TLS


    def __init__(self, str hostname, dict replies, *, str bare_newline="reject",
                 Py_ssize_t max_message_size=50 << 20, Py_ssize_t max_line_length=2048,
                 int max_recipients=1000, int max_errors=10, int max_junk_commands=100,
                 int max_messages_per_session=1000):
        if bare_newline not in ("reject", "normalize"):
            raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")
        self.hostname = hostname
        self.replies = replies
        self.bare_mode = DATA_NORMALIZE if bare_newline == "normalize" else DATA_REJECT
        self.max_message_size = max_message_size
        self.max_line_length = max_line_length
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.max_junk = max_junk_commands
        self.max_messages = max_messages_per_session
        self.rcpt_check = None
        self.mail_check = None


cdef class Transaction:
    """One mail transaction's envelope and content, handed to the spool."""

    cdef readonly str helo              # HELO/EHLO argument
    cdef readonly bint esmtp            # client said EHLO
    cdef readonly str mail_from         # reverse-path, "" for the null sender
    cdef readonly Py_ssize_t size_hint  # MAIL SIZE= value, -1 when absent
    cdef readonly str body_type         # "7BIT", "8BITMIME" or "" (RFC 6152)
    cdef readonly bint smtputf8         # MAIL SMTPUTF8 (RFC 6531)
    cdef readonly object ret            # DSN RET: "FULL", "HDRS" or None (RFC 3461 4.3)
    cdef readonly object envid          # DSN ENVID xtext or None (RFC 3461 4.4)
    cdef readonly list rcpts            # [(address, notify or None, orcpt or None)]
    cdef readonly bytearray data        # content, unstuffed, CRLF line ends
    cdef readonly bint chunked          # received with BDAT (RFC 3030)
    cdef readonly bint tls              # received over TLS (STARTTLS or an implicit listener)
    cdef readonly bint requiretls       # MAIL REQUIRETLS (RFC 8689)
    cdef readonly bint authed           # sent by a client that passed AUTH
    cdef readonly object auth_tenant    # tenant of the AUTH user, None when not authenticated


    def __repr__(self):
        return (f"<Transaction from={self.mail_from!r} rcpts={len(self.rcpts)} "
                f"size={len(self.data)}>")


cdef class ServerCore:
    """The SMTP server side of one connection. See the module docstring."""

    cdef ServerSettings s
    cdef public bint relay_allowed      # client address is inside relay_cidrs, or AUTH done
    cdef public bint tls                # the session is encrypted
    cdef readonly bint authed           # AUTH succeeded
    cdef public object auth_tenant      # the AUTH user's tenant (copied to transactions)
    cdef public object sender_check     # None, or (MAIL FROM address) -> bool (AUTH user's domains)
    cdef readonly object auth_request   # (mechanism, [raw SASL responses]) while EV_AUTH is out
    cdef int auth_step                  # 0, or the SASL response line awaited (1 PLAIN, 2-3 LOGIN,
                                        # 4 the next one of a multi-step mechanism: SCRAM)
    cdef int hold                       # the event ST_PENDING stands for (EV_MESSAGE by default)
    cdef readonly int state             # SessionState
    cdef bytes pending                  # unprocessed input
    cdef bytearray out                  # replies not yet handed to the transport
    cdef int errors                     # 4xx/5xx replies to commands so far
    cdef int junk                       # NOOP/RSET/VRFY/HELP since the last MAIL
    cdef int messages                   # messages accepted in this session
    cdef bint skip_line                 # discarding the rest of an over-long line
    cdef str helo
    cdef bint esmtp
    cdef Transaction txn                # the transaction being built
    cdef readonly list rejections       # [(reply name, sender, recipients)] for the Rejection log
    cdef data_scan scan                 # DATA scanner state
    cdef Py_ssize_t chunk_left          # BDAT octets still to read
    cdef bint chunk_last                # current chunk is the LAST one
    cdef bint chunk_discard             # current chunk is read and thrown away
    cdef int chunk_prev                 # state to return to after a discarded chunk
    cdef int chunk_cr                   # a CR ended the previous chunk
    cdef size_t chunk_bare              # bare CR/LF seen in chunks
    cdef Py_ssize_t chunk_size          # content bytes received in chunks

    cdef _set_state(self, int new)
    cdef _reply(self, str name)
    cdef _error(self, str name)
    cdef _reset_txn(self)
    cdef _end_of_content(self, size_t bare, bint overflow)
    cdef _dispatch(self, bytes line)


    def __init__(self, ServerSettings settings, bint relay_allowed):
        self.s = settings
        self.relay_allowed = relay_allowed
        self.state = ST_CONNECTED
        self.pending = b""
        self.out = bytearray()
        self.helo = ""
        self.txn = None
        self.rejections = []
        self.hold = H_MESSAGE

    # -- API used by the session -------------------------------------------

    @property
    def in_content(self):
        """True while reading DATA or a BDAT chunk (selects the data timeout)."""
        return self.state == ST_DATA or self.state == ST_CHUNK

    @property
    def closed(self):
        return self.state == ST_CLOSED

    @property
    def held(self):
        """Bytes of client input held in memory: the content of the transaction being
        received or stored, and input not processed yet (the memory governor's measure)."""
        cdef Py_ssize_t n = len(self.pending)
        if self.txn is not None:
            n += len(self.txn.data)
        return n

    def greeting(self):
        return self.s.replies["GREETING"]

    def feed(self, data):
        """Process received bytes -> (output bytes, event)."""
        if self.state == ST_CLOSED:
            return b"", EV_CLOSE
        if self.state == ST_PENDING:  # the session paused reading; keep it for later
            if self.hold == H_STARTTLS:
                return b"", EV_NONE   # plaintext after STARTTLS is never executed (RFC 3207 4.2)
            self.pending = self.pending + bytes(data)
            return b"", EV_NONE
        if self.pending:
            self.pending = self.pending + bytes(data)
        else:
            self.pending = bytes(data)
        return self._run()

    def transaction(self):
        """The completed transaction (valid after EV_MESSAGE, until resume())."""
        return self.txn

    def tls_started(self):
        """The TLS handshake after EV_STARTTLS is done: start over (RFC 3207 4.2: forget
        EHLO and anything sent before the handshake); the client sends EHLO again."""
        if self.state != ST_PENDING or self.hold != H_STARTTLS:
            raise InternalError("tls_started() without STARTTLS")
        self.pending = b""
        self.helo = ""
        self.esmtp = False
        self._reset_txn()
        self.tls = True
        self.hold = H_MESSAGE
        self.state = ST_CONNECTED

    def auth_done(self, bint ok, str failure="AUTH_FAILED", tenant=None, sender_check=None):
        """The verdict on auth_request (after EV_AUTH): 235 and relaying, or the refusal
        `failure` (counted towards max_errors); then go on with buffered input."""
        if self.state != ST_PENDING or self.hold != H_AUTH:
            raise InternalError("auth_done() without AUTH")
        self.auth_request = None
        self.hold = H_MESSAGE
        self.state = ST_READY
        if ok:
            self.authed = True
            self.relay_allowed = True
            self.auth_tenant = tenant
            self.sender_check = sender_check
            self._reply("AUTH_OK")
        else:
            self._error(failure)
        return self._run()

    def auth_continue(self, bytes challenge):
        """After EV_AUTH of a multi-step mechanism (SCRAM-SHA-256): send `challenge` (base64)
        in a 334 reply and wait for the client's next response, which comes back as
        another EV_AUTH with auth_request's responses one longer."""
        if self.state != ST_PENDING or self.hold != H_AUTH:
            raise InternalError("auth_continue() without AUTH")
        self.hold = H_MESSAGE
        self.state = ST_READY
        self.auth_step = 4
        self.out += b"334 " + challenge + b"\r\n"
        return self._run()

    def resume(self, bytes reply):
        """Send the spool's verdict for the pending message and go on."""
        if self.state != ST_PENDING or self.hold != H_MESSAGE:
            raise InternalError("resume() without a pending message")
        self.out += reply
        if reply[:1] == b"2":
            self.messages += 1
        self._reset_txn()
        self._set_state(ST_READY)
        return self._run()

    def close_with(self, str name):
        """Final reply for a session the server ends (timeout, shutdown)."""
        self.state = ST_CLOSED
        return self.s.replies[name]

    # -- the loop over buffered input ---------------------------------------

    def _run(self):
        cdef bytes buf = self.pending
        cdef const char *p = PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = len(buf), pos = 0
        while pos < n and self.state != ST_PENDING and self.state != ST_CLOSED:
            if self.state == ST_DATA:
                pos = self._process__data(p, pos, n)
            elif self.state == ST_CHUNK:
                pos = self._process__chunk(p, pos, n)
            else:
                pos = self._process__command(p, pos, n)
                if pos < 0:  # incomplete line: wait for more
                    pos = -pos - 1
                    break
        self.pending = buf[pos:] if pos < n and self.state != ST_CLOSED else b""
        out = bytes(self.out)
        self.out.clear()
        if self.state == ST_CLOSED:
            return out, EV_CLOSE
        if self.state == ST_PENDING:
            if self.hold == H_STARTTLS:
                self.pending = b""
            return out, self.hold
        return out, EV_NONE

    cdef Py_ssize_t _process__command(self, const char *buf, Py_ssize_t pos, Py_ssize_t n):
        """Handle one command line; returns the new position, or -(pos+1) if incomplete."""
        cdef const char *lf = <const char *>memchr(buf + pos, 10, n - pos)
        cdef Py_ssize_t end, stop
        if lf == NULL:
            if n - pos > self.s.max_line_length:
                if not self.skip_line:
                    self._error("LINE_TOO_LONG")
                self.skip_line = True
                return n
            return -(pos + 1)
        end = lf - buf          # index of LF
        stop = end + 1
        if self.skip_line:      # tail of an over-long line: already answered
            self.skip_line = False
            return stop
        if end - pos + 1 > self.s.max_line_length:
            self._error("LINE_TOO_LONG")
            return stop
        if end > pos and buf[end - 1] == 13:
            line = buf[pos:end - 1]
        else:
            if self.s.bare_mode == DATA_REJECT:
                self._error("BARE_LF_COMMAND")
                return stop
            line = buf[pos:end]
        self._dispatch(line)
        return stop

    cdef Py_ssize_t _process__data(self, const char *buf, Py_ssize_t pos, Py_ssize_t n):
        cdef bytearray body = self.txn.data
        # the scanner writes at most the input (reject) or twice it (normalize: LF -> CRLF)
        cdef Py_ssize_t old = len(body)
        cdef Py_ssize_t want = (n - pos + 2) if self.s.bare_mode == DATA_REJECT else 2 * (n - pos) + 2
        cdef size_t outlen = 0, used
        cdef int done = 0
        room = self.s.max_message_size - <Py_ssize_t>self.scan.size
        if room < 0:
            room = 0
        if want > room + 2:
            want = room + 2  # the scanner stores nothing past max_size
        PyByteArray_Resize(body, old + want)
        used = data_scan_run(&self.scan, buf + pos, n - pos,
                             PyByteArray_AS_STRING(body) + old, &outlen, &done)
        PyByteArray_Resize(body, old + <Py_ssize_t>outlen)
        if done:
            self._end_of_content(self.scan.bare, self.scan.overflow)
        return pos + <Py_ssize_t>used

    cdef Py_ssize_t _process__chunk(self, const char *buf, Py_ssize_t pos, Py_ssize_t n):
        cdef Py_ssize_t take = min(n - pos, self.chunk_left)
        cdef bytearray body
        cdef Py_ssize_t old
        cdef size_t wrote
        self.chunk_left -= take
        if not self.chunk_discard:
            self.chunk_size += take
            if self.chunk_size > self.s.max_message_size:
                self.chunk_discard = True  # overflow: read the rest, store nothing
                self.txn.data.clear()
            else:
                body = self.txn.data
                old = len(body)
                if self.s.bare_mode == DATA_NORMALIZE:
                    PyByteArray_Resize(body, old + 2 * take + 1)
                    wrote = chunk_scan(buf + pos, take, DATA_NORMALIZE, &self.chunk_cr,
                                       &self.chunk_bare, PyByteArray_AS_STRING(body) + old)
                    PyByteArray_Resize(body, old + <Py_ssize_t>wrote)
                else:
                    chunk_scan(buf + pos, take, DATA_REJECT, &self.chunk_cr,
                               &self.chunk_bare, NULL)
                    body += buf[pos:pos + take]
        if self.chunk_left == 0:
            self._finish_chunk()
        return pos + take

    def _finish_chunk(self):
        overflow = self.chunk_size > self.s.max_message_size
        if self.chunk_discard and not overflow:
            # a chunk outside a valid transaction (RFC 3030 3: still read it)
            self.state = self.chunk_prev
            self.chunk_discard = False
            self._error("BDAT_DISCARDED")
            return
        if not self.chunk_last and not overflow:
            self.state = ST_RCPT
            self.out += self.s.replies["CHUNK_OK"].replace(b"{}", str(self.chunk_size).encode())
            return
        if self.chunk_cr:  # a CR ending the last chunk is bare
            self.chunk_bare += 1
            if self.s.bare_mode == DATA_NORMALIZE:
                self.txn.data[len(self.txn.data):] = b" "
        self._end_of_content(self.chunk_bare, overflow)

    cdef _end_of_content(self, size_t bare, bint overflow):
        """DATA/BDAT content complete: refuse it, or hand it to the caller."""
        if overflow or (bare and self.s.bare_mode == DATA_REJECT):
            name = "SIZE_TOO_BIG" if overflow else "BARE_NEWLINE"
            self.rejections.append((name, self.txn.mail_from, [r[0] for r in self.txn.rcpts]))
        if overflow:
            self._reset_txn()
            self.state = ST_READY
            self._error("SIZE_TOO_BIG")
        elif bare and self.s.bare_mode == DATA_REJECT:
            self._reset_txn()
            self.state = ST_READY
            self._error("BARE_NEWLINE")
        else:
            self.state = ST_PENDING

    # -- commands ------------------------------------------------------------

    cdef _dispatch(self, bytes line):
        cdef int code   # a C int, so the branches below compare C values
        if self.auth_step:
            self._sasl_line(line)
            return
        sp = line.find(b" ")
        verb = (line if sp < 0 else line[:sp]).upper()
        arg = b"" if sp < 0 else line[sp + 1:]
        entry = _COMMANDS.get(verb)
        if entry is None:
            self._error("UNKNOWN_COMMAND")
            return
        code, junk = entry
        if junk:
            self.junk += 1
            if self.junk > self.s.max_junk:
                self.out += self.s.replies["TOO_MANY_COMMANDS"]
                self.state = ST_CLOSED
                return
        if code == C_HELO or code == C_EHLO:
            self._cmd_helo(arg, code == C_EHLO)
        elif code == C_MAIL:
            self._cmd_mail(arg)
        elif code == C_RCPT:
            self._cmd_rcpt(arg)
        elif code == C_DATA:
            self._cmd_data(arg)
        elif code == C_BDAT:
            self._cmd_bdat(arg)
        elif code == C_RSET:
            if arg.strip():
                self._error("SYNTAX_NOARGS")
                return
            self._reset_txn()
            if self.state != ST_CONNECTED:
                self._set_state(ST_READY)
            self._reply("RESET_OK")
        elif code == C_NOOP:
            self._reply("OK")
        elif code == C_QUIT:
            self._reply("BYE")
            self._set_state(ST_CLOSED)
        elif code == C_VRFY:
            if not arg.strip():
                self._error("SYNTAX_NOARGS")
            else:
                self._reply("VRFY")
        elif code == C_HELP:
            self._reply("HELP")
        elif code == C_STARTTLS:
            self._cmd_starttls(arg)
        elif code == C_AUTH:
            self._cmd_auth(arg)
        else:
            self._error("NOT_IMPLEMENTED")

    def _cmd_helo(self, bytes arg, bint esmtp):
        name = arg.strip(b" ")
        if not name:
            self._error("SYNTAX_HELO")
            return
        self.helo = _printable(name.split(b" ")[0])
        self.esmtp = esmtp
        self._reset_txn()
        self._set_state(ST_READY)
        if esmtp:
            self.out += self.s.replies["EHLO_TLS" if self.tls else "EHLO"].replace(b"{}", self.helo.encode())
        else:
            self.out += self.s.replies["HELO_OK"].replace(b"{}", self.helo.encode())

    def _cmd_mail(self, bytes arg):
        if self.state == ST_CONNECTED:
            self._error("NEED_HELO")
            return
        if self.state != ST_READY:
            self._error("NESTED_MAIL")
            return
        if self.s.require_tls and not self.tls:
            self._error("NEED_TLS")
            return
        if self.messages >= self.s.max_messages:
            self.out += self.s.replies["TOO_MANY_MESSAGES"]
            self.state = ST_CLOSED
            return
        if arg[:5].upper() != b"FROM:":
            self._error("SYNTAX_MAIL")
            return
        # SMTPUTF8 decides whether a non-ASCII path is legal: look ahead.
        utf8 = b" SMTPUTF8" in arg.upper()
        addr, rest, err = _parse_path(arg[5:], True, utf8)
        if err is not None:
            self._error(err)
            return
        params = _split_params(rest)
        if isinstance(params, str):
            self._error(params)
            return
        t = Transaction()
        t.helo = self.helo
        t.esmtp = self.esmtp
        t.mail_from = addr
        t.size_hint = -1
        t.body_type = ""
        t.rcpts = []
        t.data = bytearray()
        for key, value in params.items():
            if key == b"SIZE":
                if not value.isdigit() or len(value) > 18:
                    self._error("PARAM_BAD")
                    return
                t.size_hint = int(value)
                if t.size_hint > self.s.max_message_size:
                    self._error("SIZE_TOO_BIG")
                    return
            elif key == b"BODY":
                v = value.upper()
                if v != b"7BIT" and v != b"8BITMIME":
                    self._error("PARAM_UNKNOWN" if v == b"BINARYMIME" else "PARAM_BAD")
                    return
                t.body_type = v.decode()
            elif key == b"SMTPUTF8":
                if value:
                    self._error("PARAM_BAD")
                    return
                t.smtputf8 = True
            elif key == b"RET":
                v = value.upper()
                if v != b"FULL" and v != b"HDRS":
                    self._error("PARAM_BAD")
                    return
                t.ret = v.decode()
            elif key == b"ENVID":
                if len(value) > MAX_ENVID or not _is_xtext(value):
                    self._error("PARAM_BAD")
                    return
                t.envid = value.decode("ascii")
            elif key == b"AUTH":
                pass  # RFC 4954 5: accepted; we keep no AUTH= identity
            elif key == b"REQUIRETLS" and self.tls:   # RFC 8689 4.1: offered over TLS only
                if value:
                    self._error("PARAM_BAD")
                    return
                t.requiretls = True
            else:
                self._error("PARAM_UNKNOWN")
                return
        if self.s.mail_check is not None:
            verdict = self.s.mail_check(addr)
            if verdict is not None:
                # our trouble (full spool, memory budget), not the client's: not counted
                self.rejections.append((verdict[0], addr, []))
                self.out += verdict[1]
                return
        if self.sender_check is not None and not self.sender_check(addr):
            self.rejections.append(("SENDER_DENIED", addr, []))
            self._error("SENDER_DENIED")
            return
        t.tls = self.tls
        t.auth_tenant = self.auth_tenant
        t.authed = self.authed
        self.txn = t
        self.junk = 0
        self._set_state(ST_MAIL)
        self._reply("SENDER_OK")

    def _cmd_rcpt(self, bytes arg):
        if self.state == ST_CONNECTED:
            self._error("NEED_HELO")
            return
        if self.state != ST_MAIL and self.state != ST_RCPT:
            self._error("NEED_MAIL")
            return
        if arg[:3].upper() != b"TO:":
            self._error("SYNTAX_RCPT")
            return
        addr, rest, err = _parse_path(arg[3:], False, self.txn.smtputf8)
        if err is not None:
            self._error(err)
            return
        params = _split_params(rest)
        if isinstance(params, str):
            self._error(params)
            return
        notify = orcpt = None
        for key, value in params.items():
            if key == b"NOTIFY":
                items = value.upper().split(b",")
                if (len(set(items)) != len(items)
                        or not set(items) <= {b"SUCCESS", b"FAILURE", b"DELAY", b"NEVER"}
                        or (b"NEVER" in items and len(items) > 1)):
                    self._error("PARAM_BAD")
                    return
                notify = value.upper().decode()
            elif key == b"ORCPT":
                semi = value.find(b";")
                # addr-type is an atom (RFC 3461 4.2): it is stored and later
                # written into DSNs, so control and 8-bit octets are refused
                if semi <= 0 or not _is_atom(value[:semi]) or not _is_xtext(value[semi + 1:]):
                    self._error("PARAM_BAD")
                    return
                orcpt = value.decode("ascii", "replace")
            else:
                self._error("PARAM_UNKNOWN")
                return
        relay = self.relay_allowed
        if self.s.rcpt_check is not None:
            verdict = self.s.rcpt_check(addr, self.txn.mail_from, relay)
            if verdict is True:
                relay = True
            elif verdict is not None:
                # a policy refusal of one recipient, not a client error: not counted
                # towards max_errors (a bulk transaction may carry many suppressed ones;
                # only clients that may relay get one, see mta/feedback/rcpt_policy.py)
                self.rejections.append((verdict[0], self.txn.mail_from, [addr]))
                self.out += verdict[1]
                return
        if not relay:
            self.rejections.append(("RELAY_DENIED", self.txn.mail_from, [addr]))
            self._error("RELAY_DENIED")
            return
        if len(self.txn.rcpts) >= self.s.max_recipients:
            self._reply("TOO_MANY_RCPTS")  # 452: client retries the rest later
            return
        self.txn.rcpts.append((addr, notify, orcpt))
        self._set_state(ST_RCPT)
        self._reply("RCPT_OK")

    def _cmd_data(self, bytes arg):
        if arg.strip():
            self._error("SYNTAX_NOARGS")
            return
        if self.state == ST_CONNECTED:
            self._error("NEED_HELO")
            return
        if self.state == ST_READY:
            self._error("NEED_MAIL")
            return
        if self.state == ST_MAIL:
            self._error("NEED_RCPT")
            return
        if self.txn.chunked:
            self._error("DATA_AFTER_BDAT")
            return
        data_scan_init(&self.scan, self.s.bare_mode, self.s.max_message_size)
        self._set_state(ST_DATA)
        self._reply("DATA_GO")

    def _cmd_bdat(self, bytes arg):
        parts = arg.split()
        if (not parts or len(parts) > 2 or not parts[0].isdigit() or len(parts[0]) > 18
                or (len(parts) == 2 and parts[1].upper() != b"LAST")):
            # without a valid size we cannot know how much to skip: give up
            self._error("SYNTAX_BDAT")
            self.state = ST_CLOSED
            return
        self.chunk_left = int(parts[0])
        self.chunk_last = len(parts) == 2
        if self.state != ST_RCPT:
            # RFC 3030 3: the octets must be read even when the command fails
            self.chunk_discard = True
            self.chunk_size = 0
            self.chunk_prev = self.state
            self.state = ST_CHUNK
            if self.chunk_left == 0:
                self._finish_chunk()
            return
        if not self.txn.chunked:
            self.txn.chunked = True
            self.chunk_size = 0
            self.chunk_cr = 0
            self.chunk_bare = 0
            self.chunk_discard = False
        self._set_state(ST_CHUNK)
        if self.chunk_left == 0:
            self._finish_chunk()

    def _cmd_starttls(self, bytes arg):
        if not self.s.starttls:
            self._error("NOT_IMPLEMENTED")
        elif self.tls:
            self._error("TLS_ACTIVE")
        elif arg.strip():
            self._error("SYNTAX_NOARGS")
        else:
            self._reply("TLS_READY")
            self._reset_txn()
            self.hold = H_STARTTLS
            self.state = ST_PENDING   # _run stops here and drops the rest of the input

    def _cmd_auth(self, bytes arg):
        if not self.s.auth:
            self._error("NOT_IMPLEMENTED")
            return
        if not self.tls:
            self._error("AUTH_NEED_TLS")
            return
        if self.state == ST_CONNECTED:
            self._error("NEED_HELO")
            return
        if self.authed:
            self._error("AUTH_AGAIN")
            return
        if self.state != ST_READY:
            self._error("AUTH_IN_MAIL")
            return
        parts = arg.split(b" ")
        mech = parts[0].upper()
        if len(parts) > 2 or not mech:
            self._error("SYNTAX_AUTH")
        elif mech == b"PLAIN":
            if len(parts) == 2:
                self._auth_ready(b"PLAIN", [parts[1]])
            else:
                self.auth_step = 1
                self.out += b"334 \r\n"
        elif mech == b"LOGIN":
            if len(parts) == 2:   # RFC 4954 4: an initial response (the user name)
                self.auth_request = (b"LOGIN", [parts[1]])
                self.auth_step = 3
                self.out += b"334 UGFzc3dvcmQ6\r\n"
            else:
                self.auth_request = (b"LOGIN", [])
                self.auth_step = 2
                self.out += b"334 VXNlcm5hbWU6\r\n"
        elif mech == b"SCRAM-SHA-256":   # RFC 7677: the exchange is Python's (auth_continue)
            if len(parts) == 2:
                self._auth_ready(mech, [parts[1]])
            else:
                self.auth_request = (mech, [])
                self.auth_step = 4
                self.out += b"334 \r\n"
        else:
            self._error("AUTH_MECHANISM")

    cdef _sasl_line(self, bytes line):
        """A client response inside an AUTH exchange (RFC 4954 4)."""
        step = self.auth_step
        self.auth_step = 0
        if line == b"*":
            self.auth_request = None
            self._error("AUTH_CANCELLED")
        elif step == 1:
            self._auth_ready(b"PLAIN", [line])
        elif step == 2:
            self.auth_request[1].append(line)
            self.auth_step = 3
            self.out += b"334 UGFzc3dvcmQ6\r\n"
        elif step == 4:
            self.auth_request[1].append(line)
            self._auth_ready(self.auth_request[0], self.auth_request[1])
        else:
            self.auth_request[1].append(line)
            self._auth_ready(b"LOGIN", self.auth_request[1])

    cdef _auth_ready(self, bytes mech, list responses):
        self.auth_request = (mech, responses)
        self.hold = H_AUTH
        self.state = ST_PENDING

    # -- helpers -------------------------------------------------------------

    cdef _set_state(self, int new):
        if new not in _TRANSITIONS[self.state]:
            raise InternalError(f"illegal transition {STATES[self.state]} -> {STATES[new]}")
        self.state = new

    cdef _reply(self, str name):
        self.out += self.s.replies[name]

    cdef _error(self, str name):
        """A 4xx/5xx reply to a command; too many of them end the session."""
        self.errors += 1
        if self.errors >= self.s.max_errors:
            self.out += self.s.replies["TOO_MANY_ERRORS"]
            self.state = ST_CLOSED
        else:
            self.out += self.s.replies[name]

    cdef _reset_txn(self):
        self.txn = None
        self.chunk_discard = False
        self.chunk_size = 0
