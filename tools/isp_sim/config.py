"""The simulator's configuration: providers.toml read into typed, checked values.

Every provider key has a default here (DEFAULTS); a provider's table overrides them one
by one, so a small test config names only what it changes. Errors name the key path.
See README.md for the meaning of each key and tools/isp_sim/providers.toml for the
shipped providers and the sources of their reply texts.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DAY = 86400.0
HOUR = 3600.0

# reply name -> default text; "{ip}", "{rcpt}", "{domain}", "{id}", "{mx}" are filled in.
# Multi-line replies: one line per "\n" (see Reply).
DEFAULT_REPLIES = {
    "greeting": "220 {mx} ESMTP isp-sim ready",
    "connections": "421 4.7.0 Too many connections from {ip}, try again later",
    "per_connection": "421 4.7.0 Too many messages on this connection, closing",
    "rate": "421 4.7.0 Messages from {ip} temporarily deferred: rate limit reached",
    "reputation": "421 4.7.0 Messages from {ip} temporarily deferred: poor reputation",
    "block": "550 5.7.1 Messages from {ip} blocked: rate limits persistently exceeded",
    "unknown": "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
    "greylist": "451 4.7.1 Greylisting in action, please come back later",
    "relay": "550 5.7.1 <{rcpt}>: Relay access denied",
    "accepted": "250 2.0.0 OK {id}",
}


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, enhanced status (may be empty) and its lines of text."""
    code: int
    enhanced: str
    lines: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Reply:
        first, _, rest = text.strip("\n").partition(" ")
        if not re.fullmatch(r"[2345]\d\d", first):
            raise ValueError(f"{where}: a reply starts with a 3-digit code, got {text[:40]!r}")
        enhanced = ""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})( |$)", rest)
        if m and m.group(1)[0] == first[0]:
            enhanced, rest = m.group(1), rest[m.end():]
        lines = tuple(ln.strip() for ln in rest.split("\n")) or ("",)
        return cls(int(first), enhanced, lines)

    def render(self, **values: str) -> bytes:
        """The wire form: 'CODE-ENH line' for all but the last line, 'CODE ENH line' last."""
        head = f"{self.code}"
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == len(self.lines) - 1 else "-"
            text = line
            for k, v in values.items():
                text = text.replace("{" + k + "}", v)
            body = f"{self.enhanced} {text}" if self.enhanced else text
            out.append(f"{head}{sep}{body}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def first_line(self, **values: str) -> str:
        return self.render(**values).split(b"\r\n", 1)[0].decode()


@dataclass(frozen=True)
class Mx:
    name: str          # host name, absolute form without the dot
    address: str       # loopback IPv4 address the simulator listens on
    preference: int


@dataclass(frozen=True)
class Provider:
    name: str
    domains: tuple[str, ...]
    mx: tuple[Mx, ...]
    # allowance for a source of age 0 and reputation 1, and the ceilings age grows it to
    connections: tuple[int, int]
    per_connection: int
    per_day: tuple[int, int]
    per_hour_fraction: float
    growth: float
    # reputation: window of simulated hours, weights, the level below which all is deferred
    window_hours: int
    min_volume: int
    unknown_weight: float
    complaint_weight: float
    defer_below: float
    # recipients: unknown users and complaints (prefix of the local part, or a fraction)
    unknown_prefix: str
    unknown_fraction: float
    complaint_prefix: str
    complaint_fraction: float
    arf: bool
    greylist_minutes: float
    # blocks: `block_excess` refusals for excess within `block_window_hours` -> blocked
    block_excess: int
    block_window_hours: int
    block_hours: float
    max_rcpts: int
    replies: dict[str, Reply] = field(repr=False)

    def caps(self, age_days: int, reputation: float, scale: float) -> tuple[int, int, int]:
        """(connections, per_hour, per_day) for a source of this age and reputation."""
        grow = self.growth ** min(max(age_days, 0), 64)
        day = min(self.per_day[1], self.per_day[0] * grow) * scale * reputation
        conns = min(self.connections[1], self.connections[0] * grow) * reputation
        per_day = int(day)
        per_hour = min(per_day, int(-(-day * self.per_hour_fraction // 1)))
        return max(1, int(conns)), per_hour, per_day


@dataclass(frozen=True)
class Source:
    address: str
    age_days: int
    reputation: float


@dataclass(frozen=True)
class Config:
    providers: dict[str, Provider]
    sources: dict[str, Source]
    day_seconds: float
    port: int
    volume_scale: float
    seed: int
    fbl_to: str               # where ARF reports go ("" = nowhere)
    fbl_host: str             # host:port of the MTA's listener for the bounce domain
    tls: bool                 # offer STARTTLS (self-signed certificate, tls.py)

    def provider_at(self, address: str) -> Provider | None:
        return self._by_address.get(address)     # type: ignore[attr-defined]

    def addresses(self) -> list[str]:
        return list(self._by_address)            # type: ignore[attr-defined]


PROVIDER_DEFAULTS: dict[str, Any] = {
    "connections": [2, 20], "per_connection": 100, "per_day": [1000, 1_000_000],
    "per_hour_fraction": 0.125, "growth": 2.0,
    "window_hours": 24, "min_volume": 50, "unknown_weight": 5.0, "complaint_weight": 150.0,
    "defer_below": 0.5,
    "unknown_prefix": "unknown", "unknown_fraction": 0.0,
    "complaint_prefix": "complain", "complaint_fraction": 0.0,
    "arf": True, "greylist_minutes": 0.0,
    "block_excess": 200, "block_window_hours": 2, "block_hours": 24.0, "max_rcpts": 100,
}


def _pair(v: Any, where: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v) \
            and v[0] <= v[1]:
        return v[0], v[1]
    raise ValueError(f"{where}: want an integer or [initial, ceiling] with initial <= ceiling, got {v!r}")


def _loopback(addr: Any, where: str) -> str:
    try:
        ip = ipaddress.IPv4Address(addr)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: want an IPv4 address, got {addr!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"{where}: {addr} is not a loopback address (127.0.0.0/8 only)")
    return str(ip)


def _provider(name: str, t: dict[str, Any]) -> Provider:
    where = f"providers.{name}"
    known = set(PROVIDER_DEFAULTS) | {"domains", "mx", "replies"}
    if unknown := set(t) - known:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, allowed: {sorted(known)}")
    v = {**PROVIDER_DEFAULTS, **{k: t[k] for k in PROVIDER_DEFAULTS if k in t}}
    domains = t.get("domains")
    if not domains or not all(isinstance(d, str) and d for d in domains):
        raise ValueError(f"{where}.domains: want a non-empty list of domain names")
    mx = []
    for i, m in enumerate(t.get("mx") or []):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise ValueError(f"{where}.mx[{i}]: want {{name, address, preference}}")
        mx.append(Mx(m["name"].rstrip(".").lower(), _loopback(m.get("address"), f"{where}.mx[{i}].address"),
                     int(m.get("preference", 10))))
    if not mx:
        raise ValueError(f"{where}.mx: want at least one MX host")
    replies = dict(DEFAULT_REPLIES)
    for k, text in (t.get("replies") or {}).items():
        if k not in DEFAULT_REPLIES:
            raise ValueError(f"{where}.replies.{k}: unknown reply, allowed: {sorted(DEFAULT_REPLIES)}")
        replies[k] = text
    parsed = {k: Reply.parse(text, f"{where}.replies.{k}") for k, text in replies.items()}
    for k in ("unknown_fraction", "complaint_fraction", "defer_below", "per_hour_fraction"):
        if not 0.0 <= float(v[k]) <= 1.0:
            raise ValueError(f"{where}.{k}: want a number in [0, 1], got {v[k]!r}")
    if float(v["growth"]) < 1.0:
        raise ValueError(f"{where}.growth: want >= 1 (allowances never shrink with age)")
    return Provider(
        name=name, domains=tuple(d.lower().rstrip(".") for d in domains), mx=tuple(mx),
        connections=_pair(v["connections"], f"{where}.connections"),
        per_connection=int(v["per_connection"]), per_day=_pair(v["per_day"], f"{where}.per_day"),
        per_hour_fraction=float(v["per_hour_fraction"]), growth=float(v["growth"]),
        window_hours=int(v["window_hours"]), min_volume=int(v["min_volume"]),
        unknown_weight=float(v["unknown_weight"]), complaint_weight=float(v["complaint_weight"]),
        defer_below=float(v["defer_below"]),
        unknown_prefix=str(v["unknown_prefix"]).lower(), unknown_fraction=float(v["unknown_fraction"]),
        complaint_prefix=str(v["complaint_prefix"]).lower(),
        complaint_fraction=float(v["complaint_fraction"]), arf=bool(v["arf"]),
        greylist_minutes=float(v["greylist_minutes"]), block_excess=int(v["block_excess"]),
        block_window_hours=max(1, int(v["block_window_hours"])), block_hours=float(v["block_hours"]),
        max_rcpts=int(v["max_rcpts"]), replies=parsed)


def load(path: str | Path | None = None, text: str | None = None, **overrides: Any) -> Config:
    """Read a providers file (or TOML text); `overrides` (day_seconds, port, volume_scale,
    fbl_to, fbl_host, tls) win over the [simulator] table, as the CLI's options do."""
    data = tomllib.loads(text) if text is not None else tomllib.loads(Path(path).read_text())  # type: ignore[arg-type]
    sim = dict(data.get("simulator") or {})
    sim.update({k: v for k, v in overrides.items() if v is not None})
    allowed = {"day_seconds", "port", "volume_scale", "seed", "fbl_to", "fbl_host", "tls"}
    if unknown := set(sim) - allowed:
        raise ValueError(f"simulator: unknown keys {sorted(unknown)}, allowed: {sorted(allowed)}")
    providers = {name: _provider(name, t) for name, t in (data.get("providers") or {}).items()}
    if not providers:
        raise ValueError("providers: want at least one provider")
    by_address: dict[str, Provider] = {}
    for p in providers.values():
        for m in p.mx:
            if m.address in by_address:
                raise ValueError(f"providers.{p.name}.mx: {m.address} is also {by_address[m.address].name}'s")
            by_address[m.address] = p
    sources = {}
    for i, s in enumerate(data.get("sources") or []):
        addr = _loopback(s.get("address"), f"sources[{i}].address")
        sources[addr] = Source(addr, int(s.get("age_days", 0)), float(s.get("reputation", 1.0)))
    fbl_host = str(sim.get("fbl_host", ""))
    if fbl_host and not re.fullmatch(r"[\w.-]+:\d{1,5}", fbl_host):
        raise ValueError(f"simulator.fbl_host: want host:port, got {fbl_host!r}")
    day_seconds = float(sim.get("day_seconds", DAY))
    if day_seconds <= 0:
        raise ValueError("simulator.day_seconds: want > 0")
    cfg = Config(providers=providers, sources=sources, day_seconds=day_seconds,
                 port=int(sim.get("port", 25)), volume_scale=float(sim.get("volume_scale", 1.0)),
                 seed=int(sim.get("seed", 1)), fbl_to=str(sim.get("fbl_to", "")), fbl_host=fbl_host,
                 tls=bool(sim.get("tls", True)))
    object.__setattr__(cfg, "_by_address", by_address)
    return cfg


def zone_records(cfg: Config, ttl: int = 300) -> list[str]:
    """MX and A records for every provider's domains, one zone-file line each, in the form
    tools/dnsserver.py's DnsServer takes."""
    out: list[str] = []
    for p in cfg.providers.values():
        for d in p.domains:
            out += [f"{d}. {ttl} IN MX {m.preference} {m.name}." for m in p.mx]
        out += [f"{m.name}. {ttl} IN A {m.address}" for m in p.mx]
    return list(dict.fromkeys(out))
