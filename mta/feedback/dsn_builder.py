"""RFC 3464 delivery status notifications: build the DSN sent to a return path.

Where it sits: after delivery (a Bounce, a Delayed insertion past the warning
time, an Expiration, or a success the sender asked for with NOTIFY=SUCCESS) the
caller picks the recipients to report with `should_notify` (one NOTIFY value per
recipient, RFC 3461 4.1), then `build_dsn` turns them into one complete message,
which is injected with the null reverse-path `<>` (RFC 3461 6.2, RFC 5321
4.5.5) so that it can never bounce in turn.

Reads: the envelope (sender, ENVID, RET, per-recipient ORCPT) as received, the
remote replies gathered by the SMTP client, and the original message bytes.
Writes: nothing; returns the DSN as bytes with CRLF line ends, every line at
most 998 octets (RFC 5322 2.1.1).

Output (RFC 6522 multipart/report; report-type=delivery-status):
  1. text/plain: a human explanation naming each recipient and the remote reply;
  2. message/delivery-status (RFC 3464 2.2, 2.3), or message/global-delivery-status
     (RFC 6533 6.2) when an address is not ASCII: addresses then use the "utf-8"
     address type in raw UTF-8 (RFC 6533 3), as Postfix does for SMTPUTF8 mail;
  3. the original: message/rfc822 whole (RET=FULL or no RET), or
     text/rfc822-headers with the header block only (RET=HDRS, larger than
     `max_returned`, or a body that cannot be carried verbatim). Non-ASCII
     header blocks use message/global / message/global-headers (RFC 6532 3.7,
     RFC 6533 6.3/6.4); any 8-bit part carries Content-Transfer-Encoding: 8bit.
The original is copied byte for byte (only line ends become CRLF): it is never
re-encoded or re-wrapped, so DKIM signatures in it still verify for the sender.

Diagnostics: ValueError for caller bugs (null sender, no recipients, an unknown
action, RET or NOTIFY keyword, a malformed status, a reporting MTA name that is
not a host name, a sender with control characters). Bad bytes from peers never
raise: they are masked (see Trust).

Trust: recipient addresses, ORCPT, ENVID, remote MTA names and diagnostic texts
come from the network. Control characters (and, after xtext decoding, CR/LF)
are masked as "?" or re-escaped, so no peer can add header fields or DSN fields;
non-ASCII text in an ASCII report part becomes "?". Long fields are folded.

RFCs: 3461 (NOTIFY, RET, ENVID, ORCPT, xtext), 3462/6522 (multipart/report),
3463 (enhanced status codes), 3464 (DSN format), 3834 (Auto-Submitted),
5321 6.1 (no bounce to <>), 5322 (message format), 6532/6533 (UTF-8 mail, DSNs).
"""
from __future__ import annotations

import re
import secrets
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

__all__ = ["RecipientStatus", "build_dsn", "should_notify"]


@dataclass(slots=True, frozen=True)
class RecipientStatus:
    """What happened to one recipient, as reported in one per-recipient group."""

    address: str                     # the recipient as sent in RCPT TO (Final-Recipient)
    orcpt: str | None                # ORCPT as received, "addr-type;xtext" (RFC 3461 4.2)
    action: str                      # failed | delayed | delivered | expanded | relayed (RFC 3464 2.3.3)
    status: str                      # enhanced status code, "5.1.1" (RFC 3463)
    diagnostic: str | None           # remote reply text, "550 5.1.1 <u@x>: user unknown"
    remote_mta: str | None           # host name of the MX that answered (Remote-MTA: dns; ...)
    last_attempt: float | None       # Unix time of the last attempt (Last-Attempt-Date)
    will_retry_until: float | None   # Unix time retries stop; reported for "delayed" only


@dataclass(slots=True, frozen=True)
class _Kind:
    """One kind of report: what the sender sees and which NOTIFY keyword asks for it."""

    notify: str      # the RFC 3461 4.1 NOTIFY keyword that requests this kind
    subject: str     # Subject: of the DSN when this is the gravest kind in it
    intro: str       # first paragraph of the human-readable part


# The one table of report kinds, gravest first: a DSN that mixes kinds takes the
# subject and intro of the gravest one it holds.
_KINDS: dict[str, _Kind] = {
    "failed": _Kind("FAILURE", "Undelivered Mail Returned to Sender",
                    "Your message could not be delivered to one or more recipients. "
                    "The details are below; your message, or its header, is attached."),
    "delayed": _Kind("DELAY", "Delayed Mail (still being retried)",
                     "Your message has not yet been delivered to one or more recipients. "
                     "Delivery is still being retried; you do not need to send it again."),
    "delivered": _Kind("SUCCESS", "Successful Mail Delivery Report",
                       "Your message was delivered to the recipients below. You asked to be "
                       "notified of its delivery."),
}

# RFC 3464 2.3.3 action -> report kind, and the status classes (RFC 3463 2) each
# action may carry. "failed" accepts 4.x.x: a message that expired after
# temporary errors is reported with its last status, as Postfix does.
_ACTIONS: dict[str, tuple[str, str]] = {
    "failed": ("failed", "45"),
    "delayed": ("delayed", "4"),
    "delivered": ("delivered", "2"),
    "relayed": ("delivered", "2"),     # RFC 3461 6.2.2.3: relayed to a non-DSN MTA
    "expanded": ("delivered", "2"),    # RFC 3461 6.2.7.4: delivered to an alias/list
}

_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z|\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_SMTP_REPLY = re.compile(r"[245][0-9][0-9](?:[ -]|\Z)")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_CTL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[\x21-\x3b\x3d\x3f-\x7e]{1,900}>)[ \t]*\r?$",
                         re.IGNORECASE | re.MULTILINE)

_MAX_LINE = 998     # RFC 5322 2.1.1, octets before CRLF
_FOLD_AT = 78       # RFC 5322 2.1.1 SHOULD
_TEXT_WIDTH = 76    # human part; 76 characters of UTF-8 stay far below 998 octets
_CRLF = b"\r\n"


def should_notify(kind: str, notify: str | None) -> bool:
    """Whether a recipient's NOTIFY value asks for a report of this kind.

    `kind` is failed, delayed or delivered (relayed/expanded count as delivered).
    `notify` is the RCPT NOTIFY parameter as received, "SUCCESS,DELAY", or None.
    RFC 3461 4.1: without NOTIFY an MTA reports FAILURE, and DELAY at its
    discretion (we do); NEVER asks for nothing.
    """
    if kind not in _ACTIONS:
        raise ValueError(f"report kind must be one of {sorted(_ACTIONS)}, got {kind!r}")
    keyword = _KINDS[_ACTIONS[kind][0]].notify
    if notify is None:
        return keyword in ("FAILURE", "DELAY")
    return keyword in _parse_notify(notify)


def build_dsn(*, reporting_mta: str, original_envelope_id: str | None, sender: str,
              recipients: list[RecipientStatus], original_content: bytes, ret: str | None,
              arrival_date: float, queue_id: str, from_address: str = "MAILER-DAEMON",
              max_returned: int = 256 * 1024) -> bytes:
    """One complete DSN message (RFC 5322, CRLF line ends) to `sender`.

    Every recipient in `recipients` is reported; choose them with `should_notify`.
    `original_envelope_id` is ENVID as received (xtext, RFC 3461 4.4); `ret` is
    "FULL", "HDRS" or None; `from_address` is a local part (qualified with
    `reporting_mta`) or a whole address; `max_returned` caps the returned original
    in octets, above which only its header block is returned.
    """
    sender = _parse_sender(sender)
    if not recipients:
        raise ValueError("a DSN needs at least one recipient, got none")
    if not _HOSTNAME.match(reporting_mta) or len(reporting_mta) > 255:
        raise ValueError(f"reporting_mta must be a host name, got {reporting_mta!r}")
    ret_word = None if ret is None else ret.upper()
    if ret_word not in (None, "FULL", "HDRS"):
        raise ValueError(f"RET must be FULL, HDRS or None, got {ret!r}")
    for r in recipients:
        _check_recipient(r)

    now = time.time()
    qid = re.sub(r"[^A-Za-z0-9._-]", "", queue_id)[:64] or "unknown"
    gravest = min((_ACTIONS[r.action][0] for r in recipients), key=list(_KINDS).index)
    # One UTF-8 address makes the status part global (RFC 6533 6.2); text fields
    # of an ASCII status part are made ASCII.
    global_status = any(_NON_ASCII.search(a) for a in _addresses(recipients))
    groups = [_Group.of(r, ascii_only=not global_status) for r in recipients]
    # ENVID is xtext (RFC 3461 4.4); the field shows it decoded, masked (RFC 3464 2.2.1 *text).
    envid = None
    if original_envelope_id is not None:
        envid = _clean(_xtext_decode(original_envelope_id), ascii_only=True)

    content = _LINE_END.sub(_CRLF, original_content)
    if content and not content.endswith(_CRLF):
        content += _CRLF
    headers_only, returned = _returned(content, ret_word, max_returned)

    boundary = f"{qid[:24]}.{int(now)}.{secrets.token_hex(8)}/dsn"
    while ("--" + boundary).encode() in content:  # practically never; keeps the MIME parse sound
        boundary = f"{qid[:24]}.{int(now)}.{secrets.token_hex(8)}/dsn"

    human = _human_part(reporting_mta, qid, arrival_date, gravest, groups)
    status = _status_part(reporting_mta, envid, arrival_date, qid, groups)
    original = _original_part(returned, headers_only, gravest != "delivered")
    parts = [human, status, original]

    from_addr = from_address if "@" in from_address else f"{from_address}@{reporting_mta}"
    head = [
        _field("From", f"Mail Delivery System <{_clean(from_addr, ascii_only=True)}>"),
        _field("To", f"<{sender}>"),
        _field("Subject", _KINDS[gravest].subject),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{int(now)}.{secrets.token_hex(8)}.{qid}@{reporting_mta}>"),
    ]
    m = _MESSAGE_ID.search(content[:_header_end(content)])
    if m:  # threading in the sender's MUA (Postfix does the same)
        head.append(_field("In-Reply-To", m.group(1).decode("ascii")))
        head.append(_field("References", m.group(1).decode("ascii")))
    head += [
        _field("Auto-Submitted", "auto-replied"),   # RFC 3834 5: no auto-reply to this
        _field("MIME-Version", "1.0"),
        _field("Content-Type",
               f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ]
    if any(not p.isascii() for p in parts):   # RFC 2045 6.4: multipart CTE covers its parts
        head.append(_field("Content-Transfer-Encoding", "8bit"))
    out = [b"".join(head), _CRLF, b"This is a MIME-encapsulated message.", _CRLF]
    for p in parts:
        # The CRLF before each delimiter belongs to the delimiter (RFC 2046 5.1.1).
        out += [_CRLF, b"--", boundary.encode(), _CRLF, p]
    out += [_CRLF, b"--", boundary.encode(), b"--", _CRLF]
    return b"".join(out)


# --- recipients ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Group:
    """One recipient's values, cleaned for output."""

    final: str               # "rfc822; u@x" or "utf-8; ü@x"
    original: str | None     # Original-Recipient value, decoded from xtext
    shown: str               # the address for the human part
    shown_original: str | None   # the original address for the human part, if it differs
    action: str              # RFC 3464 action, validated
    status: str              # enhanced status, validated
    remote_mta: str | None   # cleaned host name
    diagnostic: str | None   # "smtp; 550 ..." or "x-mta; ..."
    reply: str | None        # the cleaned diagnostic text alone, for the human part
    last_attempt: float | None   # Last-Attempt-Date
    retry_until: float | None    # Will-Retry-Until, only for delayed

    @staticmethod
    def of(r: RecipientStatus, *, ascii_only: bool) -> _Group:
        address = _clean(r.address, ascii_only=False)  # non-ASCII -> global part
        original = shown_original = None
        if r.orcpt is not None:
            addr_type, value = _parse_orcpt(r.orcpt)
            original = f"{addr_type}; {value}"
            if value != address:
                shown_original = value
        reply = None
        if r.diagnostic:
            reply = _clean(r.diagnostic, ascii_only=ascii_only, join_lines=True).strip() or None
        diagnostic = None
        if reply is not None:
            dtype = "smtp" if _SMTP_REPLY.match(reply) else "x-mta"  # RFC 3464 2.3.6
            diagnostic = f"{dtype}; {reply}"
        remote = _clean(r.remote_mta, ascii_only=ascii_only).strip() if r.remote_mta else None
        return _Group(
            final=f"{_addr_type(address)}; {address}",
            original=original, shown=address, shown_original=shown_original,
            action=r.action, status=r.status, remote_mta=remote or None,
            diagnostic=diagnostic, reply=reply, last_attempt=r.last_attempt,
            retry_until=r.will_retry_until if r.action == "delayed" else None)


def _check_recipient(r: RecipientStatus) -> None:
    if r.action not in _ACTIONS:
        raise ValueError(f"{r.address!r}: action must be one of {sorted(_ACTIONS)}, got {r.action!r}")
    if not _STATUS.match(r.status) or r.status[0] not in _ACTIONS[r.action][1]:
        classes = " or ".join(f"{c}.x.x" for c in _ACTIONS[r.action][1])
        raise ValueError(f"{r.address!r}: status for {r.action} must be {classes}, got {r.status!r}")
    if not r.address:
        raise ValueError("a reported recipient needs an address, got ''")


def _addresses(recipients: list[RecipientStatus]) -> list[str]:
    out = [r.address for r in recipients]
    out += [_parse_orcpt(r.orcpt)[1] for r in recipients if r.orcpt is not None]
    return out


def _addr_type(address: str) -> str:
    """RFC 6533 3: "utf-8" only for an address that is not ASCII (Postfix fix 20140708)."""
    return "rfc822" if address.isascii() else "utf-8"


def _parse_orcpt(orcpt: str) -> tuple[str, str]:
    """ORCPT "addr-type;xtext" -> (addr-type, decoded address), masked for output.

    RFC 3461 6.3(d)/RFC 3464 2.3.1: Original-Recipient carries the ORCPT value
    decoded from xtext. For the utf-8 type, RFC 6533 3 EmbeddedUnicodeChar
    (\\x{HHHH}) is decoded too, giving the raw UTF-8 address.
    """
    addr_type, semi, value = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not semi or not _ATOM.match(addr_type):
        addr_type, value = "rfc822", orcpt   # the server refuses this; be lenient here
    text = _xtext_decode(value.strip())
    if addr_type.lower() == "utf-8":
        addr_type = "utf-8"
        text = re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", _unicode_char, text)
    return addr_type, _clean(text, ascii_only=False)


def _unicode_char(m: re.Match[str]) -> str:
    point = int(m.group(1), 16)
    return chr(point) if 0x80 <= point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF else m.group(0)


def _xtext_decode(value: str) -> str:
    """RFC 3461 4: "+XX" -> that octet; the octets are read as UTF-8."""
    raw = re.sub(rb"\+([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 value.encode("utf-8", "replace"))
    return raw.decode("utf-8", "replace")


def _parse_notify(notify: str) -> frozenset[str]:
    words = [w.strip().upper() for w in notify.split(",")]
    if not all(words) or not set(words) <= _NOTIFY_WORDS or ("NEVER" in words and len(words) > 1):
        raise ValueError(f"NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY, got {notify!r}")
    return frozenset(words)


def _parse_sender(sender: str) -> str:
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if not sender:
        # RFC 5321 6.1 and RFC 3461 6.2: never a DSN to the null reverse-path.
        raise ValueError("refusing to build a DSN for the null sender <>")
    if _CTL.search(sender) or len(sender.encode("utf-8")) > 900:
        raise ValueError(f"sender is not a usable return path, got {sender!r}")
    return sender


def _clean(text: str, *, ascii_only: bool, join_lines: bool = False) -> str:
    """Mask what a peer must not put into our header fields (see Trust)."""
    if join_lines:  # a multi-line SMTP reply becomes one line, as Postfix reports it
        text = re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", text).replace("\t", " ")
    text = _CTL.sub("?", text)
    return _NON_ASCII.sub("?", text) if ascii_only else text


# --- parts ---------------------------------------------------------------------------------


def _human_part(reporting_mta: str, qid: str, arrival: float, gravest: str,
                groups: list[_Group]) -> bytes:
    paras = [f"This is the mail system at host {reporting_mta}.", _KINDS[gravest].intro,
             f"Queue ID {qid}, message received {_date(arrival)}."]
    lines: list[str] = []
    for p in paras:
        lines += textwrap.wrap(p, _TEXT_WIDTH, break_on_hyphens=False) + [""]
    for g in groups:
        who = f"<{g.shown}>" + (f" (originally <{g.shown_original}>)" if g.shown_original else "")
        text = f"{who}: {g.action}, status {g.status}."
        if g.reply is not None and g.remote_mta:
            text += f" {g.remote_mta} said: {g.reply}"
        elif g.reply is not None:
            text += f" Reason: {g.reply}"
        elif g.remote_mta:
            text += f" Remote server: {g.remote_mta}."
        if g.retry_until is not None:
            text += f" Delivery will be retried until {_date(g.retry_until)}."
        lines += textwrap.wrap(text, _TEXT_WIDTH, subsequent_indent="    ",
                               break_on_hyphens=False) + [""]
    body = "\r\n".join(lines).encode("utf-8", "replace")
    return _part("Notification", body, "text/plain; charset=us-ascii",
                 "text/plain; charset=utf-8")


def _status_part(reporting_mta: str, envid: str | None, arrival: float, qid: str,
                 groups: list[_Group]) -> bytes:
    # RFC 3464 2.2 order: Original-Envelope-Id, Reporting-MTA, ..., Arrival-Date, extensions.
    block = []
    if envid is not None:
        block.append(_field("Original-Envelope-Id", envid))
    block += [_field("Reporting-MTA", f"dns; {reporting_mta}"),
              _field("Arrival-Date", _date(arrival)),
              _field("X-Mta-Queue-ID", qid)]
    blocks = [b"".join(block)]
    for g in groups:   # RFC 3464 2.3 order
        f = []
        if g.original is not None:
            f.append(_field("Original-Recipient", g.original))
        f += [_field("Final-Recipient", g.final), _field("Action", g.action),
              _field("Status", g.status)]
        if g.remote_mta:
            f.append(_field("Remote-MTA", f"dns; {g.remote_mta}"))
        if g.diagnostic:
            f.append(_field("Diagnostic-Code", g.diagnostic))
        if g.last_attempt is not None:
            f.append(_field("Last-Attempt-Date", _date(g.last_attempt)))
        if g.retry_until is not None:
            f.append(_field("Will-Retry-Until", _date(g.retry_until)))
        blocks.append(b"".join(f))
    return _part("Delivery report", _CRLF.join(blocks), "message/delivery-status",
                 "message/global-delivery-status")


def _part(description: str, body: bytes, ascii_type: str, utf8_type: str) -> bytes:
    """A MIME part's header and body: `ascii_type` for ASCII, else `utf8_type` as 8bit."""
    heads = [_field("Content-Description", description)]
    if body.isascii():
        heads.append(_field("Content-Type", ascii_type))
    else:
        heads += [_field("Content-Type", utf8_type), _field("Content-Transfer-Encoding", "8bit")]
    return b"".join(heads) + _CRLF + body


def _original_part(returned: bytes, headers_only: bool, undelivered: bool) -> bytes:
    header_ascii = returned[:_header_end(returned)].isascii()
    if headers_only:
        ctype = "text/rfc822-headers" if header_ascii else "message/global-headers"
        what = "Message Headers"
    else:
        ctype = "message/rfc822" if header_ascii else "message/global"
        what = "Message"
    heads = [_field("Content-Description", ("Undelivered " if undelivered else "") + what),
             _field("Content-Type", ctype)]
    if not returned.isascii():   # RFC 2046 5.2.1: 7bit, 8bit or binary only; no re-encoding
        heads.append(_field("Content-Transfer-Encoding", "8bit"))
    return b"".join(heads) + _CRLF + returned


def _returned(content: bytes, ret: str | None, limit: int) -> tuple[bool, bytes]:
    """(headers only?, bytes to return) for CRLF-normalised `content`.

    The whole message is returned only if it can go verbatim: within `limit`, no
    NUL (RFC 2045 2.8) and no line over 998 octets; otherwise its header block,
    cut after the last whole field that fits in `limit`.
    """
    if (ret != "HDRS" and 0 < len(content) <= limit and b"\0" not in content
            and all(len(line) <= _MAX_LINE for line in content.split(_CRLF))):
        return False, content
    fields: list[list[bytes]] = []
    for line in content[:_header_end(content)].split(_CRLF)[:-1]:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    kept: list[bytes] = []
    size = 0
    for lines in fields:
        # XXX An over-long header line is folded (one SP inserted), not dropped.
        field = b"".join(_fold_hard(line) + _CRLF for line in lines)
        if size + len(field) > limit:
            break
        kept.append(field)
        size += len(field)
    return True, b"".join(kept)


def _header_end(content: bytes) -> int:
    """Length of the header block, its final CRLF included, blank line excluded."""
    if content.startswith(_CRLF):
        return 0
    i = content.find(b"\r\n\r\n")
    return len(content) if i < 0 else i + 2


# --- low-level formatting ------------------------------------------------------------------


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, timezone.utc).replace(microsecond=0))


def _field(name: str, value: str) -> bytes:
    """`Name: value` CRLF, folded at spaces near 78 octets, no line over 998.

    Unfolding (RFC 5322 2.2.3) gives back the value exactly, except where one
    word is longer than a line: it is broken with an inserted space (XXX).
    """
    line = name.encode("ascii") + b":"
    lines: list[bytes] = []
    for i, word in enumerate(value.encode("utf-8", "replace").split(b" ")):
        piece = b" " + word
        if word and i > 0 and len(line) + len(piece) > _FOLD_AT and line.strip(b" \t"):
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    return b"\r\n".join(_fold_hard(one) for one in lines) + _CRLF


def _fold_hard(line: bytes) -> bytes:
    """Insert CRLF SP so that no line is over 998 octets, never inside a UTF-8 sequence."""
    pieces = []
    while len(line) > _MAX_LINE:
        cut = _MAX_LINE
        while cut > 1 and 0x80 <= line[cut] <= 0xBF:
            cut -= 1
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return b"\r\n".join(pieces)
