"""Log record types: the one definition of what the JSONL logs contain.

Imports nothing from the rest of mta (KumoMTA's kumo-log-types idea), so log
consumers can use it alone. Every record is one JSON object per line with at
least `type`, `time` (Unix seconds, float), `ts` (the same instant in ISO 8601
UTC with milliseconds, "2026-12-02T01:13:21.123Z") and `host` (the daemon's
[server] hostname). Address fields (recipient, recipients, sender) are in clear,
hashed or cut to the domain as [log] recipient_privacy / sender_privacy say.
"""
from __future__ import annotations

from enum import Enum


class RecordType(str, Enum):
    RECEPTION = "Reception"                # a message was accepted (after the spool sync)
    REJECTION = "Rejection"                # a transaction was refused at end of data
    DELIVERY = "Delivery"                  # a recipient was accepted by the next hop
    TRANSIENT_FAILURE = "TransientFailure"  # a delivery attempt failed, will retry
    BOUNCE = "Bounce"                      # a recipient failed permanently
    EXPIRATION = "Expiration"              # a recipient's max age passed
    ADMIN_BOUNCE = "AdminBounce"           # an operator bounced a recipient (DSN to the sender)
    ADMIN_DELETE = "AdminDelete"           # an operator deleted a queued message (no DSN)
    OOB = "OOB"                            # an out-of-band bounce was received
    FEEDBACK = "Feedback"                  # an ARF complaint was received
    SUPPRESSED = "Suppressed"              # a suppressed recipient was dropped at reception
    BACKOFF = "Backoff"                    # a throttling reply paused a (source, site)
    CORRUPT = "Corrupt"                    # a spool record failed its checks at start
    LOG_LOSS = "LogLoss"                   # records dropped while the log could not be written
    UNSUBSCRIBE = "Unsubscribe"            # a one-click unsubscribe (RFC 8058) was stored
    RELOAD = "Reload"                      # the config was re-read (SIGHUP): applied or refused
    ADAPTIVE_ACTION = "AdaptiveAction"     # adaptive delivery acted on a (source, provider)
    ADAPTIVE_RESTORE = "AdaptiveRestore"   # ... and stepped back / undid it
    WARMUP_DAY = "WarmupDay"               # a warming source's new day: its cap at a class
    SCANNED = "Scanned"                    # a message was content-scanned at reception
    TRANSFER = "Transfer"                  # a queued message moved to or from another node


# Fields per record type, for documentation and for tests that check records.
FIELDS: dict[RecordType, tuple[str, ...]] = {
    RecordType.RECEPTION: ("id", "sender", "recipients", "size", "client_ip", "client_port",
                           "helo", "listener", "tenant", "campaign", "started", "time",
                           "protocol"),
    RecordType.REJECTION: ("sender", "recipients", "client_ip", "listener", "code", "status",
                           "reason", "time"),
    # one per recipient and attempt; the message's tenant and campaign (None: none);
    # category/hard on Bounce and TransientFailure (the classifier's verdict)
    RecordType.DELIVERY: ("id", "queue", "tenant", "campaign", "recipient", "sender",
                          "source", "site", "mx", "ip", "code", "status", "text", "attempt",
                          "queued_s", "attempt_s", "time"),
    RecordType.TRANSIENT_FAILURE: ("id", "queue", "tenant", "campaign", "recipient", "sender",
                                   "source", "site", "mx", "ip", "code", "status", "text",
                                   "category", "hard", "attempt", "queued_s", "attempt_s",
                                   "time"),
    RecordType.BOUNCE: ("id", "queue", "tenant", "campaign", "recipient", "sender", "source",
                        "site", "mx", "ip", "code", "status", "text", "category", "hard",
                        "attempt", "queued_s", "attempt_s", "time"),
    RecordType.EXPIRATION: ("id", "queue", "tenant", "campaign", "recipient", "sender",
                            "code", "status", "text", "attempt", "queued_s", "time"),
    RecordType.SUPPRESSED: ("sender", "recipient", "scope", "reason", "client_ip", "listener",
                            "time"),
    # proof: what let the report act (mta/feedback/trust.py); ignored: why it did not;
    # kind "unparsed" (over the parser's budget) adds reason, attempts and saved_as;
    # with a [privacy] keyring, recipient_hash instead of a recipient no VERP path proves
    # (mta/feedback/intake.py: returned mail names sealed recipients in clear)
    RecordType.OOB: ("id", "bounce_id", "recipient", "recipient_hash", "status", "category",
                     "hard", "family", "reporting_mta", "kind", "verp", "verp_index", "proof",
                     "ignored", "suppressed", "reason", "attempts", "saved_as", "time"),
    RecordType.FEEDBACK: ("id", "bounce_id", "feedback_type", "recipient", "recipient_hash",
                          "source_ip", "source", "tenant", "verp", "verp_index", "proof",
                          "ignored", "suppressed", "time"),
    # the suppression hash the token named (the address itself is never known), its scope
    RecordType.UNSUBSCRIBE: ("recipient_hash", "scope", "client_ip", "time"),
    RecordType.BACKOFF: ("source", "site", "code", "status", "text", "until", "time"),
    RecordType.CORRUPT: ("segment", "offset", "length", "reason", "saved_as", "time"),
    RecordType.LOG_LOSS: ("lost", "time"),
    # applied: false when refused (problems say why; the running config stays); restart:
    # changed keys that keep their running value until a restart
    RecordType.RELOAD: ("origin", "applied", "problems", "restart", "time"),
    # rule: the automation rule's name, or "rate:bounce" / "rate:complaint" / "rate:deferral";
    # action: suspend, suspend_source, suspend_tenant, suspend_campaign, bounce or set;
    # value: the shaping values set (set), the tenant or campaign, or the messages bounced;
    # until: when it ends (or its next step); reason: the reply or the rate that triggered
    RecordType.ADAPTIVE_ACTION: ("source", "provider", "rule", "action", "value", "until",
                                 "reason", "time"),
    # one per step back (value: the values now, until: the next step) and at the end
    # (value: the values restored, until None); reason: "step N of M: ..." or "done: ..."
    RecordType.ADAPTIVE_RESTORE: ("source", "provider", "rule", "action", "value", "until",
                                  "reason", "time"),
    # one per warming source and provider class at each new warm-up day: action grown,
    # held or stepped_back (reason says why, from the day before's counts); cap None: no cap
    RecordType.WARMUP_DAY: ("source", "class", "day", "cap", "hour_cap", "previous_cap",
                            "action", "reason", "tried", "bounced", "deferred", "complaints",
                            "time"),
    # action: accept, tag, hold, drop, reject or tempfail; spam/score null when not scanned
    # (reason: oversize or the scanner's failure); symbols: the rules that hit
    RecordType.SCANNED: ("id", "sender", "recipients", "tenant", "scanner", "action", "spam",
                         "score", "threshold", "symbols", "reason", "client_ip", "listener",
                         "time"),
    # one per recipient; dsn: whether a DSN went to the sender (NOTIFY, null sender)
    RecordType.ADMIN_BOUNCE: ("id", "queue", "recipient", "sender", "tenant", "campaign",
                              "status", "reason", "selector", "dsn", "time"),
    # one per deleted scheduled entry (a message's recipients at one domain)
    RecordType.ADMIN_DELETE: ("id", "queue", "recipients", "sender", "tenant", "campaign",
                              "reason", "selector", "time"),
    # one per moved message (mta/control/xfer.py, drain.py): direction "out" (the sender,
    # after the receiver's 200; status stored or duplicate) or "in" (the receiver); peer:
    # the other node (URL or name); entries: domain, attempts, due per scheduled entry
    RecordType.TRANSFER: ("id", "direction", "peer", "key", "status", "recipients", "size",
                          "entries", "time"),
}
