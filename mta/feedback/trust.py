"""Feedback trust: which recipient, if any, a returned report proves we sent to (issue 10).

DSNs and ARF reports come from anyone who can reach the bounce domain's MX. A report
changes state (suppression, the per-(source, site) counters) only for a recipient it
proves we sent the original to, by one of these proofs (the `proof` field of its
OOB/Feedback record):
  verp_envelope            the report was sent to one of our VERP return paths (a DSN)
  verp_return_path         the returned original's Return-Path is one: feedback loops
                           deliver to one fixed address, and the mailbox provider stamped
                           our MAIL FROM on the original it returns
  verp_original_mail_from  the ARF Original-Mail-From field is one
  trusted_source           a complaint delivered by a client in [bounces]
                           trusted_fbl_sources (the SMTP peer address of the session that
                           brought the report)
A VERP return path is bound to one recipient and expires (mta/feedback/verp.py), so it acts on
that recipient only, and only until then (a sealed recipient's return path is bound to its
sealed form, mta/model/sealed.py: the remote server names the clear address, so `prove`
also tries the forms that address seals to under each key of the keyring, and the verdict
says which one matched, so the records name that sealed form, never the clear address); a trusted source vouches for the recipient
its complaint names, and for complaints only. A record that would have acted but could
not says why in `ignored`: no_verp, verp_mismatch, verp_expired, verp_legacy,
no_recipient or check_budget.

Cost: one HMAC per (return path, named recipient) pair, at most MAX_TOKENS return paths
per report and MAX_CHECKS HMACs in all, so a report naming thousands of addresses costs
about a millisecond, not seconds. A genuine report needs one or two.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol

from mta.feedback import verp
from mta.model.ids import id_text

if TYPE_CHECKING:
    from mta.feedback.bounce.report import Report
    from mta.model.envelope import Envelope

MAX_TOKENS = 4       # distinct return paths taken from one report
MAX_CHECKS = 256     # HMAC verifications per report
MAX_SEALS = 64       # sealed forms computed per report (AES-SIV, a few microseconds each)
SEALED_FORMS = 8     # sealed forms tried per named recipient (keys x letter cases)

ENVELOPE = "verp_envelope"
RETURN_PATH = "verp_return_path"
ORIGINAL_MAIL_FROM = "verp_original_mail_from"
TRUSTED_SOURCE = "trusted_source"

NO_VERP = "no_verp"
NO_RECIPIENT = "no_recipient"
CHECK_BUDGET = "check_budget"
# when several return paths fail, the most telling reason is logged
_RANK = {verp.EXPIRED: 3, verp.LEGACY: 2, verp.MISMATCH: 1, CHECK_BUDGET: 0}


class Keys(Protocol):
    """What proof needs of the feedback state (mta/feedback/state.py implements it):
    the VERP secret and the trusted FBL sources, not the rest of the state."""

    def verp_token(self, address: str) -> verp.Token | None: ...   # unverified, None: not ours
    def verify_verp(self, token: verp.Token, recipient: str, now: float) -> str: ...  # verp.VALID...
    def trusted_fbl(self, client_ip: str | None) -> bool: ...   # a trusted_fbl_sources client?
    def sealed_forms(self, address: str, limit: int) -> list[str]: ...  # [] without a keyring


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a report may act on one recipient, and on what grounds."""

    proof: str | None              # one of the proofs above; None: it may not act
    token: verp.Token | None       # the return path that proved it
    ignored: str | None            # why not, when proof is None
    sealed: str | None = None      # the sealed form the return path was minted for

    def fields(self, message_id: str | None) -> dict:
        """The record fields: our message id when proven, else what the report claims."""
        t = self.token
        return {"id": id_text(t.msg_id) if t else message_id, "verp": t is not None,
                "verp_index": t.index if t else None, "proof": self.proof,
                "ignored": self.ignored}


class Evidence:
    """The proof one report carries, gathered once; `prove` asks about one recipient."""

    def __init__(self, feedback: Keys, env: Envelope, idxs: list[int], report: Report,
                 now: float | None = None):
        self.feedback = feedback
        self.now = time.time() if now is None else now
        self.checks = 0
        self.seals = 0
        self.tokens: dict[verp.Token, str] = {}     # token -> where it was found
        self._gather(ENVELOPE, (env.recipients[i].address for i in idxs))
        original = report.original_headers
        if original is not None:
            self._gather(RETURN_PATH, original.get_all("Return-Path") or ())
        if report.feedback is not None and report.feedback.original_mail_from:
            self._gather(ORIGINAL_MAIL_FROM, (report.feedback.original_mail_from,))
        self.trusted = report.kind == "feedback" and feedback.trusted_fbl(env.client_ip)

    def _gather(self, where: str, addresses: Iterable[object]) -> None:
        for address in addresses:
            if len(self.tokens) >= MAX_TOKENS:
                return
            token = self.feedback.verp_token(str(address))
            if token is not None:
                self.tokens.setdefault(token, where)

    def prove(self, recipient: str | None) -> Verdict:
        """May the report act on `recipient`?"""
        if not recipient:
            return Verdict(None, None, NO_RECIPIENT)
        reason = NO_VERP
        forms: list[str] | None = None     # the sealed forms, computed when first needed
        for token, where in self.tokens.items():
            if self.checks >= MAX_CHECKS:
                reason = max(reason, CHECK_BUDGET, key=lambda r: _RANK.get(r, -1))
                break
            self.checks += 1
            answer = self.feedback.verify_verp(token, recipient, self.now)
            if answer == verp.VALID:
                return Verdict(where, token, None)
            if answer == verp.MISMATCH:
                if forms is None:
                    forms = self._sealed_forms(recipient)
                for form in forms:
                    if self.checks >= MAX_CHECKS:
                        break
                    self.checks += 1
                    sealed_answer = self.feedback.verify_verp(token, form, self.now)
                    if sealed_answer == verp.VALID:
                        return Verdict(where, token, None, form)
                    if sealed_answer != verp.MISMATCH:
                        answer = sealed_answer      # e.g. minted for it, but expired
                        break
            reason = max(reason, answer, key=lambda r: _RANK.get(r, -1))
        if self.trusted:
            return Verdict(TRUSTED_SOURCE, None, None)
        return Verdict(None, None, reason)

    def _sealed_forms(self, recipient: str) -> list[str]:
        room = min(SEALED_FORMS, MAX_SEALS - self.seals)
        if room <= 0:
            return []
        sealed_forms = getattr(self.feedback, "sealed_forms", None)
        forms = sealed_forms(recipient, room) if sealed_forms is not None else []
        self.seals += len(forms)
        return forms

    def first_proven(self, named: Iterable[str | None]) -> tuple[str | None, Verdict]:
        """The first of a complaint's `named` recipients it proves (one complaint is
        about one message, so one recipient), else the first named and why not."""
        first: tuple[str | None, Verdict] | None = None
        for rcpt in dict.fromkeys(clean(r) for r in named if r):
            if rcpt is None:
                continue
            verdict = self.prove(rcpt)
            if verdict.proof is not None:
                return rcpt, verdict
            first = first or (rcpt, verdict)
        return first or (None, Verdict(None, None, NO_RECIPIENT))


def clean(address: str) -> str | None:
    """An address as a report writes it, without brackets and blanks; None when empty."""
    a = address.strip().strip("<>").strip()
    return a or None
