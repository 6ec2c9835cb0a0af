"""Bounce and feedback processing: parse returned mail, classify remote replies.

`parse_message(bytes) -> Report` understands RFC 3464 DSNs, the common
non-standard MTA formats, ARF / JMRP feedback reports, Amazon SES
notifications and RFC 3834 auto-replies. `Classifier` maps an SMTP reply
(code, enhanced status, text) to a category and hard/soft, from TOML rules.
The parser is linear in its input (bounded notice, recipients, MIME nesting);
the daemon runs it in child processes with a time, size and memory budget
(`worker.ParserPool`).
"""
from __future__ import annotations

from .classify import Classifier, RulesError, Verdict
from .parser import parse_message
from .report import FailedRecipient, Feedback, Report

__all__ = ["Classifier", "FailedRecipient", "Feedback", "Report", "RulesError", "Verdict", "parse_message"]
