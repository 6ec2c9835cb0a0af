"""Recipient policy beyond relay_cidrs: the bounce domain and the suppression list.

At RCPT (through `ServerSettings.rcpt_check`, called by the native core only when
this policy exists, so a daemon without suppression or bounce domain pays nothing):
- an address at `[bounces] domain` is accepted from any client (returned mail comes
  from everywhere) and later handed to the bounce intake instead of delivery; while
  the intake's backlog is full ([bounces] parse_backlog) it gets 451 4.3.2 instead
  (the sender retries later: returned mail waits at its sender, not in our memory);
- a suppressed address (global or domain:<sender domain> scope) is refused with
  550 5.7.1 when `on_match = "reject"`; with "drop" it is accepted here and removed
  at end of data. Only clients that may relay are told: for anyone else the list is
  not looked at, so an outsider gets the same relay refusal (an error counted towards
  max_errors) for a suppressed address as for any other, and cannot probe who
  complained or unsubscribed.
At end of data (`filter()`), when the tenant is known: tenant-scoped entries (and,
for "drop", every scope) remove the recipient, each with a Suppressed log record.
Logs name the address (our own logs), never its hash key.
Sealed recipients (`[privacy] keyring`, mta/model/sealed.py): a local part that claims
the sealed format is opened in memory for the suppression check (the list hashes the
clear address) and dropped; one that does not open is refused with 550 5.1.3 and no
detail. Logs and replies name the sealed form, as the client sent it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from mta.model.replies import REPLIES
from mta.model.sealed import Unsealable

if TYPE_CHECKING:
    from mta.feedback.state import Feedback


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class RecipientPolicy:
    def __init__(self, feedback: Feedback):
        self.feedback = feedback
        self.bounce_domain = feedback.bounce_domain
        self.suppressions = feedback.suppressions
        self.reject = feedback.on_match == "reject"
        self.sealed = getattr(feedback, "sealed", None)   # Keyring or None
        # the bounce intake's backlog is full (set by Server once the intake exists)
        self.bounce_full: Callable[[], bool] = lambda: False
        self.suppressed = 0   # recipients refused at RCPT or dropped after DATA (/metrics)

    def is_bounce_address(self, address: str) -> bool:
        return bool(self.bounce_domain) and _domain(address) == self.bounce_domain

    def rcpt_check(self, address: str, sender: str, relay_allowed: bool):
        """The native core's hook: None, True (accept from anyone) or (name, reply line)."""
        if self.bounce_domain and _domain(address) == self.bounce_domain:
            return ("QUEUE_FULL", REPLIES["QUEUE_FULL"].line()) if self.bounce_full() else True
        if not relay_allowed:
            return None   # not relaying: the relay check refuses, suppressed or not
        clear = address
        if self.sealed is not None and address.startswith("e1"):
            try:
                clear = self.sealed.open(address) or address
            except Unsealable:
                return "BAD_SEALED", REPLIES["BAD_SEALED"].line()
        if self.suppressions is None or not self.reject:
            return None
        entry = self.suppressions.check(clear, sender_domain=_domain(sender) or None)
        if entry is None:
            return None
        self.suppressed += 1
        shown = "".join(c if " " < c < "\x7f" else "?" for c in address[:256])   # ASCII reply
        return "SUPPRESSED", REPLIES["SUPPRESSED"].line(shown, entry.reason)

    def clear(self, address: str) -> str:
        """The clear address of a sealed one, in memory only (it opened at RCPT)."""
        if self.sealed is None or not address.startswith("e1"):
            return address
        try:
            return self.sealed.open(address) or address
        except Unsealable:
            return address

    def filter(self, rcpts: list, sender: str, tenant: str | None) -> list[tuple[str, str, str]]:
        """Remove suppressed recipients from `rcpts` in place; returns (address, scope,
        reason) of each one removed."""
        if self.suppressions is None:
            return []
        if self.reject and not tenant:
            return []    # global and domain scopes were refused at RCPT already
        kept, dropped = [], []
        sender_domain = _domain(sender) or None
        for r in rcpts:
            entry = None if self.is_bounce_address(r[0]) else self.suppressions.check(
                self.clear(r[0]), tenant=tenant, sender_domain=sender_domain)
            if entry is None:
                kept.append(r)
            else:
                dropped.append((r[0], entry.scope, entry.reason))
        if dropped:
            rcpts[:] = kept
            self.suppressed += len(dropped)
        return dropped
