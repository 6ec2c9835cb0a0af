"""RFC 3464 delivery status notifications: the machine-readable message/delivery-status part.

Reads the per-message fields (Reporting-MTA) and one group per recipient
(Final-Recipient, Original-Recipient, Action, Status, Remote-MTA,
Diagnostic-Code). The field text is parsed here rather than trusted to the
email package, because real DSNs miss the blank lines between groups, fold
fields oddly, or are sent as text/plain; a new group starts at every
Final-Recipient (or an Original-Recipient not followed by one).
"""
from __future__ import annotations

import base64
import email.message
import quopri
import re
from dataclasses import dataclass, field

from .diagnostic import clean_address, unfold
from .mime import part_text, payload_of, raw_text
from .report import MAX_RECIPIENTS

__all__ = ["DsnGroup", "DsnReport", "find_dsn_parts", "parse_fields"]

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_PLAIN_ADDR = re.compile(r"^[^@\s:/<>]+@[^@\s:/<>]+$")
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_DSN_HINT = re.compile(r"^(final-recipient|original-recipient)\s*:", re.I | re.M)
# Repeated Diagnostic-Code fields of one group are joined up to this length
# (each join copies the text: unbounded, a group repeating it was quadratic).
_MAX_DIAGNOSTIC = 8192
_ACTION_HINT = re.compile(r"^(action|status)\s*:", re.I | re.M)
# Leaves that are never the status block (the returned original's headers are
# read by original.py; their "To:"/"From:" never hold Final-Recipient).
_NOT_STATUS = frozenset({"text/rfc822-headers", "text/html", "message/rfc822"})
_MAX_LEAVES = 64


@dataclass(slots=True)
class DsnGroup:
    fields: dict[str, str] = field(default_factory=dict)   # lower-case name -> unfolded value

    def get(self, name: str) -> str:
        return self.fields.get(name, "")

    @property
    def recipient(self) -> str:
        # Final-Recipient first, but only if it is a real address: some MTAs put a
        # source route, a mailbox path or a bare local part there.
        orig = clean_address(self.get("original-recipient"))
        if _PLAIN_ADDR.match(orig) and _rewritten(clean_address(self.get("final-recipient")), orig):
            return orig
        for name in ("final-recipient", "x-actual-recipient", "original-recipient"):
            addr = clean_address(self.get(name))
            if _PLAIN_ADDR.match(addr):
                return addr
        for name in ("final-recipient", "x-actual-recipient", "original-recipient"):
            addr = clean_address(self.get(name))
            if "@" in addr:
                return addr
        return clean_address(self.get("final-recipient") or self.get("original-recipient"))


def _rewritten(final: str, orig: str) -> bool:
    """Final-Recipient is the receiving site's internal rewrite of the address we sent
    to: an alias expanded to a mailbox on a host inside that domain
    ("b@host.dept.example.edu" for "a@example.edu"), or Sun/Oracle Messaging
    Server's message-store channel pseudo-domain ("a@ims-ms-daemon"). Then the
    Original-Recipient is the address that failed from our side. (Any other
    dotless domain, e.g. a "mailhub0" relay, is kept: that is what was tried.)"""
    if "@" not in final or final.lower() == orig.lower():
        return False
    fdom, odom = final.rpartition("@")[2].lower(), orig.rpartition("@")[2].lower()
    return fdom.endswith("-daemon") or fdom.endswith("." + odom)


@dataclass(slots=True)
class DsnReport:
    reporting_mta: str | None
    groups: list[DsnGroup]


def parse_fields(text: str) -> list[tuple[str, str]]:
    """'Name: value' lines with continuation lines, in order; other lines are ignored."""
    # (a field's lines are collected in a list and joined once: appending to the
    # value string per continuation line was quadratic in the field's length)
    out: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and out:
            if line.strip():
                out[-1][1].append(line.strip())
            continue
        m = _FIELD.match(line)
        if m:
            out.append((m.group(1).lower(), [m.group(2).strip()]))
        elif line.strip():
            out.append(("", []))   # a stray line ends the previous field
    return [(n, unfold(" ".join(v))) for n, v in out if n]


def _dsn_text(part: email.message.Message) -> str:
    payload = payload_of(part)
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if isinstance(payload, list) and cte in ("base64", "quoted-printable"):
        # An encoded status block (RFC 6533 allows it; RFC 3464 does not) was read as
        # header-less parts: decode their joined text.
        raw = "\n".join(raw_text(p) for p in payload if isinstance(p, email.message.Message))
        try:
            data = (base64.b64decode(re.sub(r"[^A-Za-z0-9+/=]", "", raw)) if cte == "base64"
                    else quopri.decodestring(raw.encode("utf-8", "surrogateescape")))
            return _utf8(data.decode("utf-8", "surrogateescape")).replace("\r\n", "\n")
        except ValueError:
            return raw
    if isinstance(payload, list):
        # The field groups come parsed as header-only messages: join their
        # fields directly (as_string() through the generator is several times slower).
        return "\n\n".join(fields_text(p) for p in payload if isinstance(p, email.message.Message))
    return part_text(part)


def _utf8(value: str) -> str:
    """A header value parsed from 8-bit bytes (surrogate escapes) as UTF-8 text: the
    fields of message/global-delivery-status (RFC 6533) and SMTPUTF8 addresses."""
    if not isinstance(value, str):
        value = str(value)
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def fields_text(part: email.message.Message) -> str:
    """A field group parsed as a header-only message (delivery-status, feedback-report)
    as "Name: value" lines; as_string() would fold every field again, at tens of
    microseconds each."""
    body = payload_of(part)
    if isinstance(body, str) and not body.isascii():
        # (get_payload() turned 8-bit bytes into U+FFFD; the raw bytes are UTF-8 here)
        try:
            raw = part.get_payload(decode=True)
        except Exception:
            raw = None
        if isinstance(raw, bytes):
            body = _utf8(raw.decode("utf-8", "surrogateescape"))
    head = "\n".join(f"{k}: {_utf8(v)}" for k, v in part.items())
    if isinstance(body, str) and body.strip():
        return head + "\n\n" + _utf8(body)
    return head


def find_dsn_parts(msg: email.message.Message) -> list[str]:
    """Texts of the delivery-status parts (or DSN-looking text parts) of a message."""
    found: list[str] = []
    plain: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in _DSN_TYPES:
            found.append(_dsn_text(part))
        elif not part.is_multipart() and ctype not in _NOT_STATUS and len(plain) < _MAX_LEAVES:
            plain.append(part_text(part))
    if found:
        return found
    # Some MTAs send the status block as text/plain, application/octet-stream, a
    # made-up type, or inline: accept it only when it clearly has the per-recipient fields.
    for text in plain:
        if _DSN_HINT.search(text) and _ACTION_HINT.search(text):
            found.append(text)
    return found


def parse_dsn(texts: list[str]) -> DsnReport | None:
    reporting = None
    groups: list[DsnGroup] = []
    for text in texts:
        # Blank lines separate the per-message block and the per-recipient groups;
        # inside one block, a repeated Final-Recipient starts another group
        # (some MTAs omit the blank lines).
        for block in re.split(r"\n[ \t]*\n", text):
            fields = parse_fields(block)
            names = {n for n, _ in fields}
            if not names & {"final-recipient", "original-recipient", "x-actual-recipient"}:
                for name, value in fields:
                    if name == "reporting-mta" and reporting is None:
                        reporting = _mta(value)
                continue
            cur: DsnGroup | None = None
            for name, value in fields:
                if name == "reporting-mta":
                    if reporting is None:
                        reporting = _mta(value)
                    continue
                if cur is None or (name == "final-recipient" and name in cur.fields):
                    if len(groups) >= MAX_RECIPIENTS:
                        break
                    cur = DsnGroup()
                    groups.append(cur)
                if name in cur.fields:
                    if name == "diagnostic-code" and len(cur.fields[name]) < _MAX_DIAGNOSTIC:
                        cur.fields[name] += " " + value
                    continue
                cur.fields[name] = value
    groups = [g for g in groups if g.recipient]
    if not groups:
        return None
    return DsnReport(reporting, groups)


def _mta(value: str) -> str | None:
    v = value.partition(";")[2].strip() if ";" in value else value.strip()
    v = v.split()[0] if v.split() else ""
    return v.strip("[]<>") or None


def remote_mta(group: DsnGroup) -> str | None:
    return _mta(group.get("remote-mta")) if group.get("remote-mta") else None


def diagnostic(group: DsnGroup) -> str:
    """Diagnostic-Code without its 'smtp;' type prefix."""
    d = group.get("diagnostic-code")
    kind, sep, rest = d.partition(";")
    if sep and re.fullmatch(r"\s*[A-Za-z][\w-]*\s*", kind):
        return rest.strip()
    return d.strip()
