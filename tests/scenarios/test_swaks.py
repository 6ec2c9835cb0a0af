"""Scenario: real SMTP clients (swaks, smtplib) against `mta serve`.

Each test starts its own daemon, sends with swaks as an operator's injector
would, stops the daemon and checks what it left: the spool's envelopes and
content, and the Reception/Rejection log records. swaks 20201014 (Debian 12)
has no BDAT, DSN or SMTPUTF8 options: where a test needs those, the client is
smtplib or a raw socket, and the test says so.
"""
from __future__ import annotations

import re
import shutil
import smtplib
import subprocess

import pytest

from conftest import smtp_exchange
from mta.model.replies import REPLIES, reply
from mta.spool import records as rec

SENDER = "sender@example.org"
RCPT = "rcpt@example.net"


def swaks(port: int, *args: str, to: str = RCPT) -> tuple[int, str]:
    """Run swaks against the daemon -> (exit status, transcript)."""
    assert shutil.which("swaks"), "swaks missing: tools/dev.sh installs it"
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--timeout", "10",
           "--helo", "client.example", "--from", SENDER, "--to", to, *args]
    r = subprocess.run(cmd, capture_output=True, timeout=30)
    return r.returncode, r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")


def queued_id(transcript: str) -> str:
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", transcript)
    assert m, f"no 250 queued reply in the transcript:\n{transcript}"
    return m.group(1)


def spooled(daemon) -> dict[str, tuple[dict, bytes]]:
    """id -> (envelope, content including our Received header); daemon stopped."""
    found = daemon.spooled()
    out = {}
    for raw_id, loc in found.messages.items():
        seg = (daemon.spool_dir / f"{loc.segment:08d}.seg").read_bytes()
        _, _, start = rec.parse_message(seg, loc.offset, loc.length)
        env = found.envelopes[raw_id].view()   # the stored JSON, as mta queue shows it
        out[env["id"]] = (env, seg[start:loc.offset + loc.length])
    return out


def only_message(daemon, msg_id: str) -> tuple[dict, bytes, dict]:
    """The one spooled message and its Reception record, checked to be `msg_id`."""
    assert daemon.stop() == 0, "daemon exit status"
    msgs = spooled(daemon)
    assert list(msgs) == [msg_id], f"spooled ids: got {list(msgs)}, want [{msg_id}]"
    records = daemon.log_records("Reception")
    assert [r["id"] for r in records] == [msg_id], \
        f"Reception records: got {[r['id'] for r in records]}, want [{msg_id}]"
    env, content = msgs[msg_id]
    return env, content, records[0]


@pytest.mark.parametrize("args, pipelined", [
    pytest.param([], False, id="plain"),
    pytest.param(["--pipeline"], True, id="pipelined (RFC 2920)"),
])
def test_swaks_message(daemon_factory, args, pipelined):
    d = daemon_factory()
    rc, out = swaks(d.port, "--body", "hello from swaks", *args)
    assert rc == 0, f"swaks exit status: got {rc}, want 0\n{out}"
    sent = [ln[4:].split(" ")[0] for ln in out.splitlines() if ln.startswith(" -> ")][:4]
    want_sent = ["EHLO", "MAIL", "RCPT", "DATA"]
    assert sent == want_sent, f"first commands: got {sent}, want {want_sent}"
    # pipelined: MAIL, RCPT and DATA go out before the first of their replies
    lines = out.splitlines()
    mail = next(i for i, ln in enumerate(lines) if ln.startswith(" -> MAIL"))
    grouped = [ln[:4] for ln in lines[mail:mail + 3]] == [" -> "] * 3
    assert grouped == pipelined, f"MAIL/RCPT/DATA sent as one group: got {grouped}, " \
                                 f"want {pipelined}\n{out}"
    env, content, record = only_message(d, queued_id(out))
    want_env = {"sender": SENDER, "rcpts": [[RCPT, None, None]], "helo": "client.example",
                "client_ip": "127.0.0.1", "protocol": "ESMTP", "size": len(content)}
    got_env = {k: env[k] for k in want_env}
    assert got_env == want_env, f"envelope: got {got_env}, want {want_env}"
    want_rec = {"sender": SENDER, "recipients": [RCPT], "client_ip": "127.0.0.1",
                "helo": "client.example", "protocol": "ESMTP", "size": len(content)}
    got_rec = {k: record[k] for k in want_rec}
    assert got_rec == want_rec, f"Reception record: got {got_rec}, want {want_rec}"
    assert content.startswith(b"Received: from client.example ([127.0.0.1])\r\n"), \
        f"trace header: got {content[:80]!r}"
    assert b"\r\n\r\nhello from swaks\r\n" in content, f"body not stored: {content!r}"


def test_bdat_raw_client(daemon_factory):
    d = daemon_factory()
    first, last = b"Subject: a\r\n\r\n", b".body\r\n.\r\n\r\n"   # no stuffing in chunks
    out = smtp_exchange(d.port, b"EHLO client.example\r\nMAIL FROM:<sender@example.org>\r\n"
                                b"RCPT TO:<rcpt@example.net>\r\n"
                                b"BDAT %d\r\n%sBDAT %d LAST\r\n%sQUIT\r\n"
                                % (len(first), first, len(last), last))
    assert reply("CHUNK_OK", len(first)) in out, f"no 250 for the first chunk: {out!r}"
    m = re.search(rb"250 2\.0\.0 Ok: queued as (\w+)", out)
    assert m, f"no queued reply: {out!r}"
    env, content, _ = only_message(d, m.group(1).decode())
    assert content.endswith(b"\r\n" + first + last), \
        f"chunks stored as sent: got {content[-40:]!r}, want ...{first + last!r}"
    got = (env["sender"], env["rcpts"], env["size"])
    want = (SENDER, [[RCPT, None, None]], len(content))
    assert got == want, f"envelope: got {got}, want {want}"


def test_relay_denied(daemon_factory):
    d = daemon_factory(listener='relay_cidrs = ["10.0.0.0/8"]\n')   # 127.0.0.1 is outside
    rc, out = swaks(d.port, "--body", "x")
    denied = REPLIES["RELAY_DENIED"].line().decode().rstrip("\r\n")
    assert f"<** {denied}" in out, f"got transcript\n{out}\nwant {denied!r} on RCPT"
    assert rc != 0, f"swaks exit status: got {rc}, want non-zero"
    assert d.stop() == 0
    assert spooled(d) == {}, "a message was spooled for a non-relay client"
    got = [{k: r[k] for k in ("sender", "recipients", "client_ip", "code", "status", "reason")}
           for r in d.log_records("Rejection")]
    want = [{"sender": SENDER, "recipients": [RCPT], "client_ip": "127.0.0.1", "code": 554,
             "status": "5.7.1", "reason": "relay_denied"}]
    assert got == want, f"Rejection records: got {got}, want {want}"
    assert d.log_records("Reception") == [], "Reception record without a message"


def test_dsn_parameters(daemon_factory):
    """swaks 20201014 has no DSN options: smtplib sends RET/ENVID/NOTIFY/ORCPT (RFC 3461)."""
    d = daemon_factory()
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.example", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("dsn"), "DSN not advertised in EHLO"
        code, msg = s.mail(SENDER, ["RET=HDRS", "ENVID=QQ314159"])
        assert code == 250, f"MAIL: got {code} {msg}"
        code, msg = s.rcpt(RCPT, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{RCPT}"])
        assert code == 250, f"RCPT: got {code} {msg}"
        code, msg = s.rcpt("other@example.net", ["NOTIFY=NEVER"])
        assert code == 250, f"RCPT: got {code} {msg}"
        code, msg = s.data(b"Subject: dsn\r\n\r\nbody\r\n")
        assert code == 250, f"DATA: got {code} {msg}"
    msg_id = msg.decode().rsplit(" ", 1)[1]
    env, _, _ = only_message(d, msg_id)
    got = {k: env[k] for k in ("ret", "envid", "rcpts")}
    want = {"ret": "HDRS", "envid": "QQ314159",
            "rcpts": [[RCPT, "SUCCESS,FAILURE", f"rfc822;{RCPT}"],
                      ["other@example.net", "NEVER", None]]}
    assert got == want, f"envelope DSN fields: got {got}, want {want}"


def test_utf8_recipient(daemon_factory):
    d = daemon_factory()
    utf8_rcpt = "müller@exämple.net"
    # swaks never sends SMTPUTF8, so a UTF-8 address must be refused (RFC 6531 3.4)
    rc, out = swaks(d.port, "--body", "x", to=utf8_rcpt)
    need = REPLIES["NEED_SMTPUTF8"].line().decode().rstrip("\r\n")
    assert f"<** {need}" in out, f"got transcript\n{out}\nwant {need!r}"
    assert rc != 0, f"swaks exit status: got {rc}, want non-zero"
    # smtplib does send SMTPUTF8 (and the body as 8BITMIME, RFC 6152)
    body = "Subject: grüße\r\n\r\nschöne Grüße\r\n".encode()
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.example", timeout=10) as s:
        refused = s.sendmail("jürgen@bücher.example", [utf8_rcpt], body,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}, f"refused recipients: {refused}"
    assert d.stop() == 0
    msgs = spooled(d)
    assert len(msgs) == 1, f"got {len(msgs)} messages, want 1"
    (env, content), = msgs.values()
    got = {k: env[k] for k in ("sender", "rcpts", "smtputf8", "body", "protocol")}
    want = {"sender": "jürgen@bücher.example", "rcpts": [[utf8_rcpt, None, None]],
            "smtputf8": True, "body": "8BITMIME", "protocol": "UTF8SMTP"}
    assert got == want, f"envelope: got {got}, want {want}"
    assert content.endswith(body), f"8-bit content changed: got {content[-60:]!r}"
    assert f"for <{utf8_rcpt}>".encode() in content, "Received header lacks the UTF-8 recipient"
    receptions = [(r["recipients"], r["protocol"]) for r in d.log_records("Reception")]
    assert receptions == [([utf8_rcpt], "UTF8SMTP")], f"Reception records: got {receptions}"


@pytest.mark.parametrize("headers, want", [
    pytest.param(["--h-X-Tenant", "acme", "--h-X-Campaign", "spring-sale"],
                 {"tenant": "acme", "campaign": "spring-sale"}, id="both headers"),
    pytest.param(["--h-X-Tenant", "acme"], {"tenant": "acme", "campaign": None},
                 id="tenant only"),
    pytest.param([], {"tenant": None, "campaign": None}, id="neither"),
])
def test_tenant_and_campaign_headers(daemon_factory, headers, want):
    d = daemon_factory()
    rc, out = swaks(d.port, "--body", "tenant test", *headers)
    assert rc == 0, f"swaks exit status: got {rc}, want 0\n{out}"
    env, _, record = only_message(d, queued_id(out))
    got_env = {k: env.get(k) for k in want}
    assert got_env == want, f"envelope: got {got_env}, want {want}"
    got_rec = {k: record[k] for k in want}
    assert got_rec == want, f"Reception record: got {got_rec}, want {want}"


def test_tenant_line_in_the_body_is_not_a_header(daemon_factory):
    """Only the header section counts (swaks would rewrite such a body line: smtplib)."""
    d = daemon_factory()
    content = b"Subject: t\r\nX-Campaign: real\r\n\r\nX-Tenant: from-the-body\r\n"
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.example", timeout=10) as s:
        s.sendmail(SENDER, [RCPT], content)
    assert d.stop() == 0
    (env, _), = spooled(d).values()
    got = (env.get("tenant"), env.get("campaign"))
    assert got == (None, "real"), f"tenant, campaign: got {got}, want (None, 'real')"
