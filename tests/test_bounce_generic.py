"""Generic bounce layouts, written here (not copied from a corpus): the parser must find every
failed recipient -- and no other address -- in shapes no corpus sample showed it, and the
classifier must grade hard/soft only where it is a fact about the address.

Each sample is a whole returned message: the bounce's To: is our envelope sender
(bounces@sender.example), the notice quotes the original's headers (From: the author, To/Cc:
other people) which must never be taken as failed recipients.
"""
from __future__ import annotations

import base64

import pytest

from mta.config.schema import BOUNCE_POLICY_CATEGORIES
from mta.feedback.bounce import Classifier, parse_message
from mta.feedback.bounce.classify import ADDRESS_CATEGORIES, POLICY_CATEGORIES, SHIPPED_RULES, load_rules

# addresses that appear in every sample and are never failed recipients
SENDER = "bounces@sender.example"
AUTHOR = "alice@sender.example"
OTHERS = ("carol@other.example", "dave@other.example")

ORIGINAL = (f"Return-Path: <{SENDER}>\nReceived: from out.sender.example (out.sender.example [192.0.2.10])\n"
            f"\tby mx.rcpt.example with ESMTP id 4AbCd; Tue, 1 Dec 2026 10:00:00 +0000\n"
            f"Message-ID: <m1@sender.example>\nFrom: Alice <{AUTHOR}>\nTo: {OTHERS[0]}\nCc: {OTHERS[1]}\n"
            f"Reply-To: {AUTHOR}\nSubject: hello\nDate: Tue, 1 Dec 2026 10:00:00 +0000\n")


def text_bounce(body: str, *, frm: str = "Mail Delivery System <MAILER-DAEMON@mx.rcpt.example>",
                subject: str = "Undelivered Mail Returned to Sender", original: str = ORIGINAL,
                sep: str = "------ This is a copy of the message, including all the headers. ------\n") -> bytes:
    return (f"From: {frm}\nTo: {SENDER}\nSubject: {subject}\nDate: Tue, 1 Dec 2026 10:05:00 +0000\n"
            f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + body + "\n" + sep + original + "\nhi\n").encode("utf-8")


def report(status_part: str, *, ctype: str = "message/delivery-status", human: str = "Delivery failed.\n",
           outer_extra: str = "") -> bytes:
    return (f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: Delivery Status Notification (Failure)\n"
            f"MIME-Version: 1.0\n{outer_extra}Content-Type: multipart/report; report-type=delivery-status; boundary=\"RB\"\n\n"
            f"--RB\nContent-Type: text/plain\n\n{human}\n--RB\nContent-Type: {ctype}\n\n{status_part}\n"
            f"--RB\nContent-Type: text/rfc822-headers\n\n{ORIGINAL}\n--RB--\n").encode("utf-8")


def rcpts(data: bytes, classifier: Classifier | None = None) -> dict[str, tuple]:
    rep = parse_message(data, classifier)
    assert rep.kind in ("bounce", "delay"), rep
    return {r.recipient.lower(): (r.category, r.hard) for r in rep.recipients}


def assert_exactly(data: bytes, want: dict[str, tuple[str, bool] | None]) -> None:
    got = rcpts(data)
    assert set(got) == {a.lower() for a in want}, got
    for a, v in want.items():
        if v is not None:
            assert got[a.lower()] == v, (a, got[a.lower()])
    for never in (SENDER, AUTHOR, *OTHERS, "postmaster@mx.rcpt.example", "mailer-daemon@mx.rcpt.example"):
        assert never not in got


UNKNOWN = ("invalid_recipient", True)
FULL = ("mailbox_full", False)


# -- RFC 3464 with odd formatting ---------------------------------------------------------

def test_dsn_no_blank_lines_lowercase_fields_folded_diagnostic():
    part = ("reporting-mta: dns; mx.rcpt.example\n"
            "final-recipient: rfc822; one@rcpt.example\naction: failed\nstatus: 5.1.1\n"
            "diagnostic-code: smtp; 550 5.1.1 <one@rcpt.example>:\n  Recipient address rejected:\n\tUser unknown\n"
            "final-recipient: rfc822; two@rcpt.example\naction: failed\nstatus: 5.2.2\n"
            "diagnostic-code: smtp; 552 5.2.2 Mailbox full\n")
    assert_exactly(report(part), {"one@rcpt.example": UNKNOWN, "two@rcpt.example": FULL})


def test_dsn_as_text_plain_and_octet_stream():
    part = ("Reporting-MTA: dns; mx.rcpt.example\n\nFinal-Recipient: rfc822;<three@rcpt.example>\n"
            "Action: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 no such user\n")
    for ctype in ("text/plain", "application/octet-stream", "text/delivery-status"):
        assert_exactly(report(part, ctype=ctype, human="Your message could not be delivered.\n"),
                       {"three@rcpt.example": UNKNOWN})


def test_dsn_report_nested_in_message_rfc822():
    inner = report("Reporting-MTA: dns; mx.rcpt.example\n\nFinal-Recipient: rfc822; four@rcpt.example\n"
                   "Action: failed\nStatus: 5.1.1\n").decode()
    outer = (f"From: postmaster@relay.sender.example\nTo: {SENDER}\nSubject: Fwd: Delivery Status Notification\n"
             f"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"OB\"\n\n--OB\nContent-Type: text/plain\n\n"
             f"Forwarded bounce attached.\n--OB\nContent-Type: message/rfc822\n\n{inner}\n--OB--\n").encode()
    assert_exactly(outer, {"four@rcpt.example": UNKNOWN})


def test_dsn_final_recipient_without_type_and_utf8_address():
    part = ("Reporting-MTA: dns; mx.rcpt.example\n\nOriginal-Recipient: utf-8; j\u00fcrgen@m\u00fcller.example\n"
            "Final-Recipient: utf-8; j\u00fcrgen@m\u00fcller.example\nAction: failed\nStatus: 5.1.1\n\n"
            "Final-Recipient: <five@rcpt.example>\nAction: failed\nStatus: 5.1.1\n")
    assert_exactly(report(part, ctype="message/global-delivery-status"),
                   {"j\u00fcrgen@m\u00fcller.example": UNKNOWN, "five@rcpt.example": UNKNOWN})


# -- text bounces of the common MTAs --------------------------------------------------------

def test_postfix_multi_recipient():
    body = ("This is the mail system at host mx.sender.example.\n\nI'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients. It's attached below.\n\nFor further assistance, please send mail to postmaster.\n\n"
            "                   The mail system\n\n"
            "<a1@rcpt.example>: host mx.rcpt.example[192.0.2.1] said: 550 5.1.1 <a1@rcpt.example>:\n"
            "    Recipient address rejected: User unknown in local recipient table (in reply to RCPT TO command)\n\n"
            "<a2@rcpt.example>: host mx.rcpt.example[192.0.2.1] said: 552 5.2.2 <a2@rcpt.example>:\n"
            "    Mailbox full (in reply to RCPT TO command)\n\n"
            "<\"john smith\"@rcpt.example>: host mx.rcpt.example[192.0.2.1] said: 550 5.1.1 no such user\n")
    assert_exactly(text_bounce(body, sep="--- Original message follows ---\n"),
                   {"a1@rcpt.example": UNKNOWN, "a2@rcpt.example": FULL, '"john smith"@rcpt.example': UNKNOWN})


def test_exim_multi_recipient_indented_reason():
    body = ("This message was created automatically by mail delivery software.\n\n"
            "A message that you sent could not be delivered to one or more of its\nrecipients. This is a permanent error. "
            "The following address(es) failed:\n\n"
            "  b1@rcpt.example\n    host mx.rcpt.example [192.0.2.1]\n"
            "    SMTP error from remote mail server after RCPT TO:<b1@rcpt.example>:\n    550 5.1.1 User unknown\n"
            "  b2@rcpt.example\n    host mx.rcpt.example [192.0.2.1]\n"
            "    SMTP error from remote mail server after RCPT TO:<b2@rcpt.example>:\n    452 4.2.2 Over quota\n")
    assert_exactly(text_bounce(body, frm="Mail Delivery System <Mailer-Daemon@mx.sender.example>",
                               subject="Mail delivery failed: returning message to sender"),
                   {"b1@rcpt.example": UNKNOWN, "b2@rcpt.example": FULL})


def test_sendmail_dots_and_transcript():
    body = ("The original message was received at Tue, 1 Dec 2026 10:00:00 +0000\nfrom out.sender.example [192.0.2.10]\n\n"
            "   ----- The following addresses had permanent fatal errors -----\n<c1@rcpt.example>\n"
            "    (reason: 550 5.1.1 <c1@rcpt.example>... User unknown)\n<c2@rcpt.example>\n"
            "    (reason: 550 5.1.1 <c2@rcpt.example>... User unknown)\n\n"
            "   ----- Transcript of session follows -----\n... while talking to mx.rcpt.example.:\n"
            f">>> MAIL From:<{SENDER}> SIZE=1000\n<<< 250 2.1.0 <{SENDER}>... Sender ok\n"
            ">>> RCPT To:<c1@rcpt.example>\n<<< 550 5.1.1 <c1@rcpt.example>... User unknown\n"
            ">>> RCPT To:<c2@rcpt.example>\n<<< 550 5.1.1 <c2@rcpt.example>... User unknown\n"
            "550 5.1.1 <c1@rcpt.example>... User unknown\n")
    assert_exactly(text_bounce(body, subject="Returned mail: see transcript for details",
                               sep="   ----- Original message follows -----\n"),
                   {"c1@rcpt.example": UNKNOWN, "c2@rcpt.example": UNKNOWN})


def test_qmail_colon_blocks():
    body = ("Hi. This is the qmail-send program at mx.sender.example.\nI'm afraid I wasn't able to deliver your message "
            "to the following addresses.\nThis is a permanent error; I've given up. Sorry it didn't work out.\n\n"
            "<d1@rcpt.example>:\n192.0.2.1 does not like recipient.\nRemote host said: 550 5.1.1 <d1@rcpt.example>... User unknown\n"
            "Giving up on 192.0.2.1.\n\n<d2@rcpt.example>:\n192.0.2.1 does not like recipient.\n"
            "Remote host said: 552 5.2.2 mailbox is full\nGiving up on 192.0.2.1.\n\n")
    assert_exactly(text_bounce(body, frm="MAILER-DAEMON@mx.sender.example", subject="failure notice",
                               sep="--- Below this line is a copy of the message.\n\n"),
                   {"d1@rcpt.example": UNKNOWN, "d2@rcpt.example": FULL})


def test_exchange_listing():
    body = ("Delivery has failed to these recipients or groups:\n\n"
            "e1@rcpt.example (e1@rcpt.example)<mailto:e1@rcpt.example>\n"
            "The email address you entered couldn't be found. Please check the recipient's email address and try to "
            "resend the message.\n\ne2@rcpt.example<mailto:e2@rcpt.example>\n"
            "The recipient's mailbox is full and can't accept messages now.\n\n\n\n\n\nDiagnostic information for administrators:\n\n"
            "Generating server: mx.rcpt.example\n\ne1@rcpt.example\nRemote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\n\n"
            "e2@rcpt.example\nRemote Server returned '554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException'\n\n"
            "Original message headers:\n\n")
    assert_exactly(text_bounce(body, frm="postmaster@rcpt.example", subject="Undeliverable: hello", sep=""),
                   {"e1@rcpt.example": UNKNOWN, "e2@rcpt.example": FULL})


def test_domino_lotus_layout():
    body = ("Your message\n\n  Subject: hello\n\nwas not delivered to:\n\n  f1@rcpt.example\n\nbecause:\n\n"
            "  User f1@rcpt.example (f1@rcpt.example) not listed in Domino Directory\n\n")
    assert_exactly(text_bounce(body, frm="Postmaster@rcpt.example", subject="DELIVERY FAILURE: User f1 not listed",
                               sep="", original=""),
                   {"f1@rcpt.example": UNKNOWN})


def test_courier_layout():
    body = ("This is a delivery status notification from mx.sender.example,\nrunning the Courier mail server, version 1.1.\n\n"
            "The original message was received on Tue, 1 Dec 2026 10:00:00 +0000\nfrom out.sender.example [192.0.2.10]\n\n"
            "----------------------------------------------------------------------\n\n"
            "                           UNDELIVERABLE MAIL\n\n"
            "Your message to the following recipients cannot be delivered:\n\n"
            "<g1@rcpt.example>:\n    mx.rcpt.example [192.0.2.1]:\n>>> RCPT TO:<g1@rcpt.example>\n"
            "<<< 550 5.1.1 <g1@rcpt.example>: Recipient address rejected: User unknown\n\n"
            "<g2@rcpt.example>:\n    mx.rcpt.example [192.0.2.1]:\n>>> RCPT TO:<g2@rcpt.example>\n"
            "<<< 550 5.1.1 <g2@rcpt.example>: Recipient address rejected: User unknown\n")
    assert_exactly(text_bounce(body, frm="Courier mail server at mx.sender.example <@>",
                               subject="NOTICE: mail delivery status."),
                   {"g1@rcpt.example": UNKNOWN, "g2@rcpt.example": UNKNOWN})


def test_mdaemon_layout():
    body = ("The attached message had PERMANENT fatal delivery errors!\n\nAfter one or more unsuccessful delivery attempts "
            "the attached message has been removed from the mail queue on this server.\n\n"
            "--- Session Transcript ---\n Tue 2026-12-01 10:00:00: Parsing message <q.msg>\n"
            " Tue 2026-12-01 10:00:00: *  From: " + SENDER + "\n"
            " Tue 2026-12-01 10:00:00: *  To: h1@rcpt.example\n"
            " Tue 2026-12-01 10:00:01: --> RCPT To:<h1@rcpt.example>\n"
            " Tue 2026-12-01 10:00:01: <-- 550 5.1.1 <h1@rcpt.example>: Recipient address rejected: User unknown\n"
            "--- End Transcript ---\n")
    assert_exactly(text_bounce(body, frm="MDaemon@mx.sender.example",
                               subject="Permanent Delivery Failure", sep="--- Original message ---\n", original=""),
                   {"h1@rcpt.example": UNKNOWN})


# -- address forms ----------------------------------------------------------------------------

def test_address_then_indented_reason_blocks():
    body = ("Delivery to the following recipients failed permanently:\n\n"
            "    i1@rcpt.example\n        550 5.1.1 The email account that you tried to reach does not exist.\n\n"
            "    i2@rcpt.example\n        552 5.2.2 The email account that you tried to reach is over quota.\n\n")
    assert_exactly(text_bounce(body, frm="Mail Delivery Subsystem <mailer-daemon@mx.sender.example>",
                               subject="Delivery Status Notification (Failure)", sep="----- Original message -----\n"),
                   {"i1@rcpt.example": UNKNOWN, "i2@rcpt.example": FULL})


def test_quoted_local_part_and_angle_forms():
    body = ("Your message could not be delivered to the following recipients:\n\n"
            "\"j doe\"@rcpt.example: 550 5.1.1 user unknown\n"
            "\"k.o'neil\"@rcpt.example: 550 5.1.1 user unknown\n")
    assert_exactly(text_bounce(body), {'"j doe"@rcpt.example': UNKNOWN, "\"k.o'neil\"@rcpt.example": UNKNOWN})


def test_rcpt_to_only():
    body = ("An error occurred while delivering your message.\n\n"
            f"MAIL FROM:<{SENDER}>\n250 ok\nRCPT TO:<l1@rcpt.example>\n550 5.1.1 mailbox unavailable\n")
    assert_exactly(text_bounce(body, sep="--- original message ---\n"), {"l1@rcpt.example": UNKNOWN})


def test_smtputf8_address_in_text():
    body = ("Delivery to the following recipient failed permanently:\n\n"
            "     \u7528\u6237@\u4f8b\u5b50.example\n\nTechnical details of permanent failure:\n"
            "550 5.1.1 user unknown\n\n")
    assert_exactly(text_bounce(body, sep="----- Original message -----\n"),
                   {"\u7528\u6237@\u4f8b\u5b50.example": UNKNOWN})


def test_inline_header_block_without_separator_is_not_read():
    # no "copy of the message" line: the quoted headers start right after the reason
    body = ("Could not deliver to m1@rcpt.example\n550 5.1.1 User unknown\n\n")
    assert_exactly(text_bounce(body, sep=""), {"m1@rcpt.example": UNKNOWN})


def test_many_recipients_none_invented():
    addrs = [f"n{i}@rcpt.example" for i in range(40)]
    body = ("The following addresses had permanent fatal errors:\n\n"
            + "".join(f"<{a}>: 550 5.1.1 User unknown\n" for a in addrs)
            + "\nFor help contact postmaster@mx.rcpt.example or write to " + AUTHOR + ".\n")
    assert_exactly(text_bounce(body), {a: UNKNOWN for a in addrs})


# -- hard / soft ------------------------------------------------------------------------------

@pytest.mark.parametrize("code,status,text,category", [
    (550, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "spam_block"),
    (554, "5.7.1", "Message rejected as spam by the content filter", "spam_content"),
    (554, "5.7.1", "Virus detected in attachment", "virus"),
    (550, "5.7.26", "Unauthenticated email is not accepted due to the sender domain's DMARC policy", "policy"),
    (550, "5.7.1", "Message refused by local policy", "policy"),
    (550, "5.2.1", "The mailbox has been suspended", "inactive_mailbox"),
])
def test_policy_categories_follow_config(code, status, text, category):
    assert category in POLICY_CATEGORIES
    default = Classifier().classify(code, status, text)
    assert (default.category, default.hard) == (category, False)
    aliases = [n for n, c in BOUNCE_POLICY_CATEGORIES.items() if c == category]
    for name in aliases:
        v = Classifier(policy_hard=[name]).classify(code, status, text)
        assert (v.category, v.hard) == (category, True), name
        # never for a temporary failure
        t = Classifier(policy_hard=[name]).classify(450, "4" + status[1:], text)
        assert t.hard is False


@pytest.mark.parametrize("code,status,text,category,hard", [
    (550, "5.1.1", "No such user here", "invalid_recipient", True),
    (550, None, "Host or domain name not found", "invalid_domain", True),
    (552, "5.2.2", "Mailbox full", "mailbox_full", False),
    (None, "5.4.7", "delivery time expired", "expired", False),
    (421, "4.7.0", "Too many connections, slow down", "rate_limited", False),
    (552, "5.3.4", "Message size exceeds fixed maximum message size", "message_too_large", False),
    (451, "4.3.0", "Internal server error", "system_error", False),
])
def test_unambiguous_grades_ignore_policy_config(code, status, text, category, hard):
    everything = Classifier(policy_hard=list(BOUNCE_POLICY_CATEGORIES))
    for c in (Classifier(), everything):
        v = c.classify(code, status, text)
        assert (v.category, v.hard) == (category, hard), v


def test_shipped_rules_grade_only_address_failures_hard():
    for r in load_rules(SHIPPED_RULES):
        if r.hard:
            assert r.category in ADDRESS_CATEGORIES, r.name
        if r.category in POLICY_CATEGORIES:
            assert not r.hard, r.name


def test_policy_hard_in_a_text_bounce():
    body = ("The following address failed:\n\n<p1@rcpt.example>: 550 5.7.1 Client host blocked using zen.spamhaus.org\n")
    assert rcpts(text_bounce(body))["p1@rcpt.example"] == ("spam_block", False)
    assert rcpts(text_bounce(body), Classifier(policy_hard=["blocked"]))["p1@rcpt.example"] == ("spam_block", True)


def test_unknown_policy_name_is_refused():
    with pytest.raises(ValueError):
        Classifier(policy_hard=["invalid_recipient"])


# -- more layouts: vendor-style notices (wording of their kind, written here) ------------------

MORE: dict[str, tuple[bytes, set[str]]] = {}
MORE['biglobe'] = (text_bounce("This is a MIME-encapsulated message.\n\n  ----- The following addresses had delivery problems -----\nq1@rcpt.example\n\n  ----- Non-delivered information -----\nThe number of messages in recipient's mailbox exceeded the local limit.\n", frm="postmaster@rcpt.example", subject="Returned mail: Delivery failed", sep="  ----- Original message -----\n"), {"q1@rcpt.example"})
MORE['imail'] = (text_bounce("Body of message generated response:\n\nUnknown user: q2@rcpt.example\n\n", frm="postmaster@rcpt.example", subject="Undeliverable Mail", sep="Original message follows.\n"), {"q2@rcpt.example"})
MORE['mailmarshal'] = (text_bounce(f"Your message:\n\n   From:    Alice <{AUTHOR}>\n   Subject: hello\n\nCould not be delivered because of\n\n550 5.1.1 User unknown\n\nThe following recipients were affected: \n    q3@rcpt.example\n    q4@rcpt.example\n\nAdditional Information\n======================\n\nOriginal Sender:    <{SENDER}>\nSender-MTA:         <192.0.2.10>\nRemote-MTA:         <192.0.2.1>\nReporting-MTA:      <mx.rcpt.example>\nRecipient:          <q3@rcpt.example>\n", frm="postmaster@rcpt.example", subject="Undeliverable Mail: \"hello\"", sep=""), {"q3@rcpt.example","q4@rcpt.example"})
MORE['google'] = (text_bounce("This is an automatically generated Delivery Status Notification\n\nDelivery to the following recipient failed permanently:\n\n     q5@rcpt.example\n\nTechnical details of permanent failure:\nGoogle tried to deliver your message, but it was rejected by the server for the recipient domain rcpt.example by mx.rcpt.example. [192.0.2.1].\n\nThe error that the other server returned was:\n550 5.1.1 <q5@rcpt.example>... User Unknown\n", frm="Mail Delivery Subsystem <mailer-daemon@googlemail.com>", subject="Delivery Status Notification (Failure)", sep="----- Original message -----\n"), {"q5@rcpt.example"})
MORE['yahoo'] = (text_bounce("Sorry, we were unable to deliver your message to the following address.\n\n<q6@rcpt.example>:\nRemote host said: 550 5.1.1 <q6@rcpt.example>... User Unknown [RCPT_TO]\n", frm="MAILER-DAEMON@yahoo.example", subject="Failure Notice", sep="--- Below this line is a copy of the message.\n"), {"q6@rcpt.example"})
MORE['sentence'] = (text_bounce("Your message to <q7@rcpt.example> could not be delivered.\nThe server said: 550 5.1.1 mailbox unavailable\n", sep="--- original message ---\n"), {"q7@rcpt.example"})
MORE['sentence2'] = (text_bounce("We could not deliver your message to q8@rcpt.example because the address does not exist.\n", subject="Delivery failure", sep="--- original message ---\n"), {"q8@rcpt.example"})
MORE['oneline-list'] = (text_bounce("The following recipients failed: q9@rcpt.example, q10@rcpt.example, q11@rcpt.example\nReason: 550 5.1.1 user unknown\n", sep="--- original message ---\n"), {"q9@rcpt.example","q10@rcpt.example","q11@rcpt.example"})
MORE['labelled'] = (text_bounce("Delivery failed.\n\nFailed recipient: q12@rcpt.example\nReason: Remote host said: 550 5.1.1 unknown user\n\nFailed recipient: q13@rcpt.example\nReason: Remote host said: 552 5.2.2 mailbox full\n", sep="--- original message ---\n"), {"q12@rcpt.example","q13@rcpt.example"})
MORE['exch2003'] = (text_bounce("Your message\n\n  To:      q14@rcpt.example\n  Subject: hello\n  Sent:    Tue, 1 Dec 2026 10:00:00 +0000\n\ndid not reach the following recipient(s):\n\nq14@rcpt.example on Tue, 1 Dec 2026 10:00:05 +0000\n    The e-mail account does not exist at the organization this message was sent to.\n    <mx.rcpt.example #5.1.1>\n", frm="System Administrator <postmaster@rcpt.example>", subject="Undeliverable: hello", sep="", original=""), {"q14@rcpt.example"})
MORE['html-only'] = ((f"From: postmaster@rcpt.example\nTo: {SENDER}\nSubject: Undeliverable: hello\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n<html><body><p><b>Your message to <a href=\"mailto:q15@rcpt.example\">q15@rcpt.example</a> couldn't be delivered.</b></p><p>q15 wasn't found at rcpt.example.</p><p>Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'</p></body></html>\n").encode(), {"q15@rcpt.example"})
MORE['ja'] = (text_bounce("以下のアドレスへの送信に失敗しました。\n\nq16@rcpt.example\n\n550 5.1.1 ユーザが存在しません (user unknown)\n", frm="MAILER-DAEMON@mx.rcpt.example", subject="配信エラー", sep="-------original message\n"), {"q16@rcpt.example"})
MORE['de'] = (text_bounce("Ihre Nachricht konnte nicht zugestellt werden an:\n\n  q17@rcpt.example\n  Grund: 550 5.1.1 Benutzer unbekannt\n", frm="MAILER-DAEMON@mx.rcpt.example", subject="Unzustellbar: hello", sep="--- Originalnachricht ---\n"), {"q17@rcpt.example"})
MORE['xfailed-only'] = ((f"From: Mail Delivery System <MAILER-DAEMON@mx.rcpt.example>\nTo: {SENDER}\nSubject: Mail delivery failed\nX-Failed-Recipients: q18@rcpt.example, q19@rcpt.example\n\nA message that you sent could not be delivered to one or more of its recipients.\n").encode(), {"q18@rcpt.example","q19@rcpt.example"})
MORE['angle-sentence-multi'] = (text_bounce("Delivery to the following recipients failed.\n\n       <q20@rcpt.example>\n       <q21@rcpt.example>\n\nReason: 550 5.1.1 unknown user\n", sep="--- original message ---\n"), {"q20@rcpt.example","q21@rcpt.example"})
MORE['rcpt-transcript-multi'] = (text_bounce(f"Transcript:\n>>> MAIL FROM:<{SENDER}>\n<<< 250 ok\n>>> RCPT TO:<q22@rcpt.example>\n<<< 550 5.1.1 no such user\n>>> RCPT TO:<q23@rcpt.example>\n<<< 550 5.1.1 no such user\n", subject="Delivery failure", sep="--- original message ---\n"), {"q22@rcpt.example","q23@rcpt.example"})
MORE['reason-first'] = (text_bounce("This message could not be delivered.\n\nReason: 550 5.1.1 User unknown\nRecipient: <q24@rcpt.example>\nSender: <" + SENDER + ">\n", sep="--- original message ---\n"), {"q24@rcpt.example"})


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_layouts_find_exactly_the_recipients(name):
    data, want = MORE[name]
    rep = parse_message(data)
    assert rep.kind == "bounce"
    assert {r.recipient.lower() for r in rep.recipients} == want


# -- RFC 3464 edge forms ---------------------------------------------------------------------

DSN_EDGE: dict[str, tuple[bytes, set[str]]] = {}
DSN_EDGE['fr-display'] = (report("Reporting-MTA: dns; mx\n\nFinal-Recipient: RFC822; Kiji Tora <r1@rcpt.example>\nAction: failed\nStatus: 5.1.1\n"), {"r1@rcpt.example"})
DSN_EDGE['fr-comment'] = (report("Reporting-MTA: dns; mx\n\nFinal-Recipient: rfc822;r2@rcpt.example (Kiji)\nAction: failed\nStatus: 5.1.1\n"), {"r2@rcpt.example"})
DSN_EDGE['fr-space-colon'] = (report("Reporting-MTA : dns; mx\n\nFinal-Recipient : rfc822; r3@rcpt.example\nAction : failed\nStatus : 5.1.1\n"), {"r3@rcpt.example"})
b64 = base64.encodebytes(b"Reporting-MTA: dns; mx\n\nFinal-Recipient: rfc822; r4@rcpt.example\nAction: failed\nStatus: 5.1.1\n").decode()
DSN_EDGE['b64-dsn'] = ((f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: Delivery Status Notification (Failure)\nMIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"RB\"\n\n--RB\nContent-Type: text/plain\n\nfailed\n--RB\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n{b64}\n--RB--\n").encode(), {"r4@rcpt.example"})
DSN_EDGE['dsn-no-rcpt-fields'] = (report("Reporting-MTA: dns; mx\n\nAction: failed\nStatus: 5.1.1\n", human="<r5@rcpt.example>: 550 5.1.1 user unknown\n"), {"r5@rcpt.example"})
DSN_EDGE['fr-no-at-local'] = (report("Reporting-MTA: dns; mx\n\nFinal-Recipient: LOCAL; r6\nAction: failed\nStatus: 5.1.1\n", human="Delivery to r6@rcpt.example failed: user unknown\n"), {"r6@rcpt.example"})
DSN_EDGE['dsn-upper-orig-differs'] = (report("Reporting-MTA: dns; mx\n\nOriginal-Recipient: rfc822; R7@Rcpt.Example\nFinal-Recipient: rfc822; r7@rcpt.example\nAction: failed\nStatus: 5.1.1\n"), {"r7@rcpt.example"})
DSN_EDGE['dsn-multi-delayed+failed'] = (report("Reporting-MTA: dns; mx\n\nFinal-Recipient: rfc822; r8@rcpt.example\nAction: failed\nStatus: 5.1.1\n\nFinal-Recipient: rfc822; r9@rcpt.example\nAction: delayed\nStatus: 4.4.1\n"), {"r8@rcpt.example"})
qp = "Content-Transfer-Encoding: quoted-printable\n"
DSN_EDGE['qp-text'] = ((f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n{qp}\n<r10@rcpt.exa=\nmple>: host mx[192.0.2.1] said: 550 5.1.1 unknown us=\ner\n").encode(), {"r10@rcpt.example"})
DSN_EDGE['notice-as-attachment'] = ((f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: failure notice\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"MB\"\n\n--MB\nContent-Type: text/plain\nContent-Disposition: attachment; filename=details.txt\n\n<r11@rcpt.example>: 550 5.1.1 no such user\n--MB\nContent-Type: message/rfc822\n\n{ORIGINAL}\nhi\n--MB--\n").encode(), {"r11@rcpt.example"})
DSN_EDGE['dsn-in-message-rfc822'] = (report("Reporting-MTA: dns; mx\n\nFinal-Recipient: rfc822; r13@rcpt.example\nAction: failed\nStatus: 5.1.1\n", ctype="message/rfc822"), {"r13@rcpt.example"})


@pytest.mark.parametrize("name", sorted(DSN_EDGE))
def test_dsn_edge_forms(name):
    data, want = DSN_EDGE[name]
    rep = parse_message(data)
    assert rep.kind == "bounce"
    assert {r.recipient.lower() for r in rep.recipients} == want


# -- the unambiguous grades over many wordings (typical replies, written from memory of real MTAs) --

HARD_REPLIES = [  # (code, status, text) expected hard True (user/domain unknown)
 (550, "5.1.1", "5.1.1 <a@x>: Recipient address rejected: User unknown in local recipient table"),
 (550, None, "Requested action not taken: mailbox unavailable"),
 (550, "5.1.1", "Mailbox does not exist"),
 (550, None, "No Such User Here"),
 (550, None, "sorry, no mailbox here by that name (#5.1.1)"),
 (550, None, "Invalid recipient"),
 (550, "5.1.1", "The email account that you tried to reach does not exist."),
 (554, "5.1.1", "Unknown recipient"),
 (550, "5.1.1", "RESOLVER.ADR.RecipNotFound; not found"),
 (550, None, "Address rejected"),
 (511, None, "sorry, no mailbox here by that name"),
 (550, None, "User not found"),
 (550, None, "<a@x>: Recipient address rejected: undeliverable address: host x said: 550 unknown user"),
 (550, "5.1.1", "user does not exist"),
 (550, None, "recipient not found"),
 (550, None, "Unrouteable address"),
 (550, None, "Host or domain name not found. Name service error for name=x type=MX: Host not found"),
 (550, "5.1.2", "Bad destination mailbox address"),
 (550, None, "5.1.1 <a@x>... User unknown"),
 (550, None, "Destination mailbox address invalid"),
 (550, None, "No such recipient"),
 (550, None, "The recipient does not exist"),
 (550, None, "Mailbox not found"),
 (550, None, "Recipient unknown"),
 (550, None, "unknown address or alias"),
 (550, None, "#5.1.1 bad address a@x"),
 (550, None, "invalid mailbox"),
 (550, None, "user unknown; rejecting"),
 (550, None, "no valid recipients"),
 (550, None, "Account does not exist"),
 (550, None, "Recipient address does not exist"),
 (550, None, "mailbox name not allowed"),
 (550, "5.1.1", "Recipient rejected: Not a valid user"),
 (550, None, "The mail server could not deliver mail to a@x. The account or domain may not exist"),
 (550, None, "Domain does not exist"),
 (550, None, "DNS lookup failed for domain x: NXDOMAIN"),
 (550, None, "MX lookup failed: no such domain"),
]
SOFT_REPLIES = [
 (552, None, "Mailbox quota exceeded"),
 (452, "4.2.2", "Mailbox full"),
 (552, None, "Requested mail action aborted: exceeded storage allocation"),
 (550, None, "Benutzer hat zuviele Mails auf dem Server"),
 (552, "5.2.2", "user is over quota"),
 (550, "5.2.2", "The user's mailbox is full"),
 (554, None, "delivery error: dd This user doesn't have enough space in their mailbox"),
 (None, "5.4.7", "Delivery expired (message too old)"),
 (None, None, "Message expired"),
 (None, None, "retry timeout exceeded"),
 (451, None, "Too many messages, slow down"),
 (421, None, "Too many concurrent SMTP connections from this IP address; please try again later."),
 (450, None, "rate limit exceeded, try again later"),
 (552, "5.3.4", "Message size exceeds fixed maximum message size"),
 (552, None, "Message too big"),
 (554, None, "Message exceeds maximum size"),
 (451, None, "Requested action aborted: local error in processing"),
 (452, None, "Insufficient system storage"),
 (550, None, "Internal error"),
 (550, "5.2.2", "mailbox full; 550 user unknown not"),
 (552, "5.2.2", "Quota exceeded. The recipient mailbox is full."),
 (550, None, "Message rejected: message is too large"),
 (550, "5.0.0", "Maximum message size exceeded"),
 (451, "4.3.0", "Temporary failure, please try again later"),
]


@pytest.mark.parametrize("code,status,text", HARD_REPLIES)
def test_unknown_user_or_domain_wordings_are_hard(code, status, text):
    v = Classifier().classify(code, status, text)
    assert v.hard and v.category in ADDRESS_CATEGORIES, v


@pytest.mark.parametrize("code,status,text", SOFT_REPLIES)
def test_full_expired_rate_size_system_wordings_are_soft(code, status, text):
    v = Classifier(policy_hard=list(BOUNCE_POLICY_CATEGORIES)).classify(code, status, text)
    assert not v.hard, v


# -- end to end: a real daemon, returned mail over SMTP at the bounce domain ------------------

def _policy_dsn(rcpt: str) -> bytes:
    """A DSN for a reputation block (a policy verdict about the sender, 5.7.1)."""
    return report(f"Reporting-MTA: dns; mx.rcpt.example\n\nFinal-Recipient: rfc822; {rcpt}\nAction: failed\n"
                  f"Status: 5.7.1\nDiagnostic-Code: smtp; 550 5.7.1 Service unavailable; client host "
                  f"[192.0.2.10] blocked using zen.spamhaus.org\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("policy_hard,suppressed", [("[]", False), ('["blocked"]', True)])
def test_daemon_policy_block_suppresses_only_when_configured(daemon_factory, policy_hard, suppressed):
    import os
    import smtplib
    import time

    from peers import _records

    from mta.feedback import verp
    from mta.feedback.suppression import load_key

    domain = "bounces.test"
    d = daemon_factory(extra=f'[bounces]\ndomain = "{domain}"\npolicy_hard = {policy_hard}\n')
    key = load_key(d.workdir / "var" / "suppression" / "suppression.key")
    rcpt = "blocked-here@rcpt.example"
    ret_path = verp.encode(os.urandom(16), 0, rcpt, time.time() + 86400, key, "b", domain)
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        s.sendmail("", [ret_path], _policy_dsn(rcpt))
    oob, = _records(d, "OOB", 1)
    assert (oob["recipient"], oob["category"], oob["hard"]) == (rcpt, "spam_block", suppressed), oob
    assert bool(oob.get("suppressed")) is suppressed, oob
    d.stop()


# -- none invented: contact addresses, the sender in a sentence, the original's header block
#    without a trace header, HTML tables, an Exchange summary block naming the recipients -----

_WEAK = f"From: Alice <{AUTHOR}>\nTo: {OTHERS[0]}\nCc: {OTHERS[1]}\nSubject: hello\nDate: Tue, 1 Dec 2026 10:00:00 +0000\n"
NOT_INVENTED: dict[str, tuple[bytes, set[str]]] = {}
NOT_INVENTED['weak-headers-nosep'] = (text_bounce("Your message could not be delivered to s1@rcpt.example.\nReason: 550 5.1.1 user unknown\n\n", sep="", original=_WEAK), {"s1@rcpt.example"})
NOT_INVENTED['weak-headers-blank'] = (text_bounce("Your message could not be delivered to s2@rcpt.example.\nReason: 550 5.1.1 user unknown\n\n", sep="\n\n", original=_WEAK), {"s2@rcpt.example"})
NOT_INVENTED['msg-headers-label'] = (text_bounce("Delivery to the following recipient failed:\n\n  s3@rcpt.example\n\n550 5.1.1 user unknown\n\n", sep="Message headers:\n", original=_WEAK), {"s3@rcpt.example"})
NOT_INVENTED['from-sentence'] = (text_bounce(f"Your message from {SENDER} to s4@rcpt.example was rejected: 550 5.1.1 user unknown\n", sep="--- original ---\n"), {"s4@rcpt.example"})
NOT_INVENTED['contact-postmaster'] = (text_bounce("<s5@rcpt.example>: 550 5.1.1 user unknown\n\nIf you need help, contact postmaster@mx.rcpt.example or abuse@rcpt.example.\n", sep="--- original ---\n"), {"s5@rcpt.example"})
NOT_INVENTED['contact-helpdesk'] = (text_bounce("Delivery failed for s6@rcpt.example: 550 5.1.1 user unknown\n\nQuestions? Write to helpdesk@rcpt.example\n", sep="--- original ---\n"), {"s6@rcpt.example"})
NOT_INVENTED['reply-to-line'] = (text_bounce("Could not deliver to <s7@rcpt.example>:\n550 5.1.1 unknown user\n\nOriginal sender: " + AUTHOR + "\nOriginal recipient: s7@rcpt.example\n", sep="--- original ---\n"), {"s7@rcpt.example"})
NOT_INVENTED['html-table'] = ((f"From: postmaster@rcpt.example\nTo: {SENDER}\nSubject: Undeliverable: hello\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n<html><body><table><tr><td>Recipient</td><td>s8@rcpt.example</td></tr><tr><td>Reason</td><td>550 5.1.1 User unknown</td></tr><tr><td>Sender</td><td>{SENDER}</td></tr></table></body></html>\n").encode(), {"s8@rcpt.example"})
NOT_INVENTED['exch-unindented'] = (text_bounce("Your message\n\nFrom: Alice <" + AUTHOR + ">\nTo: t1@rcpt.example; t2@rcpt.example\nSubject: hello\nSent: Tue, 1 Dec 2026 10:00:00 +0000\n\ndid not reach the following recipient(s):\n\nt1@rcpt.example on Tue, 1 Dec 2026 10:00:05 +0000\n    The e-mail account does not exist at the organization this message was sent to.\n\nt2@rcpt.example on Tue, 1 Dec 2026 10:00:05 +0000\n    The recipient's mailbox is full.\n", frm="System Administrator <postmaster@rcpt.example>", subject="Undeliverable: hello", sep="", original=""), {"t1@rcpt.example", "t2@rcpt.example"})


@pytest.mark.parametrize("name", sorted(NOT_INVENTED))
def test_no_address_invented(name):
    data, want = NOT_INVENTED[name]
    rep = parse_message(data)
    assert rep.kind == "bounce"
    assert {r.recipient.lower() for r in rep.recipients} == want


# -- address forms in text bounces: bullets, numbering, doubled angles, percent hack, an
#    address quoted in the SMTP reply, the subject naming it, ISO-2022-JP ----------------------

ADDRESS_FORMS: dict[str, tuple[bytes, set[str]]] = {}
def _tb(b, **k): return text_bounce(b, sep="--- original message ---\n", **k)
ADDRESS_FORMS['paren-name'] = (_tb("The following address failed:\n\n    u1@rcpt.example (Kiji Tora)\n\n550 5.1.1 user unknown\n"), {"u1@rcpt.example"})
ADDRESS_FORMS['double-angle'] = (_tb("Delivery failed:\n<<u2@rcpt.example>> 550 5.1.1 user unknown\n"), {"u2@rcpt.example"})
ADDRESS_FORMS['percent-hack'] = (_tb("<u3%host.rcpt.example@relay.rcpt.example>: 550 5.1.1 user unknown\n"), {"u3%host.rcpt.example@relay.rcpt.example"})
ADDRESS_FORMS['bullets'] = (_tb("Delivery to these recipients failed:\n\t* u4@rcpt.example - 550 5.1.1 user unknown\n\t* u5@rcpt.example - 552 5.2.2 mailbox full\n"), {"u4@rcpt.example","u5@rcpt.example"})
ADDRESS_FORMS['numbered'] = (_tb("Failed recipients:\n1) u6@rcpt.example: user unknown\n2) u7@rcpt.example: user unknown\n"), {"u6@rcpt.example","u7@rcpt.example"})
ADDRESS_FORMS['subject-only'] = ((f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: Undeliverable: u8@rcpt.example\n\nThe message could not be delivered: 550 5.1.1 user unknown\n").encode(), {"u8@rcpt.example"})
ADDRESS_FORMS['iso2022'] = ((f"From: MAILER-DAEMON@mx.rcpt.example\nTo: {SENDER}\nSubject: =?ISO-2022-JP?B?GyRCRVtDIzxSR1QbKEI=?=\nMIME-Version: 1.0\nContent-Type: text/plain; charset=ISO-2022-JP\nContent-Transfer-Encoding: 7bit\n\n").encode() + "以下のアドレスに配信できませんでした。\n\nu9@rcpt.example\n\n550 5.1.1 user unknown\n".encode("iso-2022-jp"), {"u9@rcpt.example"})
ADDRESS_FORMS['mailto-angle'] = (_tb("Your message wasn't delivered to u10@rcpt.example<mailto:u10@rcpt.example> because the address couldn't be found.\n"), {"u10@rcpt.example"})
ADDRESS_FORMS['rcpt-reject-quote'] = (_tb("Remote server replied: 550 5.1.1 <u11@rcpt.example>: Recipient address rejected: User unknown\n"), {"u11@rcpt.example"})
ADDRESS_FORMS['smtp-in-reply'] = (_tb("Error for u12@rcpt.example:\n  in reply to RCPT TO command: 550 5.1.1 no such user\n"), {"u12@rcpt.example"})
ADDRESS_FORMS['x-failed+text'] = ((f"From: Mail Delivery System <MAILER-DAEMON@mx.rcpt.example>\nTo: {SENDER}\nSubject: Mail delivery failed\nX-Failed-Recipients: u13@rcpt.example\n\nA message that you sent could not be delivered.\n\n  u13@rcpt.example\n    SMTP error from remote mail server after RCPT TO:<u13@rcpt.example>:\n    550 5.1.1 user unknown\n").encode(), {"u13@rcpt.example"})


@pytest.mark.parametrize("name", sorted(ADDRESS_FORMS))
def test_address_forms(name):
    data, want = ADDRESS_FORMS[name]
    rep = parse_message(data)
    assert rep.kind == "bounce"
    assert {r.recipient.lower() for r in rep.recipients} == want


def test_transcript_mail_from_is_never_a_recipient():
    body = ("The following address failed:\n\n  kiji\n    SMTP error from remote mail server after MAIL FROM:"
            "<boss@sender.example> SIZE=100:\n    550 5.7.0 <boss@sender.example>... Use your ISP's server\n")
    rep = parse_message(text_bounce(body, sep="--- original message ---\n"))
    assert "boss@sender.example" not in {r.recipient for r in rep.recipients}


@pytest.mark.parametrize("text,category", [
    ("Empf\u00e4nger existiert nicht", "invalid_recipient"), ("Benutzer unbekannt", "invalid_recipient"),
    ("Usu\u00e1rio desconhecido", "invalid_recipient"), ("L'adresse n'existe pas", "invalid_recipient"),
    ("Utente non esiste", "invalid_recipient"), ("Usuario desconocido", "invalid_recipient"),
    ("La casella di posta \u00e8 piena", "mailbox_full"), ("Postfach ist voll", "mailbox_full"),
    ("Buz\u00f3n lleno", "mailbox_full"), ("La bo\u00eete aux lettres est pleine", "mailbox_full"),
    ("Caixa postal cheia", "mailbox_full"),
])
def test_other_languages(text, category):
    v = Classifier().classify(550, None, text)
    assert (v.category, v.hard) == (category, category == "invalid_recipient"), v
