"""The RCPT policy: the native core's `rcpt_check` hook and mta/feedback/rcpt_policy.py,
against a real SuppressionList in a temporary directory (no daemon, no sockets)."""
from __future__ import annotations

import time

import pytest

from mta._native.wire import ServerCore
from mta.config import parse_config
from mta.feedback.rcpt_policy import RecipientPolicy
from mta.feedback.state import Feedback
from mta.ingest.settings import server_settings
from mta.model.replies import REPLIES, reply


def _feedback(tmp_path, extra: str = "", bounces: str = "") -> Feedback:
    cfg = parse_config(f'[bounces]\ndomain = "bounces.test"\n{bounces}\n[suppression]\n'
                       f'store = "{tmp_path}/s.sqlite"\nkey_file = "{tmp_path}/k"\n{extra}')
    return Feedback(cfg)


def _core(policy: RecipientPolicy | None, relay: bool, max_errors: int = 10) -> ServerCore:
    settings = server_settings("mx.test", "t", max_errors=max_errors)
    if policy is not None:
        settings.rcpt_check = policy.rcpt_check
    core = ServerCore(settings, relay)
    core.feed(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\n")
    return core


def test_hook_bounce_domain_from_anyone_suppressed_refused_not_counted(tmp_path):
    fb = _feedback(tmp_path)
    fb.suppress("gone@example.test", "global", "hard_bounce")
    fb.suppress("dom@example.test", "domain:sender.test", "manual")
    outsider = _core(RecipientPolicy(fb), relay=False, max_errors=3)
    out, _ = outsider.feed(b"RCPT TO:<x@Bounces.Test>\r\n")
    assert out == reply("RCPT_OK"), "the bounce domain is open to any client"
    out, _ = outsider.feed(b"RCPT TO:<other@example.test>\r\nRCPT TO:<gone@example.test>\r\n")
    assert out == reply("RELAY_DENIED") * 2, "outsiders cannot tell who is suppressed"
    out, _ = outsider.feed(b"RCPT TO:<gone@example.test>\r\n")
    assert out.startswith(b"421 4.7.0") and outsider.closed, "probes count as errors"
    core = _core(RecipientPolicy(fb), relay=True, max_errors=2)
    for _ in range(3):   # three refusals with max_errors=2: the session stays open
        out, _ = core.feed(b"RCPT TO:<gone@example.test>\r\n")
        assert out == REPLIES["SUPPRESSED"].line("gone@example.test", "hard_bounce")
    out, _ = core.feed(b"RCPT TO:<dom@example.test>\r\n")
    assert out.startswith(b"550 5.7.1 <dom@example.test>: recipient is suppressed (manual)")
    assert [r[0] for r in core.rejections] == ["SUPPRESSED"] * 4
    assert not core.closed
    fb.close()


def test_no_hook_when_nothing_is_configured_keeps_relay_rules(tmp_path):
    core = _core(None, relay=True)
    out, _ = core.feed(b"RCPT TO:<any@example.test>\r\n")
    assert out == reply("RCPT_OK")


def test_drop_mode_accepts_at_rcpt_and_filter_removes(tmp_path):
    fb = _feedback(tmp_path, 'on_match = "drop"\n')
    fb.suppress("gone@example.test", "global", "unsubscribe")
    fb.suppress("t@example.test", "tenant:acme", "complaint")
    policy = RecipientPolicy(fb)
    assert policy.rcpt_check("gone@example.test", "a@sender.test", True) is None
    rcpts = [("gone@example.test", None, None), ("ok@example.test", None, None),
             ("t@example.test", None, None), ("x@bounces.test", None, None)]
    dropped = policy.filter(rcpts, "a@sender.test", "acme")
    assert [r[0] for r in rcpts] == ["ok@example.test", "x@bounces.test"]
    assert dropped == [("gone@example.test", "global", "unsubscribe"),
                       ("t@example.test", "tenant:acme", "complaint")]
    fb.close()


def test_hard_bounce_expiry_and_counters(tmp_path):
    fb = _feedback(tmp_path, 'hard_bounce_expiry = "1h"\n')
    assert fb.hard_bounce("h@example.test", "ip1", "mx.example.test", "550 5.1.1")
    entry = fb.suppressions.check("h@example.test")
    assert entry.reason == "hard_bounce" and entry.scope == "global"
    assert abs(entry.expires - (time.time() + 3600)) < 5
    assert fb.complaint("c@example.test", "acme", "ip1", "mx.example.test") == "tenant:acme"
    assert fb.counts[("ip1", "mx.example.test")] == {"hard_bounces": 1, "complaints": 1}
    fb.close()


def test_bad_verp_prefix_fails_at_start(tmp_path):
    with pytest.raises(ValueError):
        _feedback(tmp_path, bounces='verp_prefix = "x_y"')


def test_suppressions_from_a_burst_are_written_in_one_transaction(tmp_path):
    """10,000 hard bounces in one loop iteration: one SQLite transaction (one fsync),
    every address suppressed afterwards, nothing visible before the batch is written."""
    import asyncio
    fb = _feedback(tmp_path)
    seq = lambda: fb.suppressions._db.execute(  # noqa: E731
        "SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]

    async def burst() -> tuple[int, bool, int]:
        before = seq()
        for i in range(10000):
            fb.hard_bounce(f"gone{i}@example.org", "s1", "mx.example.org")
        visible_early = fb.suppressions.check("gone5@example.org") is not None
        await asyncio.sleep(0.01)          # the batch runs on the next loop turn
        return seq() - before, visible_early, fb.suppressions.count()

    transactions, visible_early, count = asyncio.run(burst())
    assert transactions == 1, f"got {transactions} transactions, want 1 for the whole burst"
    assert not visible_early
    assert count == 10000
    assert fb.suppressions.check("Gone9999@Example.org").reason == "hard_bounce"
    fb.close()
