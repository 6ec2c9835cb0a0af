"""Data types returned by the bounce parser: a Report with its failed recipients or feedback.

Plain dataclasses so callers (the CLI, suppression lists, accounting) can read
them without knowing which detector produced them.
"""
from __future__ import annotations

import email.message
from dataclasses import dataclass, field

__all__ = ["FailedRecipient", "Feedback", "Report", "MAX_RECIPIENTS"]

# Failed recipients one report may name (the first ones, in the report's order).
# A real DSN names the recipients of one transaction, with VERP exactly one; a
# bound keeps a report listing a hundred thousand addresses from costing a
# hundred thousand verdicts, log records and suppressions.
MAX_RECIPIENTS = 1000


@dataclass(slots=True)
class FailedRecipient:
    recipient: str            # the failed address (Final-Recipient, or from the text)
    status: str | None        # RFC 3463 x.y.z as stated (or derived, see status_derived)
    reply_code: int | None    # SMTP reply code found in the diagnostic, if any
    diagnostic: str           # the remote's text, unfolded
    action: str               # failed | delayed | delivered | relayed | expanded
    category: str = "unknown"
    hard: bool = False
    remote_mta: str | None = None
    status_derived: bool = False   # True when status was not stated but derived from the category


@dataclass(slots=True)
class Feedback:
    """An ARF (RFC 5965) report or a Microsoft JMRP complaint."""

    feedback_type: str
    original_rcpt_to: str | None = None
    source_ip: str | None = None
    original_mail_from: str | None = None
    user_agent: str | None = None
    version: str | None = None
    arrival_date: str | None = None
    reported_domain: str | None = None
    reported_uri: str | None = None
    message_id: str | None = None     # OUR id, recovered from the attached original


@dataclass(slots=True)
class Report:
    kind: str = "none"        # "bounce" | "delay" | "autoreply" | "feedback" | "none"
    family: str = ""          # which format/detector recognised it
    reporting_mta: str | None = None
    recipients: list[FailedRecipient] = field(default_factory=list)
    feedback: Feedback | None = None
    message_id: str | None = None
    original_headers: email.message.Message | None = None
