"""The node's view of several worker processes (mta/control/nodeview.py): merging each
view, the answer when a worker is missing, the /metrics merge, and the budget split of
mta/control/worker_config.py."""
from __future__ import annotations

import dataclasses

import orjson
import pytest

from mta.config import load_config
from mta.control import metrics as mx
from mta.control import nodeview as nv
from mta.control.fanout import NodeFanout
from mta.control.views import (AgeTable, FeedbackCounts, ListedMessage, LiveError, LiveHold,
                                LiveRow, LiveView, OutcomeCounts, QueueListing, QueueSummary,
                                ReadyRow, ScheduledRow)
from mta.model.node import WorkerSlot
from mta.model.queued import InsertReason


def _summary(count: int, *, site: str | None = "s1", held: int = 0,
             until: float | None = None, delivered: int = 0) -> QueueSummary:
    return QueueSummary(
        {"c:t@a.test": ScheduledRow(count, site, "bulk", "p", 1, held, until is not None, until)},
        {"src->s1": ReadyRow(2, 1, 10, {"c:t@a.test": 2})}, 1, 3,
        {InsertReason.RECEIVED: count}, OutcomeCounts(delivered, 1, 2, 0),
        {"src|s1": FeedbackCounts(1, 2)})


def test_summaries_sum_and_merge_rows_by_name():
    a = _summary(5, site=None, delivered=7)
    b = _summary(3, held=2, until=100.0, delivered=1)
    b.scheduled["c:t@b.test"] = ScheduledRow(4, None, "bulk", "p", 0, 0, False, None)
    m = nv.merge_summaries([a, b])
    row = m.scheduled["c:t@a.test"]
    assert (row.count, row.site, row.backlog, row.held, row.suspended,
            row.suspended_until) == (8, "s1", 2, 2, True, 100.0)
    assert m.scheduled["c:t@b.test"].count == 4 and m.queued == 12
    r = m.ready["src->s1"]
    assert (r.count, r.connections, r.sent, r.queues) == (4, 2, 20, {"c:t@a.test": 4})
    assert (m.connections, m.wheel) == (2, 6)
    assert m.inserts == {InsertReason.RECEIVED: 8}
    assert m.outcomes == OutcomeCounts(8, 2, 4, 0)
    assert m.feedback == {"src|s1": FeedbackCounts(2, 4)}
    assert a.scheduled["c:t@a.test"].count == 5     # the parts are not changed
    # through JSON, as the admin API and the CLI see it
    ans = nv.merge("GET", "/queue/summary", [nv.WorkerAnswer(0, 200, a.to_json()),
                                             nv.WorkerAnswer(1, 200, b.to_json())])
    assert ans.status == 200 and not ans.missing
    assert QueueSummary.from_json(ans.data).queued == 12


def test_ages_sum_per_row_and_bucket():
    t1 = AgeTable("queue", ["0-5m", "5m+"], {"q1": [1, 2]}, [1, 2])
    t2 = AgeTable("queue", ["0-5m", "5m+"], {"q1": [3, 0], "q2": [0, 1]}, [3, 1])
    m = nv.merge_ages([t1, t2])
    assert m.rows == {"q1": [4, 2], "q2": [0, 1]} and m.total == [4, 3]
    with pytest.raises(ValueError):
        nv.merge_ages([t1, AgeTable("queue", ["x"], {}, [0])])


def _listed(i: str) -> ListedMessage:
    return ListedMessage(i, "scheduled", 1, 0, None, 1.0)


def test_listings_concatenate_in_id_order_and_honour_the_limit():
    a = QueueListing("q", [_listed("01"), _listed("05"), _listed("07")], None)
    b = QueueListing("q", [_listed("02"), _listed("03")], None)
    m = nv.merge_listings([a, b], 10)
    assert [x.id for x in m.messages] == ["01", "02", "03", "05", "07"] and m.next is None
    m = nv.merge_listings([a, b], 3)
    assert [x.id for x in m.messages] == ["01", "02", "03"] and m.next == "03"
    # a worker with more than its page: the cursor is the last id shown
    m = nv.merge_listings([QueueListing("q", [_listed("01")], "01"), b], 3)
    assert [x.id for x in m.messages] == ["01", "02", "03"] and m.next == "03"
    # the limit comes from the request's query; a worker without the queue answers 404
    ans = nv.merge("GET", "/queue/list/q?limit=2", [
        nv.WorkerAnswer(0, 200, a.to_json()), nv.WorkerAnswer(1, 404, {"error": "no"})])
    assert ans.status == 200 and not ans.missing
    assert [x["id"] for x in ans.data["messages"]] == ["01", "05"] and ans.data["next"] == "05"


def test_message_found_on_the_worker_that_holds_it():
    view = {"id": "ab", "size": 3}
    ans = nv.merge("GET", "/queue/messages/ab", [nv.WorkerAnswer(0, 404, {"error": "nf"}),
                                                 nv.WorkerAnswer(1, 200, view)])
    assert (ans.status, ans.data, ans.missing) == (200, view, [])
    ans = nv.merge("GET", "/queue/messages/ab", [nv.WorkerAnswer(0, 404, {"error": "nf"}),
                                                 nv.WorkerAnswer(1, 404, {"error": "nf"})])
    assert ans.status == 404 and not ans.missing
    # not found on the one that answered, the other did not answer: not "not found"
    ans = nv.merge("GET", "/queue/messages/ab", [nv.WorkerAnswer(0, 404, {"error": "nf"}),
                                                 nv.WorkerAnswer(1, 0, None, "refused")])
    assert ans.status == 404 and [a.worker for a in ans.missing] == [1]
    assert ans.http()[0] == 502


def test_live_views_merge_rows_holds_and_errors():
    def view(at, delivered, until, err_at):
        return LiveView(at, OutcomeCounts(delivered, 0, 0, 0), 5, 2, 1, 1, 1,
                        [LiveRow("src", "s1", "p", delivered, 0, 0, 1, 1, 2, None)],
                        [LiveHold("queue", "q", None, until, "suspended")],
                        [LiveError(err_at, "deferred", "src", "s1", 451, "x")])
    m = nv.merge_live([view(10.0, 3, 50.0, 2.0), view(11.0, 4, 60.0, 1.0)])
    assert m.at == 11.0 and m.outcomes.delivered == 7 and m.received == 10
    assert len(m.rows) == 1 and m.rows[0].delivered == 7 and m.rows[0].scheduled == 4
    assert [h.until for h in m.holds] == [60.0]
    assert [e.at for e in m.errors] == [1.0, 2.0]


def test_holds_are_the_union():
    ans = nv.merge("GET", "/queue/holds", [
        nv.WorkerAnswer(0, 200, [{"domain": "a"}]),
        nv.WorkerAnswer(1, 200, [{"domain": "a"}, {"queue": "b"}])])
    assert ans.data == [{"domain": "a"}, {"queue": "b"}]


def test_a_missing_worker_is_named_and_http_answers_502_with_the_partial_view():
    a = _summary(5)
    ans = nv.merge("GET", "/queue/summary", [nv.WorkerAnswer(0, 200, a.to_json()),
                                             nv.WorkerAnswer(1, 0, None, "connection refused")])
    assert ans.status == 200 and ans.problems() == ["worker 1: connection refused"]
    status, body = ans.http()
    assert status == 502 and "worker 1: connection refused" in body["error"]
    assert body["missing"] == [{"worker": 1, "status": 0, "error": "connection refused"}]
    assert QueueSummary.from_json(body["partial"]).queued == 5
    # a worker answering 500 is missing too; a bad parameter refused by all passes through
    ans = nv.merge("GET", "/queue/summary", [nv.WorkerAnswer(0, 200, a.to_json()),
                                             nv.WorkerAnswer(1, 500, {"error": "internal"})])
    assert [m.worker for m in ans.missing] == [1]
    ans = nv.merge("GET", "/queue/ages/x", [nv.WorkerAnswer(0, 400, {"error": "by"}),
                                            nv.WorkerAnswer(1, 400, {"error": "by"})])
    assert (ans.status, ans.data, ans.missing) == (400, {"error": "by"}, [])


def test_an_answer_that_is_not_the_view_fails_the_merge():
    ans = nv.merge("GET", "/queue/summary", [nv.WorkerAnswer(0, 200, {"scheduled": 3}),
                                             nv.WorkerAnswer(1, 200, _summary(1).to_json())])
    assert ans.status == 502 and "not the view" in ans.data["error"]


def test_actions_and_per_worker_views_are_sections():
    ans = nv.merge("POST", "/control/hold", [nv.WorkerAnswer(0, 200, {"held": 2}),
                                             nv.WorkerAnswer(1, 200, {"held": 1})])
    assert ans.status == 200 and ans.data == {"workers": [
        {"worker": 0, "status": 200, "result": {"held": 2}},
        {"worker": 1, "status": 200, "result": {"held": 1}}]}
    ans = nv.merge("GET", "/shaping", [nv.WorkerAnswer(0, 200, []),
                                       nv.WorkerAnswer(1, 0, None, "timeout")])
    assert ans.data["workers"][1] == {"worker": 1, "status": 0, "error": "timeout"}
    assert ans.http()[0] == 502
    ans = nv.merge("POST", "/control/limits", [nv.WorkerAnswer(0, 400, {"error": "x"}),
                                               nv.WorkerAnswer(1, 400, {"error": "x"})])
    assert ans.status == 400 and not ans.missing


def test_query_node_parameter():
    assert nv.wants_node("node=1") and nv.wants_node("limit=3&node=true")
    assert not nv.wants_node("node=0") and not nv.wants_node("limit=3")
    assert nv.strip_node("/queue/list/q?limit=3&node=1") == "/queue/list/q?limit=3"
    assert nv.strip_node("/queue/summary?node=1") == "/queue/summary"
    assert nv.strip_node("/metrics") == "/metrics"


def _exposition(received: int, lag_max: float, started: float, hist: list[int]) -> str:
    x = mx.Exposition()
    x.family("mta_start_time_seconds", "gauge", "when", [({}, started)])
    x.family("mta_messages_received_total", "counter", "accepted",
             [({"listener": "smtp"}, received), ({"listener": 'a"b\\c'}, 1)])
    x.histogram("mta_spool_batch_records", "records", [1, 10], hist, float(sum(hist)))
    x.family("mta_event_loop_lag_recent_seconds", "gauge", "lag",
             [({"stat": "max"}, lag_max)])
    return x.text()


def test_metrics_merge_sums_series_and_buckets():
    from prometheus_client.parser import text_string_to_metric_families
    text = mx.merge_expositions([_exposition(3, 0.5, 100.0, [1, 2, 3]),
                                 _exposition(4, 0.25, 90.0, [0, 1, 1])])
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in fams.values() for s in f.samples}
    assert got[("mta_messages_received_total", (("listener", "smtp"),))] == 7
    assert got[("mta_messages_received_total", (("listener", 'a"b\\c'),))] == 2
    assert got[("mta_spool_batch_records_bucket", (("le", "1.0"),))] == 1
    assert got[("mta_spool_batch_records_bucket", (("le", "10.0"),))] == 4
    assert got[("mta_spool_batch_records_bucket", (("le", "+Inf"),))] == 8
    assert got[("mta_spool_batch_records_count", ())] == 8
    assert got[("mta_spool_batch_records_sum", ())] == 8.0
    assert got[("mta_start_time_seconds", ())] == 90.0              # the earliest start
    assert got[("mta_event_loop_lag_recent_seconds", (("stat", "max"),))] == 0.5   # the worst
    assert fams["mta_spool_batch_records"].type == "histogram"
    with pytest.raises(ValueError):
        mx.merge_expositions(["mta_x{bad 1\n"])
    ans = nv.merge_metrics([nv.WorkerAnswer(0, 200, _exposition(1, 0, 1, [0, 0, 0])),
                            nv.WorkerAnswer(1, 0, None, "down")])
    assert ans.status == 200 and [a.worker for a in ans.missing] == [1]


def test_metrics_merge_is_linear_on_crafted_sample_lines():
    """A sibling's exposition is parsed as untrusted: lines made to make a regex
    backtrack (many labels with no closing brace, escapes without an end quote, a long
    run of blanks) are refused in time proportional to their length."""
    import time
    n = 200_000
    crafted = ["a{" + 'b="x",' * n + " 1",
               'a{b="' + '\\"' * n + " 1",
               'a{b="x"' + " " * n + "z",
               "a" + " " * n + "1 2 3",
               "a{" + "b=" * n]
    for line in crafted:
        t = time.perf_counter()
        with pytest.raises(ValueError):
            mx.merge_expositions([line + "\n"])
        took = time.perf_counter() - t
        assert took < 1.0, f"got {took:.2f}s for a {len(line)}-character line"
    # the same many labels, well formed, still parse (and are summed)
    ok = "a{" + ",".join(f'l{i}="v"' for i in range(1000)) + "} 2\n"
    assert mx.merge_expositions([ok, ok]).endswith("} 4\n")


def test_worker_config_splits_the_node_budgets(tmp_path):
    from mta.control.worker_config import per_worker, worker_config
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nworkers = 3\ndata_memory_budget = "10MiB"\n'
                    f'[spool]\ndirectory = "{tmp_path}/spool"\nhot_cache = 0\n'
                    f'[egress]\nmax_connections = 100\n'
                    f'[bounces]\nparse_workers = 4\n'
                    f'[admin]\nlisten = "127.0.120.1:9100"\n'
                    f'[[listener]]\naddress = "127.0.120.1"\nport = 2525\nmax_connections = 7\n'
                    f'[[listener]]\naddress = "127.0.120.1"\nport = 2526\nmax_connections = 1\n')
    config = load_config(str(path))
    for i in range(3):
        w = worker_config(config, WorkerSlot(i, 3, "n1"))
        assert w.egress.max_connections == 34                   # 100 / 3 rounded up
        assert [lst.max_connections for lst in w.listener] == [3, 1]   # at least 1
        assert w.server.data_memory_budget == -(-(10 << 20) // 3)
        assert w.spool.hot_cache == 0                           # off stays off
        assert w.bounces.parse_workers == 2                     # 4 / 3 rounded up
        assert w.admin.listen == ("127.0.120.1", 9100 + i)
        assert WorkerSlot(i, 3, "n1").admin_ports(w.admin.listen[1]) == [9100, 9101, 9102]
    assert config.egress.max_connections == 100                 # the node's config unchanged
    one = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=1))
    assert worker_config(one, WorkerSlot(0, 1, "n1")) is one
    assert (per_worker(256 << 20, 2), per_worker(1, 4), per_worker(0, 4)) == (128 << 20, 1, 0)


def test_fanout_reads_siblings_defensively():
    """NodeFanout against fake siblings on 127.0.120.2: an answer over the size bound, one
    that is not JSON, one slower than the timeout and one that is fine; the request's
    token goes along, node=1 does not, and a fanned-out request is not fanned out again."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    host = "127.0.120.2"
    seen: list[tuple[str, str | None, str | None]] = []
    summary = _summary(2).to_json()

    def app(kind: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            seen.append((request.path_qs, request.headers.get("Authorization"),
                         request.headers.get(nv.FANOUT_HEADER)))
            if kind == "big":
                return web.Response(body=b"[" + b"0," * 5000 + b"0]")
            if kind == "text":
                return web.Response(body=b"<html>")
            if kind == "slow":
                await asyncio.sleep(2)
            return web.json_response(summary)
        a = web.Application()
        a.router.add_route("*", "/{tail:.*}", handle)
        return a

    async def run() -> tuple[web.StreamResponse, web.StreamResponse]:
        runners, ports = [], []
        for kind in ("ok", "big", "text", "slow"):
            runner = web.AppRunner(app(kind))
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            runners.append(runner)
            ports.append(runner.addresses[0][1])
        try:
            fan = NodeFanout(host, ports, timeout=0.5, max_answer=1000)
            req = make_mocked_request("GET", "/queue/summary?node=1",
                                      headers={"Authorization": "Bearer t0k"})
            answer = await fan(req)
            again = await fan(make_mocked_request(
                "GET", "/queue/summary?node=1", headers={nv.FANOUT_HEADER: "1"}))
            return answer, again
        finally:
            for r in runners:
                await r.cleanup()

    answer, again = asyncio.run(run())
    assert answer.status == 502
    body = orjson.loads(answer.body)
    missing = {m["worker"]: m["error"] for m in body["missing"]}
    assert set(missing) == {1, 2, 3}
    assert "larger than 1000 bytes" in missing[1]
    assert "not JSON" in missing[2]
    assert "no answer" in missing[3]
    assert QueueSummary.from_json(body["partial"]).queued == 2
    assert ("/queue/summary", "Bearer t0k", "1") in seen          # node=1 stripped
    assert again.status == 400
