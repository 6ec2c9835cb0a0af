"""A delivery attempt and what the next hop said: the values the SMTP client
hands to the dispatcher and the outcome rules (no I/O here).

RemoteReply is one reply as the client parsed it (or our local refusal);
TransactionResult is what one message transaction got per recipient; Attempt
says where an attempt went, for the log records; AttemptResult is what one
attempt at one queue entry came to, the one value a dispatcher (or the router)
hands to the outcome rules (mta/delivery/outcome.py: Outcomes.apply).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from mta.model.envelope import Envelope
from mta.model.queued import QueuedMessage

# RCPT accepted but the message data never got its reply (the session died first)
NO_DATA_REPLY_TEXT = "no reply to the message data"


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

    def finals(self) -> list[RemoteReply]:
        """The reply that decides each recipient: its RCPT refusal, else the data reply
        (none: the data was never answered, so the recipient is retried)."""
        data = self.data or RemoteReply(451, "4.3.0", NO_DATA_REPLY_TEXT)
        return [r if r.code >= 300 else data for r in self.recipients]


class Attempt:
    """Where one delivery attempt went, for the log records."""

    __slots__ = ("source", "site", "mx", "ip", "started")

    def __init__(self, source: str, site: str, mx: str = "", ip: str = ""):
        self.source = source
        self.site = site
        self.mx = mx
        self.ip = ip
        self.started = time.time()


@dataclass(slots=True)
class AttemptResult:
    """One attempt at one queue entry, as a value: the reply that decides each of
    its recipients (2xx delivered, 5xx bounced, anything else retried), each of
    `msg.rcpts` exactly once. `env` is None when the attempt never read the
    message (e.g. no MX host took a connection)."""
    msg: QueuedMessage
    env: Envelope | None
    at: Attempt
    replies: list[tuple[int, RemoteReply]]   # (recipient index, deciding reply)

    @classmethod
    def all(cls, msg: QueuedMessage, env: Envelope | None, at: Attempt,
            reply: RemoteReply) -> AttemptResult:
        """Every recipient of the entry got the same answer (a session, site, DNS or
        signing failure, or a routing refusal)."""
        return cls(msg, env, at, [(i, reply) for i in msg.rcpts])
