"""Every SMTP reply the server sends: code, enhanced status (RFC 3463) and text.

This is the only place reply texts live (Postfix's cleanup_stat_map idea): the
native protocol core receives them as pre-encoded lines through
`mta._native.wire.ServerSettings`, and tests import this table instead of
retyping replies. Texts never carry internal exception text to the peer.
"""
from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    code: int      # three-digit SMTP reply code (RFC 5321 4.2)
    status: str    # enhanced status code (RFC 3463), "" for none
    text: str      # human text; ASCII only

    def line(self, *args: object) -> bytes:
        """The reply as one CRLF-terminated wire line; `args` fill `{}` slots."""
        text = self.text.format(*args) if args else self.text
        sep = " " + self.status + " " if self.status else " "
        return f"{self.code}{sep}{text}\r\n".encode("ascii")


# Name -> reply. Names are what the native core and the session refer to.
REPLIES: dict[str, Reply] = {
    # session
    "GREETING": Reply(220, "", "{} {}"),                      # hostname, banner
    "BYE": Reply(221, "2.0.0", "Bye"),
    "HELO_OK": Reply(250, "", "{} Hello {}"),
    "OK": Reply(250, "2.0.0", "OK"),
    "RESET_OK": Reply(250, "2.0.0", "Reset OK"),
    "HELP": Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"),
    "VRFY": Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"),
    "TIMEOUT": Reply(421, "4.4.2", "{} Error: timeout exceeded, closing connection"),
    "TOO_MANY_ERRORS": Reply(421, "4.7.0", "{} Error: too many errors, closing connection"),
    "TOO_MANY_COMMANDS": Reply(421, "4.7.0", "{} Error: too many commands without a transaction"),
    "TOO_MANY_MESSAGES": Reply(421, "4.7.0", "{} Error: too many messages in this session"),
    "TOO_MANY_CONNECTIONS": Reply(421, "4.7.0", "{} Error: too many connections, try again later"),
    "TOO_MANY_FROM_IP": Reply(421, "4.7.0", "{} Error: too many connections from your address"),
    "SHUTDOWN": Reply(421, "4.3.2", "{} Service shutting down, try again later"),
    # command syntax
    "UNKNOWN_COMMAND": Reply(500, "5.5.2", "Error: command not recognized"),
    "LINE_TOO_LONG": Reply(500, "5.5.2", "Error: line too long"),
    "BARE_LF_COMMAND": Reply(500, "5.5.2", "Error: bare <LF> received; lines must end with <CR><LF>"),
    "NOT_IMPLEMENTED": Reply(502, "5.5.1", "Error: command not implemented"),
    "SYNTAX_HELO": Reply(501, "5.5.4", "Syntax: HELO/EHLO domain"),
    "SYNTAX_MAIL": Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]"),
    "SYNTAX_RCPT": Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]"),
    "SYNTAX_NOARGS": Reply(501, "5.5.4", "Syntax: no parameters allowed"),
    "SYNTAX_BDAT": Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"),
    "PARAM_UNKNOWN": Reply(555, "5.5.4", "Error: unsupported parameter"),
    "PARAM_BAD": Reply(501, "5.5.4", "Error: bad parameter value"),
    "PARAM_REPEATED": Reply(501, "5.5.4", "Error: parameter given twice"),
    # sequence
    "NEED_HELO": Reply(503, "5.5.1", "Error: send HELO/EHLO first"),
    "NESTED_MAIL": Reply(503, "5.5.1", "Error: nested MAIL command"),
    "NEED_MAIL": Reply(503, "5.5.1", "Error: need MAIL command"),
    "NEED_RCPT": Reply(503, "5.5.1", "Error: need RCPT command"),
    "DATA_AFTER_BDAT": Reply(503, "5.5.1", "Error: DATA is not allowed after BDAT in one transaction"),
    # envelope
    "SENDER_OK": Reply(250, "2.1.0", "Sender OK"),
    "RCPT_OK": Reply(250, "2.1.5", "Recipient OK"),
    "BAD_SENDER": Reply(553, "5.1.7", "Error: bad sender address syntax"),
    "BAD_RECIPIENT": Reply(553, "5.1.3", "Error: bad recipient address syntax"),
    "NEED_SMTPUTF8": Reply(553, "5.6.7", "Error: non-ASCII address needs the SMTPUTF8 parameter"),
    "RELAY_DENIED": Reply(554, "5.7.1", "Error: relay access denied"),
    "SUPPRESSED": Reply(550, "5.7.1", "<{}>: recipient is suppressed ({})"),   # address, reason
    # a sealed local part (mta/model/sealed.py) that does not open: nothing more is said
    "BAD_SEALED": Reply(550, "5.1.3", "Error: bad recipient address"),
    "TOO_MANY_RCPTS": Reply(452, "4.5.3", "Error: too many recipients"),
    "SIZE_TOO_BIG": Reply(552, "5.3.4", "Error: message size exceeds fixed limit"),
    # content
    "DATA_GO": Reply(354, "", "End data with <CR><LF>.<CR><LF>"),
    "CHUNK_OK": Reply(250, "2.0.0", "{} octets received"),
    "QUEUED": Reply(250, "2.0.0", "Ok: queued as {}"),
    "BARE_NEWLINE": Reply(550, "5.6.0", "Error: bare <CR> or <LF> in message content; "
                                       "only <CR><LF> line ends are allowed"),
    "BDAT_DISCARDED": Reply(503, "5.5.1", "Error: chunk discarded, no valid transaction"),
    # local trouble: always temporary, never the exception text
    "SPOOL_ERROR": Reply(451, "4.3.0", "Error: queue file write error, try again later"),
    "SPOOL_FULL": Reply(452, "4.3.1", "Error: insufficient system storage, try again later"),
    "QUEUE_FULL": Reply(451, "4.3.2", "Error: queue is full, try again later"),
    "MEMORY_FULL": Reply(452, "4.3.1", "Error: insufficient system resources, try again later"),
    "MEMORY_SHED": Reply(421, "4.3.2", "{} Error: insufficient system resources, closing connection"),
    "INTERNAL": Reply(451, "4.3.0", "Error: internal error, try again later"),
    "DKIM_DEFER": Reply(451, "4.7.0", "Error: message cannot be DKIM-signed now, try again later"),
    # STARTTLS (RFC 3207), AUTH (RFC 4954), REQUIRETLS (RFC 8689)
    "TLS_READY": Reply(220, "2.0.0", "Ready to start TLS"),
    "TLS_ACTIVE": Reply(503, "5.5.1", "Error: TLS already active"),
    "TLS_UNAVAILABLE": Reply(454, "4.7.0", "TLS not available due to temporary reason"),
    "NEED_TLS": Reply(530, "5.7.0", "Must issue a STARTTLS command first"),
    "AUTH_NEED_TLS": Reply(538, "5.7.11", "Encryption required for requested authentication mechanism"),
    "AUTH_AGAIN": Reply(503, "5.5.1", "Error: already authenticated"),
    "AUTH_IN_MAIL": Reply(503, "5.5.1", "Error: AUTH not allowed in a mail transaction"),
    "SYNTAX_AUTH": Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"),
    "AUTH_MECHANISM": Reply(504, "5.5.4", "Error: unrecognized authentication type"),
    "AUTH_CANCELLED": Reply(501, "5.0.0", "Authentication cancelled"),
    "AUTH_BAD_RESPONSE": Reply(501, "5.5.2", "Error: cannot decode the response"),
    "AUTH_OK": Reply(235, "2.7.0", "Authentication successful"),
    "AUTH_FAILED": Reply(535, "5.7.8", "Error: authentication credentials invalid"),
    "AUTH_TEMP": Reply(454, "4.7.0", "Temporary authentication failure, try again later"),
    "SENDER_DENIED": Reply(550, "5.7.1", "Error: sender address not allowed for this user"),
}

# EHLO keywords we advertise, in order (RFC 5321 4.1.1.1). SIZE gets the limit.
EHLO_EXTENSIONS = ("PIPELINING", "SIZE {}", "8BITMIME", "SMTPUTF8",
                   "ENHANCEDSTATUSCODES", "CHUNKING", "DSN")


def reply(name: str, *args: object) -> bytes:
    """Encode reply `name` (see REPLIES) as a wire line."""
    return REPLIES[name].line(*args)


def ehlo_lines(hostname: str, client_name: str, max_size: int,
               extra: tuple[str, ...] = ()) -> bytes:
    """The multi-line EHLO response; `extra`: STARTTLS, AUTH ..., REQUIRETLS as offered."""
    lines = [f"{hostname} Hello {client_name}"]
    lines += [kw.format(max_size) if "{}" in kw else kw for kw in EHLO_EXTENSIONS]
    lines += extra
    out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
    return ("\r\n".join(out) + "\r\n").encode("ascii", "replace")
