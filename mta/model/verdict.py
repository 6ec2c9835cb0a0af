"""Verdict: what the reply classifier made of a remote reply (no I/O here).

Made by mta/feedback/bounce/classify.py, read by the outcome rules (log
records carry `category` and `hard`; a hard bounce suppresses) and the
bounce intake.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    category: str   # one of mta.feedback.bounce.classify.CATEGORIES
    hard: bool      # permanent for this recipient: suppress it
    rule: str       # name of the rule that matched, for the log
