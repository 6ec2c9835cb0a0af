"""Feedback-loop reports: ARF (RFC 5965 message/feedback-report) and Microsoft JMRP.

ARF: a multipart/report whose machine-readable part is message/feedback-report
with Feedback-Type, User-Agent, Version, Original-Rcpt-To, Source-IP, ...
Values are returned exactly as the report states them (several occurrences of
one field are joined with " | "); recipients are the Original-Rcpt-To
addresses, else the To: of the attached original.

JMRP (Outlook.com / Hotmail "Junk Mail Reporting Program"): not RFC 5965 but a
multipart/mixed with the complained-about message attached as message/rfc822
carrying X-HmXmrOriginalRecipient; its feedback type is always "abuse".
"""
from __future__ import annotations

import email.message

from .diagnostic import ADDR, clean_address
from .dsn import fields_text, parse_fields
from .mime import header, part_text, payload_of
from .report import MAX_RECIPIENTS, Feedback

__all__ = ["find_feedback", "jmrp_original"]

_FIELDS = {
    "feedback-type": "feedback_type", "original-rcpt-to": "original_rcpt_to", "source-ip": "source_ip",
    "original-mail-from": "original_mail_from", "user-agent": "user_agent", "version": "version",
    "arrival-date": "arrival_date", "reported-domain": "reported_domain", "reported-uri": "reported_uri",
}


def _report_text(part: email.message.Message) -> str:
    payload = payload_of(part)
    if isinstance(payload, list):
        return "\n\n".join(fields_text(p) for p in payload if isinstance(p, email.message.Message))
    return part_text(part)


def find_feedback(msg: email.message.Message) -> tuple[Feedback, list[str]] | None:
    """(feedback, original recipients) for an ARF report, None when it is not one."""
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            return _arf(_report_text(part))
    # A few senders mislabel the report part as text/plain: accept it only with both key fields.
    if msg.get_content_type() == "multipart/report" and "feedback-report" in header(msg, "Content-Type").lower():
        for part in msg.walk():
            if part.get_content_type() == "text/plain":
                text = part_text(part)
                names = {n for n, _ in parse_fields(text)}
                if "feedback-type" in names and "user-agent" in names:
                    return _arf(text)
    return None


def _arf(text: str) -> tuple[Feedback, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in parse_fields(text):
        attr = _FIELDS.get(name)
        if attr:
            values.setdefault(attr, []).append(value)
    fb = Feedback(feedback_type=(values.pop("feedback_type", ["abuse"])[0] or "abuse").strip())
    for attr, vals in values.items():
        setattr(fb, attr, " | ".join(vals))
    rcpts = [clean_address(v) for v in (fb.original_rcpt_to or "").split(" | ") if v.strip()]
    return fb, [r for r in rcpts if "@" in r][:MAX_RECIPIENTS]


def jmrp_original(msg: email.message.Message) -> email.message.Message | None:
    """The attached original of a Microsoft JMRP complaint, None when it is not one."""
    if msg.get_content_maintype() != "multipart":
        return None
    for part in msg.walk():
        if part.get_content_type() == "message/rfc822":
            payload = payload_of(part)
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, email.message.Message) and inner.get("X-HmXmrOriginalRecipient"):
                return inner
    return None


def jmrp_feedback(inner: email.message.Message) -> tuple[Feedback, list[str]]:
    rcpt = header(inner, "X-HmXmrOriginalRecipient")
    # JMRP states only the complaining recipient; the rest of Feedback stays None.
    fb = Feedback(feedback_type="abuse", original_rcpt_to=rcpt or None)
    addrs = [m.group(1) for m in ADDR.finditer(rcpt)]
    return fb, addrs
