"""mta against the ISP simulator (issue 12 item 6): the rig shared by
tests/scenarios/test_isp_sim_mta.py and bench/isp_bench.py.

One real `mta serve` (subprocess, tests/conftest.py's Daemon) with 16 [[source]]s on
127.0.70.1-16 in one pool, 4 of them warming from the simulator's start instant
(`warmup_start`, `[warmup] day_length` = the simulator's day_seconds, schedules scaled by
the simulator's volume_scale); the simulator as a subprocess (`python -m tools.isp_sim`)
with the shipped providers.toml plus all 16 sources under [[sources]] (12 old, 4 with
age_days = 0); DNS through tools/dnsserver.py with the simulator's zone. Every duration
of the MTA meant in provider time is divided by F = 86400 / day_seconds (where the
schema's lower bound allows it: rule durations >= 1 s, [adaptive] windows >= 1 min).

Load: one recipient per message, several tenants and campaigns, recipients spread over
the providers' domains with a small share of unknown users and complainers (the
simulator's prefixes), injected over SMTP at a steady rate for `days` simulated days,
then a drain period. Measured: per provider demand / allowed / accepted / deferred by
reason / blocks (from the simulator's /stats), every injected message accounted for by id
(Reception records against Delivery / Bounce / Expiration records and the spool after
stop), warm-up caps against what the simulator accepted per warm-up day and hour.
"""
from __future__ import annotations

import json
import os
import random
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
for p in (ROOT / "tools", ROOT / "tests", ROOT / "tests" / "scenarios"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from conftest import Daemon  # noqa: E402
from dnsserver import DnsServer  # noqa: E402
from isp_sim import load, zone_records  # noqa: E402

NET = "127.0.70"
N_SOURCES, N_NEW = 16, 4
OLD_AGES = [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]   # days; the 12 established sources (young, so that allowances bind at this rate)
# recipient domain -> share of the load
DOMAINS = {"gmail.test": 0.30, "googlemail.test": 0.05, "yahoo.test": 0.18, "aol.test": 0.12,
           "outlook.test": 0.15, "hotmail.test": 0.10, "smallisp.test": 0.10}
TENANTS = {"acme": ["spring", "news"], "globex": ["promo"], "initech": ["digest", "alerts"],
           "umbrella": ["weekly"]}
UNKNOWN_SHARE = 0.01        # "unknown-..." local parts: the simulator's unknown users
COMPLAIN_SHARE = 0.0003     # "complain-..." local parts: each complains once accepted
WARMUP_MAJOR = [10000, 20000, 40000, 80000, 160000, 320000, 640000, 1280000]
WARMUP_SMALL = [1000, 2000, 4000, 8000, 16000, 32000]


def _dur(seconds: float, lo: float = 1.0) -> str:
    return f"{max(lo, seconds):.3f}s"


@dataclass
class Result:
    out: Path
    day_seconds: float
    days: float
    rate: float
    volume_scale: float
    injected: int = 0
    demand: dict[str, int] = field(default_factory=dict)        # provider -> injected
    stats: dict = field(default_factory=dict)                   # simulator /stats at the end
    delivered: int = 0
    bounced: int = 0
    expired: int = 0
    queued: int = 0
    lost: list[str] = field(default_factory=list)               # ids neither done nor queued
    mta_delivered: dict[str, int] = field(default_factory=dict)   # provider -> Delivery records
    warmup_breaches: list[str] = field(default_factory=list)
    warmup_rows: list[tuple] = field(default_factory=list)      # (source, provider, day, cap, accepted, max hour, hour cap)
    shows: list[tuple[str, str, str]] = field(default_factory=list)   # (when, shaping, warmup)
    actions: dict[str, int] = field(default_factory=dict)       # AdaptiveAction rule/kind -> count
    wall: float = 0.0

    def providers(self) -> dict[str, dict]:
        """Per provider: demand, allowed (all sources), accepted, ratio, deferred by reason,
        rejected, blocks."""
        rows = {}
        for prov, pairs in sorted(self.stats["providers"].items()):
            ours = {s: p for s, p in pairs.items() if s.startswith(NET + ".")}
            allowed = sum(p["allowed"] for p in ours.values())
            accepted = sum(p["accepted"] for p in ours.values())
            deferred: dict[str, int] = {}
            for p in ours.values():
                for k, v in p["counts"].items():
                    if k.startswith("deferred."):
                        deferred[k[9:]] = deferred.get(k[9:], 0) + v
            demand = self.demand.get(prov, 0)
            target = min(demand, allowed)
            rows[prov] = {"demand": demand, "allowed": allowed, "accepted": accepted,
                          "ratio": accepted / target if target else 1.0, "deferred": deferred,
                          "rejected": sum(p["rejected"] for p in ours.values()),
                          "blocks": sum(p["counts"].get("blocks", 0) + len(p.get("blocks", []))
                                        for p in ours.values())}
        return rows

    def table(self) -> str:
        lines = [f"run: {self.days:g} simulated days of {self.day_seconds:g} s, {self.rate:g} msg/s, "
                 f"volume_scale {self.volume_scale:g}, {self.wall:.0f} s wall",
                 f"{'provider':<10} {'demand':>7} {'allowed':>8} {'accepted':>8} {'ratio':>6} "
                 f"{'rejected':>8} {'blocks':>6}  deferred by reason"]
        for prov, r in self.providers().items():
            d = ", ".join(f"{k} {v}" for k, v in sorted(r["deferred"].items())) or "-"
            lines.append(f"{prov:<10} {r['demand']:>7} {r['allowed']:>8} {r['accepted']:>8} "
                         f"{r['ratio']:>6.3f} {r['rejected']:>8} {r['blocks']:>6}  {d}")
        lines.append("")
        lines.append(f"{'warming source':<15} {'provider':<10} {'day':>3} {'day cap':>7} "
                     f"{'accepted':>8} {'max/hour':>8} {'hour cap':>8}")
        for src, prov, day, cap, acc, mh, hcap in self.warmup_rows:
            lines.append(f"{src:<15} {prov:<10} {day:>3} {cap if cap is not None else '-':>7} "
                         f"{acc:>8} {mh:>8} {hcap if hcap is not None else '-':>8}")
        lines.append("")
        lines.append(f"totals: injected {self.injected}, delivered {self.delivered}, bounced "
                     f"{self.bounced}, expired {self.expired}, still queued {self.queued}, "
                     f"lost {len(self.lost)}; warm-up cap breaches {len(self.warmup_breaches)}")
        if self.actions:
            lines.append("adaptive actions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items())))
        return "\n".join(lines)


def _provider_of(domain: str, cfg) -> str:
    for name, p in cfg.providers.items():
        if domain in p.domains:
            return name
    raise KeyError(domain)


def _sim_toml(day_seconds: float, volume_scale: float) -> str:
    text = (ROOT / "tools" / "isp_sim" / "providers.toml").read_text()
    for i in range(N_SOURCES):
        age = OLD_AGES[i] if i < N_SOURCES - N_NEW else 0
        text += f'\n[[sources]]\naddress = "{NET}.{i + 1}"\nage_days = {age}\n'
    return text


def _shaping_toml(f: float) -> str:
    """The shipped automation rules by name with durations / F, and one rule for the small
    ISP's rate reply (Postfix's "450 4.7.1 Error: too much mail from IP"), which the
    shipped file does not know."""
    def d(s: float) -> str:
        return _dur(s / f)
    return f"""
[[default.automation]]
name = "ts-complaints"
text = '\\[TS0[12]\\]'
action = ["suspend"]
duration = "{d(3600)}"
[[default.automation]]
name = "ts-permanent"
text = '\\[TS03\\]'
action = ["suspend"]
duration = "{d(86400)}"
[provider.google]
[[provider.google.automation]]
name = "gmail-rate-limited"
status = ["4.7.28"]
action = ["suspend"]
set = {{ max_message_rate = "30/m" }}
duration = "{d(900)}"
steps = 3
recover_after = 200
[[provider.google.automation]]
name = "gmail-low-reputation"
status = ["4.7.0"]
text = 'low reputation|unusual rate|unsolicited'
after = 3
within = "{d(600)}"
set = {{ connection_limit = 2, max_message_rate = "20/m" }}
duration = "{d(3600)}"
[provider.yahoo]
[[provider.yahoo.automation]]
name = "yahoo-tss04"
text = '\\[TSS0[0-9]\\]'
action = ["suspend"]
set = {{ connection_limit = 2, max_message_rate = "60/m" }}
duration = "{d(900)}"
steps = 3
recover_after = 100
[provider.outlook]
[[provider.outlook.automation]]
name = "microsoft-rate-limited"
status = ["4.7.650"]
action = ["suspend"]
set = {{ max_message_rate = "30/m" }}
duration = "{d(600)}"
steps = 3
[[provider.outlook.automation]]
name = "microsoft-server-busy"
status = ["4.7.500"]
set = {{ connection_limit = 2 }}
duration = "{d(600)}"
[provider.smallisp]
match = ["mx.smallisp.test"]
warmup_class = "small"
connection_limit = 2
max_deliveries_per_connection = 20
[[provider.smallisp.automation]]
name = "smallisp-too-much-mail"
status = ["4.7.1"]
text = 'too much mail'
action = ["suspend"]
duration = "{d(3600)}"
"""


def _scaled(schedule: list[int], s: float) -> list[int]:
    out: list[int] = []
    for v in schedule:
        n = max(1, int(v * s))
        if out:
            n = max(out[-1], min(n, 2 * out[-1]))
        out.append(n)
    return out


def _mta_extra(dns_port: int, start: float, day_seconds: float, s: float, shaping: Path) -> str:
    f = 86400 / day_seconds
    iso = datetime.fromtimestamp(start, timezone.utc).isoformat(timespec="milliseconds")
    src = ""
    for i in range(N_SOURCES):
        src += f'[[source]]\nname = "s{i + 1:02d}"\naddress = "{NET}.{i + 1}"\n'
        if i >= N_SOURCES - N_NEW:
            src += f'warmup_start = "{iso}"\n'
    names = ", ".join(f'"s{i + 1:02d}"' for i in range(N_SOURCES))
    return f"""
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
[delivery]
retry_initial = "{_dur(300 / f)}"
retry_max = "{_dur(4 * 3600 / f)}"
max_age = "{_dur(5 * 86400 / f)}"
connect_timeout = "10s"
command_timeout = "20s"
data_timeout = "20s"
no_dsn_tenants = {json.dumps(list(TENANTS))}
[egress]
default_pool = "all"
shaping = ["{shaping}"]
{src}
[[pool]]
name = "all"
sources = [{names}]
[warmup]
day_length = "{day_seconds:g}s"
major = {_scaled(WARMUP_MAJOR, s)}
small = {_scaled(WARMUP_SMALL, s)}
default = {_scaled(WARMUP_SMALL, s)}
min_volume = 20
[adaptive]
window = "{_dur(3600 / f, 60)}"
throttle_for = "{_dur(3600 / f, 60)}"
suspend_for = "{_dur(4 * 3600 / f, 60)}"
"""


def _mta(d: Daemon, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mta", *args, "-c", str(d.config)],
                         capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    return out.stdout.decode() + (f"[exit {out.returncode}: {out.stderr.decode()[-500:]}]"
                                  if out.returncode else "")


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


class Injector:
    """One SMTP connection, reopened when it fails; one recipient per message."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.s: smtplib.SMTP | None = None

    def send(self, sender: str, rcpt: str, body: bytes) -> None:
        for attempt in range(3):
            try:
                if self.s is None:
                    self.s = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                self.s.sendmail(sender, [rcpt], body)
                return
            except (smtplib.SMTPException, OSError):
                if self.s is not None:
                    try:
                        self.s.close()
                    except OSError:
                        pass
                self.s = None
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        if self.s is not None:
            try:
                self.s.quit()
            except (smtplib.SMTPException, OSError):
                pass


def run(out: Path, *, days: float = 3, day_seconds: float = 60, rate: float = 30,
        volume_scale: float = 0.002, drain_days: float = 1.0, seed: int = 7,
        log=print) -> Result:
    """The whole run; returns the measurements (out: the working and output folder)."""
    out.mkdir(parents=True, exist_ok=True)
    res = Result(out, day_seconds, days, rate, volume_scale)
    t0 = time.monotonic()
    f = 86400 / day_seconds
    cfg_path = out / "providers.toml"
    cfg_path.write_text(_sim_toml(day_seconds, volume_scale))
    cfg = load(cfg_path, day_seconds=day_seconds, volume_scale=volume_scale)
    for name in ("events.jsonl", "stats.json"):
        (out / name).unlink(missing_ok=True)
    sim = subprocess.Popen(
        [sys.executable, "-m", "tools.isp_sim", "-c", str(cfg_path), "--day-seconds", f"{day_seconds:g}",
         "--volume-scale", f"{volume_scale:g}", "--events", str(out / "events.jsonl"),
         "--stats-file", str(out / "stats.json"), "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=open(out / "sim.err", "wb"), cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    dns = daemon = None
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline().decode()
        if not line.startswith("isp_sim: ready"):
            raise RuntimeError(f"simulator did not start: {line!r} {(out / 'sim.err').read_text()[-1000:]}")
        http = int(line.split("http=")[1].split()[0].rpartition(":")[2])
        st = _get(http, "/stats")
        start = time.time() - st["sim_time"] / f          # the simulator's day 0, hour 0
        dns = DnsServer(zone_records(cfg)).start()
        shaping = out / "shaping.toml"
        shaping.write_text(_shaping_toml(f))
        import shutil
        shutil.rmtree(out / "mta", ignore_errors=True)
        daemon = Daemon(out / "mta", extra=_mta_extra(dns.port, start, day_seconds, volume_scale, shaping))
        daemon.start()
        res.shows.append(("start", _mta(daemon, "shaping", "show"), _mta(daemon, "warmup", "show")))
        rng = random.Random(seed)
        doms, weights = list(DOMAINS), list(DOMAINS.values())
        tenants = [(t, c) for t, cs in TENANTS.items() for c in cs]
        inj = Injector(daemon.port)
        total = int(days * day_seconds * rate)
        began = time.monotonic()
        mid_done = False
        for n in range(total):
            due = began + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            dom = rng.choices(doms, weights)[0]
            x = rng.random()
            local = ("unknown" if x < UNKNOWN_SHARE else
                     "complain" if x < UNKNOWN_SHARE + COMPLAIN_SHARE else "u") + f"-{n}"
            tenant, campaign = tenants[n % len(tenants)]
            sender = f"bounces-{tenant}@{tenant}.sender.test"
            body = (f"From: <news@{tenant}.sender.test>\r\nTo: <{local}@{dom}>\r\n"
                    f"Subject: {campaign} {n}\r\nX-Tenant: {tenant}\r\nX-Campaign: {campaign}\r\n"
                    f"Message-ID: <{n}.{seed}@{tenant}.sender.test>\r\n\r\n"
                    f"hello {n}\r\n").encode()
            inj.send(sender, f"{local}@{dom}", body)
            prov = _provider_of(dom, cfg)
            res.demand[prov] = res.demand.get(prov, 0) + 1
            res.injected += 1
            if not mid_done and n >= total // 2:
                mid_done = True
                res.shows.append(("mid-run", _mta(daemon, "shaping", "show"), _mta(daemon, "warmup", "show")))
        inj.close()
        log(f"isp_rig: injected {res.injected} in {time.monotonic() - began:.0f} s; draining")
        # drain: until every message is finished or drain_days passed
        deadline = time.monotonic() + drain_days * day_seconds
        while time.monotonic() < deadline:
            done = {r["id"] for r in daemon.log_records() if r["type"] in ("Delivery", "Bounce", "Expiration")}
            if len(done) >= res.injected:
                break
            time.sleep(1.0)
        res.shows.append(("end", _mta(daemon, "shaping", "show"), _mta(daemon, "warmup", "show")))
        warm = json.loads(_mta(daemon, "warmup", "show", "--json").split("[exit")[0] or "[]")
        daemon.stop()
        res.stats = _get(http, "/stats")
        _account(res, daemon, cfg)
        _warmup(res, daemon, start, warm)
        _plot(res)
    finally:
        if daemon is not None:
            daemon.kill()
        if dns is not None:
            dns.stop()
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(20)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait(5)
    res.wall = time.monotonic() - t0
    return res


def _account(res: Result, d: Daemon, cfg) -> None:
    recs = d.log_records()
    received = {r["id"] for r in recs if r["type"] == "Reception"}
    by = {"Delivery": set(), "Bounce": set(), "Expiration": set()}
    for r in recs:
        if r["type"] in by:
            by[r["type"]].add(r["id"])
        if r["type"] == "Delivery":
            prov = _provider_of(r["recipient"].rpartition("@")[2], cfg)
            res.mta_delivered[prov] = res.mta_delivered.get(prov, 0) + 1
        if r["type"] == "AdaptiveAction":
            k = str(r.get("rule") or r.get("kind") or r.get("action"))
            res.actions[k] = res.actions.get(k, 0) + 1
    live = {e.id for e in d.spooled().envelopes.values()}
    res.delivered, res.bounced, res.expired = (len(by[k] & received) for k in ("Delivery", "Bounce", "Expiration"))
    done = by["Delivery"] | by["Bounce"] | by["Expiration"]
    res.queued = len((received - done) & live)
    res.lost = sorted(received - done - live)
    if len(received) != res.injected:
        res.lost.append(f"{res.injected - len(received)} injected messages without a Reception record")


def _warmup(res: Result, d: Daemon, start: float, warm: list) -> None:
    """For each warming source and provider: the simulator's accepted per simulated day
    (= warm-up day - 1) and per hour against the MTA's caps for that day."""
    caps: dict[tuple[str, str, int], tuple[int | None, int | None]] = {}
    for r in d.log_records("WarmupDay"):
        caps[(r["source"], r["class"], r["day"])] = (r["cap"], r["hour_cap"])
    klass = {"gmail": "major", "yahoo": "major", "microsoft": "major", "smallisp": "small"}
    major, small = _scaled(WARMUP_MAJOR, res.volume_scale), _scaled(WARMUP_SMALL, res.volume_scale)
    for i in range(N_SOURCES - N_NEW, N_SOURCES):
        name, ip = f"s{i + 1:02d}", f"{NET}.{i + 1}"
        for prov, pairs in sorted(res.stats["providers"].items()):
            p = pairs.get(ip)
            if p is None:
                continue
            per_day: dict[int, list[int]] = {}
            for hour, _allowed, accepted, _deferred, _rejected in p["hourly"]:
                per_day.setdefault(hour // 24, []).append(accepted)
            for day0, hours in sorted(per_day.items()):
                day = day0 + 1
                k = klass[prov]
                if day == 1:
                    sched = major if k == "major" else small
                    cap = (sched[0], -(-sched[0] // 8))
                else:
                    cap = caps.get((name, k, day), (None, None))
                acc, mh = sum(hours), max(hours)
                res.warmup_rows.append((name, prov, day, cap[0], acc, mh, cap[1]))
                if cap[0] is not None and (acc > cap[0] or mh > cap[1]):
                    res.warmup_breaches.append(f"{name} {prov} day {day}: accepted {acc} (max {mh}/h) "
                                               f"> cap {cap[0]} ({cap[1]}/h)")


def _plot(res: Result) -> None:
    (res.out / "stats.json").write_text(json.dumps(res.stats))
    subprocess.run([sys.executable, "-m", "tools.isp_sim.plot", str(res.out / "stats.json"),
                    str(res.out / "plot.html"), "--title",
                    f"mta vs isp_sim: {res.days:g} days of {res.day_seconds:g} s"],
                   cwd=ROOT, check=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
