"""Out-of-band intake: returned mail addressed to the bounce domain, processed locally.

Where it sits: Server hands every durable message (new or recovered) whose
recipients include addresses at `[bounces] domain` here instead of to delivery;
the message was spooled like any other before its 250, so nothing accepted is
lost. `process()` parses it with mta.bounce, writes one OOB record per failed
recipient or one Feedback record for an ARF report, suppresses the hard bounces
and complaints the report proves, and returns; the caller then
finishes those recipients in the spool (tombstone). A crash before that leaves
the message live, recovery brings it back and it is processed again
(at-least-once: a record may repeat, a suppression is idempotent).

Trust: everything here comes from the Internet. A hard bounce or complaint
suppresses (and counts) only a recipient the report proves we sent to: a VERP
return path minted for that recipient, or a complaint from a trusted FBL source
(mta/feedback_trust.py); the others say in `ignored` why they did not act.
Auto-replies and delay notices are logged, never suppress. XXX: parsing runs on the loop thread; a
very large returned message costs milliseconds there.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mta.bounce import parse_message
from mta.bounce.report import Report
from mta.egress.pools import DEFAULT_SOURCE
from mta.feedback_trust import Evidence, Verdict
from mta.logs.records import RecordType

if TYPE_CHECKING:
    from mta.config import Config
    from mta.feedback import Feedback
    from mta.logs.writer import LogWriter
    from mta.spool import Spool

log = logging.getLogger("mta.bounce_intake")


def _domain(address: str | None) -> str:
    return (address or "").rpartition("@")[2].lower()


class BounceIntake:
    def __init__(self, config: Config, feedback: Feedback, spool: Spool, logs: LogWriter | None):
        self.feedback = feedback
        self.spool = spool
        self.logs = logs
        self.tenant_header = config.reception.tenant_header
        # complaint reports name the sending IP; operators think in [[source]] names
        self.sources = {s.address: s.name for s in config.source}
        self.processed = 0

    def bounce_indexes(self, env: dict) -> list[int]:
        dom = self.feedback.bounce_domain
        if not dom:
            return []
        return [i for i, r in enumerate(env["rcpts"]) if _domain(r[0]) == dom]

    def process(self, msg_id: bytes, env: dict, idxs: list[int]) -> None:
        """Handle the message for its bounce-domain recipients `idxs` (never raises)."""
        try:
            _, content = self.spool.read(msg_id)
        except KeyError:
            return
        try:
            self._apply(env, idxs, parse_message(bytes(content), self.feedback.classifier))
        except Exception:   # a parser bug must not keep the message (or the loop) stuck
            log.exception("cannot process returned message %s", env.get("id"))
            self._log(RecordType.OOB, id=None, bounce_id=env.get("id"), kind="error")
        self.processed += 1

    def _apply(self, env: dict, idxs: list[int], report: Report) -> None:
        """Act on a parsed report: log it, and suppress and count only what it proves
        (mta/feedback_trust.py: a VERP return path of ours for that recipient, or a
        complaint from a trusted FBL source)."""
        fb = self.feedback
        evidence = Evidence(fb, env, idxs, report)
        tenant = None
        if report.original_headers is not None and self.tenant_header:
            tenant = report.original_headers.get(self.tenant_header)
            tenant = str(tenant).strip() or None if tenant is not None else None
        base = {"bounce_id": env.get("id"), "kind": report.kind, "family": report.family,
                "reporting_mta": report.reporting_mta}
        if report.kind == "feedback" and report.feedback is not None:
            f = report.feedback
            rcpt, verdict = evidence.first_proven(
                [f.original_rcpt_to, *(r.recipient for r in report.recipients)])
            source = self.sources.get(f.source_ip or "", "")
            scope = None
            if verdict.proof is not None:
                # without [[source]] tables everything leaves from the default source
                counted = source or ("" if self.sources else DEFAULT_SOURCE)
                scope = fb.complaint(rcpt, tenant, counted, fb.site_for(rcpt))
            self._log(RecordType.FEEDBACK, **base, **verdict.fields(report.message_id),
                      feedback_type=f.feedback_type, recipient=rcpt, source_ip=f.source_ip,
                      source=source or None, tenant=tenant, suppressed=scope)
            return
        if not report.recipients:
            # auto-replies and unrecognised mail: logged as such, nobody suppressed
            nothing = Verdict(None, None, None).fields(report.message_id)
            self._log(RecordType.OOB, **base, **nothing, recipient=None, suppressed=None)
            return
        for r in report.recipients:
            verdict = evidence.prove(r.recipient)
            acts = report.kind == "bounce" and r.hard
            suppressed = None
            # a DSN does not say which source sent the original
            if acts and verdict.proof is not None and fb.hard_bounce(
                    r.recipient, "", fb.site_for(r.recipient), f"oob {r.status or ''} {r.category}"):
                suppressed = "global"
            fields = verdict.fields(report.message_id)
            if not acts:
                fields["ignored"] = None     # nothing to act on, nothing ignored
            self._log(RecordType.OOB, **base, **fields, recipient=r.recipient, status=r.status,
                      code=r.reply_code, category=r.category, hard=r.hard, action=r.action,
                      remote_mta=r.remote_mta, suppressed=suppressed)

    def _log(self, rtype: RecordType, **fields) -> None:
        if self.logs is not None:
            self.logs.log(rtype, **fields)
