"""The operator views (mta/control/views.py) built from a real DeliveryEngine on virtual
time (the rig of tests/test_dispatcher_unit.py): what they hold, that `to_json()` is the
admin API's historic wire format key for key, that `from_json()` reads it back to an equal
value, and that the CLI formats `mta queue summary|count|inspect` and `mta shaping show`
from a parsed view. The daemon serving these over HTTP is tests/scenarios/test_delivery.py
and test_egress.py."""
from __future__ import annotations

import pytest
from test_dispatcher_unit import SITE, Rig

from mta import cli
from mta.control import cli as control_cli
from mta.control.views import (
    MessageView,
    OutcomeCounts,
    QueueSummary,
    ShapingRow,
    message_view,
    queue_summary,
    shaping_rows,
    view_routes,
)
from mta.model.attempt import RemoteReply
from mta.model.ids import id_text
from mta.model.queued import InsertReason

# the JSON keys the admin API served before the views existed, in their order: scripts and
# the scenario tests read them
SUMMARY_KEYS = ["scheduled", "ready", "connections", "wheel", "inserts", "outcomes", "feedback"]
SCHEDULED_KEYS = ["count", "site", "class", "pool", "backlog", "held", "suspended",
                  "suspended_until"]
READY_KEYS = ["count", "connections", "sent", "queues"]
OUTCOME_KEYS = ["delivered", "bounced", "deferred", "expired"]
SHAPING_KEYS = ["source", "site", "matched", "connections", "peak_connections",
                "connection_limit", "site_connections", "site_connection_limit",
                "max_message_rate", "max_connection_rate", "max_deliveries_per_connection",
                "tls", "ready", "sent", "backoffs", "hard_bounces", "complaints", "paused_until"]
MESSAGE_KEYS = ["id", "envelope", "size", "headers", "recipients"]


@pytest.fixture
def engine_after_three_outcomes(monkeypatch, tmp_path):
    """One message delivered, one bounced, one deferred (waiting in its scheduled queue)."""
    r = Rig(monkeypatch, tmp_path, shaping='["default"]\nmax_message_rate = "60/m"\n')
    r.net.replies["gone@example.test"] = RemoteReply(550, "5.1.1", "no such user")
    r.net.replies["later@example.test"] = RemoteReply(451, "4.2.0", "try later")
    for rcpt in ("ok@example.test", "gone@example.test", "later@example.test"):
        r.send(1, rcpt)
    r.loop.settle(10)
    yield r
    r.close()


def test_queue_summary_holds_the_engine_state(engine_after_three_outcomes):
    r = engine_after_three_outcomes
    s = queue_summary(r.engine)
    assert s.outcomes == OutcomeCounts(delivered=1, bounced=1, deferred=1, expired=0), \
        f"got {s.outcomes}"
    (row,) = s.scheduled.values()
    assert (row.count, row.site, row.suspended, row.suspended_until) == (1, SITE, False, None), \
        f"got {row}, want the deferred message waiting for {SITE}"
    assert s.queued == 1
    (ready_name, ready), = s.ready.items()
    assert ready_name == f"default->{SITE}" and ready.sent == 3, f"got {ready_name}: {ready}"
    assert s.inserts[InsertReason.RECEIVED] == 3 and s.inserts[InsertReason.TRANSIENT_FAILURE] == 1
    assert s.wheel == 1 and s.feedback == {}


def test_queue_summary_wire_format_round_trips(engine_after_three_outcomes):
    s = queue_summary(engine_after_three_outcomes.engine)
    wire = s.to_json()
    assert list(wire) == SUMMARY_KEYS, f"got {list(wire)}, want {SUMMARY_KEYS}"
    (row,) = wire["scheduled"].values()
    assert list(row) == SCHEDULED_KEYS, f"got {list(row)}"
    (ready,) = wire["ready"].values()
    assert list(ready) == READY_KEYS, f"got {list(ready)}"
    assert list(wire["outcomes"]) == OUTCOME_KEYS
    assert wire["inserts"]["received"] == 3, "insert reasons are keyed by their value"
    assert QueueSummary.from_json(wire) == s


def test_shaping_row_holds_limits_and_counters(engine_after_three_outcomes):
    (row,) = shaping_rows(engine_after_three_outcomes.engine)
    assert (row.source, row.site, row.sent, row.max_message_rate) == ("default", SITE, 3, "60/m"), \
        f"got {row}"
    assert row.paused_until is None and row.connection_limit >= 1
    wire = row.to_json()
    assert list(wire) == SHAPING_KEYS, f"got {list(wire)}, want {SHAPING_KEYS}"
    assert ShapingRow.from_json(wire) == row


def test_message_view_of_a_queued_message(engine_after_three_outcomes):
    r = engine_after_three_outcomes
    (msg_id, (env, content)), = [(i, m) for i, m in r.spool.messages.items()
                                 if i not in r.spool.finished]
    view = message_view(r.engine, id_text(msg_id))
    assert view is not None and view.envelope == env
    assert (view.size, view.headers) == (len(content), "Subject: test\r\n"), f"got {view}"
    wire = view.to_json()
    assert list(wire) == MESSAGE_KEYS and wire["envelope"]["rcpts"] == [["later@example.test",
                                                                         None, None]]
    assert MessageView.from_json(wire) == view
    finished = r.spool.finished[0]
    assert message_view(r.engine, id_text(finished)) is None, "a finished message is not queued"
    with pytest.raises(ValueError):
        message_view(r.engine, "not-an-id")


def test_routes_serve_the_views_json(engine_after_three_outcomes):
    r = engine_after_three_outcomes
    routes = view_routes(r.engine)
    assert routes["/queue/summary"]("") == queue_summary(r.engine).to_json()
    assert routes["/shaping"]("") == [row.to_json() for row in shaping_rows(r.engine)]
    assert routes["/queue/messages"](id_text(r.spool.finished[0])) is None   # the API's 404


def test_unknown_outcome_counter_is_an_error_not_dropped():
    with pytest.raises(TypeError):
        OutcomeCounts.from_json({"delivered": 1, "bounced": 0, "deferred": 0, "expired": 0,
                                 "quarantined": 2})


def _serve(monkeypatch, engine) -> None:
    """The CLI asks this engine's routes instead of a daemon over HTTP."""
    routes = view_routes(engine)

    def admin_get(args, path, body=None):
        for prefix, handler in routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                value = handler(path[len(prefix) + 1:])
                return (200, value) if value is not None else (404, {"error": "not found"})
        raise AssertionError(f"the CLI asked for {path}")
    monkeypatch.setattr(control_cli, "_request", admin_get)


def test_cli_formats_the_parsed_views(engine_after_three_outcomes, monkeypatch, capsys):
    r = engine_after_three_outcomes
    _serve(monkeypatch, r.engine)
    s = queue_summary(r.engine)
    (queue_name,) = s.scheduled
    assert cli.main(["queue", "summary"]) == 0
    out = capsys.readouterr().out
    assert f"{queue_name:<50} {1:>8}  {SITE}" in out, out
    assert f"default->{SITE}" in out and "'delivered': 1" in out, out
    assert cli.main(["queue", "count"]) == 0
    assert capsys.readouterr().out == "1\n"
    assert cli.main(["shaping", "show"]) == 0
    (_header, line) = capsys.readouterr().out.splitlines()
    assert line.split() == ["default", SITE, "0", str(shaping_rows(r.engine)[0].connection_limit),
                            "3", "60/m", "0", "3", "running"], f"got {line}"
    queued = next(i for i in r.spool.messages if i not in r.spool.finished)
    assert cli.main(["queue", "inspect", id_text(queued)]) == 0
    assert "later@example.test" in capsys.readouterr().out
