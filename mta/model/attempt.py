"""A delivery attempt and what the next hop said: the values the SMTP client
hands to the dispatcher and the outcome rules (no I/O here).

RemoteReply is one reply as the client parsed it (or our local refusal);
TransactionResult is what one message transaction got per recipient; Attempt
says where an attempt went, for the log records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class RemoteReply:
    code: int       # SMTP reply code (RFC 5321 4.2), or ours for a local refusal
    status: str     # enhanced status code (RFC 3463), "" if none
    text: str       # reply text, lines joined by spaces, printable ASCII only


@dataclass(slots=True)
class TransactionResult:
    # One per recipient, in the order given: its RCPT reply, or the MAIL reply
    # when MAIL was refused, or our local refusal when nothing was sent. The
    # message reached recipient i iff recipients[i] and `data` are both 2xx.
    recipients: list[RemoteReply]
    data: RemoteReply | None    # end of data / BDAT LAST (or refused DATA) reply; None: not sent
    phase: str                  # last phase reached (Postfix-style phrase)


class Attempt:
    """Where one delivery attempt went, for the log records."""

    __slots__ = ("source", "site", "mx", "ip", "started")

    def __init__(self, source: str, site: str, mx: str = "", ip: str = ""):
        self.source = source
        self.site = site
        self.mx = mx
        self.ip = ip
        self.started = time.time()
