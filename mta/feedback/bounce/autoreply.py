"""Auto-replies (RFC 3834): vacation / out-of-office answers are not bounces.

Signals, strongest first: Auto-Submitted: auto-replied (RFC 3834 5.1; but
MTAs also put it on real bounces, so the caller checks for a bounce first),
X-Autoreply / X-Autorespond / X-Auto-Response-Suppress with OOF,
Precedence: auto_reply, and vacation-like subjects in many languages.
"""
from __future__ import annotations

import email.message
import re

from .mime import header

__all__ = ["is_autoreply"]

_SUBJECT = re.compile(
    r"\b(?:auto(?:matic)?[ _-]?(?:reply|response|respons|answer|antwort|r[eé]ponse)|out of (?:the )?office|"
    r"vacation|on holiday|away from (?:the )?office|abwesenheit|absence|abwesend|"
    r"r[eé]ponse automatique|risposta automatica|respuesta autom[aá]tica|autoreply|autoresponse)\b|"
    r"\u4e0d\u5728|\u81ea\u52d5\u8fd4\u4fe1|\u81ea\u52a8\u56de\u590d",
    re.I)


def is_autoreply(msg: email.message.Message) -> bool:
    auto = header(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-AutoReply-From", "X-Mail-Autoreply"):
        if msg.get(name) is not None:
            return True
    if header(msg, "Precedence").lower() == "auto_reply":
        return True
    if "oof" in header(msg, "X-Auto-Response-Suppress").lower() and _SUBJECT.search(header(msg, "Subject")):
        return True
    return bool(_SUBJECT.search(header(msg, "Subject")))
