"""mta.feedback.trust without a daemon: where proof is looked for, what it may act on,
and what a hostile report costs (a real Feedback with its key and suppression store in a
temporary directory; Reports built as the parser returns them)."""
from __future__ import annotations

import email
import os
import time

import pytest

from mta.feedback import verp
from mta.feedback.bounce.report import FailedRecipient, Feedback as Arf, Report
from mta.config import ConfigError, parse_config
from mta.feedback.state import Feedback
from mta.model.envelope import Envelope, Recipient
from mta.feedback.trust import (CHECK_BUDGET, ENVELOPE, MAX_CHECKS, MAX_TOKENS, NO_RECIPIENT,
                                NO_VERP, ORIGINAL_MAIL_FROM, RETURN_PATH, TRUSTED_SOURCE,
                                Evidence)

DOMAIN = "bounces.test"


def _feedback(tmp_path, bounces: str = "") -> Feedback:
    cfg = parse_config(f'[bounces]\ndomain = "{DOMAIN}"\n{bounces}\n[suppression]\n'
                       f'store = "{tmp_path}/s.sqlite"\nkey_file = "{tmp_path}/k"\n')
    return Feedback(cfg)


def _path(fb: Feedback, rcpt: str, index: int = 0) -> str:
    return fb.verp_sender(os.urandom(16), index, rcpt, time.time())


def _env(*rcpts: str, client_ip: str = "192.0.2.9") -> tuple[Envelope, list[int]]:
    return (Envelope("", "", [Recipient(r) for r in rcpts], client_ip=client_ip),
            list(range(len(rcpts))))


def _bounce(*rcpts: str) -> Report:
    return Report(kind="bounce", recipients=[
        FailedRecipient(r, "5.1.1", 550, "user unknown", "failed", hard=True) for r in rcpts])


def _complaint(rcpt: str | None, original: str = "", mail_from: str | None = None) -> Report:
    return Report(kind="feedback", feedback=Arf("abuse", original_rcpt_to=rcpt,
                                                original_mail_from=mail_from),
                  original_headers=email.message_from_string(original + "Subject: x\n\nhi\n"))


def test_each_place_of_proof(tmp_path):
    fb = _feedback(tmp_path)
    bob = _path(fb, "bob@example.test")
    env, idxs = _env(bob)
    assert Evidence(fb, env, idxs, _bounce("bob@example.test")).prove(
        "bob@example.test").proof == ENVELOPE
    env, idxs = _env(f"fbl@{DOMAIN}")
    for report, where in ((_complaint("bob@example.test", f"Return-Path: <{bob}>\n"), RETURN_PATH),
                          (_complaint("bob@example.test", mail_from=f"<{bob}>"), ORIGINAL_MAIL_FROM)):
        rcpt, verdict = Evidence(fb, env, idxs, report).first_proven([report.feedback.original_rcpt_to])
        assert (rcpt, verdict.proof, verdict.ignored) == ("bob@example.test", where, None)
        assert verdict.fields(None)["verp"] is True


def test_a_redacted_named_recipient_falls_back_to_the_proven_one(tmp_path):
    # some feedback loops redact Original-Rcpt-To but leave the original's To
    fb = _feedback(tmp_path)
    report = _complaint("redacted@example.test", f"Return-Path: {_path(fb, 'bob@example.test')}\n")
    named = [report.feedback.original_rcpt_to, "Bob@Example.test"]
    rcpt, verdict = Evidence(fb, *_env(f"fbl@{DOMAIN}"), report).first_proven(named)
    assert (rcpt, verdict.proof) == ("Bob@Example.test", RETURN_PATH)
    rcpt, verdict = Evidence(fb, *_env(f"fbl@{DOMAIN}"), report).first_proven(named[:1])
    assert (rcpt, verdict.proof, verdict.ignored) == ("redacted@example.test", None, "verp_mismatch")
    assert Evidence(fb, *_env(f"fbl@{DOMAIN}"), report).first_proven([None, " <> "])[1].ignored \
        == NO_RECIPIENT


def test_reasons(tmp_path):
    fb = _feedback(tmp_path)
    env, idxs = _env(f"anything@{DOMAIN}")
    assert Evidence(fb, env, idxs, _bounce("x@example.test")).prove("x@example.test").ignored == NO_VERP
    legacy = "b-aaaqeayeaudaocajbifqydiob47-c5igdu7sobglko5w@" + DOMAIN   # the first form
    got = Evidence(fb, *_env(legacy), _bounce("x@example.test")).prove("x@example.test")
    assert (got.proof, got.ignored) == (None, "verp_mismatch"), "not ours: another key"
    old = fb.verp_sender(os.urandom(16), 0, "old@example.test", time.time() - 40 * 86400)
    got = Evidence(fb, *_env(old), _bounce("old@example.test")).prove("old@example.test")
    assert (got.proof, got.ignored) == (None, "verp_expired")


def test_trusted_source_vouches_for_complaints_only(tmp_path):
    fb = _feedback(tmp_path, 'trusted_fbl_sources = ["127.0.0.0/8", "2001:db8::/32"]')
    for ip in ("127.0.0.1", "::ffff:127.0.0.2", "2001:db8::5"):
        env, idxs = _env(f"fbl@{DOMAIN}", client_ip=ip)
        assert Evidence(fb, env, idxs, _complaint("dora@example.test")).first_proven(
            ["dora@example.test"])[1].proof == TRUSTED_SOURCE, ip
        assert Evidence(fb, env, idxs, _bounce("dora@example.test")).prove(
            "dora@example.test").ignored == NO_VERP, "a DSN needs its VERP proof"
    for ip in ("192.0.2.1", "::1", "", None, "not an ip"):
        env, idxs = _env(f"fbl@{DOMAIN}", client_ip=ip)
        assert Evidence(fb, env, idxs, _complaint("dora@example.test")).first_proven(
            ["dora@example.test"])[1].proof is None, ip


def test_hostile_report_cost_is_bounded(tmp_path):
    # 1,000 envelope recipients shaped like return paths (forged MACs), the genuine one
    # last, and a DSN naming 5,000 addresses: a few tokens, a few hundred HMACs
    fb = _feedback(tmp_path)
    forged = [verp.encode(os.urandom(16), i, "x@example.test", time.time() + 86400, b"k" * 32,
                          "b", DOMAIN) for i in range(1000)]
    env, idxs = _env(*forged, _path(fb, "victim@example.test"))
    names = [f"user{i}@example.test" for i in range(5000)]
    start = time.perf_counter()
    evidence = Evidence(fb, env, idxs, _bounce(*names))
    verdicts = [evidence.prove(n) for n in names]
    elapsed = time.perf_counter() - start
    assert len(evidence.tokens) == MAX_TOKENS and evidence.checks == MAX_CHECKS
    assert {v.ignored for v in verdicts} == {"verp_mismatch", CHECK_BUDGET}
    assert all(v.proof is None for v in verdicts)
    assert elapsed < 1.0, f"{elapsed:.3f} s for a hostile report"   # ~10 ms unloaded
    # a genuine report: one return path, one recipient
    env, idxs = _env(_path(fb, "victim@example.test"))
    assert Evidence(fb, env, idxs, _bounce("victim@example.test")).prove(
        "victim@example.test").proof == ENVELOPE


def test_verp_expiry_must_outlive_max_age(tmp_path):
    with pytest.raises(ConfigError) as err:
        _feedback(tmp_path, 'verp_expiry = "5d"')     # [delivery] max_age defaults to 5d
    assert err.value.problems[0].startswith("bounces.verp_expiry: 432000s is not longer than "
                                            "delivery.max_age (432000s)"), err.value.problems
    assert _feedback(tmp_path, 'verp_expiry = "6d"').verp_expiry == 6 * 86400
