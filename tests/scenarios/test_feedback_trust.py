"""Feedback trust, attacked from outside (issue 10): returned mail changes state only
through a VERP address we issued for that very recipient, or from a trusted FBL source.

A real daemon delivers to aiosmtpd receivers (127.0.7.x:25, found through the test DNS
server), so the genuine VERP return paths come off the wire, as an attacker who received
our mail would see them. The attacker then talks SMTP (smtplib) to the bounce domain.
"""
from __future__ import annotations

import os
import smtplib
import time

from peers import NET, _records, _send
from test_bounces import BOUNCE_DOMAIN, _admin, _arf, _dsn, _feedback_daemon, _key, _refused

from mta.feedback import verp

GLOBAL = '[suppression]\ncomplaint_scope = "global"\n'


def _genuine_return_paths(d, mx, rcpts: list[str]) -> dict[str, str]:
    """Send one message to `rcpts` through the daemon; each recipient's MAIL FROM."""
    _send(d.port, "alice@sender.test", rcpts)
    return {got[0]: mail_from for mail_from, got, _ in mx.wait(len(rcpts))}


def _submit(port: int, rcpt: str, content: bytes, sender: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail(sender, [rcpt], content)


def _suppressed(d, rcpt: str) -> bool:
    refusal = _refused(d.port, rcpt)
    assert refusal == "" or (refusal.startswith("550") and "suppressed" in refusal), refusal
    return refusal != ""


def test_forged_arf_to_any_bounce_address_suppresses_nobody(daemon_factory):
    # an outsider, no VERP address at all: the report names a victim and our source IP
    d = _feedback_daemon(daemon_factory, extra='[[source]]\nname = "ip-one"\naddress = "127.0.0.1"\n'
                         + GLOBAL)
    _submit(d.port, f"fbl-{os.urandom(4).hex()}@{BOUNCE_DOMAIN}",
            _arf("victim@example.test", "127.0.0.1", "acme"), sender="fbl@isp.test")
    fb, = _records(d, "Feedback", 1)
    assert (fb["recipient"], fb["suppressed"]) == ("victim@example.test", None), f"got {fb}"
    assert not _suppressed(d, "victim@example.test")
    assert _admin(d, "/queue/summary")["feedback"] == {}, "no complaint is counted"
    assert (fb["proof"], fb["ignored"]) == (None, "no_verp"), f"got {fb}"


def test_arf_with_our_return_path_acts_only_on_its_recipient(daemon_factory, dns_server,
                                                             receivers):
    mx = receivers(f"{NET}.2")
    d = _feedback_daemon(daemon_factory, dns_server, extra=GLOBAL)
    paths = _genuine_return_paths(d, mx, ["bob@example.test", "eve@example.test"])
    # bob got our mail, so he holds a genuine return path; he reports eve with it
    _submit(d.port, f"fbl@{BOUNCE_DOMAIN}",
            _arf("eve@example.test", "127.0.0.1", "acme", return_path=paths["bob@example.test"]))
    fb, = _records(d, "Feedback", 1)
    assert (fb["recipient"], fb["suppressed"]) == ("eve@example.test", None), f"got {fb}"
    assert not _suppressed(d, "eve@example.test")
    assert fb["ignored"] == "verp_mismatch", f"got {fb}"
    # a feedback loop returning bob's original (one fixed address, proof inside) acts on bob
    _submit(d.port, f"fbl@{BOUNCE_DOMAIN}",
            _arf("bob@example.test", "127.0.0.1", "acme", return_path=paths["bob@example.test"]))
    fb = _records(d, "Feedback", 2)[1]
    assert (fb["recipient"], fb["suppressed"], fb["proof"], fb["ignored"]) == (
        "bob@example.test", "global", "verp_return_path", None), f"got {fb}"
    assert _suppressed(d, "bob@example.test")
    assert not _suppressed(d, "eve@example.test")


def test_dsn_to_a_genuine_verp_address_acts_only_on_its_recipient(daemon_factory, dns_server,
                                                                  receivers):
    mx = receivers(f"{NET}.2")
    d = _feedback_daemon(daemon_factory, dns_server)
    paths = _genuine_return_paths(d, mx, ["bob@example.test"])
    _submit(d.port, paths["bob@example.test"],
            _dsn("bob@example.test", "5.1.1", "550 5.1.1 user unknown",
                 also=("eve@example.test", "carol@example.test")))
    recs = {r["recipient"]: r for r in _records(d, "OOB", 3)}
    assert not _suppressed(d, "eve@example.test") and not _suppressed(d, "carol@example.test")
    assert _suppressed(d, "bob@example.test")
    rows = _admin(d, "/queue/summary")["feedback"]
    assert sum(c["hard_bounces"] for c in rows.values()) == 1, f"got {rows}"
    assert (recs["bob@example.test"]["suppressed"], recs["bob@example.test"]["proof"]) == (
        "global", "verp_envelope"), f"got {recs['bob@example.test']}"
    for other in ("eve@example.test", "carol@example.test"):
        assert (recs[other]["suppressed"], recs[other]["ignored"]) == (None, "verp_mismatch"), \
            f"got {recs[other]}"


def test_expired_verp_address_is_ignored(daemon_factory):
    d = _feedback_daemon(daemon_factory)
    # minted for a message received 40 days ago (default verp_expiry 30d)
    long_ago = time.time() - 40 * 86400
    path = verp.encode(os.urandom(16), 0, "old@example.test", long_ago + 30 * 86400,
                       _key(d), "b", BOUNCE_DOMAIN)
    _submit(d.port, path, _dsn("old@example.test", "5.1.1", "550 5.1.1 user unknown"))
    oob, = _records(d, "OOB", 1)
    assert not _suppressed(d, "old@example.test")
    assert (oob["suppressed"], oob["ignored"]) == (None, "verp_expired"), f"got {oob}"


def test_trusted_fbl_source_acts_without_verp(daemon_factory):
    d = _feedback_daemon(daemon_factory, extra='trusted_fbl_sources = ["127.0.0.1/32"]\n' + GLOBAL)
    _submit(d.port, f"fbl@{BOUNCE_DOMAIN}", _arf("dora@example.test", "192.0.2.1", "acme"))
    fb, = _records(d, "Feedback", 1)
    assert (fb["suppressed"], fb["proof"], fb["ignored"]) == ("global", "trusted_source", None), \
        f"got {fb}"
    assert _suppressed(d, "dora@example.test")
    # a DSN is no complaint: the trusted source does not vouch for it
    _submit(d.port, f"postmaster@{BOUNCE_DOMAIN}",
            _dsn("fred@example.test", "5.1.1", "550 5.1.1 user unknown"))
    oob, = _records(d, "OOB", 1)
    assert (oob["suppressed"], oob["ignored"]) == (None, "no_verp"), f"got {oob}"
