"""Traffic shaping rules: which limits hold for one (source, destination).

The delivery engine asks `Shaping.limits(source, domain, mx_hosts)` for the
`Limits` of a ready queue (one per egress source and site, see
docs/architecture.md) and enforces them: connections, messages per
connection, recipients per transaction, message and connection rates (with
`mta.egress.throttle.Throttle`), TLS, retry intervals.

File format (TOML, the shape of KumoMTA's shaping.toml):

    ["default"]                      # every destination
    connection_limit = 20

    [provider.google]                # a mailbox provider, found by its MX host names
    match = ["*.google.com", "*.googlemail.com"]
    max_deliveries_per_connection = 100

    [site."mx1.example.net,mx2.example.net"]   # one site, by its name (see below)
    connection_limit = 4

    ["gmail.com"]                    # one destination domain, exact (no subdomains)
    max_recipients_per_transaction = 100

    [provider.google.sources."ip-1"] # per egress source, inside any of the tables above
    connection_limit = 2

- Top-level tables other than `default`, `provider` and `site` are domains (A-labels).
- A provider matches a destination when *every* MX host matches one of its `match`
  patterns: "*.google.com" matches any name ending in ".google.com", a pattern without
  "*." matches that one name. A site that mixes providers (a Google primary and an own
  backup MX) is not one provider's infrastructure, so no provider table applies to it
  (KumoMTA's MXSuffix rule). When several providers match, the one with the longest
  matching pattern wins (an exact name beats any wildcard), so a
  "*.olc.protection.outlook.com" provider beats a "*.protection.outlook.com" one. Two
  providers may not list the same pattern.
- A provider table may say `warmup_class = "major"` (or "small"; default "default"): the
  [warmup] schedule that caps a warming source's messages to it (mta/egress/warmup.py).
- A site is named as `mta.egress.sites.Site.name`: its MX host names, lower case,
  sorted, joined by ","; a single-MX site is just its host name; a static route or the
  smarthost is "[host]:port" (pass `site=` to `limits` for those).
- Keys: see KEYS below (`describe()` lists them with their docs). Keys shared with
  [delivery] have the same types and bounds. Rates are "COUNT/UNIT" ("10/s", "600/m",
  "5000/h", "100/5m") or "unlimited". `scope = "source"` (the default) means the
  per-path limits (connection_limit, max_connection_rate, max_message_rate) hold per
  (source, site); `scope = "site"` makes the engine count them per site, shared by all
  sources. `site_connection_limit` and `site_max_message_rate` always hold per site,
  across all sources, on top of the per-path limits; they are not allowed inside
  `sources` tables (a site-wide limit per source would be a contradiction).

Automation rules (acted on by mta/egress/adaptive.py), an array in any table but
`sources`:

    [[provider.yahoo.automation]]
    name = "yahoo-tss04"             # a later file's rule of this name replaces it
    status = ["4.7.0"]               # enhanced status, exact or a prefix "4.7." (optional)
    text = '\\[TSS0[0-9]\\]'        # regex, case-insensitive, on the reply text's first
                                     # 512 characters (optional; one of the two is needed)
    after = 1                        # matches within `within` before acting (1: at once)
    within = "1h"
    action = ["suspend"]             # suspend (the (source, provider)), suspend_source,
                                     # suspend_tenant, suspend_campaign, bounce
    set = { max_message_rate = "60/m", connection_limit = 2 }   # per-path shaping keys
    duration = "15m"                 # actions hold this long at full strength
    steps = 3                        # then `set` comes back halving the cut per step,
    step_for = "15m"                 # every step_for (default: duration) or
    recover_after = 100              # every N good deliveries (0: by time only)
    enabled = true                   # false (with the name alone) switches one off

The rules of every table that applies (default, provider, site, domain) are merged by
name into `Limits.automation`; `backoff_on` / `backoff_for` are the rule "backoff_on"
(a matching 4xx suspends the (source, provider) for backoff_for).

Layering: the [delivery] values passed to `load`, then the shipped
mta/egress/shaping.toml, then the operator's files in order. A later file overrides
keys of the same table; tables merge key by key (a provider's `match` is one key: a
later file replaces the whole list).

Resolution for one (source, domain, MX hosts), each layer overriding the one before:
[delivery] values < default < the matching provider < site < domain < the per-source
tables of those same entries, in the same order (default.sources.S < provider's < ...).
Per-source tables win over every table without a source because a source's limits
(an IP in warm-up, a shared IP) are the operator's most specific statement.
`Limits.matched` lists the tables that applied, e.g. ("default", "provider:google",
"domain:gmail.com", "provider:google/source:ip-1").

Reads: the shaping files, once, at `load`. Writes nothing. Keeps a bounded cache of
resolved Limits (identical Limits are shared).
Diagnostics: `ShapingError` (fatal: configuration), naming the file, the table path and
the problem: unknown key (with the allowed ones), wrong type, bad rate, out of range.
Values go through the config's TOML value checker (mta/config/values.py), so a rate,
a duration or a regex is read, and refused, as in mta.toml.
Trust: the files are the operator's; every value is still checked.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.config.schema import DeliveryConfig, keys_of
from mta.config.values import (
    BOOL,
    CHOICE,
    DURATION,
    HOSTNAME,
    INT,
    LIMIT,
    NAME,
    RATE,
    REGEX,
    REGEX_LIST,
    TEXT_LIST,
    Invalid,
    Key,
    check_table,
    check_value,
    read_toml,
)
from mta.config.values import (
    describe as describe_value,
)
from mta.model.rate import Rate

__all__ = ["Limits", "Rule", "SHIPPED", "Shaping", "ShapingError", "KEYS", "RULE_KEYS"]

# The shipped defaults: big mailbox providers, each number with its source.
SHIPPED = Path(__file__).with_name("shaping.toml")


class ShapingError(ValueError):
    """A shaping file that cannot be used: the text names the file, table and problem."""

    def __init__(self, file: str, table: str, problem: str) -> None:
        where = f"{file}: [{table}]" if table else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.table = table
        self.problem = problem


# --- keys ------------------------------------------------------------------------------


_DELIVERY = keys_of(DeliveryConfig)
# Every key a shaping table may hold, in Limits field order. The keys [delivery] also
# has are its own Key objects, so types, bounds and docs are defined once.
KEYS: dict[str, Key] = {
    "connection_limit": _DELIVERY["connection_limit"],
    "max_connection_rate": Key(RATE, None, "new connections opened per unit of time"),
    "max_deliveries_per_connection": _DELIVERY["max_deliveries_per_connection"],
    "max_message_rate": Key(RATE, None, "messages (transactions) sent per unit of time"),
    "max_recipients_per_transaction": _DELIVERY["max_recipients_per_transaction"],
    "idle_timeout": _DELIVERY["idle_timeout"],
    "tls": Key(CHOICE, None, "STARTTLS: when offered (unauthenticated, RFC 7435); "
               "opportunistic-fallback (the same, and after a failed handshake that host "
               "again in plaintext at once, unless a policy needs TLS); required (defer if "
               "not offered or it fails); verified (required, and the certificate chain must "
               "verify against the trust store and name the MX host); or never (off). "
               "MTA-STS and DANE policies of a domain apply on top ([delivery] mta_sts, dane)",
               choices=("opportunistic", "opportunistic-fallback", "required", "verified", "off")),
    "retry_initial": _DELIVERY["retry_initial"],
    "retry_max": _DELIVERY["retry_max"],
    "site_connection_limit": Key(LIMIT, None, "connections to the site from all sources "
                                 "together"),
    "site_max_message_rate": Key(RATE, None, "messages to the site per unit of time from "
                                 "all sources together"),
    "scope": Key(CHOICE, None, "what connection_limit, max_connection_rate and "
                 "max_message_rate are counted over: each (source, site), or the site",
                 choices=("source", "site")),
    "backoff_on": Key(REGEX_LIST, None, "shorthand for one automation rule: 4xx replies "
                      "(matched against \"code status text\") that mean the provider is "
                      "throttling this source suspend the (source, provider) for backoff_for"),
    "backoff_for": Key(DURATION, None, "how long a backoff_on match pauses the (source, site)",
                       lo="1s", hi="1d"),
}
_SITE_WIDE = ("site_connection_limit", "site_max_message_rate", "scope")

# --- automation rules ----------------------------------------------------------------------
# [[provider.NAME.automation]] (and in [default], [site."..."] and domain tables): what to do
# when a reply matches. mta/egress/adaptive.py keeps their counters and acts on them.

ACTIONS = ("suspend", "suspend_source", "suspend_tenant", "suspend_campaign", "bounce")
# A rule reads at most this much of a reply's text (linear: Python re on a bounded string).
RULE_TEXT_LIMIT = 512
_STATUS_RE = re.compile(r"[245]\.(?:\d{1,3}\.(?:\d{1,3})?)?", re.ASCII)
RULE_KEYS: dict[str, Key] = {
    "name": Key(NAME, None, "the rule's name: a later file's rule of the same name in the same "
                "table replaces it; log records and `mta shaping show` name it", required=True),
    "status": Key(TEXT_LIST, [], "enhanced status codes the reply must have: \"4.7.0\" exactly, "
                  "or a prefix ending in \".\" (\"4.7.\"); empty: any"),
    "text": Key(REGEX, None, "regular expression searched (case-insensitive) in the first "
                f"{RULE_TEXT_LIMIT} characters of the reply text; absent: any text"),
    "after": Key(INT, 1, "matches (one per attempt) before the rule acts; 1: at once",
                 lo=1, hi=1_000_000),
    "within": Key(DURATION, "1h", "the window the `after` matches must fall in",
                  lo="1s", hi="7d"),
    "action": Key(TEXT_LIST, [], "what to do: " + ", ".join(ACTIONS) + " (suspend: the "
                  "(source, provider) pair; suspend_tenant / suspend_campaign: the message's "
                  "tenant or campaign at that provider; bounce: what that tenant and campaign "
                  "have queued for that provider)"),
    "duration": Key(DURATION, "15m", "how long the actions hold at full strength",
                    lo="1s", hi="30d"),
    "steps": Key(INT, 3, "`set` values come back in this many steps, each halving what is "
                 "left of the cut (0: all at once after the duration)", lo=0, hi=10),
    "step_for": Key(DURATION, None, "time per step back (default: the duration)",
                    lo="1s", hi="30d"),
    "recover_after": Key(INT, 0, "a step back also comes after this many good deliveries "
                         "(0: by time only)", lo=0, hi=1_000_000),
    "enabled": Key(BOOL, True, "false switches off a rule of that name from an earlier file"),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One automation rule, checked and compiled once (shared by every Limits holding it)."""

    name: str
    table: str                           # where it was defined: "provider:yahoo", ...
    status: tuple[str, ...]              # exact codes or prefixes ending in "."
    text: re.Pattern[str] | None
    after: int
    within: float
    actions: tuple[str, ...]
    set: tuple[tuple[str, Any], ...]     # shaping keys to override, checked values
    duration: float
    steps: int
    step_for: float
    recover_after: int
    line: bool = False                   # backoff_on: match "code status text" of 4xx only

    def matches(self, code: int, status: str, text: str) -> bool:
        """Whether a (non-2xx) reply is one this rule is about."""
        if self.line:
            return 400 <= code < 500 and self.text is not None and self.text.search(
                f"{code} {status} {text[:RULE_TEXT_LIMIT]}") is not None
        if self.status and not any(status == s or (s.endswith(".") and status.startswith(s))
                                   for s in self.status):
            return False
        return self.text is None or self.text.search(text[:RULE_TEXT_LIMIT]) is not None


def backoff_rule(patterns: tuple[str, ...], duration: float) -> Rule:
    """The backoff_on / backoff_for shorthand as the rule it stands for."""
    return Rule("backoff_on", "backoff_on", (), re.compile(
        "|".join(f"(?:{p})" for p in patterns), re.I), 1, 3600.0, ("suspend",), (),
        duration, 0, duration, 0, line=True)


def parse_rule(raw: object, table: str) -> tuple[Rule, bool]:
    """One [[...automation]] entry: the Rule and whether it is enabled; raises Invalid.
    `name = "..."` with `enabled = false` alone switches off an earlier file's rule."""
    if not isinstance(raw, dict):
        raise Invalid(f"expected a table, got {describe_value(raw)}")
    raw = dict(raw)
    set_raw = raw.pop("set", {})
    v = check_table(raw, RULE_KEYS, Path())
    for i, st in enumerate(v["status"]):
        if not _STATUS_RE.fullmatch(st):
            raise Invalid(f"status[{i}]: {st!r} is not an enhanced status code (\"4.7.0\") "
                          "or a prefix of one ending in \".\" (\"4.7.\")")
    for i, act in enumerate(v["action"]):
        if act not in ACTIONS:
            raise Invalid(f"action[{i}]: {act!r} is not one of {', '.join(ACTIONS)}")
    if not isinstance(set_raw, dict):
        raise Invalid(f"set: expected a table of shaping keys, got {describe_value(set_raw)}")
    values = []
    for k, val in set_raw.items():
        if k not in _RULE_SET_KEYS:
            raise Invalid(f"set: {k}: not a key a rule may set (allowed: "
                          f"{', '.join(_RULE_SET_KEYS)})")
        try:
            values.append((k, check_value(KEYS[k], val, Path())))
        except Invalid as e:
            raise Invalid(f"set.{k}{e.at}: {e}") from None
    if v["enabled"] and not v["action"] and not values:
        raise Invalid("a rule needs an action or a set table (or both)")
    if v["enabled"] and not v["status"] and v["text"] is None:
        raise Invalid("a rule needs a status or a text pattern (or both)")
    rule = Rule(v["name"], table, tuple(v["status"]),
                re.compile(v["text"], re.I) if v["text"] is not None else None, v["after"],
                v["within"], tuple(dict.fromkeys(v["action"])), tuple(values), v["duration"],
                v["steps"], v["step_for"] if v["step_for"] is not None else v["duration"],
                v["recover_after"])
    return rule, v["enabled"]

# A provider table's warm-up class: which [warmup] schedule caps a warming source there.
WARMUP_CLASS = Key(CHOICE, "default", "warm-up schedule of this provider ([warmup] in the "
                   "configuration): major, small or default", choices=("major", "small", "default"))
_SOURCE_KEYS = [k for k in KEYS if k not in _SITE_WIDE]
# Keys that [delivery] must supply; the others default to "no limit" / "source".
# Keys a rule's `set` may change: per-path keys (a (source, provider) override).
_RULE_SET_KEYS = [k for k in _SOURCE_KEYS if k not in ("backoff_on", "backoff_for")]
_REQUIRED = ("connection_limit", "max_deliveries_per_connection",
             "max_recipients_per_transaction", "idle_timeout", "tls", "retry_initial",
             "retry_max")
_OPTIONAL_DEFAULTS = {"max_connection_rate": None, "max_message_rate": None,
                      "site_connection_limit": None, "site_max_message_rate": None,
                      "scope": "source", "backoff_on": [], "backoff_for": "10m"}


@dataclass(frozen=True, slots=True)
class Limits:
    """The resolved shaping of one (source, destination); shared, never mutated."""

    connection_limit: int
    max_connection_rate: Rate | None
    max_deliveries_per_connection: int
    max_message_rate: Rate | None
    max_recipients_per_transaction: int
    idle_timeout: float
    tls: str
    retry_initial: float
    retry_max: float
    site_connection_limit: int | None
    site_max_message_rate: Rate | None
    scope: str
    backoff_on: tuple[str, ...]
    backoff_for: float
    # Automation rules (mta/egress/adaptive.py acts on them): every table's, merged by name,
    # plus the backoff_on shorthand as the rule "backoff_on".
    automation: tuple[Rule, ...]
    # Tables that applied, least specific first, for operators and the admin API.
    matched: tuple[str, ...]


# --- files -----------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def _path(*parts: str) -> str:
    """A TOML table path as an operator writes it: provider.google.sources."ip-1"."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


@dataclass(slots=True)
class _Table:
    """One shaping table after merging every file: checked values and source overrides."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, tuple[Rule, bool]] = field(default_factory=dict)   # name -> (rule, enabled)


@dataclass(slots=True)
class _Provider:
    table: _Table
    file: str                            # the file that first defined it, for errors
    match: tuple[str, ...] = ()          # patterns as written, lower case
    match_file: str = ""                 # the file that last set `match`, for errors
    warmup_class: str = "default"        # its warm-up schedule (mta/egress/warmup.py)


def _label(path: tuple[str, ...]) -> str:
    """A table path as Limits.matched names it: "provider:google", "domain:gmail.com"."""
    if path[0] == "default":
        return "default"
    if path[0] in ("provider", "site"):
        return f"{path[0]}:{path[1]}"
    return f"domain:{path[0]}"


def _hostname(value: str) -> str:
    return HOSTNAME.parse(value.lower().rstrip("."), Path())


class _Loader:
    """Checks files one by one and merges them into the tables of a Shaping."""

    def __init__(self) -> None:
        self.default = _Table()
        self.providers: dict[str, _Provider] = {}
        self.sites: dict[str, _Table] = {}
        self.domains: dict[str, _Table] = {}

    def file(self, path: Path) -> None:
        name = str(path)
        try:
            data = read_toml(path)
        except Invalid as e:
            raise ShapingError(name, "", str(e)) from None
        for top, raw in data.items():
            if top == "default":
                self.table(name, ("default",), raw, self.default)
            elif top == "provider":
                for pname, praw in self.subtables(name, ("provider",), raw).items():
                    self.provider(name, pname, praw)
            elif top == "site":
                for sname, sraw in self.subtables(name, ("site",), raw).items():
                    key = ",".join(sorted(h.strip().lower().rstrip(".")
                                          for h in sname.split(",")))
                    if not key or " " in key:
                        raise ShapingError(name, _path("site", sname), "not a site name "
                                           "(MX host names joined by \",\", or "
                                           "\"[host]:port\")")
                    self.table(name, ("site", sname), sraw, self.sites.setdefault(key, _Table()))
            else:
                if top.startswith((".", "*")):
                    raise ShapingError(name, _path(top), "top-level tables are domains; "
                                       "match MX host names with [provider.NAME] match = "
                                       f"[\"*{top.lstrip('*')}\"]")
                try:
                    domain = _hostname(top)
                except Invalid as e:
                    raise ShapingError(name, _path(top), f"not a domain (top-level tables "
                                       f"other than default, provider and site are "
                                       f"destination domains): {e}") from None
                self.table(name, (top,), raw, self.domains.setdefault(domain, _Table()))

    def subtables(self, file: str, path: tuple[str, ...], raw: object) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise ShapingError(file, _path(*path), f"expected a table of tables, "
                               f"got {describe_value(raw)}")
        return raw

    def provider(self, file: str, pname: str, raw: object) -> None:
        path = ("provider", pname)
        entry = self.providers.setdefault(pname, _Provider(_Table(), file))
        if isinstance(raw, dict) and "match" in raw:
            raw = dict(raw)
            entry.match = self.patterns(file, path, raw.pop("match"))
            entry.match_file = file
        if isinstance(raw, dict) and "warmup_class" in raw:
            raw = dict(raw)
            entry.warmup_class = self.value(file, path, "warmup_class", raw.pop("warmup_class"),
                                            ["warmup_class"], WARMUP_CLASS)
        self.table(file, path, raw, entry.table, extra=("match", "warmup_class"))

    def patterns(self, file: str, path: tuple[str, ...], raw: object) -> tuple[str, ...]:
        if not isinstance(raw, list):
            raise ShapingError(file, _path(*path), f"match: expected an array of MX host "
                               f"patterns like \"*.google.com\", got {describe_value(raw)}")
        out = []
        for i, item in enumerate(raw):
            try:
                if not isinstance(item, str):
                    raise Invalid(f"expected a string, got {describe_value(item)}")
                wild = item.startswith("*.")
                out.append(("*." if wild else "") + _hostname(item[2:] if wild else item))
            except Invalid as e:
                raise ShapingError(file, _path(*path), f"match[{i}]: {e} (a pattern is "
                                   f"\"*.suffix\" or one host name)") from None
        return tuple(out)

    def table(self, file: str, path: tuple[str, ...], raw: object, into: _Table,
              extra: tuple[str, ...] = ()) -> None:
        if not isinstance(raw, dict):
            raise ShapingError(file, _path(*path), f"expected a table, got "
                               f"{describe_value(raw)}")
        for name, value in raw.items():
            if name == "automation":
                self.rules(file, path, value, into)
                continue
            if name == "sources":
                for src, sraw in self.subtables(file, path + ("sources",), value).items():
                    spath = path + ("sources", src)
                    if not isinstance(sraw, dict):
                        raise ShapingError(file, _path(*spath), f"expected a table, got "
                                           f"{describe_value(sraw)}")
                    values = into.sources.setdefault(src, {})
                    for k, v in sraw.items():
                        values[k] = self.value(file, spath, k, v, _SOURCE_KEYS)
                continue
            into.values[name] = self.value(file, path, name, value,
                                           [*KEYS, *extra, "sources"])

    def rules(self, file: str, path: tuple[str, ...], raw: object, into: _Table) -> None:
        if not isinstance(raw, list):
            raise ShapingError(file, _path(*path), "automation: expected an array of tables "
                               f"([[{_path(*path)}.automation]]), got {describe_value(raw)}")
        label = _label(path)
        for i, item in enumerate(raw):
            try:
                rule, enabled = parse_rule(item, label)
            except Invalid as e:
                raise ShapingError(file, _path(*path), f"automation[{i}]: {e}") from None
            into.rules[rule.name] = (rule, enabled)

    def value(self, file: str, path: tuple[str, ...], name: str, raw: object,
              allowed: list[str], k: Key | None = None) -> Any:
        k = k or KEYS.get(name)
        if k is None or name not in allowed:
            why = ("applies to the site as a whole, so not inside a sources table "
                   if k is not None else "unknown key ")
            raise ShapingError(file, _path(*path), f"{name}: {why}(allowed: "
                               f"{', '.join(allowed)})")
        try:
            return check_value(k, raw, Path())
        except Invalid as e:
            raise ShapingError(file, _path(*path), f"{name}{e.at}: {e}") from None

    def check_patterns(self) -> dict[str, tuple[tuple[str, bool], ...]]:
        """Provider -> its patterns as (suffix or name, is wildcard); no pattern twice."""
        owner: dict[str, str] = {}
        out = {}
        for pname, entry in self.providers.items():
            if not entry.match_file:
                # Most likely a misspelt shipped provider: it would silently never apply.
                raise ShapingError(entry.file, _path("provider", pname), "no match "
                                   "patterns in any file (write match = [] to disable a "
                                   "provider on purpose)")
            for pattern in entry.match:
                if owner.get(pattern, pname) != pname:
                    raise ShapingError(entry.match_file, _path("provider", pname),
                                       f"match: {json.dumps(pattern)} is also matched by "
                                       f"[{_path('provider', owner[pattern])}]; a pattern "
                                       "belongs to one provider")
                owner[pattern] = pname
            out[pname] = tuple((p[1:], True) if p.startswith("*.") else (p, False)
                               for p in entry.match)
        return out


# --- resolution ------------------------------------------------------------------------


def _show_rule(rule: Rule, enabled: bool) -> dict[str, Any]:
    return {"name": rule.name, "status": list(rule.status),
            "text": rule.text.pattern if rule.text is not None else None,
            "after": rule.after, "within": rule.within, "action": list(rule.actions),
            "set": {k: _show(v) for k, v in rule.set}, "duration": rule.duration,
            "steps": rule.steps, "step_for": rule.step_for,
            "recover_after": rule.recover_after, "enabled": enabled}


def _show(value: Any) -> Any:
    """A checked value in a JSON-able form, for describe()."""
    return str(value) if isinstance(value, Rate) else value


class Shaping:
    """Checked, merged shaping tables and the cache of resolved Limits."""

    def __init__(self, base: dict[str, Any], loader: _Loader, files: list[str],
                 cache_size: int) -> None:
        self._base = base                      # [delivery] values, checked
        self._default = loader.default
        self._providers = loader.providers
        self._patterns = loader.check_patterns()
        self._sites = loader.sites
        self._domains = loader.domains
        self._files = files
        self._cache_size = cache_size
        # (source, domain, mx hosts, site) -> Limits, oldest first (FIFO eviction).
        self._cache: OrderedDict[tuple[Any, ...], Limits] = OrderedDict()
        # Identical Limits share one object: many domains and sources resolve alike.
        self._interned: dict[Limits, Limits] = {}
        self._backoffs: dict[tuple[Any, ...], Rule] = {}   # one compiled rule per shorthand

    @classmethod
    def load(cls, files: Sequence[Path], defaults: Mapping[str, Any], *,
             shipped: bool = True, cache_size: int = 100_000) -> Shaping:
        """The shipped file (unless `shipped` is False), then `files`, over `defaults`.

        `defaults` holds the [delivery] values (e.g. `dataclasses.asdict(config.delivery)`);
        keys that are not shaping keys are ignored.
        """
        if cache_size < 1:
            raise ValueError(f"cache_size {cache_size} must be at least 1")
        base: dict[str, Any] = {}
        for name in _REQUIRED:
            if name not in defaults:
                raise ShapingError("<delivery defaults>", "", f"{name}: required")
        for name in KEYS:
            raw = defaults.get(name, _OPTIONAL_DEFAULTS.get(name))
            k = KEYS[name]
            try:
                base[name] = raw if raw is None else check_value(k, raw, Path())
            except Invalid as e:
                raise ShapingError("<delivery defaults>", "", f"{name}: {e}") from None
        paths = ([SHIPPED] if shipped else []) + [Path(f) for f in files]
        loader = _Loader()
        for path in paths:
            loader.file(path)
        return cls(base, loader, [str(p) for p in paths], cache_size)

    def limits(self, source: str, domain: str, mx_hosts: Sequence[str], *,
               site: str | None = None) -> Limits:
        """The Limits for mail from `source` to `domain` over `mx_hosts` (any order).

        `site` is the Site name when it is not the MX names (a static route, the
        smarthost). Cached: one dict lookup after the first call for the same arguments.
        """
        key = (source, domain, tuple(mx_hosts), site)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        hosts = tuple(sorted({h.lower().rstrip(".") for h in mx_hosts}))
        site_name = site.lower() if site is not None else ",".join(hosts)
        limits = self._resolve(source, domain.lower().rstrip("."), hosts, site_name)
        limits = self._interned.setdefault(limits, limits)
        cache = self._cache
        cache[key] = limits
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return limits

    def provider_for(self, mx_hosts: Sequence[str]) -> str | None:
        """The provider whose patterns match every MX host; the most specific wins."""
        best: tuple[int, str] | None = None
        hosts = [h.lower().rstrip(".") for h in mx_hosts]
        if not hosts:
            return None
        for pname, patterns in self._patterns.items():
            score = 0
            for host in hosts:
                # An exact name outranks any wildcard; a longer suffix a shorter one.
                s = max((len(p) + (0 if wild else 10_000) for p, wild in patterns
                         if (host.endswith(p) if wild else host == p)), default=0)
                if s == 0:
                    break
                score = max(score, s)
            else:
                if best is None or score > best[0]:
                    best = (score, pname)
        return best[1] if best else None

    def warmup_class(self, provider: str | None) -> str:
        """The warm-up class of a provider (None: no provider matched): "default" unless
        its table says `warmup_class`."""
        entry = self._providers.get(provider) if provider else None
        return entry.warmup_class if entry is not None else "default"

    def _resolve(self, source: str, domain: str, hosts: tuple[str, ...],
                 site_name: str) -> Limits:
        layers: list[tuple[str, _Table]] = [("default", self._default)]
        pname = self.provider_for(hosts)
        if pname is not None:
            layers.append((f"provider:{pname}", self._providers[pname].table))
        if site_name in self._sites:
            layers.append((f"site:{site_name}", self._sites[site_name]))
        if domain in self._domains:
            layers.append((f"domain:{domain}", self._domains[domain]))
        values = dict(self._base)
        matched = []
        rules: dict[str, tuple[Rule, bool]] = {}
        for label, table in layers:
            values.update(table.values)
            rules.update(table.rules)
            matched.append(label)
        for label, table in layers:
            if source in table.sources:
                values.update(table.sources[source])
                matched.append(f"{label}/source:{source}")
        automation = [r for r, enabled in rules.values() if enabled]
        if values["backoff_on"]:
            automation.append(self._backoff(tuple(values["backoff_on"]), values["backoff_for"]))
        return Limits(**values, automation=tuple(automation), matched=tuple(matched))

    def _backoff(self, patterns: tuple[str, ...], duration: float) -> Rule:
        key = (patterns, duration)
        rule = self._backoffs.get(key)
        if rule is None:
            rule = self._backoffs[key] = backoff_rule(patterns, duration)
        return rule

    def describe(self) -> dict[str, Any]:
        """The merged rules, JSON-able, for the admin API and docs."""
        def table(t: _Table, **extra: Any) -> dict[str, Any]:
            out = dict(extra)
            out.update({k: _show(v) for k, v in t.values.items()})
            if t.rules:
                out["automation"] = [_show_rule(r, enabled) for r, enabled in t.rules.values()]
            if t.sources:
                out["sources"] = {s: {k: _show(v) for k, v in vals.items()}
                                  for s, vals in t.sources.items()}
            return out

        return {
            "files": list(self._files),
            "resolution": ["delivery", "default", "provider", "site", "domain",
                           "sources (same order)"],
            "delivery": {k: _show(v) for k, v in self._base.items()},
            "default": table(self._default),
            "providers": {n: table(p.table, match=list(p.match), warmup_class=p.warmup_class)
                          for n, p in self._providers.items()},
            "sites": {n: table(t) for n, t in self._sites.items()},
            "domains": {n: table(t) for n, t in self._domains.items()},
            "keys": {n: k.doc for n, k in KEYS.items()},
        }
