"""Classifier unit tests: realistic remote replies, operator overrides, hot reload, bad rule files."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mta.feedback.bounce import Classifier, RulesError
from mta.feedback.bounce.classify import SHIPPED_RULES, load_rules


@pytest.fixture(scope="module")
def c() -> Classifier:
    return Classifier()


@pytest.mark.parametrize("code,status,text,category,hard", [
    (550, "5.1.1", "5.1.1 The email account that you tried to reach does not exist. Please try double-checking "
                   "the recipient's email address for typos or unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser "
                   "a1si123.456 - gsmtp", "invalid_recipient", True),
    (550, "5.7.1", "5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus. To request removal "
                   "from this list see https://www.spamhaus.org/query/ip/192.0.2.1 (AS3130). "
                   "[BN8NAM11FT066.eop-nam11.prod.protection.outlook.com]", "spam_block", False),
    (451, "4.7.650", "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. "
                     "For e-mail delivery information, see https://postmaster.live.com (S775)", "spam_block", False),
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints "
                   "- 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "rate_limited", False),
    (452, "4.2.2", "4.2.2 The email account that you tried to reach is over quota. Please direct the recipient to "
                   "https://support.google.com/mail/?p=OverQuotaTemp", "mailbox_full", False),
    (552, "5.2.2", "5.2.2 The email account that you tried to reach is over quota and inactive.", "mailbox_full", False),
    (552, "5.3.4", "5.3.4 Message size exceeds fixed limit", "message_too_large", False),
    (554, "5.7.1", "5.7.1 Message rejected as spam by Content Filtering.", "spam_content", False),
    (550, "5.7.26", "5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy.",
     "policy", False),
    (550, "5.7.1", "5.7.1 <x@example.org>: Relay access denied", "relaying_denied", False),
    (550, "5.1.2", "5.1.2 Host or domain name not found. Name service error for name=example.invalid", "invalid_domain", True),
    (556, "5.1.10", "5.1.10 Recipient address has null MX", "invalid_domain", True),
    (550, "5.2.1", "5.2.1 The email account that you tried to reach is disabled.", "inactive_mailbox", False),
    (550, None, "5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.1]", "spam_block", False),
    (554, "5.7.1", "5.7.1 Virus found: Eicar-Test-Signature", "virus", False),
    (450, "4.1.1", "4.1.1 <u@example.org>: Recipient address rejected: User unknown", "invalid_recipient", False),
    (None, "5.4.7", "retry timeout exceeded", "expired", False),
    (None, None, "Connection timed out", "network_error", False),
])
def test_realistic_replies(c, code, status, text, category, hard):
    v = c.classify(code, status, text)
    assert (v.category, v.hard) == (category, hard), v
    assert v.rule


def test_status_fallback_without_text(c):
    assert c.classify(550, "5.1.1", "").category == "invalid_recipient"
    assert c.classify(452, "4.2.2", "").category == "mailbox_full"
    assert c.classify(None, None, "").category == "unknown"


def test_fast(c):
    text = "5.7.1 Message rejected due to local policy, contact the postmaster of this domain"
    n = 2000
    t = time.perf_counter()
    for i in range(n):
        c._classify(550, "5.7.1", text.lower())          # uncached path
    per = (time.perf_counter() - t) / n
    assert per < 500e-6, per   # well under a millisecond even on a slow CI box


def test_operator_rules_first_and_reload(tmp_path: Path):
    ops = tmp_path / "operator.toml"
    ops.write_text('[[rule]]\nname = "acme-mailbox-gone"\ntext = "mailbox gone to acme"\n'
                   'category = "invalid_recipient"\nhard = true\n')
    c = Classifier([ops])
    v = c.classify(550, "5.7.1", "550 5.7.1 mailbox gone to acme")
    assert v == (v.__class__("invalid_recipient", True, "acme-mailbox-gone"))
    assert c.reload_if_changed() is False           # nothing changed: cheap, no reload
    ops.write_text('[[rule]]\nname = "acme-mailbox-gone"\ntext = "mailbox gone to acme"\n'
                   'category = "policy"\nhard = false\n')
    st = ops.stat()
    os.utime(ops, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # coarse-mtime file systems
    assert c.reload_if_changed() is True
    v = c.classify(550, "5.7.1", "550 5.7.1 mailbox gone to acme")
    assert (v.category, v.hard, v.rule) == ("policy", False, "acme-mailbox-gone")


def test_bad_rules_file_keeps_old_rules(tmp_path: Path):
    ops = tmp_path / "operator.toml"
    ops.write_text('[[rule]]\nname = "ok"\ntext = "zzz-special"\ncategory = "virus"\n')
    c = Classifier([ops])
    assert c.classify(550, None, "zzz-special").category == "virus"
    ops.write_text('[[rule]]\nname = "ok"\ntext = "zzz-special"\ncategory = "virus"\n\n'
                   '[[rule]]\nname = "broken-one"\ntext = "([unclosed"\ncategory = "policy"\n')
    st = ops.stat()
    os.utime(ops, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(RulesError) as ei:
        c.reload_if_changed()
    msg = str(ei.value)
    assert str(ops) in msg and "rule #2" in msg and "broken-one" in msg
    assert 'text: "([unclosed" is not a regular expression' in msg
    assert c.classify(550, None, "zzz-special").category == "virus"   # old rules still active


@pytest.mark.parametrize("body,problem", [
    ('[[rule]]\nname = "x"\ncategory = "nonsense"\n',
     'rule #1 (\'x\'): category: "nonsense" is not one of "auto_reply", "bad_sender", '),
    ('[[rule]]\nname = "x"\ncategory = "policy"\ncode = "6xx"\n',
     "rule #1 ('x'): code: expected a reply code: 550, \"5xx\", \"55x\" or [lo, hi], "
     'got string "6xx"'),
    ('[[rule]]\nname = "x"\ncategory = "policy"\ncode = 600\n',
     "rule #1 ('x'): code: reply code 600 is outside 200..599"),
    ('[[rule]]\nname = "x"\ncategory = "policy"\nstatus = "5.1"\n',
     "rule #1 ('x'): status: \"5.1\" is not a status pattern"),
    ('[[rule]]\ncategory = "policy"\n', "rule #1: name: required"),
    ('[[rule]]\nname = "x"\ncategory = "policy"\ncolour = "red"\n',
     "rule #1 ('x'): colour: unknown key (allowed: name, code, status, text, not_text, "
     "category, hard)"),
    ('[[rule]]\nname = "x"\ncategory = "policy"\ntext = ""\n',
     "rule #1 ('x'): text: an empty regular expression would match everything"),
    ('[[rule]]\nname = "x"\ncategory = "policy"\ntext = []\n',
     "rule #1 ('x'): text: expected a regular expression or a non-empty array of them"),
    ("rule = 3\n", "'rule' must be an array of tables"),
    ("rule = [3]\n", "rule #1: expected a table, got integer 3"),
    ('[[rule]\n', "TOML syntax error at line 1"),
])
def test_bad_rules_file_messages(tmp_path: Path, body: str, problem: str):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(RulesError) as ei:
        Classifier([f])
    assert str(f) in str(ei.value) and problem in str(ei.value)


def test_shipped_rules_compile():
    rules = load_rules(SHIPPED_RULES)
    assert len(rules) > 20
    assert len({r.name for r in rules}) == len(rules)   # names are unique: Verdict.rule identifies one


@pytest.mark.parametrize("code,status,text,category,hard", [
    # Postfix access maps: the reason after "Recipient address rejected:" decides.
    (554, "5.3.0", "554 5.3.0 <a@example.org>: Recipient address rejected: Internal system error", "system_error", False),
    (552, "5.2.2", "552 5.2.2 <a@example.org>: Recipient address rejected: Mailbox full", "mailbox_full", False),
    (550, "5.0.0", "550 5.0.0 <a@example.org>: Recipient address rejected: On hold", "unknown", False),
    (550, "5.1.1", "550 5.1.1 <a@example.org>: Recipient address rejected: User unknown in local recipient table",
     "invalid_recipient", True),
    # Microsoft directory-based edge blocking: "Access denied" there means no such recipient.
    (550, "5.4.1", "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "invalid_recipient", True),
    # Our HELO name refused, a local delivery program failing: never the recipient's fault.
    (501, "5.0.0", "Connected to 192.0.2.1 but my name was rejected. Remote host said: 501 5.0.0 Invalid domain name",
     "spam_block", False),
    (None, None, 'procmail: Couldn\'t create "/var/spool/mail/neko" id: No such user', "system_error", False),
    (None, None, "pipe to |/usr/local/bin/filter generated by a@example.org: No such file or directory",
     "system_error", False),
    # A quoted DSN field naming the sender must not hide the recipient wording.
    (550, "5.1.1", "550 5.1.1 The email account that you tried to reach does not exist. X-Postfix-Sender: rfc822; s@example.com",
     "invalid_recipient", True),
    (None, None, "an MX or SRV record indicated no SMTP service", "invalid_domain", True),
    # A relay's label around the quoted remote reply: the remote reply decides.
    (550, "5.1.0", "5.1.0 - Unknown address error 550-'5.7.1 <a@example.org>... Access denied' (delivery attempts: 0)",
     "policy", False),
    (550, "5.1.0", "5.1.0 - Unknown address error 550-'This user doesn't exist here' (delivery attempts: 0)",
     "invalid_recipient", True),
])
def test_reason_wording(c, code, status, text, category, hard):
    v = c.classify(code, status, text)
    assert (v.category, v.hard) == (category, hard), v.rule
