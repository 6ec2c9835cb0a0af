"""Bounces, feedback, suppression and one-click unsubscribe, end to end (issue 5).

A real daemon subprocess; returned mail arrives over SMTP (smtplib) at the bounce
domain, in-band replies come from aiosmtpd receivers on 127.0.7.x:25 found through
the test DNS server, the unsubscribe endpoint is POSTed to with http.client, and the
`mta suppress` / `mta bounce parse` commands run as subprocesses.
"""
from __future__ import annotations

import http.client
import os
import re
import smtplib
import subprocess
import sys
import time

import orjson
import pytest
from aiosmtpd.controller import Controller

from conftest import ROOT, corpus, free_port
from peers import NET, ZONE, _records, _send, Receiver

from mta.feedback import verp
from mta.model.ids import id_text
from mta.feedback.suppression import address_hash, hash_text, load_key

BOUNCE_DOMAIN = "bounces.test"


def _key(d) -> bytes:
    return load_key(d.workdir / "var" / "suppression" / "suppression.key")


def _feedback_daemon(daemon_factory, dns_server=None, extra: str = "", listener: str = ""):
    conf = f'[bounces]\ndomain = "{BOUNCE_DOMAIN}"\n{extra}\n'
    if dns_server is not None:
        dns = dns_server(ZONE)
        conf += (f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                 '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n')
    return daemon_factory(extra=conf, listener=listener)


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def _dsn(rcpt: str, status: str, diag: str, also: tuple[str, ...] = ()) -> bytes:
    """An RFC 3464 DSN as a remote MTA would return it; `also`: more failed recipients."""
    more = "".join(f"""
Final-Recipient: rfc822; {r}
Action: failed
Status: {status}
Diagnostic-Code: smtp; {diag}
""" for r in also)
    return _crlf(f"""From: MAILER-DAEMON@mx.remote.test
To: someone@bounces.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BB"

--BB
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--BB
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.remote.test

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Remote-MTA: dns; mx.remote.test
Diagnostic-Code: smtp; {diag}
{more}
--BB
Content-Type: message/rfc822

From: alice@sender.test
To: {rcpt}
Subject: newsletter

hello
--BB--
""")


def _arf(rcpt: str, source_ip: str, tenant: str, return_path: str = "") -> bytes:
    """An RFC 5965 abuse report with the original (and its tenant header) attached;
    `return_path`: the Return-Path the mailbox provider stamped on the original."""
    stamp = f"Return-Path: <{return_path}>\n" if return_path else ""
    return _crlf(f"""From: fbl@isp.test
To: fbl@bounces.test
Subject: FW: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="FF"

--FF
Content-Type: text/plain

This is an email abuse report.

--FF
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp-fbl/1.0
Version: 1
Original-Mail-From: <alice@sender.test>
Original-Rcpt-To: <{rcpt}>
Source-IP: {source_ip}
Reported-Domain: sender.test

--FF
Content-Type: message/rfc822

{stamp}From: alice@sender.test
To: {rcpt}
Subject: offer
X-Tenant: {tenant}

buy now
--FF--
""")


def _refused(port: int, rcpt: str, sender: str = "alice@sender.test", headers: str = "",
             client: str = "127.0.0.1") -> str:
    """Send one message from `client`; the refusal text (RCPT or end of data), or "" when
    accepted."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(client, 0)) as s:
        try:
            s.sendmail(sender, [rcpt], f"From: <{sender}>\r\n{headers}Subject: x\r\n\r\nhi\r\n")
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            return f"{code} {text.decode()}"
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
    return ""


def _mta(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=cwd, timeout=60)


class ScriptedReceiver(Receiver):
    """Receiver with a mailbox-full answer besides reject*/defer*."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@")[0].lower().startswith("full"):
            return "452 4.2.2 <%s>: mailbox full, over quota" % address
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.fixture
def scripted():
    ctl = Controller(ScriptedReceiver(), hostname=f"{NET}.2", port=25)
    ctl.start()
    yield ctl.handler
    ctl.stop()


# --- out of band ---------------------------------------------------------------------


def test_oob_dsn_to_verp_address_suppresses_and_next_rcpt_is_refused(daemon_factory):
    # relay only from 127.0.0.2: returned mail to the bounce domain is taken from anyone
    d = _feedback_daemon(daemon_factory, listener='relay_cidrs = ["127.0.0.2/32"]')
    our_id = os.urandom(16)
    ret_path = verp.encode(our_id, 3, "gone@example.test", time.time() + 86400, _key(d), "b",
                           BOUNCE_DOMAIN)
    assert _refused(d.port, "x@example.test").startswith("554"), "others are still not relayed"
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        s.sendmail("", [ret_path], _dsn("gone@example.test", "5.1.1",
                                        "550 5.1.1 <gone@example.test>: user unknown"))
    oob, = _records(d, "OOB", 1)
    assert (oob["id"], oob["verp_index"], oob["recipient"]) == (id_text(our_id), 3,
                                                                 "gone@example.test")
    assert (oob["kind"], oob["status"], oob["category"], oob["hard"]) == (
        "bounce", "5.1.1", "invalid_recipient", True), f"got {oob}"
    assert oob["suppressed"] == "global" and oob["reporting_mta"] == "mx.remote.test"
    # only a client that may relay learns of the suppression (outsiders cannot probe it)
    refusal = _refused(d.port, "gone@example.test", client="127.0.0.2")
    assert refusal.startswith("550") and "5.7.1" in refusal and "suppressed" in refusal, refusal
    rej = [r for r in _records(d, "Rejection", 2) if r["reason"] == "suppressed"]
    assert [r["recipients"] for r in rej] == [["gone@example.test"]]
    d.stop()
    assert d.spooled().messages == {}, "the processed bounce is finished in the spool"


def test_oob_forged_address_and_auto_reply_suppress_nobody(daemon_factory):
    d = _feedback_daemon(daemon_factory)
    forged = verp.encode(os.urandom(16), 0, "victim@example.test", time.time() + 86400,
                         os.urandom(32), "b", BOUNCE_DOMAIN)
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        s.sendmail("", [forged], _dsn("victim@example.test", "5.1.1", "550 5.1.1 user unknown"))
        s.sendmail("bob@remote.test", ["anything@bounces.test"],
                   b"From: bob@remote.test\r\nAuto-Submitted: auto-replied\r\n"
                   b"Subject: Out of office\r\n\r\nI am away until Monday.\r\n")
    recs = _records(d, "OOB", 2)
    by_rcpt = {r["recipient"]: r for r in recs}
    assert by_rcpt["victim@example.test"]["verp"] is False
    assert by_rcpt["victim@example.test"]["suppressed"] is None, "a forged VERP never suppresses"
    auto = by_rcpt["bob@remote.test"]
    assert auto["kind"] == "autoreply" and auto["suppressed"] is None, f"got {auto}"
    assert _refused(d.port, "victim@example.test") == "", "the recipient is not suppressed"


def test_arf_complaint_feedback_record_and_tenant_suppression(daemon_factory):
    d = _feedback_daemon(daemon_factory, extra='[[source]]\nname = "ip-one"\naddress = "127.0.0.1"\n')
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        # a feedback loop's fixed address; the proof is the original's Return-Path
        ret_path = verp.encode(os.urandom(16), 0, "carol@example.test", time.time() + 86400,
                               _key(d), "b", BOUNCE_DOMAIN)
        s.sendmail("", ["fbl@bounces.test"], _arf("carol@example.test", "127.0.0.1", "acme",
                                                  return_path=ret_path))
    fb, = _records(d, "Feedback", 1)
    assert (fb["feedback_type"], fb["recipient"], fb["source_ip"], fb["source"], fb["tenant"]) == (
        "abuse", "carol@example.test", "127.0.0.1", "ip-one", "acme"), f"got {fb}"
    assert fb["suppressed"] == "tenant:acme"
    counters = _admin(d, "/queue/summary")["feedback"]
    assert counters == {"ip-one|example.test": {"hard_bounces": 0, "complaints": 1}}, counters
    # tenant scope: known only after DATA, so the message is refused at end of data ...
    refusal = _refused(d.port, "carol@example.test", headers="X-Tenant: acme\r\n")
    assert refusal.startswith("550") and "suppressed" in refusal, refusal
    # ... and another tenant still reaches carol
    assert _refused(d.port, "carol@example.test", headers="X-Tenant: other\r\n") == ""
    got = _mta("suppress", "-c", str(d.config), "check", "carol@example.test", "--tenant", "acme")
    assert got.returncode == 0 and orjson.loads(got.stdout)["reason"] == "complaint", got


def test_recovered_unprocessed_bounce_is_processed_again(daemon_factory):
    d = _feedback_daemon(daemon_factory, extra='[delivery]\nhold = true\n')
    key = _key(d)
    d.stop()
    # spool a returned message while the intake is off (no bounce domain), as a crash
    # between the 250 and the processing would leave it
    plain = daemon_factory(extra='[delivery]\nhold = true\n', start=False)
    plain.config.write_text(d.config.read_text().replace(f'domain = "{BOUNCE_DOMAIN}"', ""))
    plain.spool_dir, plain.log_dir, plain.port = d.spool_dir, d.log_dir, d.port
    plain.start()
    ret_path = verp.encode(os.urandom(16), 0, "later@example.test", time.time() + 86400, key,
                           "b", BOUNCE_DOMAIN)
    with smtplib.SMTP("127.0.0.1", plain.port) as s:
        s.sendmail("", [ret_path], _dsn("later@example.test", "5.1.1", "550 5.1.1 no such user"))
    plain.kill()
    assert d.log_records("OOB") == []
    d.start()
    oob, = _records(d, "OOB", 1)
    assert oob["recipient"] == "later@example.test" and oob["suppressed"] == "global"
    d.stop()
    assert d.spooled().messages == {}


# --- in band -----------------------------------------------------------------------


def test_inband_hard_bounce_classified_and_suppressed_mailbox_full_not(daemon_factory, dns_server,
                                                                       scripted):
    d = _feedback_daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["reject-hard@example.test"])
    bounce, = _records(d, "Bounce", 1)
    assert (bounce["code"], bounce["category"], bounce["hard"]) == (550, "invalid_recipient", True)
    _send(d.port, "alice@sender.test", ["full-box@example.test"])
    full = _matching(d, "TransientFailure", "full-box@example.test")
    assert full and (full[0]["code"], full[0]["category"], full[0]["hard"]) == (
        452, "mailbox_full", False), f"got {full}"
    assert _refused(d.port, "reject-hard@example.test").startswith("550")
    assert _refused(d.port, "full-box@example.test") == "", "a full mailbox is not suppressed"
    rows = _admin(d, "/shaping")
    assert sum(r["hard_bounces"] for r in rows) == 1, f"got {rows}"


def _matching(d, rtype: str, rcpt: str, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not (got := [r for r in d.log_records(rtype) if r["recipient"] == rcpt]):
        assert time.monotonic() < deadline, f"no {rtype} record for {rcpt}"
        time.sleep(0.1)
    return got


def _admin(d, path: str):
    from mta.config import load_config
    from mta.control.client import admin_request
    return admin_request(load_config(d.config), path)[1]   # the daemon's address and token


def test_verp_mail_from_decodes_to_the_message_id(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2")
    d = _feedback_daemon(daemon_factory, dns_server)
    _send(d.port, "alice@sender.test", ["bob@example.test", "eve@example.test"])
    msgs = mx2.wait(2)
    rec, = _records(d, "Reception", 1)
    for mail_from, rcpts, _ in msgs:
        assert mail_from.endswith("@" + BOUNCE_DOMAIN), f"got MAIL FROM {mail_from}"
        token = verp.parse(mail_from, "b", BOUNCE_DOMAIN)
        assert id_text(token.msg_id) == rec["id"]
        assert rcpts == [["bob@example.test", "eve@example.test"][token.index]], "one each"
        assert verp.verify(token, rcpts[0], _key(d)) == verp.VALID, "bound to its recipient"
        # valid for [bounces] verp_expiry (35d) after reception, then no longer
        expires = rec["started"] + 35 * 86400
        assert expires <= token.expiry_hour * 3600 < expires + 3600
    delivered = _records(d, "Delivery", 2)
    assert {r["sender"] for r in delivered} == {"alice@sender.test"}, "logs keep the sender"


def test_one_click_unsubscribe_then_rcpt_refused(daemon_factory, dns_server, receivers):
    mx2 = receivers(f"{NET}.2")
    port = free_port()
    d = _feedback_daemon(daemon_factory, dns_server, extra=(
        f'[unsubscribe]\nlisten = "127.0.0.1:{port}"\nbase_url = "https://unsub.test"\n'
        'add_headers = true\n'))
    _send(d.port, "alice@sender.test", ["dave@example.test"])
    (_, _, content), = mx2.wait(1)
    head = content.split(b"\r\n\r\n")[0].decode()
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
    assert head.startswith("Received:"), "our trace header stays on top"
    path = re.search(r"List-Unsubscribe: <https://unsub\.test(/u/[^>]+)>", head)[1]
    # RFC 8058 wants https in production; the test talks plain HTTP on loopback
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, b"List-Unsubscribe=One-Click",
                 {"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    unsub, = _records(d, "Unsubscribe", 1)
    assert unsub["scope"] == "global" and unsub["client_ip"] == "127.0.0.1", unsub
    assert unsub["recipient_hash"] == hash_text(address_hash(_key(d), "dave@example.test"))
    deadline = time.monotonic() + 5
    while (refusal := _refused(d.port, "dave@example.test")) == "" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refusal.startswith("550") and "unsubscribe" in refusal, refusal


def test_suppress_cli_against_the_daemon_store_and_drop_mode(daemon_factory):
    d = _feedback_daemon(daemon_factory, extra='[suppression]\non_match = "drop"\n'
                                               '[delivery]\nhold = true\n')
    got = _mta("suppress", "-c", str(d.config), "add", "frank@example.test", "--reason", "manual")
    assert got.returncode == 0, got.stderr
    got = _mta("suppress", "-c", str(d.config), "check", "frank@example.test")
    assert got.returncode == 0 and orjson.loads(got.stdout)["scope"] == "global"
    time.sleep(1.2)   # the daemon's filter refreshes every second
    with smtplib.SMTP("127.0.0.1", d.port) as s:
        refused = s.sendmail("alice@sender.test", ["frank@example.test", "gina@example.test"],
                             b"Subject: x\r\n\r\nhi\r\n")
    assert refused == {}, "drop mode accepts"
    sup, = _records(d, "Suppressed", 1)
    assert (sup["recipient"], sup["scope"], sup["reason"]) == ("frank@example.test", "global",
                                                               "manual")
    rec, = _records(d, "Reception", 1)
    assert rec["recipients"] == ["gina@example.test"], "the suppressed recipient is removed"


def test_bounce_parse_cli_on_a_corpus_file(tmp_path):
    path = corpus("sisimai-set-of-emails") / "maildir" / "mac" / "lhost-amavis-01.eml"
    got = _mta("bounce", "parse", str(path))
    assert got.returncode == 0, got.stderr
    lines = [orjson.loads(line) for line in got.stdout.splitlines()]
    assert lines and all(r["kind"] == "bounce" and r["recipient"] for r in lines), lines
    # -c adds the config's [bounces] rules in front of the shipped ones
    (tmp_path / "ops.toml").write_text('[[rule]]\nname = "everything"\ncode = "5xx"\n'
                                       'category = "policy"\nhard = false\n')
    (tmp_path / "mta.toml").write_text('[bounces]\nrules = ["ops.toml"]\n')
    got = _mta("bounce", "-c", str(tmp_path / "mta.toml"), "parse", str(path))
    assert got.returncode == 0, got.stderr
    cats = {orjson.loads(line)["category"] for line in got.stdout.splitlines()}
    assert cats == {"policy"}, f"got {cats}"


def test_rules_file_reload_changes_the_next_category(daemon_factory, dns_server, receivers,
                                                     tmp_path):
    receivers(f"{NET}.2")
    rules = tmp_path / "ops-rules.toml"
    rules.write_text('[[rule]]\nname = "ops"\ntext = ["never matches zzz"]\n'
                     'category = "policy"\nhard = false\n')
    d = _feedback_daemon(daemon_factory, dns_server, extra=f'rules = ["{rules}"]\n')
    _send(d.port, "alice@sender.test", ["reject-one@example.test"])
    first, = _records(d, "Bounce", 1)
    assert first["category"] == "invalid_recipient"
    rules.write_text('[[rule]]\nname = "ops"\ntext = ["no such user"]\n'
                     'category = "policy"\nhard = false\n')
    os.utime(rules, (time.time() + 5, time.time() + 5))   # a new mtime even within one tick
    time.sleep(4)   # the daemon looks every 3 s
    _send(d.port, "alice@sender.test", ["reject-two@example.test"])
    second = _records(d, "Bounce", 2)[1]
    assert (second["recipient"], second["category"], second["hard"]) == (
        "reject-two@example.test", "policy", False), f"got {second}"
    rules.write_text("[[rule]]\nthis is not toml")
    os.utime(rules, (time.time() + 10, time.time() + 10))
    time.sleep(4)
    _send(d.port, "alice@sender.test", ["reject-three@example.test"])
    third = _records(d, "Bounce", 3)[2]
    assert third["category"] == "policy", "a broken file keeps the previous rules"
    assert "previous rules" in (d.workdir / "daemon.err").read_text()
