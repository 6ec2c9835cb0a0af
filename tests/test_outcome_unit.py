"""Outcomes applied (mta/delivery/outcome.py) on an injected clock: what a delivery,
a bounce, a deferral and an expiry do to the spool (tombstone, RCPTS_DONE), the
scheduled queue (retry due time, entry finished), the log records and DSNs. The
spool is a dict, the scheduler two callbacks, the log a list."""
from __future__ import annotations

import email

import pytest
from delivery_fakes import FakeSpool, make_id
from virtual_time import VirtualClock

from mta.delivery.outcome import Outcomes
from mta.model.attempt import Attempt, AttemptResult, RemoteReply
from mta.model.envelope import Envelope, Recipient
from mta.model.ids import id_text
from mta.model.log_records import RecordType
from mta.model.queued import DELAY_DSN_SENT, InsertReason, QueuedMessage
from mta.queues.retry import RetryPolicy
from mta.queues.scheduled import ScheduledQueue

OK = RemoteReply(250, "2.0.0", "ok")
GONE = RemoteReply(550, "5.1.1", "no such user")
LATER = RemoteReply(451, "4.2.0", "try later")
HOUR = 3600.0


class Logs:
    def __init__(self) -> None:
        self.records: list[tuple[RecordType, dict]] = []

    def log(self, rtype: RecordType, **fields) -> None:
        self.records.append((rtype, fields))

    def types(self) -> list[str]:
        return [t.value for t, _ in self.records]


class Rig:
    def __init__(self, delay_dsn_after: float = 0.0) -> None:
        self.clock = VirtualClock()
        self.spool = FakeSpool()
        self.logs = Logs()
        self.scheduled: list[tuple[QueuedMessage, float, InsertReason]] = []
        self.finished: list[QueuedMessage] = []
        self.dsns: list[tuple[str, list[str], bytes]] = []
        self.queue = ScheduledQueue("example.test", "example.test", "", "")
        self.outcomes = Outcomes(
            spool=self.spool, schedule=lambda m, due, why: self.scheduled.append((m, due, why)),
            finished=self.finished.append, logs=self.logs,
            retry=RetryPolicy(initial=600, maximum=4 * HOUR, max_age=24 * HOUR),
            inject=lambda s, r, c: self.dsns.append((s, r, c)), hostname="mx.test",
            delay_dsn_after=delay_dsn_after, clock=self.clock)

    def message(self, *rcpts: str, sender: str = "a@x.test", age: float = 0.0,
                notify: str | None = None, entries: int = 1) -> tuple[QueuedMessage, Envelope]:
        msg_id = make_id(self.clock() - age)
        env = self.spool.add(msg_id, sender, list(rcpts))
        env.recipients = [Recipient(r, notify) for r in rcpts]
        msg = QueuedMessage(msg_id, self.queue, tuple(range(len(rcpts))))
        if entries > 1:
            self.outcomes.track([msg] * entries)
        return msg, env

    def attempt(self, msg, env, replies) -> None:
        """One transaction for all of the entry's recipients, then settle."""
        self.outcomes.apply(AttemptResult(msg, env, Attempt("s1", "mx.example", "mx.example",
                                                            "127.0.0.1"),
                                          list(zip(msg.rcpts, replies))))


@pytest.fixture
def rig():
    return Rig()


def test_delivered_message_is_tombstoned_and_logged(rig):
    msg, env = rig.message("ok@example.test")
    rig.attempt(msg, env, [OK])
    assert rig.spool.finished == [msg.id] and rig.finished == [msg]
    assert rig.logs.types() == ["Delivery"] and not rig.scheduled and not rig.dsns
    fields = rig.logs.records[0][1]
    assert (fields["recipient"], fields["code"], fields["attempt"]) == ("ok@example.test", 250, 1)


def test_one_entry_of_several_writes_rcpts_done_not_a_tombstone(rig):
    msg, env = rig.message("a@example.test", "b@example.test", entries=2)
    first = QueuedMessage(msg.id, rig.queue, (0,))
    second = QueuedMessage(msg.id, rig.queue, (1,))
    rig.attempt(first, env, [OK])
    assert rig.spool.rcpts_done == [(msg.id, [0])] and rig.spool.finished == []
    rig.attempt(second, env, [OK])
    assert rig.spool.finished == [msg.id], "the last entry finishes the message"


def test_bounce_sends_one_dsn_to_the_sender_naming_the_recipient(rig):
    msg, env = rig.message("ok@example.test", "gone@example.test")
    rig.attempt(msg, env, [OK, GONE])
    assert rig.logs.types() == ["Delivery", "Bounce"]
    assert rig.spool.finished == [msg.id], "both recipients are final"
    ((sender, to, dsn),) = rig.dsns
    assert (sender, to) == ("", ["a@x.test"]), "a DSN comes from the null sender"
    report = email.message_from_bytes(dsn)
    text = dsn.decode("utf-8", "replace")
    assert report.get_content_type() == "multipart/report"
    assert "gone@example.test" in text and "5.1.1" in text and "ok@example.test" not in text


@pytest.mark.parametrize("sender, notify", [("", None), ("a@x.test", "NEVER")])
def test_no_dsn_to_the_null_sender_or_when_never_asked(rig, sender, notify):
    msg, env = rig.message("gone@example.test", sender=sender, notify=notify)
    rig.attempt(msg, env, [GONE])
    assert rig.dsns == [] and rig.logs.types() == ["Bounce"]


def test_deferral_schedules_the_retry_with_backoff_on_the_clock(rig):
    msg, env = rig.message("ok@example.test", "later@example.test")
    rig.attempt(msg, env, [OK, LATER])
    ((entry, due, why),) = rig.scheduled
    now = rig.clock()
    assert entry is msg and why is InsertReason.TRANSIENT_FAILURE
    assert now + 480 <= due <= now + 720, f"got due in {due - now:.0f}s, want 600 s +- 20 %"
    assert msg.rcpts == (1,) and msg.attempts == 1
    assert rig.spool.rcpts_done == [(msg.id, [0])], "the delivered one is done on disk"
    assert rig.finished == [] and rig.spool.finished == []
    rig.clock.advance(due - now)
    rig.attempt(msg, env, [LATER])
    due2 = rig.scheduled[1][1]
    assert rig.clock() + 960 <= due2 <= rig.clock() + 1440, "the second interval doubles"


def test_the_destinations_shaped_retry_policy_wins(rig):
    msg, env = rig.message("later@example.test")
    rig.outcomes.apply(AttemptResult(msg, env, Attempt("s1", "mx"), [(0, LATER)]),
                       RetryPolicy(initial=60, maximum=60, max_age=HOUR))
    due = rig.scheduled[0][1] - rig.clock()
    assert 48 <= due <= 72, f"got {due:.0f}s, want the shaped 60 s +- 20 %"


def test_a_message_past_max_age_expires_with_a_dsn(rig):
    msg, env = rig.message("later@example.test", age=24 * HOUR + 1)
    rig.attempt(msg, env, [LATER])
    assert rig.logs.types() == ["TransientFailure", "Expiration"]
    assert rig.scheduled == [] and rig.spool.finished == [msg.id] and rig.finished == [msg]
    assert rig.outcomes.counters["expired"] == 1
    ((_, to, dsn),) = rig.dsns
    assert to == ["a@x.test"] and b"4.4.7" in dsn


def test_the_last_retry_falls_on_the_expiry_time(rig):
    msg, env = rig.message("later@example.test", age=24 * HOUR - 100)
    rig.attempt(msg, env, [LATER])
    assert rig.scheduled[0][1] == pytest.approx(msg.received + 24 * HOUR)


def test_one_delay_dsn_once_the_message_waited_long_enough():
    rig = Rig(delay_dsn_after=HOUR)
    msg, env = rig.message("later@example.test")
    rig.attempt(msg, env, [LATER])
    assert rig.dsns == [], "too early for a delay notice"
    rig.clock.advance(HOUR)
    rig.attempt(msg, env, [LATER])
    rig.attempt(msg, env, [LATER])
    assert len(rig.dsns) == 1 and msg.flags & DELAY_DSN_SENT
    assert b"delayed" in rig.dsns[0][2]


def test_route_failure_bouncing_every_recipient_finishes_the_entry(rig):
    msg, env = rig.message("a@nowhere.test", "b@nowhere.test")
    rig.outcomes.apply(AttemptResult.all(msg, env, Attempt("", ""),
                                         RemoteReply(550, "5.1.2", "domain does not exist")))
    assert rig.logs.types() == ["Bounce", "Bounce"] and rig.spool.finished == [msg.id]
    assert len(rig.dsns) == 1 and rig.outcomes.counters["bounced"] == 2
    assert id_text(msg.id) in rig.dsns[0][2].decode("ascii", "replace")


def test_observers_see_each_result_after_it_is_applied(rig):
    seen = []
    rig.outcomes.observers.append(lambda r: seen.append((r.msg.id, [x.code for _, x in r.replies],
                                                         list(rig.spool.finished))))
    msg, env = rig.message("ok@example.test", "gone@example.test")
    rig.attempt(msg, env, [OK, GONE])
    assert seen == [(msg.id, [250, 550], [msg.id])], "called once, after the spool update"
