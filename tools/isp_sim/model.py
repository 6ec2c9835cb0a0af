"""What a mailbox provider thinks of each sending IP: allowance, reputation, greylist, blocks.

No I/O here: the SMTP sessions (server.py) ask this model for a decision at each step and
report what happened; tests drive it with a clock they advance by hand.

Units. Time is simulated seconds since the simulator started (Clock); simulated hour h
covers [h*3600, (h+1)*3600) and day d covers hours 24d..24d+23. Volume is counted in
recipients (a message to three users of one provider counts three).

Allowance of a (source, provider) pair, set at the start of each simulated hour h of
day d (see Provider.caps):
  age      = days since the source was first seen (configured sources: age_days + d)
  rep      = the pair's reputation over the complete hours before h (below)
  per_day  = floor(min(ceiling, initial * growth**age) * volume_scale * rep)
  per_hour = min(per_day, ceil(that product * per_hour_fraction))
  conns    = min(ceiling, initial * growth**age) * rep, at least 1
A recipient is accepted only while the hour's count is under per_hour and the day's count
(recipients accepted since the day began) is under per_day.

`allowed` (what the benchmark compares delivered volume against) is what a sender with
unlimited demand and perfect pacing would have had accepted: summed over each simulated
hour h since the pair began (configured sources: hour 0; others: their first contact),
    allowed(h) = 0                                  if rep(h) < defer_below
                 min(per_hour(h), per_day(d) - allowed so far on day d)   otherwise
the current hour counted in full. Connection and per-connection limits, greylisting and
unknown users do not reduce it; a block does not either (a perfect sender is never
blocked).

Reputation of a pair over the last `window_hours` simulated hours, once at least
`min_volume` recipients were judged (got as far as the mailbox check: accepted at RCPT or
unknown; recipients deferred for rate, reputation or a block, and retries of those, do
not dilute the rates):
    rep = min(initial, 1 - unknown_weight * unknown/judged - complaint_weight * complaints/accepted)
clamped to [0, 1]. Below `defer_below` every recipient is deferred with the provider's
reputation reply until the window forgets enough.

Blocks: each recipient refused because a cap was reached, and each connection refused
for the connection cap, is an excess; `block_excess` of them within `block_window_hours`
blocks the source at that provider for `block_hours` (every recipient gets the block
reply, a 5.7.1).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from .config import DAY, HOUR, Config, Provider

MAX_CATCH_UP_HOURS = 24 * 400     # hours a pair's ledger is brought forward at once
SERIES_HOURS = 24 * 60            # hourly series kept per pair (for plots)
MAX_GREYLIST = 1_000_000          # greylist triples remembered

ACCEPT = "accepted"
DEFER = "deferred"
REJECT = "rejected"


class Clock:
    """Simulated seconds: wall time since start times 86400/day_seconds, plus what
    advance() added (tests skip ahead without waiting)."""

    def __init__(self, day_seconds: float, manual: bool = False) -> None:
        self.factor = DAY / day_seconds
        self.start = time.monotonic()
        self.offset = 0.0
        self.manual = manual        # True: time moves only by advance()

    def now(self) -> float:
        return self.offset if self.manual else (time.monotonic() - self.start) * self.factor + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def hashed_fraction(*parts: str) -> float:
    """A number in [0, 1) fixed by `parts` (the seed first): 'a fraction of recipients' that
    stays the same recipients across retries and runs with one seed."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Hour:
    """What one simulated hour saw for a pair."""
    offered: int = 0
    judged: int = 0         # recipients that got as far as the mailbox check: accepted or unknown
    unknown: int = 0
    accepted: int = 0
    complaints: int = 0
    deferred: int = 0
    rejected: int = 0
    excess: int = 0
    allowed: int = 0


@dataclass
class Pair:
    """Everything a provider keeps about one source IP."""
    source: str
    provider: Provider
    age_base: int               # age on day `first_day`
    first_day: int
    initial_rep: float
    last_hour: int              # last hour the ledger has evaluated
    hours: dict[int, Hour] = field(default_factory=dict)
    open: int = 0               # connections open now
    day: int = -1
    day_cap: int = 0
    day_used: int = 0           # recipients accepted or reserved today
    day_allowed: int = 0
    hour_cap: int = 0
    hour_used: int = 0
    conn_cap: int = 1
    reputation: float = 1.0
    allowed: int = 0
    blocked_until: float = -1.0
    blocks: list[list[float]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def age(self, day: int) -> int:
        return self.age_base + day - self.first_day

    def hour(self, h: int) -> Hour:
        rec = self.hours.get(h)
        if rec is None:
            rec = self.hours[h] = Hour()
            self.hours.pop(h - SERIES_HOURS, None)       # hours are made in order, one by one
            if len(self.hours) > SERIES_HOURS + 48:      # ... unless a catch-up skipped some
                for old in [k for k in self.hours if k <= h - SERIES_HOURS]:
                    del self.hours[old]
        return rec

    def rep_at(self, h: int) -> float:
        p = self.provider
        window = [self.hours[k] for k in range(h - p.window_hours + 1, h + 1) if k in self.hours]
        judged = sum(x.judged for x in window)
        if judged < p.min_volume:
            return self.initial_rep
        accepted = sum(x.accepted for x in window)
        rep = 1.0 - p.unknown_weight * sum(x.unknown for x in window) / judged
        if accepted:
            rep -= p.complaint_weight * sum(x.complaints for x in window) / accepted
        return max(0.0, min(self.initial_rep, rep))

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


class Model:
    """All pairs of one simulator, and the decisions the SMTP sessions ask for."""

    def __init__(self, cfg: Config, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.pairs: dict[tuple[str, str], Pair] = {}
        self.first_seen: dict[str, int] = {}          # unconfigured source -> first day
        self.greylist: dict[tuple[str, str, str], float] = {}   # triple -> first try (sim s)
        self.seed = str(cfg.seed)      # picks which recipients the *_fraction settings hit
        for src in cfg.sources.values():
            for p in cfg.providers.values():
                self._new_pair(src.address, p, 0, src.age_days, src.reputation, first_hour=0)

    # --- bookkeeping ----------------------------------------------------------------------

    def _new_pair(self, source: str, p: Provider, day: int, age: int, rep: float, first_hour: int) -> Pair:
        pair = Pair(source, p, age_base=age, first_day=day, initial_rep=rep, last_hour=first_hour - 1,
                    reputation=rep)
        self.pairs[(source, p.name)] = pair
        return pair

    def pair(self, source: str, provider: Provider) -> Pair:
        """The pair, its ledger brought up to now."""
        now = self.clock.now()
        pair = self.pairs.get((source, provider.name))
        if pair is None:
            day = int(now // DAY)
            first = self.first_seen.setdefault(source, day)
            pair = self._new_pair(source, provider, first, 0, 1.0, first_hour=int(now // HOUR))
        self._catch_up(pair, int(now // HOUR))
        return pair

    def _catch_up(self, pair: Pair, now_hour: int) -> None:
        """Evaluate every hour since the last one: caps, reputation, allowed volume."""
        start = max(pair.last_hour + 1, now_hour - MAX_CATCH_UP_HOURS)
        p = pair.provider
        for h in range(start, now_hour + 1):
            day = h // 24
            rep = pair.rep_at(h - 1) if h > 0 else pair.initial_rep
            if day != pair.day:
                pair.day, pair.day_used, pair.day_allowed = day, 0, 0
            pair.conn_cap, pair.hour_cap, pair.day_cap = p.caps(pair.age(day), rep, self.cfg.volume_scale)
            pair.hour_used = 0
            pair.reputation = rep
            allowed = 0 if rep < p.defer_below else max(0, min(pair.hour_cap, pair.day_cap - pair.day_allowed))
            pair.day_allowed += allowed
            pair.allowed += allowed
            pair.hour(h).allowed = allowed
        pair.last_hour = max(pair.last_hour, now_hour)

    def _excess(self, pair: Pair) -> None:
        now = self.clock.now()
        h = int(now // HOUR)
        pair.hour(h).excess += 1
        p = pair.provider
        recent = sum(pair.hours[k].excess for k in range(h - p.block_window_hours + 1, h + 1) if k in pair.hours)
        if recent >= p.block_excess and pair.blocked_until < now:
            pair.blocked_until = now + p.block_hours * HOUR
            pair.blocks.append([now, pair.blocked_until])
            pair.count("blocks")

    # --- decisions ------------------------------------------------------------------------

    def connect(self, source: str, provider: Provider) -> tuple[str, str]:
        """(outcome, reason) for a new connection: ACCEPT, or DEFER 'connections'."""
        pair = self.pair(source, provider)
        pair.count("connections")
        if pair.open >= pair.conn_cap:
            pair.count("refused_connections")
            self._excess(pair)
            return DEFER, "connections"
        pair.open += 1
        return ACCEPT, ""

    def disconnect(self, source: str, provider: Provider) -> None:
        pair = self.pairs.get((source, provider.name))
        if pair is not None and pair.open > 0:
            pair.open -= 1

    def rcpt(self, source: str, provider: Provider, sender: str, rcpt: str) -> tuple[str, str]:
        """(outcome, reason) for RCPT TO. ACCEPT reserves a unit of the hour's and day's cap
        (release() gives it back if the transaction does not complete)."""
        pair = self.pair(source, provider)
        now = self.clock.now()
        rec = pair.hour(int(now // HOUR))
        rec.offered += 1
        pair.count("offered")
        local, _, domain = rcpt.rpartition("@")
        local = local.lower()
        outcome, reason = self._rcpt_decision(pair, now, sender, rcpt.lower(), local, domain.lower())
        if outcome == ACCEPT or reason == "unknown":
            rec.judged += 1
        if outcome == ACCEPT:
            pair.hour_used += 1
            pair.day_used += 1
        else:
            pair.count(f"{outcome}.{reason}")
            if outcome == DEFER:
                rec.deferred += 1
            else:
                rec.rejected += 1
            if reason == "unknown":
                rec.unknown += 1
        return outcome, reason

    def _rcpt_decision(self, pair: Pair, now: float, sender: str, rcpt: str, local: str,
                       domain: str) -> tuple[str, str]:
        p = pair.provider
        if now < pair.blocked_until:
            return REJECT, "block"
        if domain not in p.domains:
            return REJECT, "relay"
        if pair.reputation < p.defer_below:
            return DEFER, "reputation"
        if pair.hour_used >= pair.hour_cap or pair.day_used >= pair.day_cap:
            self._excess(pair)
            return DEFER, "rate"
        if (p.unknown_prefix and local.startswith(p.unknown_prefix)) or \
                (p.unknown_fraction and hashed_fraction(self.seed, "unknown", rcpt) < p.unknown_fraction):
            return REJECT, "unknown"
        if p.greylist_minutes > 0:
            key = (pair.source, sender.lower(), rcpt)
            first = self.greylist.setdefault(key, now)
            if len(self.greylist) > MAX_GREYLIST:       # forget the oldest tenth
                for old in list(self.greylist)[: MAX_GREYLIST // 10]:
                    del self.greylist[old]
            if now < first + p.greylist_minutes * 60:
                return DEFER, "greylist"
        return ACCEPT, ""

    def release(self, source: str, provider: Provider, n: int, hour: int) -> None:
        """Give back `n` reserved units of a transaction that did not complete in `hour`."""
        pair = self.pairs[(source, provider.name)]
        if hour == pair.last_hour:
            pair.hour_used = max(0, pair.hour_used - n)
        if hour // 24 == pair.day:
            pair.day_used = max(0, pair.day_used - n)

    def accepted(self, source: str, provider: Provider, rcpts: list[str], message_id: str) -> list[str]:
        """Record accepted recipients; return those who will complain (an ARF each)."""
        pair = self.pair(source, provider)
        p = pair.provider
        rec = pair.hour(int(self.clock.now() // HOUR))
        rec.accepted += len(rcpts)
        pair.count("accepted", len(rcpts))
        pair.count("messages")
        complainers = []
        for r in rcpts:
            local = r.rpartition("@")[0].lower()
            if (p.complaint_prefix and local.startswith(p.complaint_prefix)) or \
                    (p.complaint_fraction and hashed_fraction(self.seed, "complaint", r.lower(), message_id)
                     < p.complaint_fraction):
                complainers.append(r)
        rec.complaints += len(complainers)
        if complainers:
            pair.count("complaints", len(complainers))
        return complainers

    # --- observation ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Per provider, per source: counters, current caps, allowed, blocks and the hourly
        series [hour, allowed, accepted, deferred, rejected] (hours with any activity or
        allowance)."""
        now = self.clock.now()
        out: dict = {"sim_time": round(now, 1), "day": int(now // DAY), "hour": int(now // HOUR),
                     "day_seconds": self.cfg.day_seconds, "providers": {}}
        for (source, name), pair in sorted(self.pairs.items()):
            self._catch_up(pair, int(now // HOUR))
            entry = {
                "age_days": pair.age(int(now // DAY)), "reputation": round(pair.reputation, 4),
                "caps": {"connections": pair.conn_cap, "per_hour": pair.hour_cap, "per_day": pair.day_cap,
                         "per_connection": pair.provider.per_connection},
                "allowed": pair.allowed, "accepted": pair.counts.get("accepted", 0),
                "deferred": sum(v for k, v in pair.counts.items() if k.startswith(DEFER + ".")),
                "rejected": sum(v for k, v in pair.counts.items() if k.startswith(REJECT + ".")),
                "counts": dict(sorted(pair.counts.items())),
                "blocked": now < pair.blocked_until, "blocks": [[round(a, 1), round(b, 1)] for a, b in pair.blocks],
                "open": pair.open,
                "hourly": [[h, x.allowed, x.accepted, x.deferred, x.rejected]
                           for h, x in sorted(pair.hours.items())
                           if x.allowed or x.accepted or x.deferred or x.rejected],
            }
            out["providers"].setdefault(name, {})[source] = entry
        return out
