"""Pick apart diagnostic texts: SMTP reply codes, RFC 3463 statuses, e-mail addresses.

Shared by every detector. Remote replies are quoted in many shapes
("550 5.1.1 <a@b>: ...", "550-5.1.1 ...", "said: 554 ...", "(#5.5.0)",
"DSN 5.1.10 ..."), so a code and a status that sit next to each other are
preferred over lone ones; a lone x.y.z must not be part of an IP address.
"""
from __future__ import annotations

import re

__all__ = ["smtp_stage", "ADDR", "clean_address", "find_code_status", "unfold", "is_role_address"]

# Deliberately permissive local part (quoted parts, '+', '=', '/', '&'...); the
# domain needs a dot or is a bracketed literal.
ADDR = re.compile(
    r"(?<![\w.+=/&%!#$'*?^`{|}~-])"
    r"((?:\"[^\"\n]{1,64}\"|[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*)"
    # (SMTPUTF8: the labels before the last may be Unicode; the last must be ASCII, so
    # an address written straight before CJK text does not swallow it)
    r"@(?:(?:[^\W_](?:[\w-]{0,62}[^\W_])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]))"
)

_CODE_STATUS = re.compile(r"(?<![\d.])([245][0-5]\d)(?:[ -]+|-|\s*\(?#?)([245]\.\d{1,3}\.\d{1,3})(?![\d]|\.\d)")
_STATUS = re.compile(r"(?<![\d.\w])#?([245]\.\d{1,3}\.\d{1,3})(?![\d]|\.\d)")
_CODE = re.compile(
    r"(?:^|(?<=[\s:(\[\"'<=>])|(?<=\bsaid))([245][0-5]\d)(?=[\s\-:;,.\])]|$)(?![\-.]\d{2,})",
)
_CODE_CONTEXT = re.compile(r"(?:said|error|reply|response|returned|was|code|status|smtp|host|server|>>>|<<<|\)|\])\W{0,4}$", re.I)


def unfold(text: str) -> str:
    """Collapse runs of white space (folded lines, indentation) into single spaces."""
    return " ".join(text.split())


def find_code_status(text: str) -> tuple[int | None, str | None]:
    """The SMTP reply code and RFC 3463 status quoted in a diagnostic text."""
    first = None
    for i, m in enumerate(_CODE_STATUS.finditer(text)):
        code, status = int(m.group(1)), m.group(2)
        if not (code // 100 == int(status[0]) or status[0] == "2"):
            continue
        if code >= 400:
            return code, status
        # A transcript's "250 2.1.5 Ok" before the failure is not the failure:
        # a 4xx/5xx pair later in the text wins (looked for over a few pairs only).
        if first is None:
            first = (code, status)
        if i >= 16:
            break
    if first is not None:
        return first
    status = None
    m = _STATUS.search(text)
    if m:
        status = m.group(1)
    code = None
    for m in _CODE.finditer(text):
        start = m.start(1)
        before = text[max(0, start - 24):start]
        # A bare number is a reply code only at the start or after a telling word.
        if start == 0 or before.endswith("\n") or _CODE_CONTEXT.search(before):
            code = int(m.group(1))
            break
    if code is not None and status is not None and code // 100 != int(status[0]):
        if status[0] in "45" and code // 100 in (4, 5):
            pass   # some MTAs do mix them (e.g. "550 4.4.7"); keep both as stated
    return code, status


def clean_address(raw: str) -> str:
    """'rfc822; <Foo@Bar.example>' -> 'Foo@Bar.example'."""
    s = raw.strip()
    if ";" in s and not s.startswith('"'):
        kind, _, rest = s.partition(";")
        if "@" not in kind:
            s = rest.strip()
    s = s.strip().strip("<>").strip()
    m = ADDR.search(s)
    if m:
        return m.group(1).strip(".")
    return s.strip(" \t\"'.")


_ROLE = re.compile(
    r"^(?:mailer-daemon|postmaster|mail-daemon|maildaemon|mailerdaemon|"
    r"no-?reply|do-?not-?reply|double-bounce|mdaemon)(?:[+-].*)?@", re.I)


def is_role_address(addr: str) -> bool:
    """Addresses of the reporting side (postmaster, MAILER-DAEMON...), never the failed recipient."""
    return bool(_ROLE.match(addr))


_STAGE = re.compile(
    r"(?:after|in reply to|in response to)\s+(?:the\s+)?(?:end of\s+)?"
    r"(MAIL FROM|RCPT TO|DATA|RCPT|MAIL|message (?:body|text|data))", re.I)
_TRANSCRIPT_CMD = re.compile(r"^>>>\s*(MAIL FROM|RCPT TO|DATA|\.)", re.I | re.M)
_TRANSCRIPT_ERR = re.compile(r"^<<<\s*[45]\d\d", re.M)


def smtp_stage(text: str) -> str | None:
    """The SMTP command a rejection answered ("MAIL", "RCPT", "DATA"), when the text says so.

    "after RCPT TO" / "in reply to end of DATA command" wordings, or in a
    Sendmail-style transcript the last ">>>" command before the first "<<< 5xx"."""
    err = _TRANSCRIPT_ERR.search(text)
    if err:
        cmds = list(_TRANSCRIPT_CMD.finditer(text, 0, err.start()))
        if cmds:
            return _stage_word(cmds[-1].group(1))
    m = _STAGE.search(text)
    return _stage_word(m.group(1)) if m else None


def _stage_word(word: str) -> str:
    w = word.upper()
    if w.startswith("MAIL"):
        return "MAIL"
    if w.startswith("RCPT"):
        return "RCPT"
    return "DATA"
