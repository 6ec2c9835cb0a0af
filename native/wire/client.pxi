# client.pxi - the SMTP client session core (outbound). Part of wire.pyx.
#
# One outbound connection as a state machine: replies go in through feed(),
# commands and content come out, with event flags telling the session layer
# (mta/delivery/client.py) what to do next. No I/O, no sockets, no timers: the
# per-state table CLIENT_PHASES names the timeout the caller applies and the
# phrase it logs (Postfix smtp_proto.c).
#
# Diagnostics: a failed session is data (`failure`), never an exception; bad
# arguments to start() raise ValueError, calls in the wrong state and illegal
# transitions raise InternalError (a bug: the caller drops the connection).
# Trust: replies are from the remote server and parsed with bounds
# (client_codec.pxi). Nothing the caller passes reaches the wire with a CR,
# LF or other control character in a command; content is dot-stuffed with
# only CRLF line ends (stuff.c), so no receiver can be smuggled a message.
# RFCs: 5321 (client side), 2920 PIPELINING, 1870 SIZE, 6152 8BITMIME,
# 6531 SMTPUTF8, 3030 CHUNKING, 3461 DSN, 3207 STARTTLS (negotiation only),
# 2034 ENHANCEDSTATUSCODES.

# Event flags returned with the output of ClientCore.feed() and start();
# several can be set at once (say EV_DONE | EV_READY).
EV_READY = 4        # idle: start() may be called
EV_STARTTLS = 8     # STARTTLS accepted: do the TLS handshake, then tls_started()
EV_DONE = 16        # the transaction finished: take_result()
EV_FAILED = 32      # the session failed (see `failure`): close the connection
EV_CLOSED = 64      # QUIT answered: close the connection

CLIENT_STATES = {CS_GREETING: "greeting", CS_EHLO: "ehlo", CS_HELO: "helo",
                 CS_STARTTLS: "starttls", CS_TLS: "tls", CS_READY: "ready",
                 CS_RSET: "rset", CS_MAIL: "mail", CS_RCPT: "rcpt", CS_DATA: "data",
                 CS_BODY: "body", CS_DOT: "dot", CS_QUIT: "quit", CS_CLOSED: "closed"}

# State -> (phrase for the log, name of the Timeouts field that applies or
# None). The phrases are Postfix's (smtp_proto.c), which operators grep for.
CLIENT_PHASES = {
    CS_GREETING: ("receiving the initial server greeting", "greeting"),
    CS_EHLO: ("performing the EHLO handshake", "ehlo"),
    CS_HELO: ("performing the HELO handshake", "ehlo"),
    CS_STARTTLS: ("sending STARTTLS", "ehlo"),
    CS_TLS: ("performing the TLS handshake", "ehlo"),
    CS_READY: ("waiting for the next message", None),
    CS_RSET: ("sending RSET", "mail"),
    CS_MAIL: ("sending MAIL FROM", "mail"),
    CS_RCPT: ("sending RCPT TO", "rcpt"),
    CS_DATA: ("sending DATA command", "data"),
    CS_BODY: ("sending message body", "body"),
    CS_DOT: ("sending end of data -- message may be sent more than once", "end_of_data"),
    CS_QUIT: ("sending QUIT", "quit"),
    CS_CLOSED: ("session closed", None),
}
# Phase of a transaction refused before anything was sent.
PHASE_LOCAL = "checking the message before MAIL FROM (nothing sent)"

# Replies we make up when a message must not be sent as it is: we never
# convert or mangle a message (RFC 6152 3 offers no downgrade we trust).
CLIENT_LOCAL_REPLIES = {
    "NEED_8BITMIME": (554, "5.6.3", "conversion required but not supported: "
                                    "8-bit message and the remote offers no 8BITMIME"),
    "NEED_SMTPUTF8": (553, "5.6.7", "SMTPUTF8 not offered by remote"),
    "TOO_BIG": (552, "5.3.4", "message size exceeds the remote SIZE limit"),
}

# Legal transitions; anything else is a bug (asyncpg's coreproto discipline).
cdef dict _CLIENT_TRANSITIONS = {
    CS_GREETING: {CS_EHLO, CS_CLOSED},
    CS_EHLO: {CS_HELO, CS_STARTTLS, CS_READY, CS_CLOSED},
    CS_HELO: {CS_READY, CS_CLOSED},
    CS_STARTTLS: {CS_TLS, CS_READY, CS_CLOSED},
    CS_TLS: {CS_EHLO, CS_CLOSED},
    CS_READY: {CS_READY, CS_MAIL, CS_QUIT, CS_CLOSED},
    CS_RSET: {CS_READY, CS_CLOSED},
    CS_MAIL: {CS_RCPT, CS_READY, CS_CLOSED},
    CS_RCPT: {CS_RCPT, CS_DATA, CS_BODY, CS_DOT, CS_RSET, CS_CLOSED},
    CS_DATA: {CS_BODY, CS_DOT, CS_RSET, CS_READY, CS_CLOSED},
    CS_BODY: {CS_DOT, CS_READY, CS_RSET, CS_CLOSED},
    CS_DOT: {CS_READY, CS_RSET, CS_CLOSED},
    CS_QUIT: {CS_CLOSED},
    CS_CLOSED: set(),
}


cdef class ClientCore:
    """The client side of one outbound SMTP connection. See the file header.

    feed(), start(), tls_started() and quit() return the octets to write;
    feed() and start() also return event flags (EV_*). After EV_DONE,
    take_result() gives ([per-recipient reply], data reply or None, phase),
    each reply a (code, enhanced status or "", text) tuple: recipient i got
    its RCPT reply (or the MAIL reply when MAIL was refused, or a local
    refusal), and the message reached it iff that and the data reply are 2xx.
    After EV_FAILED, `failure` is (reply or None, phase, permanent, reason,
    recipient replies received so far or None).
    """

    cdef readonly str ehlo_name         # our name in EHLO/HELO
    cdef bytes ehlo_b                   # ... encoded
    cdef bint tls_wanted                # tls="opportunistic": STARTTLS when offered
    cdef readonly int state             # ClientState
    cdef readonly bint esmtp            # EHLO accepted (False: HELO fallback)
    cdef readonly bint tls_active       # tls_started() was called
    cdef readonly dict capabilities     # EHLO keyword (upper case) -> parameters
    cdef readonly Py_ssize_t size_limit  # peer's SIZE, 0 for none (RFC 1870)
    cdef readonly int messages_sent     # messages the peer accepted (2xx at end of data)
    cdef readonly int replies_seen      # complete replies parsed (timers re-arm on it)
    cdef readonly object failure        # see the class docstring; None while healthy
    cdef bytes inbuf                    # unparsed input
    cdef Py_ssize_t inpos               # parse position in inbuf during feed()
    cdef list lines                     # lines (after "ddd-") of the reply being read
    cdef int line_code                  # their reply code
    cdef Py_ssize_t reply_size          # octets of that reply so far (bounded)
    cdef list last_lines                # lines of the last complete reply (EHLO keywords)
    cdef bytearray out                  # output not yet returned
    cdef int events                     # event flags not yet returned
    cdef bint quit_wanted               # quit() called while RSET was pending
    # the transaction in progress
    cdef object content                 # the message (bytes-like, unchanged until done)
    cdef bint pipelined                 # sent as one group (RFC 2920)
    cdef bint chunking                  # BDAT instead of DATA (RFC 3030)
    cdef list rcpt_cmds                 # encoded RCPT commands
    cdef list rcpt_replies              # their replies so far
    cdef int accepted                   # recipients accepted with 2xx
    cdef object mail_reply              # reply to MAIL, None until it comes
    cdef object data_reply              # reply that decided the content, or None
    cdef bint void_dot                  # "." sent after 354 with no recipient left
    cdef str txn_phase                  # phase of the last reply of the transaction
    cdef object result                  # finished transaction, until take_result()

    def __init__(self, str ehlo_name, str tls="opportunistic"):
        if tls not in ("opportunistic", "off"):
            raise ValueError(f"tls must be 'opportunistic' or 'off', not {tls!r}")
        if not ehlo_name or not ehlo_name.isascii() or not ehlo_name.isprintable() \
                or " " in ehlo_name:
            raise ValueError(f"bad EHLO name {ehlo_name!r}")
        self.ehlo_name = ehlo_name
        self.ehlo_b = ehlo_name.encode("ascii")
        self.tls_wanted = tls == "opportunistic"
        self.state = CS_GREETING
        self.capabilities = {}
        self.inbuf = b""
        self.lines = []
        self.last_lines = []
        self.out = bytearray()
        self.txn_phase = ""

    # -- readable state ------------------------------------------------------------

    @property
    def phase(self):
        """Postfix-style phrase of the current state ("sending RCPT TO")."""
        return CLIENT_PHASES[self.state][0]

    @property
    def timeout_name(self):
        """Name of the timeout that applies now (a Timeouts field), or None."""
        return CLIENT_PHASES[self.state][1]

    @property
    def reusable(self):
        """Idle and healthy: another message may be sent on this connection."""
        return self.state == CS_READY and self.failure is None and not self.quit_wanted

    @property
    def closing(self):
        """QUIT was asked for, sent or answered, or the session failed."""
        return self.quit_wanted or self.state == CS_QUIT or self.state == CS_CLOSED

    # -- API used by the session layer ---------------------------------------------

    def feed(self, data):
        """Process received octets -> (output, event flags)."""
        if self.state == CS_CLOSED:
            return b"", 0
        self.inbuf = self.inbuf + bytes(data) if self.inbuf else bytes(data)
        self.inpos = 0
        while self.state != CS_CLOSED and self.state != CS_TLS:
            reply = self._read_reply()
            if reply is None:
                break
            self._on_reply(reply)
        if self.state == CS_TLS and self.inpos < len(self.inbuf):
            # RFC 3207 5: octets after the 220 but before TLS would be trusted
            # as if they came over TLS (reply injection, CVE-2011-0411 style)
            self._fail(None, False, "data received after the STARTTLS reply", False)
        self.inbuf = self.inbuf[self.inpos:] if self.state != CS_CLOSED else b""
        return self._flush()

    def start(self, str mail_from, list rcpts, content, *, bint body_8bit=False,
              bint smtputf8=False, object ret=None, object envid=None,
              bint requiretls=False):
        """Begin a transaction -> (output, event flags).

        rcpts: [(address, NOTIFY or None, ORCPT or None)], values as stored
        (xtext). `content` (bytes-like, CRLF, unstuffed) must not change
        until EV_DONE. A message the peer cannot take unchanged (8-bit
        without 8BITMIME, SMTPUTF8 without SMTPUTF8, over its SIZE) is not
        sent: the result is ready at once (EV_DONE) with a local permanent
        refusal for every recipient. A message is 8-bit if `body_8bit` says
        so or any octet is >= 0x80; only the octets decide a refusal.
        `requiretls` adds REQUIRETLS to MAIL FROM (RFC 8689 4.1); the caller
        has checked that the session is TLS and the server offers it."""
        if self.state != CS_READY or self.quit_wanted:
            raise InternalError(f"start() in state {CLIENT_STATES[self.state]}")
        if not rcpts:
            raise ValueError("start() needs at least one recipient")
        cdef const unsigned char[::1] view = content
        cdef Py_ssize_t n = view.shape[0]
        caps = self.capabilities
        utf8 = smtputf8 or not mail_from.isascii() or any(not r[0].isascii() for r in rcpts)
        eight = n > 0 and c_needs_8bit(<const char *>&view[0], <size_t>n) != 0
        size = n + (2 if n and (n < 2 or view[n - 2] != 13 or view[n - 1] != 10) else 0)
        dsn = "DSN" in caps
        # encode everything first: a ValueError must leave the core untouched
        params = []
        if "SIZE" in caps:
            params.append(b" SIZE=%d" % size)
        if (eight or body_8bit) and "8BITMIME" in caps:
            params.append(b" BODY=8BITMIME")
        if utf8 and "SMTPUTF8" in caps:
            params.append(b" SMTPUTF8")
        if dsn and ret is not None:
            params.append(b" RET=" + _wire_arg(ret, False, True, "RET"))
        if dsn and envid is not None:
            params.append(b" ENVID=" + _wire_arg(envid, False, True, "ENVID"))
        if requiretls:
            params.append(b" REQUIRETLS")
        mail = (b"MAIL FROM:<" + _wire_arg(mail_from, utf8, False, "sender") + b">"
                + b"".join(params) + b"\r\n")
        cmds = []
        for addr, notify, orcpt in rcpts:
            cmd = b"RCPT TO:<" + _wire_arg(addr, utf8, False, "recipient") + b">"
            if dsn and notify is not None:
                cmd += b" NOTIFY=" + _wire_arg(notify, False, True, "NOTIFY")
            if dsn and orcpt is not None:
                cmd += b" ORCPT=" + _wire_arg(orcpt, False, True, "ORCPT")
            cmds.append(cmd + b"\r\n")
        self._new_txn(content, cmds)
        if utf8 and "SMTPUTF8" not in caps:
            return self._refuse("NEED_SMTPUTF8")
        if eight and "8BITMIME" not in caps:
            return self._refuse("NEED_8BITMIME")
        if self.size_limit and size > self.size_limit:
            return self._refuse("TOO_BIG")
        self.pipelined = "PIPELINING" in caps
        self.chunking = "CHUNKING" in caps
        if not self.pipelined:
            self.out += mail
        elif self.chunking:
            self.out += _wire_content(content, 0, mail + b"".join(cmds), True)
        else:
            self.out += mail + b"".join(cmds) + b"DATA\r\n"
        self._set_state(CS_MAIL)
        self.txn_phase = CLIENT_PHASES[CS_MAIL][0]
        return self._flush()

    def body_sent(self):
        """The transport has handed the whole body to the kernel: from now on
        the end-of-data timeout applies, not the body timeout."""
        if self.state == CS_BODY:
            self._set_state(CS_DOT)

    def tls_started(self):
        """The TLS handshake succeeded -> the EHLO to send (RFC 3207 4.2: all
        knowledge from before TLS is discarded)."""
        if self.state != CS_TLS:
            raise InternalError(f"tls_started() in state {CLIENT_STATES[self.state]}")
        self.tls_active = True
        self.capabilities = {}
        self.size_limit = 0
        self._set_state(CS_EHLO)
        return b"EHLO " + self.ehlo_b + b"\r\n"

    def quit(self):
        """QUIT -> the octets to write (b"" if it must wait for the RSET reply
        or the session is already over). Only between transactions."""
        if self.state == CS_CLOSED or self.state == CS_QUIT:
            return b""
        if self.state == CS_RSET:
            self.quit_wanted = True
            return b""
        if self.state != CS_READY:
            raise InternalError(f"quit() in state {CLIENT_STATES[self.state]}")
        self._set_state(CS_QUIT)
        return b"QUIT\r\n"

    def lost(self, str reason):
        """The connection ended or timed out without a reply. Returns True if
        that fails the session (not after QUIT, not when already over)."""
        if self.state == CS_CLOSED:
            return False
        if self.state == CS_QUIT:   # many servers close without a 221
            self._set_state(CS_CLOSED)
            return False
        self._fail(None, False, reason, False)
        self.events = 0
        self.out.clear()
        return True

    def take_result(self):
        """The finished transaction (after EV_DONE), once; else None."""
        r = self.result
        self.result = None
        return r

    # -- replies ---------------------------------------------------------------------

    cdef object _read_reply(self):
        """The next complete reply in inbuf from inpos, or None (incomplete,
        or malformed/oversized: then the session has failed)."""
        cdef bytes buf = self.inbuf
        cdef Py_ssize_t n = len(buf), lf, end, code
        cdef bytes line
        while True:
            lf = buf.find(b"\n", self.inpos)
            if lf < 0:
                if self.reply_size + n - self.inpos > MAX_REPLY:
                    self._fail(None, False, "reply too long", False)
                return None
            self.reply_size += lf + 1 - self.inpos
            if self.reply_size > MAX_REPLY:
                self._fail(None, False, "reply too long", False)
                return None
            end = lf - 1 if lf > self.inpos and buf[lf - 1] == 13 else lf
            line = buf[self.inpos:end]
            self.inpos = lf + 1
            # "ddd", "ddd text" or "ddd-text"; codes 2yz-5yz only (4.2.1)
            if (len(line) < 3 or not (0x32 <= line[0] <= 0x35) or not _is_digit(line[1])
                    or not _is_digit(line[2]) or (len(line) > 3 and line[3] != 0x20
                                                  and line[3] != 0x2d)):
                self._fail(None, False, "malformed reply: %s"
                           % line[:80].translate(_PRINTABLE).decode("ascii"), False)
                return None
            code = (line[0] - 0x30) * 100 + (line[1] - 0x30) * 10 + line[2] - 0x30
            if self.lines and code != self.line_code:
                self._fail(None, False, "reply lines with different codes", False)
                return None
            self.line_code = code
            self.lines.append(line[4:])
            if len(line) > 3 and line[3] == 0x2d:
                continue
            self.last_lines = self.lines
            self.lines = []
            self.reply_size = 0
            self.replies_seen += 1
            return _make_reply(code, self.last_lines)

    cdef _on_reply(self, tuple r):
        cdef int code = r[0]
        cdef int s = self.state
        if code == 421 and s != CS_QUIT:
            # RFC 5321 3.8: the server is closing the channel, whatever we sent
            self._fail(r, False, "service not available", False)
        elif s == CS_GREETING:
            self._process__greeting(r)
        elif s == CS_EHLO:
            self._process__ehlo(r)
        elif s == CS_HELO:
            self._process__helo(r)
        elif s == CS_STARTTLS:
            self._process__starttls(r)
        elif s == CS_RSET:
            self._process__rset(r)
        elif s == CS_MAIL:
            self._process__mail(r)
        elif s == CS_RCPT:
            self._process__rcpt(r)
        elif s == CS_DATA:
            self._process__data(r)
        elif s == CS_BODY or s == CS_DOT:
            self._process__dot(r)
        elif s == CS_QUIT:
            self._set_state(CS_CLOSED)
            self.events |= EV_CLOSED
        else:  # READY: nothing was asked
            self._fail(r, False, "unexpected reply", True)

    cdef _process__greeting(self, tuple r):
        if r[0] // 100 == 2:
            self._send(b"EHLO " + self.ehlo_b + b"\r\n", CS_EHLO)
        else:  # RFC 5321 3.1: a 554 greeting still expects our QUIT
            self._fail(r, r[0] // 100 == 5, "greeting refused", True)

    cdef _process__ehlo(self, tuple r):
        if r[0] // 100 == 2:
            self.esmtp = True
            self.capabilities = _parse_ehlo(self.last_lines)
            self.size_limit = _size_limit(self.capabilities)
            if self.tls_wanted and not self.tls_active and "STARTTLS" in self.capabilities:
                self._send(b"STARTTLS\r\n", CS_STARTTLS)
            else:
                self._ready()
        elif r[0] // 100 == 5:  # an old server: try HELO (RFC 5321 3.2)
            self._send(b"HELO " + self.ehlo_b + b"\r\n", CS_HELO)
        else:
            self._fail(r, False, "EHLO refused", True)

    cdef _process__helo(self, tuple r):
        if r[0] // 100 == 2:
            self.esmtp = False
            self.capabilities = {}
            self.size_limit = 0
            self._ready()
        else:
            self._fail(r, r[0] // 100 == 5, "EHLO and HELO refused", True)

    cdef _process__starttls(self, tuple r):
        if r[0] // 100 == 2:
            self._set_state(CS_TLS)
            self.events |= EV_STARTTLS
        else:  # opportunistic TLS (RFC 7435): go on in plaintext
            self._ready()

    cdef _process__rset(self, tuple r):
        if r[0] // 100 == 2:
            self._ready()
        else:  # a server that cannot reset cannot take another message
            self._fail(r, False, "RSET refused", True)

    cdef _process__mail(self, tuple r):
        self.mail_reply = r
        if self.pipelined:          # the RCPT replies follow
            self._set_state(CS_RCPT)
        elif r[0] // 100 == 2:
            self._send(self.rcpt_cmds[0], CS_RCPT)
        else:                       # no transaction open: nothing to reset
            self._finish(False)

    cdef _process__rcpt(self, tuple r):
        cdef Py_ssize_t i
        if self.mail_reply[0] // 100 == 2:     # else MAIL decided it
            self.txn_phase = CLIENT_PHASES[CS_RCPT][0]
        self.rcpt_replies.append(r)
        if r[0] // 100 == 2:
            self.accepted += 1
        i = len(self.rcpt_replies)
        if i < len(self.rcpt_cmds):
            if not self.pipelined:
                self.out += self.rcpt_cmds[i]
            self._set_state(CS_RCPT)
        elif self.pipelined:        # DATA or BDAT was sent with the group
            self._set_state(CS_DOT if self.chunking else CS_DATA)
        elif not self._good():      # RFC 5321 3.3: no recipient, no content
            self._finish(True)
        elif self.chunking:
            self.out += _wire_content(self.content, 0, b"", True)
            self._set_state(CS_BODY)
        else:
            self._send(b"DATA\r\n", CS_DATA)

    cdef _process__data(self, tuple r):
        if self._good():
            self.txn_phase = CLIENT_PHASES[CS_DATA][0]
        if r[0] // 100 == 3:
            if self._good():
                self.out += _wire_content(self.content, STUFF_DOTS | STUFF_TERMINATE,
                                          b"", False)
                self._set_state(CS_BODY)
            else:
                # RFC 2920 3.1: a 354 with every recipient refused still
                # needs an end of data; send an empty one, deliver nothing
                self.void_dot = True
                self._send(b".\r\n", CS_DOT)
        else:
            if self._good():
                self.data_reply = r
            # the server may still hold MAIL and RCPTs: reset them
            self._finish(self.mail_reply[0] // 100 == 2)

    cdef _process__dot(self, tuple r):
        cdef bint ok = r[0] // 100 == 2
        if self.void_dot or not self._good():
            # RFC 3030 2: a refused chunk leaves MAIL open; RSET it
            self._finish(self.chunking and not self.void_dot)
            return
        self.txn_phase = CLIENT_PHASES[CS_DOT][0]
        self.data_reply = r
        if ok:
            self.messages_sent += 1
        # after BDAT a failed LAST chunk leaves the transaction undefined
        self._finish(self.chunking and not ok)

    # -- helpers -----------------------------------------------------------------------

    cdef bint _good(self):
        """MAIL accepted and at least one recipient accepted."""
        return self.mail_reply is not None and self.mail_reply[0] // 100 == 2 \
            and self.accepted > 0

    cdef _new_txn(self, object content, list cmds):
        self.content = content
        self.rcpt_cmds = cmds
        self.rcpt_replies = []
        self.accepted = 0
        self.mail_reply = None
        self.data_reply = None
        self.void_dot = False
        self.result = None

    cdef list _recipient_replies(self):
        """Per recipient: its RCPT reply, or the MAIL reply if MAIL was
        refused; None for one not answered yet."""
        cdef Py_ssize_t n = len(self.rcpt_cmds)
        if self.mail_reply is not None and self.mail_reply[0] // 100 != 2:
            return [self.mail_reply] * n
        return self.rcpt_replies + [None] * (n - len(self.rcpt_replies))

    cdef _finish(self, bint rset):
        """The transaction is decided: publish the result, then RSET or idle."""
        self.result = (self._recipient_replies(), self.data_reply, self.txn_phase)
        self.events |= EV_DONE
        self.content = None
        if rset:
            self._send(b"RSET\r\n", CS_RSET)
        else:
            self._ready()

    cdef tuple _refuse(self, str name):
        """A local permanent refusal of the whole message; nothing is sent."""
        self.result = ([CLIENT_LOCAL_REPLIES[name]] * len(self.rcpt_cmds), None, PHASE_LOCAL)
        self.content = None
        self.events |= EV_DONE
        self._ready()
        return self._flush()

    cdef _ready(self):
        if self.quit_wanted:
            self._set_state(CS_READY)
            self._send(b"QUIT\r\n", CS_QUIT)
            return
        self._set_state(CS_READY)
        self.events |= EV_READY

    cdef _send(self, bytes command, int state):
        self.out += command
        self._set_state(state)

    cdef _fail(self, object reply, bint permanent, str reason, bint send_quit):
        if self.state == CS_CLOSED:
            return
        partial = None
        if CS_MAIL <= self.state <= CS_DOT:
            partial = self._recipient_replies()
        self.failure = (reply, CLIENT_PHASES[self.state][0], permanent, reason, partial)
        self.content = None
        if send_quit:
            self.out += b"QUIT\r\n"
        self._set_state(CS_CLOSED)
        self.events |= EV_FAILED

    cdef _set_state(self, int new):
        if new not in _CLIENT_TRANSITIONS[self.state]:
            raise InternalError(f"illegal client transition {CLIENT_STATES[self.state]}"
                                f" -> {CLIENT_STATES[new]}")
        self.state = new

    cdef tuple _flush(self):
        out = bytes(self.out)
        self.out.clear()
        ev = self.events
        self.events = 0
        return out, ev
