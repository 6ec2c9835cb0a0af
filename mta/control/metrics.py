"""GET /metrics: the daemon's counters in Prometheus text exposition format 0.0.4.

Nothing is counted here. The hot paths increment plain ints in structures they already
own (Reception.received per listener, Outcomes.by_pair per source/site/class/pool, the
spool's batch and latency histograms, the DKIM batcher's signed/errors, Feedback.counts);
this module reads them only when scraped and writes the text itself. Why not
prometheus_client's registry: it is a process-global registry of label children whose
every increment takes a lock and a label lookup; our counters already exist as ints in
the objects that own them, so a scrape-time walk costs nothing per message and needs no
runtime dependency (prometheus-client is a test dependency: the tests parse our output
with its parser).

Cardinality: sites (MX sets) are folded into a `provider` label when scraped: the
configured shaping provider a site matched ("provider:google" -> "google"), else the site
name itself for the [admin] metrics_top_sites busiest sites, else "other". Sources, pools,
classes and listeners are configured names. Counters reset when the daemon restarts
(they are not persisted); mta_start_time_seconds tells Prometheus when that happened.

Several worker processes ([server] workers = N): each worker's /metrics is its own; GET
/metrics?node=1 on any worker's admin port is the node's, every series summed across the
workers (`merge_expositions`; histogram buckets, _sum and _count alike; the start time the
earliest, the oldest age, loop lag, spool errno and webhook failing the worst). Scrape
that one URL per node.

Series (counters are totals since start):
  mta_start_time_seconds                         gauge
  mta_messages_received_total{listener}          messages accepted (250 / HTTP 200)
  mta_recipients_{delivered,bounced,deferred}_total{source,pool,provider,class}
  mta_recipients_expired_total
  mta_complaints_total{source,provider}, mta_hard_bounces_total{source,provider}
  mta_suppressed_total                           recipients dropped or refused as suppressed
  mta_suppression_shared_{published,imported}_total, mta_suppression_shared_skipped_total
    {reason}, mta_suppression_shared_lag_seconds  entries shared with other nodes (worker 0)
  mta_queue_messages{class,provider}             entries in scheduled queues
  mta_queue_oldest_age_seconds{class,provider}   age of the oldest entry counted
  mta_ready_messages{source,provider}, mta_connections_open{source,provider}
  mta_spool_messages, mta_spool_bytes_written_total, mta_spool_segments, mta_spool_write_error
  mta_spool_batch_records (histogram), mta_spool_commit_seconds (histogram)
  mta_dkim_signatures_total, mta_dkim_errors_total
  mta_adaptive_actions{action}, mta_limits_overrides, mta_backoffs_total{source,provider}
  mta_suspended_queues, mta_paused_pairs
  mta_webhook_*{hook}, mta_log_*                 webhook and log writer stats
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mta.control.views import entries
from mta.logs import looplag
from mta.spool.segments import BATCH_BOUNDS, LATENCY_BOUNDS

if TYPE_CHECKING:
    from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
_OLDEST_SCAN = 50_000   # entries looked at for queue ages per scrape (beyond: a lower bound)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


class Exposition:
    """One scrape's text, family by family (every family's samples written together)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]], suffix: str = "") -> None:
        self.parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        for labels, value in samples:
            self.sample(name + suffix, labels, value)

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            self.parts.append(f"{name}{{{inner}}} {_fmt(value)}\n")
        else:
            self.parts.append(f"{name} {_fmt(value)}\n")

    def histogram(self, name: str, help_text: str, bounds: Iterable[float], counts: list[int],
                  total: float) -> None:
        self.parts.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
        cum = 0
        for bound, n in zip(bounds, counts):
            cum += n
            self.sample(name + "_bucket", {"le": _fmt(float(bound))}, cum)
        cum += counts[-1]
        self.sample(name + "_bucket", {"le": "+Inf"}, cum)
        self.sample(name + "_sum", {}, total)
        self.sample(name + "_count", {}, cum)

    def text(self) -> str:
        return "".join(self.parts)


class Metrics:
    """Builds the exposition from a running Server (mta/server.py) when scraped."""

    def __init__(self, server: Any, top_sites: int = 20):
        self.server = server
        self.top_sites = top_sites
        self.started = time.time()

    # -- labels -----------------------------------------------------------------------------

    def _providers(self) -> dict[str, str]:
        """site -> provider label: the configured shaping provider it matched, else the
        site for the busiest `top_sites` sites; sites not in the map are "other"."""
        engine = self.server.delivery
        out: dict[str, str] = {}
        volume: dict[str, int] = {}
        for sites in engine.outcomes.by_pair.values():
            for site, classes in sites.items():
                volume[site] = volume.get(site, 0) + sum(
                    sum(row) for pools in classes.values() for row in pools.values())
        for (_, site), d in engine.dispatchers.items():
            volume.setdefault(site, 0)
            volume[site] += len(d.ready)
            for m in d.limits.matched:
                if m.startswith("provider:"):
                    out[site] = m[len("provider:"):]
                    break
        rest = sorted((s for s in volume if s not in out), key=lambda s: (-volume[s], s))
        for site in rest[:self.top_sites]:
            out[site] = site
        return out

    # -- the text ----------------------------------------------------------------------------

    def render(self) -> str:
        s = self.server
        x = Exposition()
        x.family("mta_start_time_seconds", "gauge", "when the daemon started (unix time); "
                 "counters start from zero then", [({}, self.started)])
        rec = s.reception
        x.family("mta_messages_received_total", "counter", "messages accepted, by listener "
                 "(http-inject for POST /inject, inject for local submission)",
                 [({"listener": k}, v) for k, v in sorted((rec.received if rec else {}).items())])
        engine = s.delivery
        if engine is not None:
            self._delivery(x, engine)
        self._spool(x)
        dkim = s.dkim
        batcher = dkim.batcher if dkim is not None else None
        x.family("mta_dkim_signatures_total", "counter", "messages DKIM-signed",
                 [({}, getattr(batcher, "signed", 0))])
        x.family("mta_dkim_errors_total", "counter", "messages that could not be signed",
                 [({}, getattr(batcher, "errors", 0))])
        self._logs(x)
        lag = getattr(s, "loop_lag", None)
        if lag is not None:
            x.histogram("mta_event_loop_lag_seconds", "how late the event loop ran a 100 ms timer, "
                        "since start (work that blocks the loop delays every session)",
                        looplag.BOUNDS, lag.hist, lag.total)
            worst, p99 = lag.recent()
            x.family("mta_event_loop_lag_recent_seconds", "gauge", "the timer's lag over the "
                     "last minute: max and 99th percentile",
                     [({"stat": "max"}, worst), ({"stat": "p99"}, p99)])
        return x.text()

    def _delivery(self, x: Exposition, engine: Any) -> None:
        providers = self._providers()
        prov = providers.get
        # outcomes by (source, pool, provider, class)
        agg: dict[tuple[str, str, str, str], list[int]] = {}
        for source, sites in engine.outcomes.by_pair.items():
            for site, classes in sites.items():
                p = prov(site, OTHER)
                for klass, pools in classes.items():
                    for pool, row in pools.items():
                        a = agg.setdefault((source, pool, p, klass), [0, 0, 0])
                        a[0] += row[0]
                        a[1] += row[1]
                        a[2] += row[2]
        keys = sorted(agg)

        def labels(k: tuple[str, str, str, str]) -> dict[str, str]:
            return {"source": k[0], "pool": k[1], "provider": k[2], "class": k[3]}
        for i, what in enumerate(("delivered", "bounced", "deferred")):
            x.family(f"mta_recipients_{what}_total", "counter",
                     f"recipients {what}, by source, pool, provider and queue class",
                     [(labels(k), agg[k][i]) for k in keys])
        x.family("mta_recipients_expired_total", "counter", "recipients given up after the "
                 "retry time limit", [({}, engine.outcomes.counters["expired"])])
        counts = engine.feedback.counts if engine.feedback is not None else {}
        fb: dict[tuple[str, str], list[int]] = {}
        for (source, site), c in counts.items():
            a = fb.setdefault((source, prov(site, OTHER)), [0, 0])
            a[0] += c.get("complaints", 0)
            a[1] += c.get("hard_bounces", 0)
        x.family("mta_complaints_total", "counter", "feedback-loop complaints, by source and "
                 "provider", [({"source": k[0], "provider": k[1]}, v[0])
                              for k, v in sorted(fb.items())])
        x.family("mta_hard_bounces_total", "counter", "hard bounces (suppressing), by source "
                 "and provider", [({"source": k[0], "provider": k[1]}, v[1])
                                  for k, v in sorted(fb.items())])
        policy = self.server.reception.policy if self.server.reception else None
        x.family("mta_suppressed_total", "counter", "recipients refused or dropped at "
                 "reception because they are suppressed",
                 [({}, getattr(policy, "suppressed", 0))])
        sync = engine.feedback.sync if engine.feedback is not None else None
        if sync is not None:    # worker 0 of a node sharing suppression ([cluster])
            st = sync.stats
            x.family("mta_suppression_shared_published_total", "counter", "suppression "
                     "changes of this host sent to the other nodes", [({}, st.published)])
            x.family("mta_suppression_shared_imported_total", "counter", "suppression "
                     "changes of other nodes applied here", [({}, st.imported)])
            x.family("mta_suppression_shared_skipped_total", "counter", "shared suppression "
                     "records ignored: malformed, or hashed under another key",
                     [({"reason": "malformed"}, st.malformed),
                      ({"reason": "foreign_key"}, st.foreign_key)])
            x.family("mta_suppression_shared_lag_seconds", "gauge", "how far the newest "
                     "shared suppression record is ahead of the last one read here",
                     [({}, st.lag)])
        # queues
        now = engine.scheduler.clock()
        depth: dict[tuple[str, str], int] = {}
        oldest: dict[tuple[str, str], float] = {}
        suspended = 0
        for q in engine.scheduler.queues.values():
            if q.suspended_until > now:
                suspended += 1
            k = (q.klass, prov(q.site.name, OTHER) if q.site else "unrouted")
            depth[k] = depth.get(k, 0) + q.count
        for scanned, (msg, _) in enumerate(entries(engine), 1):
            q = msg.queue
            k = (q.klass, prov(q.site.name, OTHER) if q.site else "unrouted")
            if msg.received and (k not in oldest or msg.received < oldest[k]):
                oldest[k] = msg.received
            if scanned >= _OLDEST_SCAN:
                break
        x.family("mta_queue_messages", "gauge", "queued entries (scheduled queues, any state), "
                 "by queue class and provider",
                 [({"class": k[0], "provider": k[1]}, v) for k, v in sorted(depth.items())])
        wall = time.time()
        x.family("mta_queue_oldest_age_seconds", "gauge", "age of the oldest queued entry "
                 "(not in flight), by class and provider",
                 [({"class": k[0], "provider": k[1]}, round(max(0.0, wall - v), 3))
                  for k, v in sorted(oldest.items())])
        pairs: dict[tuple[str, str], list[int]] = {}
        paused = 0
        for (source, site), d in engine.dispatchers.items():
            a = pairs.setdefault((source, prov(site, OTHER)), [0, 0, 0])
            a[0] += d.active
            a[1] += len(d.ready)
            a[2] += d.backoffs
            if d.paused_until(now):
                paused += 1
        pl = sorted(pairs)
        x.family("mta_connections_open", "gauge", "open or opening delivery connections, by "
                 "source and provider", [({"source": k[0], "provider": k[1]}, pairs[k][0])
                                         for k in pl])
        x.family("mta_ready_messages", "gauge", "entries due and waiting for a connection, by "
                 "source and provider", [({"source": k[0], "provider": k[1]}, pairs[k][1])
                                         for k in pl])
        x.family("mta_backoffs_total", "counter", "times adaptive delivery paused a (source, "
                 "site), by source and provider (live pairs only)",
                 [({"source": k[0], "provider": k[1]}, pairs[k][2]) for k in pl])
        x.family("mta_paused_pairs", "gauge", "(source, site) pairs paused now",
                 [({}, paused)])
        x.family("mta_suspended_queues", "gauge", "queues suspended by the operator now",
                 [({}, suspended)])
        actions: dict[str, int] = {}
        for a in engine.adaptive.adaptive.view():
            actions[a["action"]] = actions.get(a["action"], 0) + 1
        x.family("mta_adaptive_actions", "gauge", "adaptive actions in force, by action",
                 [({"action": k}, v) for k, v in sorted(actions.items())])
        x.family("mta_limits_overrides", "gauge", "run-time shaping overrides in force "
                 "(operator and adaptive)", [({}, len(engine.limits.overrides()))])

    def _spool(self, x: Exposition) -> None:
        spool = self.server.spool
        h = spool.health()
        x.family("mta_spool_messages", "gauge", "messages live in the spool",
                 [({}, h.get("messages", 0))])
        x.family("mta_spool_segments", "gauge", "live spool segment files",
                 [({}, h.get("segments", 0))])
        x.family("mta_spool_bytes_written_total", "counter", "bytes written to the spool",
                 [({}, h.get("bytes", 0))])
        x.family("mta_spool_syncs_total", "counter", "segment fdatasyncs",
                 [({}, h.get("syncs", 0))])
        x.family("mta_spool_failed_batches_total", "counter", "spool batches that failed",
                 [({}, h.get("failed_batches", 0))])
        x.family("mta_spool_write_error", "gauge", "errno of the last failed batch while the "
                 "spool cannot write, else 0", [({}, h.get("write_error", 0))])
        x.histogram("mta_spool_batch_records", "records per completed spool batch",
                    BATCH_BOUNDS, spool.batch_hist, spool.batch_sum)
        x.histogram("mta_spool_commit_seconds", "seconds from a record's append to its batch "
                    "being durable (the oldest waiting record per completion)",
                    LATENCY_BOUNDS, spool.latency_hist, spool.latency_sum)

    def _logs(self, x: Exposition) -> None:
        logs = self.server.logs
        st = logs.stats() if logs is not None else {}
        x.family("mta_log_written_bytes_total", "counter", "bytes written to the log",
                 [({}, st.get("written_bytes", 0))])
        x.family("mta_log_buffered_bytes", "gauge", "log bytes not yet written",
                 [({}, st.get("buffered_bytes", 0))])
        x.family("mta_log_write_errors_total", "counter", "failed log writes",
                 [({}, st.get("write_errors", 0))])
        x.family("mta_log_dropped_records_total", "counter", "log records dropped (buffer "
                 "full while writes fail)", [({}, st.get("dropped_records", 0))])
        hooks = self.server.webhooks
        hs = hooks.stats() if hooks is not None else {}
        for key, kind, help_text in (
                ("sent_batches", "counter", "webhook batches acknowledged"),
                ("sent_records", "counter", "log records delivered to the webhook"),
                ("failed_attempts", "counter", "failed webhook POSTs"),
                ("lag_bytes", "gauge", "log bytes not yet acknowledged by the webhook"),
                ("skipped_bytes", "counter", "log bytes skipped (max_lag, a lost file)"),
                ("failing", "gauge", "1 while the webhook fails")):
            name = f"mta_webhook_{key}" + ("_total" if kind == "counter" else "")
            x.family(name, kind, help_text,
                     [({"hook": n}, v.get(key, 0) or 0) for n, v in sorted(hs.items())])


def handler(metrics: Metrics):
    """The aiohttp handler for GET /metrics (registered in AdminServer.handlers)."""
    from aiohttp import web     # the daemon's; `mta` commands merging expositions need none

    async def get(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render().encode("utf-8"),
                            headers={"Content-Type": CONTENT_TYPE})
    return get


# --- one node's workers as one exposition (GET /metrics?node=1, mta/control/nodeview.py) ---

# families whose samples are not summed across worker processes: the node started when its
# first worker did; an age, an errno, a lag or a failing flag is the worst worker's
_NODE_MIN = frozenset({"mta_start_time_seconds"})
_NODE_MAX = frozenset({"mta_queue_oldest_age_seconds", "mta_spool_write_error",
                       "mta_event_loop_lag_recent_seconds", "mta_webhook_failing",
                       "mta_suppression_shared_lag_seconds"})
# A sample line is read piece by piece (a name, then one label at a time), so no pattern
# repeats a repetition: linear in the line however it is crafted.
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?')
_INT = re.compile(r"-?[0-9]+")


def _sample(line: str) -> tuple[str, str, str] | None:
    """(name, label text with its braces or "", value text) of an exposition sample line
    (an optional timestamp after the value is dropped), or None when it is not one."""
    m = _NAME.match(line)
    if m is None:
        return None
    pos = m.end()
    labels = ""
    if line.startswith("{", pos):
        start, pos = pos, pos + 1
        while not line.startswith("}", pos):
            lm = _LABEL.match(line, pos)
            if lm is None:
                return None
            pos = lm.end()
        pos += 1
        labels = line[start:pos]
    if line[pos:pos + 1] not in (" ", "\t"):
        return None
    parts = line[pos:].split(None, 2)
    if not 1 <= len(parts) <= 2 or (len(parts) == 2 and not _INT.fullmatch(parts[1])):
        return None
    return m.group(), labels, parts[0]


class _Family:
    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str):
        self.name = name
        self.help = ""
        self.kind = "untyped"
        # (sample name, label text) -> value, in first-seen order
        self.samples: dict[tuple[str, str], float] = {}


def _parse(text: str, families: dict[str, _Family]) -> None:
    """Add one exposition's samples to `families` (merged by the family's rule);
    ValueError on a line that is not exposition format 0.0.4."""
    current: _Family | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = families.get(parts[2])
                if current is None:
                    current = families[parts[2]] = _Family(parts[2])
                if parts[1] == "HELP":
                    current.help = parts[3] if len(parts) > 3 else ""
                else:
                    current.kind = parts[3].strip() if len(parts) > 3 else "untyped"
            continue
        sample = _sample(line)
        if sample is None:
            raise ValueError(f"line {n} is not a sample")
        name, labels, raw = sample
        value: float = int(raw) if _INT.fullmatch(raw) else float(raw)
        if current is None or not name.startswith(current.name):
            current = families.get(name)
            if current is None:
                current = families[name] = _Family(name)
        key = (name, labels)
        have = current.samples.get(key)
        if have is None:
            current.samples[key] = value
        elif current.name in _NODE_MIN:
            current.samples[key] = min(have, value)
        elif current.name in _NODE_MAX:
            current.samples[key] = max(have, value)
        else:
            current.samples[key] = have + value


def merge_expositions(texts: Iterable[str]) -> str:
    """Several worker processes' expositions as the node's: each series summed across
    them (counters, gauges and histogram buckets, _sum and _count alike), except the
    _NODE_MIN/_NODE_MAX gauges; families and series in first-seen order."""
    families: dict[str, _Family] = {}
    for text in texts:
        _parse(text, families)
    out = []
    for f in families.values():
        out.append(f"# HELP {f.name} {f.help}\n# TYPE {f.name} {f.kind}\n")
        for (name, labels), value in f.samples.items():
            out.append(f"{name}{labels} {_fmt(value)}\n")
    return "".join(out)
