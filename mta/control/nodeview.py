"""One node, several worker processes: the admin API's answers for the node as a whole.

Where it sits: the control stage. With `[server] workers = N` each worker process has its
own queues, counters and admin API (port [admin] listen + I). An operator asks the node:
- `mta queue ...`, `mta top` (mta/control/client.py `node_request`) ask every worker and
  merge here;
- an HTTP client adds `?node=1` to a view or action on any worker's admin API: that worker
  (mta/control/fanout.py `NodeFanout`, installed by mta/server.py) asks every worker of
  the node, itself included, with the client's own Authorization header, and answers
  with the merge.

What merging means, per view (`merge`):
- /queue/summary, /queue/ages, /live: counters and depths summed, rows merged by key
  (queue, ready queue, domain, (source, site)); /live's holds deduplicated, errors by time;
- /queue/list/<queue>: pages concatenated in id order, cut at the page's limit, the cursor
  from the merged page; /queue/messages/<id>: the worker that holds the message;
  /queue/holds: the union (every worker gets the same holds);
- /metrics: counters, gauges and histogram buckets summed per series (a few gauges where a
  sum means nothing take the max or the min: mta/control/metrics.py `merge_expositions`);
- everything else (/shaping, /adaptive, /warmup, /drain: each worker's own live state and
  limits) and every POST action: one section per worker,
  {"workers": [{"worker": I, "status": S, "result": ...}, ...]}.
A worker that does not answer (or answers other than 200 and, for the keyed views, 404)
is named in `NodeAnswer.missing`: the CLI says so on stderr and exits non-zero; over HTTP
the node answers 502 {"error", "missing", "partial": the merge of the others}, so a
partial view is never taken for the whole.

Bounds: one sibling gets `timeout` seconds (below [admin] timeout, so the answer names the
slow one), its answer at most MAX_ANSWER bytes, parsed as any other untrusted JSON (a
sibling's answer that is not the view's shape counts as that worker failing). A
fanned-out request carries FANOUT_HEADER and no `node` parameter; a request with both is
refused (400), so a request fans out once.
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from mta.control import metrics as mx
from mta.control.views import (LIVE_ERRORS, AgeTable, FeedbackCounts, LiveError, LiveHold,
                                LiveRow, LiveView, OutcomeCounts, QueueListing, QueueSummary,
                                ReadyRow, ScheduledRow)
from mta.model.queued import InsertReason

NODE_PARAM = "node"                  # ?node=1: the node's answer
FANOUT_HEADER = "Mta-Node-Fanout"    # on the requests a worker sends to the node's workers
MAX_ANSWER = 64 << 20                # bytes read from one worker's answer
SIBLING_TIMEOUT = 8.0                # seconds for one worker's answer (at most)


@dataclass(slots=True)
class WorkerAnswer:
    """One worker's answer to a fanned-out request."""
    worker: int                      # its index on the node
    status: int                      # HTTP status; 0: it did not answer
    data: Any = None                 # decoded JSON (text for /metrics); None: no answer
    error: str = ""                  # why it did not answer, or its error text

    @property
    def answered(self) -> bool:
        return self.status != 0


@dataclass(slots=True)
class NodeAnswer:
    """The node's answer: the merged (status, data) and the workers left out of it."""
    status: int
    data: Any
    missing: list[WorkerAnswer] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One line per worker left out: `worker I: why`."""
        return [f"worker {a.worker}: {a.error or f'HTTP {a.status}'}" for a in self.missing]

    def http(self) -> tuple[int, Any]:
        """(status, body) for an HTTP client: 502 with the partial merge when a worker is
        missing, so a client cannot take it for the whole node."""
        if not self.missing:
            return self.status, self.data
        return 502, {"error": "not every worker of the node answered: "
                              + "; ".join(self.problems()),
                     "missing": [{"worker": a.worker, "status": a.status, "error": a.error}
                                 for a in self.missing],
                     "partial": self.data}


def strip_node(raw_path: str) -> str:
    """`raw_path` without the `node` query parameter (what a worker is asked for)."""
    path, sep, query = raw_path.partition("?")
    if not sep:
        return path
    kept = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
            if k != NODE_PARAM]
    return path + ("?" + urllib.parse.urlencode(kept) if kept else "")


def wants_node(query: str) -> bool:
    """True when a query string asks for the node (`node=1`, `node=true`, `node`)."""
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if k == NODE_PARAM:
            return v.lower() in ("", "1", "true", "yes")
    return False


# --- merging typed views ------------------------------------------------------------------

def _add(into: dict[Any, int], more: dict[Any, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


def _later(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def merge_summaries(parts: Sequence[QueueSummary]) -> QueueSummary:
    """Queue summaries of several workers as one: counts summed, rows merged by name."""
    scheduled: dict[str, ScheduledRow] = {}
    ready: dict[str, ReadyRow] = {}
    inserts: dict[InsertReason, int] = {}
    feedback: dict[str, FeedbackCounts] = {}
    outcomes = OutcomeCounts(0, 0, 0, 0)
    connections = wheel = 0
    for s in parts:
        for name, r in s.scheduled.items():
            have = scheduled.get(name)
            if have is None:
                scheduled[name] = ScheduledRow(r.count, r.site, r.klass, r.pool, r.backlog,
                                               r.held, r.suspended, r.suspended_until)
                continue
            have.count += r.count
            have.site = have.site or r.site
            have.backlog += r.backlog
            have.held += r.held
            have.suspended = have.suspended or r.suspended
            have.suspended_until = _later(have.suspended_until, r.suspended_until)
        for name, rr in s.ready.items():
            got = ready.get(name)
            if got is None:
                ready[name] = ReadyRow(rr.count, rr.connections, rr.sent, dict(rr.queues))
                continue
            got.count += rr.count
            got.connections += rr.connections
            got.sent += rr.sent
            _add(got.queues, rr.queues)
        _add(inserts, s.inserts)
        for key, c in s.feedback.items():
            fb = feedback.setdefault(key, FeedbackCounts(0, 0))
            fb.hard_bounces += c.hard_bounces
            fb.complaints += c.complaints
        _add_outcomes(outcomes, s.outcomes)
        connections += s.connections
        wheel += s.wheel
    return QueueSummary(scheduled, ready, connections, wheel, inserts, outcomes, feedback)


def _add_outcomes(into: OutcomeCounts, more: OutcomeCounts) -> None:
    into.delivered += more.delivered
    into.bounced += more.bounced
    into.deferred += more.deferred
    into.expired += more.expired


def merge_ages(parts: Sequence[AgeTable]) -> AgeTable:
    """Age tables as one: each row's buckets and the totals summed."""
    first = parts[0]
    rows: dict[str, list[int]] = {}
    total = [0] * len(first.buckets)
    for t in parts:
        if t.buckets != first.buckets or t.by != first.by or len(t.total) != len(total):
            raise ValueError("the workers' age tables have different buckets")
        for name, row in t.rows.items():
            have = rows.setdefault(name, [0] * len(total))
            if len(row) != len(total):
                raise ValueError(f"age row {name!r} has {len(row)} buckets")
            for i, n in enumerate(row):
                have[i] += n
        for i, n in enumerate(t.total):
            total[i] += n
    return AgeTable(first.by, list(first.buckets), rows, total)


def merge_listings(parts: Sequence[QueueListing], limit: int) -> QueueListing:
    """Pages of one queue from several workers as one page: in id order, at most `limit`
    messages; the cursor is the last one shown when any worker had more."""
    messages = sorted((m for p in parts for m in p.messages), key=lambda m: m.id)
    page = messages[:limit]
    more = len(messages) > limit or any(p.next for p in parts)
    return QueueListing(parts[0].queue, page, page[-1].id if more and page else None)


def merge_live(parts: Sequence[LiveView]) -> LiveView:
    """/live snapshots as one: totals summed, (source, site) rows merged, holds once each
    (the latest end), recent errors by time."""
    rows: dict[tuple[str, str], LiveRow] = {}
    holds: dict[tuple[str, str, str | None], LiveHold] = {}
    outcomes = OutcomeCounts(0, 0, 0, 0)
    received = scheduled = ready = in_flight = connections = 0
    for v in parts:
        for r in v.rows:
            have = rows.get((r.source, r.site))
            if have is None:
                rows[(r.source, r.site)] = LiveRow(
                    r.source, r.site, r.provider, r.delivered, r.deferred, r.bounced,
                    r.connections, r.ready, r.scheduled, r.paused_until)
                continue
            have.delivered += r.delivered
            have.deferred += r.deferred
            have.bounced += r.bounced
            have.connections += r.connections
            have.ready += r.ready
            have.scheduled += r.scheduled
            have.paused_until = _later(have.paused_until, r.paused_until)
        for h in v.holds:
            key = (h.kind, h.name, h.site)
            if key not in holds or h.until > holds[key].until:
                holds[key] = h
        _add_outcomes(outcomes, v.outcomes)
        received += v.received
        scheduled += v.scheduled
        ready += v.ready
        in_flight += v.in_flight
        connections += v.connections
    errors: list[LiveError] = sorted((e for v in parts for e in v.errors), key=lambda e: e.at)
    return LiveView(max(v.at for v in parts), outcomes, received, scheduled, ready, in_flight,
                    connections, list(rows.values()), list(holds.values()),
                    errors[-LIVE_ERRORS:])


def merge_holds(parts: Sequence[list]) -> list:
    """/queue/holds of every worker: each hold once, in first-seen order."""
    seen: dict[bytes, Any] = {}
    for p in parts:
        if not isinstance(p, list):
            raise TypeError("holds: not a list")
        for h in p:
            seen.setdefault(orjson.dumps(h, option=orjson.OPT_SORT_KEYS), h)
    return list(seen.values())


def _limit_of(path: str) -> int:
    query = urllib.parse.parse_qs(path.partition("?")[2])
    try:
        return int(query.get("limit", ["100"])[0])
    except ValueError:
        return 100


# route prefix -> (merge of the 200 answers' JSON, whether a 404 only means "not here")
Merge = Callable[[str, list[Any]], Any]
_MERGED: dict[str, tuple[Merge, bool]] = {
    "/queue/summary": (lambda path, ds: merge_summaries(
        [QueueSummary.from_json(d) for d in ds]).to_json(), False),
    "/queue/ages": (lambda path, ds: merge_ages(
        [AgeTable.from_json(d) for d in ds]).to_json(), False),
    "/live": (lambda path, ds: merge_live([LiveView.from_json(d) for d in ds]).to_json(),
              False),
    "/queue/list": (lambda path, ds: merge_listings(
        [QueueListing.from_json(d) for d in ds], _limit_of(path)).to_json(), True),
    "/queue/messages": (lambda path, ds: ds[0], True),
    "/queue/holds": (lambda path, ds: merge_holds(ds), False),
}


def _route(path: str) -> str | None:
    bare = path.partition("?")[0]
    for prefix in _MERGED:
        if bare == prefix or bare.startswith(prefix + "/"):
            return prefix
    return None


def sections(answers: Sequence[WorkerAnswer]) -> NodeAnswer:
    """One section per worker: what each answered (actions, and per-worker views)."""
    body = {"workers": [{"worker": a.worker, "status": a.status,
                         **({"result": a.data} if a.answered else {"error": a.error})}
                        for a in answers]}
    missing = [a for a in answers if not a.answered]
    statuses = {a.status for a in answers if a.answered}
    status = 200 if statuses <= {200} else max(statuses)
    return NodeAnswer(status, body, missing)


def merged(method: str, path: str) -> bool:
    """Whether the node's answer to this request is a merge (else: sections)."""
    return method == "GET" and _route(path) is not None


def merge(method: str, path: str, answers: Sequence[WorkerAnswer]) -> NodeAnswer:
    """The node's answer to `method path` from its workers' answers."""
    prefix = _route(path) if method == "GET" else None
    if prefix is None:
        return sections(answers)
    fn, keyed = _MERGED[prefix]
    ok = [a for a in answers if a.status == 200]
    absent = [a for a in answers if keyed and a.status == 404]
    missing = [a for a in answers if a.status != 200 and not (keyed and a.status == 404)]
    answered = [a for a in answers if a.answered]
    if answered and all(a.status == answered[0].status != 200 for a in answered):
        # every worker that answered refused alike (a bad parameter, no such message)
        return NodeAnswer(answered[0].status, answered[0].data,
                          [a for a in answers if not a.answered])
    if not ok:
        first = next(iter(absent), None)
        return NodeAnswer(404 if first else 502, first.data if first else
                          {"error": "no worker answered"}, missing)
    try:
        data = fn(path, [a.data for a in ok])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return NodeAnswer(502, {"error": f"a worker's answer is not the view: {exc!r}"},
                          list(answers))
    return NodeAnswer(200, data, missing)


def merge_metrics(answers: Sequence[WorkerAnswer]) -> NodeAnswer:
    """/metrics of every worker as one exposition (text)."""
    texts, missing = [], []
    for a in answers:
        if a.status == 200 and isinstance(a.data, str):
            texts.append(a.data)
        else:
            missing.append(a)
    try:
        text = mx.merge_expositions(texts)
    except ValueError as exc:
        return NodeAnswer(502, f"a worker's /metrics is not an exposition: {exc}",
                          list(answers))
    return NodeAnswer(200, text, missing)
