"""Amazon SES notifications delivered by e-mail (SNS "Notification" JSON in the body).

SES can publish Bounce, Complaint and Delivery events to an SNS topic whose
e-mail subscription sends the JSON as the message body; the inner "Message"
is itself a JSON string. Mail gateways often wrap the long lines (a newline
plus one space inside a JSON string), so that wrapping is undone first.
"""
from __future__ import annotations

import json
import re

from .diagnostic import find_code_status
from .report import MAX_RECIPIENTS, Feedback, FailedRecipient

__all__ = ["parse_ses"]

_HINT = re.compile(r'"notificationType|\\"notificationType|"eventType')


def _load(text: str) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    body = text[start:text.rfind("}") + 1]
    for candidate in (body, body.replace("\n ", ""), re.sub(r"\n\s*", "", body)):
        try:
            doc = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def parse_ses(text: str) -> tuple[str, list[FailedRecipient], Feedback | None, dict] | None:
    """(kind, recipients, feedback, mail) from an SES notification body; None if not one."""
    if not _HINT.search(text):
        return None
    doc = _load(text)
    if doc is None:
        return None
    inner = doc.get("Message", doc)
    if isinstance(inner, str):
        try:
            inner = json.loads(inner)
        except ValueError:
            return None
    if not isinstance(inner, dict):
        return None
    kind = str(inner.get("notificationType") or inner.get("eventType") or "")
    mail = inner.get("mail") if isinstance(inner.get("mail"), dict) else {}
    if kind == "Bounce":
        b = inner.get("bounce") or {}
        transient = str(b.get("bounceType", "")).lower() == "transient"
        out = []
        for r in (b.get("bouncedRecipients") or [])[:MAX_RECIPIENTS]:
            diag = str(r.get("diagnosticCode") or "")
            code, status = find_code_status(diag)
            out.append(FailedRecipient(
                recipient=str(r.get("emailAddress") or ""), status=r.get("status") or status,
                reply_code=code, diagnostic=re.sub(r"^\s*smtp;\s*", "", diag),
                action=str(r.get("action") or ("delayed" if transient else "failed")),
                remote_mta=b.get("remoteMtaIp") or None))
        return ("delay" if transient else "bounce"), out, None, mail
    if kind == "Complaint":
        c = inner.get("complaint") or {}
        rcpts = [str(r.get("emailAddress") or "") for r in (c.get("complainedRecipients") or [])[:MAX_RECIPIENTS]]
        fb = Feedback(feedback_type=str(c.get("complaintFeedbackType") or "abuse"),
                      original_rcpt_to=" | ".join(rcpts) or None, user_agent=c.get("userAgent"),
                      arrival_date=c.get("arrivalDate"), source_ip=mail.get("sourceIp"),
                      original_mail_from=mail.get("source"))
        out = [FailedRecipient(recipient=a, status=None, reply_code=None, diagnostic="", action="failed",
                               category="unknown") for a in rcpts]
        return "feedback", out, fb, mail
    if kind == "Delivery":
        d = inner.get("delivery") or {}
        diag = str(d.get("smtpResponse") or "")
        code, status = find_code_status(diag)
        out = [FailedRecipient(recipient=str(a), status=status, reply_code=code, diagnostic=diag,
                               action="delivered", remote_mta=d.get("reportingMTA"))
               for a in (d.get("recipients") or [])[:MAX_RECIPIENTS]]
        return "delivery", out, None, mail
    return None
