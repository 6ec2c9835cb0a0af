"""Issue 13 (items 6 and 8) end to end: what leaves the daemon and what its records say.

A real daemon subprocess relays to aiosmtpd receivers on 127.0.7.x:25 found through the
test DNS server (tests/scenarios/peers.py's zone, moved to 127.0.19.x): classification headers never reach the
recipient; every per-message record carries tenant, campaign, host and an ISO time;
addresses in the records follow [log] recipient_privacy / sender_privacy; our own DSNs
carry no List-Unsubscribe and, when they bounce, put nobody on the suppression list;
a tenant in [delivery] no_dsn_tenants gets no DSN.
"""
from __future__ import annotations

import re
import smtplib
import time
from datetime import datetime, timezone

from peers import NET as SHARED_NET
from peers import ZONE as SHARED_ZONE
from peers import _records

from mta.feedback.suppression import SuppressionList, address_hash, hash_text, load_key


# the receivers of this file listen on their own addresses, so it can run beside the
# other delivery scenarios (which use 127.0.7.x:25)
NET = "127.0.19"
ZONE = [r.replace(SHARED_NET + ".", NET + ".") for r in SHARED_ZONE]


def _submit(port: int, sender: str, rcpts: list[str], headers: str = "") -> None:
    msg = (f"From: <{sender}>\r\nSubject: test\r\n{headers}Message-ID: <p{time.time_ns()}"
           f"@sender.test>\r\n\r\nhello\r\nX-Tenant: a body line that stays\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail(sender, rcpts, msg)


def _daemon(daemon_factory, dns_server, extra: str = "", log: str = ""):
    dns = dns_server(ZONE)
    # `log` lines land in the [log] table the daemon factory writes just before them
    return daemon_factory(extra=log + f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
                                '[delivery]\nretry_initial = "1s"\nretry_max = "1s"\n' + extra)


def test_private_headers_stripped_and_records_name_tenant_host_time(daemon_factory, dns_server,
                                                                     receivers):
    mx2 = receivers(f"{NET}.2")
    d = _daemon(daemon_factory, dns_server,
                log='recipient_privacy = "hashed"\nsender_privacy = "domain"\n')
    _submit(d.port, "alice@sender.test", ["Bob@example.test"],
            "X-Tenant: acme\r\nx-campaign: spring\r\n sale\r\nX-Queue-Class: bulk\r\n")
    (_, _, content), = mx2.wait(1)
    head, _, body = content.partition(b"\r\n\r\n")
    assert not re.search(rb"(?im)^(x-tenant|x-campaign|x-queue-class)\s*:", head), head
    assert b"\r\n sale" not in head, "a folded header goes with its continuation line"
    assert b"Subject: test" in head and b"X-Tenant: a body line that stays" in body
    rec, = _records(d, "Delivery", 1)
    assert (rec["tenant"], rec["campaign"]) == ("acme", "spring"), rec   # first line only
    assert rec["host"] == "mx.test.example", rec
    iso = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(iso.timestamp() - rec["time"]) < 0.002, (rec["ts"], rec["time"])
    key = load_key(d.workdir / "var" / "suppression" / "suppression.key")
    assert rec["recipient"] == hash_text(address_hash(key, "bob@example.test")), \
        "hashed like `mta suppress` exports it (case-normalised), so records join"
    assert rec["sender"] == "sender.test"
    reception, = d.log_records("Reception")
    assert reception["recipients"] == [rec["recipient"]] and reception["sender"] == "sender.test"
    assert "Bob@example.test" not in (d.log_dir / "mta.jsonl").read_text()


def test_dsn_has_no_unsubscribe_and_its_bounce_suppresses_nobody(daemon_factory, dns_server,
                                                                 receivers):
    receivers(f"{NET}.2")
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server,
                '[unsubscribe]\nbase_url = "https://unsub.test"\nadd_headers = true\n'
                '[bounces]\ndomain = "bounces.test"\n')
    # the DSN for reject-b goes to carol; the DSN for reject-c goes to reject-sender, whose
    # MX refuses it (a hard bounce of our own null-sender mail)
    _submit(d.port, "carol@sender.test", ["reject-b@example.test"])
    _submit(d.port, "reject-sender@sender.test", ["reject-c@example.test"])
    (dsn_from, dsn_to, dsn), = dsn_box.wait(1)
    assert dsn_to == ["carol@sender.test"] and dsn_from in ("", "<>")
    head = dsn.split(b"\r\n\r\n")[0]
    assert b"List-Unsubscribe" not in head, head
    bounces = _records(d, "Bounce", 3)
    dsn_bounce = [b for b in bounces if b["sender"] == ""]
    assert [b["recipient"] for b in dsn_bounce] == ["reject-sender@sender.test"], bounces
    assert all(b["hard"] for b in bounces), "all three are hard bounces"
    d.stop()
    store = SuppressionList(d.workdir / "var" / "suppression" / "suppression.sqlite",
                            load_key(d.workdir / "var" / "suppression" / "suppression.key"))
    try:
        assert store.check("reject-b@example.test") is not None, "a recipient's hard bounce suppresses"
        assert store.check("reject-sender@sender.test") is None, \
            "a bounce of our own DSN must not suppress the sender"
    finally:
        store.close()


def test_no_dsn_tenants_get_no_dsn(daemon_factory, dns_server, receivers):
    receivers(f"{NET}.2")
    dsn_box = receivers(f"{NET}.3")
    d = _daemon(daemon_factory, dns_server, 'no_dsn_tenants = ["quiet corp"]\n')
    _submit(d.port, "q@sender.test", ["reject-q@example.test"], "X-Tenant: quiet corp\r\n")
    first, = _records(d, "Bounce", 1)
    assert first["tenant"] == "quiet corp"
    _submit(d.port, "loud@sender.test", ["reject-l@example.test"], "X-Tenant: loud\r\n")
    (_, dsn_to, _), = dsn_box.wait(1)
    _records(d, "Bounce", 2)
    time.sleep(1.0)   # the quiet one bounced first; its DSN would have been queued before
    assert [m[1] for m in dsn_box.messages] == [["loud@sender.test"]], dsn_box.messages


def test_site_failure_records_name_each_recipient(daemon_factory, dns_server, receivers):
    """No MX takes a connection (nobody listens on mx1 or mx2): every TransientFailure
    record still names its recipient, tenant and campaign."""
    d = _daemon(daemon_factory, dns_server)
    _submit(d.port, "alice@sender.test", ["x@example.test", "y@example.test"],
            "X-Tenant: acme\r\nX-Campaign: c1\r\n")
    recs = _records(d, "TransientFailure", 2)
    assert sorted(r["recipient"] for r in recs[:2]) == ["x@example.test", "y@example.test"], recs
    assert {(r["tenant"], r["campaign"]) for r in recs} == {("acme", "c1")}
