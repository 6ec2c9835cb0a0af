"""The TOML value checker: every value the daemon reads from a TOML file goes through here.

Three kinds of file are TOML: the configuration (mta/config/load.py, keys in schema.py),
the traffic-shaping files (mta/egress/shaping.py) and the bounce classifier's rule files
(mta/feedback/bounce/classify.py). Each declares its keys as `Key`s of the value types
below (duration, size, rate, host:port, CIDR, regular expression, choice, ...), and each
value goes through `check_value`: the type's parser, then the key's choices, then its
bounds (`check_table` does a whole table: unknown, missing and bad keys). So "5m" means
the same in every file, and a mistake reads the same in every file: the loader prefixes
the file and the key path, the text here says what is wrong and what is allowed.
`read_toml` is the one place a file is read and its syntax errors worded.

Reads: the files handed to read_text/read_toml. Writes nothing.
Diagnostics: everything here raises `Invalid`; each loader turns it into its own fatal
error (ConfigError, ShapingError, RulesError) naming the file and key path.
Trust: the files are the operator's, but every value is still checked: a CRLF in a banner
or a negative size would otherwise reach the wire or the spool.
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta.model.rate import Rate

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Invalid(ValueError):
    """A TOML value that its key's type does not accept; the text says what is allowed."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        # Suffix of the key path pointing inside the value, e.g. "[2]" for a list element.
        self.at = at


def render(value: object) -> str:
    """Format a value as it would be written in TOML, for messages and docs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {render(v)}" for k, v in value.items()) + "}"
    return str(value)


_TOML_TYPE_NAMES = [
    (bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
    (list, "array"), (dict, "table"),
]


def describe(value: object) -> str:
    """Name a TOML value's type and show it, shortened: 'integer 5', 'string "x"'."""
    name = next((n for t, n in _TOML_TYPE_NAMES if isinstance(value, t)), "datetime")
    shown = render(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{name} {shown}"


# --- value types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValueType:
    """How one kind of TOML value is checked and converted."""

    # Short name shown in the type column of docs/config.md.
    name: str
    # TOML value and the directory relative paths resolve against -> Python value.
    parse: Callable[[object, Path], Any]
    # What any value of this type must look like, for the docs' value-type table.
    doc: str


def _parse_str(value: object, base: Path) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    return value


def _parse_int(value: object, base: Path) -> int:
    # TOML has real booleans and floats; 1 for true or 2.0 for 2 is a typo, not a value.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {describe(value)}")
    return value


def _parse_bool(value: object, base: Path) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected a boolean (true or false), got {describe(value)}")
    return value


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
# re.ASCII throughout: without it \d takes any Unicode digit and [a-z] with IGNORECASE
# takes the Kelvin sign, so "\u0665MiB" or "\u212aiB" would pass for a size.
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)
_SIZE_HELP = 'integer bytes, or a string like "512KiB", "50MiB", "2GB"'


def parse_size(value: object, base: Path = Path()) -> int:
    """Bytes from an integer or a string with a unit: KB/MB/GB = 1000^n, KiB/MiB/GiB = 1024^n."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"expected a size ({_SIZE_HELP}), got {describe(value)}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise Invalid(f"{render(value)} is not a size ({_SIZE_HELP})")
    n = decimal.Decimal(m.group(1)) * unit
    if n != n.to_integral_value():
        raise Invalid(f"{render(value)} is not a whole number of bytes")
    return int(n)


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# "ms" before "m" so "250ms" is not read as 250 minutes followed by junk.
_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
_DURATION_RE = re.compile(f"(?:{_DURATION_PART})+", re.ASCII)
_DURATION_PART_RE = re.compile(_DURATION_PART, re.ASCII)
_DURATION_HELP = 'seconds as a number, or a string like "250ms", "30s", "5m", "1h", "1h30m"'


def parse_duration(value: object, base: Path = Path()) -> float:
    """Seconds from a number or a string of number+unit parts (ms, s, m, h, d)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Invalid(f"expected a duration ({_DURATION_HELP}), got {describe(value)}")
    if not isinstance(value, str):
        return float(value)
    if not _DURATION_RE.fullmatch(value):
        raise Invalid(f"{render(value)} is not a duration ({_DURATION_HELP})")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(value))


def _parse_path(value: object, base: Path) -> Path:
    text = _parse_str(value, base)
    if not text or "\0" in text:
        raise Invalid(f"{render(text)} is not a usable path (empty, or contains NUL)")
    # abspath, not resolve(): symlinks in the operator's layout are theirs to keep.
    return Path(os.path.abspath(base / os.path.expanduser(text)))


# RFC 1035 2.3.1 as relaxed by RFC 1123 2.1 (labels may start with a digit); a numeric
# last label would make "1.2.3.4" a hostname, which RFC 5321 4.1.3 writes as [1.2.3.4].
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE | re.ASCII)
_HOSTNAME_RULES = "dot-separated labels of letters, digits and inner hyphens"


def _parse_hostname(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    labels = text.split(".")
    if (len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise Invalid(f"{render(text)} is not a valid DNS hostname ({_HOSTNAME_RULES}, "
                      "1..63 characters each, 253 in all, last label not numeric)")
    return text


# RFC 5321 4.2: reply text is textstring = 1*(%d09 / %d32-126); a CR or LF in a banner
# would end the greeting line early and let the rest be read as a second reply.
# 250 keeps "220 <253-char hostname> <banner>" within the 512-octet reply line (4.5.3.1.5).
_TEXT_RE = re.compile(r"[\t\x20-\x7e]{0,250}")


def _parse_text(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    if not _TEXT_RE.fullmatch(text):
        raise Invalid(f"{render(text)} is not allowed (printable ASCII and tab only, "
                      "at most 250 characters)")
    return text


# RFC 5322 3.6.8: field-name = 1*ftext, printable ASCII except ":".
_HEADER_RE = re.compile(r"[\x21-\x39\x3b-\x7e]*")


def _parse_header_name(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    if not _HEADER_RE.fullmatch(text):
        raise Invalid(f"{render(text)} is not a header field name (printable ASCII, "
                      "no spaces or colon; empty to disable)")
    return text


def _parse_optional_hostname(value: object, base: Path) -> str:
    return "" if value == "" else _parse_hostname(value, base).lower()


def _parse_optional_path(value: object, base: Path) -> Path | None:
    return None if value == "" else _parse_path(value, base)


def _parse_ip(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Invalid(f"{render(text)} is not an IPv4 or IPv6 address") from None


def _parse_cidrs(value: object, base: Path) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise Invalid(f"expected an array of CIDR strings, got {describe(value)}")
    nets = []
    for i, item in enumerate(value):
        # ip_network() would take an integer as an address; only strings are CIDRs here.
        if not isinstance(item, str):
            raise Invalid(f"expected a string, got {describe(item)}", at=f"[{i}]")
        try:
            # strict=False: "10.1.2.3/8" means 10.0.0.0/8, as in Postfix mynetworks.
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise Invalid(f"{render(item)} is not a CIDR network (like \"10.0.0.0/8\" or "
                          "\"2001:db8::/32\")", at=f"[{i}]") from None
    return tuple(nets)



_HOSTPORT_RE = re.compile(r"\[([^\]]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", re.ASCII)
_HOSTPORT_HELP = '"host:port" (an IPv6 address in brackets: "[::1]:25")'


def parse_hostport(value: object, base: Path = Path()) -> tuple[str, int]:
    """(host, port) from "host:port" or "[IPv6]:port"; host is an IP or a DNS name."""
    text = _parse_str(value, base)
    m = _HOSTPORT_RE.fullmatch(text)
    port = int(m[2] or m[4]) if m else 0
    if m is None or not 1 <= port <= 65535:
        raise Invalid(f"{render(text)} is not {_HOSTPORT_HELP} with a port 1..65535")
    host = m[1] if m[1] is not None else m[3]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = _parse_hostname(host, base)
    return host, port


def _parse_optional_hostport(value: object, base: Path) -> tuple[str, int] | None:
    return None if value == "" else parse_hostport(value, base)


def _parse_each(value: object, base: Path, item: Callable[[object, Path], Any],
                what: str) -> tuple:
    """An array whose elements each go through `item`; a problem names its index."""
    if not isinstance(value, list):
        raise Invalid(f"expected an array of {what}, got {describe(value)}")
    out = []
    for i, element in enumerate(value):
        try:
            out.append(item(element, base))
        except Invalid as e:
            raise Invalid(str(e), at=f"[{i}]") from None
    return tuple(out)


def _parse_hostport_list(value: object, base: Path) -> tuple[tuple[str, int], ...]:
    return _parse_each(value, base, parse_hostport, f"{_HOSTPORT_HELP} strings")


def _parse_nonempty_header(value: object, base: Path) -> str:
    name = _parse_header_name(value, base)
    if not name:
        raise Invalid("a header name cannot be empty")
    return name.lower()


def _parse_names(value: object, base: Path) -> tuple[str, ...]:
    return _parse_each(value, base, _parse_nonempty_header, "header names")


def _parse_texts(value: object, base: Path) -> tuple[str, ...]:
    return _parse_each(value, base, _parse_text, "strings")


def _parse_selector(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    if not text or not all(_LABEL_RE.fullmatch(label) for label in text.split(".")):
        raise Invalid(f"{render(text)} is not a DKIM selector (DNS labels, RFC 6376 3.1)")
    return text


def _parse_routes(value: object, base: Path) -> dict[str, tuple[str, int]]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a table of domain = \"host:port\", got {describe(value)}")
    out = {}
    for domain, target in value.items():
        name = domain[2:] if domain.startswith("*.") else domain
        try:
            _parse_hostname(name, base)
            out[domain.lower()] = parse_hostport(target, base)
        except Invalid as e:
            raise Invalid(str(e), at=f".{json.dumps(domain)}") from None
    return out

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_NAME_HELP = "1-64 letters, digits, '_', '.', '-'"


def _parse_name(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    if not _NAME_RE.fullmatch(text):
        raise Invalid(f"{render(text)} is not a name ({_NAME_HELP})")
    return text


def _parse_optional_name(value: object, base: Path) -> str:
    return "" if value == "" else _parse_name(value, base)


def _parse_weighted(value: object, base: Path) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"expected a non-empty array of source names or {{source = \"name\", "
                      f"weight = N}} tables, got {describe(value)}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            name, weight = item, 1
        elif isinstance(item, dict) and set(item) <= {"source", "weight"} and "source" in item:
            name, weight = item["source"], item.get("weight", 1)
        else:
            raise Invalid(f"expected a source name or {{source = \"name\", weight = N}}, got "
                          f"{describe(item)}", at=f"[{i}]")
        try:
            name = _parse_name(name, base)
        except Invalid as e:
            raise Invalid(str(e), at=f"[{i}]") from None
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
            raise Invalid(f"weight must be an integer 1..1000, got {describe(weight)}",
                          at=f"[{i}]")
        out.append((name, weight))
    return tuple(out)


def _parse_path_list(value: object, base: Path) -> tuple[Path, ...]:
    return _parse_each(value, base, _parse_path, "file paths")


# Long unit names operators write (KumoMTA accepts "100/min", "10000/h"), mapped to
# the units parse_duration knows, so the denominator goes through that one parser.
_UNIT_ALIASES = {"sec": "s", "second": "s", "seconds": "s", "min": "m", "minute": "m",
                 "minutes": "m", "hr": "h", "hour": "h", "hours": "h", "day": "d",
                 "days": "d"}
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*", re.ASCII)
RATE_HELP = ('a string "COUNT/UNIT" with UNIT s, m, h or d (or sec, min, hour, day), '
             'optionally with a number: "10/s", "600/m", "5000/h", "100/5m"; '
             'or "unlimited"')


def parse_rate(value: object, base: Path = Path()) -> Rate | None:
    """A Rate from "10/s", "600/m", "100/5m", "5000/hour"; None for "unlimited".

    A Rate passes through unchanged, so the [delivery] defaults may hold either form.
    """
    if value is None or isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise Invalid(f"expected a rate ({RATE_HELP}), got {describe(value)}")
    if value.strip() in ("unlimited", ""):
        return None
    m = _RATE_RE.fullmatch(value.lower())
    if m is None:
        raise Invalid(f"{render(value)} is not a rate ({RATE_HELP})")
    unit = _UNIT_ALIASES.get(m[3], m[3])
    try:
        per = parse_duration(f"{m[2] or '1'}{unit}")
    except Invalid:
        raise Invalid(f"{render(value)} is not a rate: unknown unit {render(m[3])} "
                      f"({RATE_HELP})") from None
    count = float(m[1])
    if not count > 0 or not per > 0 or math.isinf(count):
        raise Invalid(f"{render(value)} is not a rate: count and period must be above 0 "
                      "(write \"unlimited\" for no limit)")
    return Rate(count, per)


def _parse_percent(value: object, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value <= 100:
        raise Invalid(f"expected a percentage 0..100 (a number, e.g. 0.2 or 3), "
                      f"got {describe(value)}")
    return float(value)


def _parse_start_time(value: object, base: Path) -> str:
    """A warm-up start: empty (none), "now" (when first seen), or a date or date-time
    (UTC unless it has an offset), as a TOML value or a string; returned as "", "now"
    or ISO 8601 with its offset."""
    if value in ("", "now"):
        return value   # type: ignore[return-value]
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(f"{render(value)} is not a date (\"2026-12-01\"), a date-time "
                          f"(\"2026-12-01T08:00:00Z\") or \"now\"") from None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        value = datetime.datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime.datetime):
        raise Invalid(f"expected a date, a date-time or \"now\", got {describe(value)}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.isoformat()


def _parse_schedule(value: object, base: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"expected a non-empty array of daily message counts, got "
                      f"{describe(value)}")
    out: list[int] = []
    for i, n in enumerate(value):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000_000:
            raise Invalid(f"expected an integer 1..1000000000, got {describe(n)}", at=f"[{i}]")
        if out and not out[-1] <= n <= 2 * out[-1]:
            raise Invalid(f"{n} after {out[-1]}: a day's cap may neither shrink nor more "
                          "than double the day before's", at=f"[{i}]")
        out.append(n)
    return tuple(out)


def _parse_workers(value: object, base: Path) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise Invalid(f'expected an integer 1..1024 or "auto", got {describe(value)}')
    return value


CHOICE = ValueType("choice", _parse_str, "one of the strings listed for the key")
TEXT = ValueType("text", _parse_text, "printable ASCII and tab, at most 250 characters")
HOSTNAME = ValueType("hostname", _parse_hostname,
                     f"DNS hostname: {_HOSTNAME_RULES}, at most 253 characters")
OPTIONAL_HOSTNAME = ValueType("hostname or \"\"", _parse_optional_hostname,
                              "a DNS hostname (as for hostname), or \"\" for none")
HEADER_NAME = ValueType("header", _parse_header_name,
                        "header field name (RFC 5322 3.6.8); empty string disables")
INT = ValueType("int", _parse_int, "a TOML integer (not a float, not a boolean)")
BOOL = ValueType("bool", _parse_bool, "true or false (not 0 or 1)")
SIZE = ValueType("size", parse_size, "integer bytes, or a string: B, KB, MB, GB "
                 "(powers of 1000), KiB, MiB, GiB (powers of 1024), e.g. \"50MiB\"")
DURATION = ValueType("duration", parse_duration, "seconds as an integer or float, or a "
                     "string of number+unit parts: ms, s, m, h, d, e.g. \"250ms\", \"1h30m\"")
PATH = ValueType("path", _parse_path, "a string; ~ is the home directory, relative paths "
                 "resolve against the config file's directory (the working directory for "
                 "the built-in default)")
OPTIONAL_PATH = ValueType("path or \"\"", _parse_optional_path, "a path (as for path), or "
                          "\"\" for none")
IP_ADDRESS = ValueType("ip address", _parse_ip, "an IPv4 or IPv6 address string")
CIDR_LIST = ValueType("cidr list", _parse_cidrs, "an array of strings like \"10.0.0.0/8\"; "
                      "host bits are ignored")
HOSTPORT = ValueType("host:port", _parse_optional_hostport, "\"host:port\" (IPv6 in "
                     "brackets), or \"\" for none")
HOSTPORT_LIST = ValueType("host:port list", _parse_hostport_list,
                          "an array of \"host:port\" strings")
ROUTES = ValueType("routes", _parse_routes, "a table of domain = \"host:port\"; a key "
                   "\"*.example.com\" covers the subdomains")
HEADER_LIST = ValueType("header list", _parse_names, "an array of header field names; "
                        "case does not matter")
TEXT_LIST = ValueType("text list", _parse_texts, "an array of strings (each as for text)")
SELECTOR = ValueType("selector", _parse_selector, "DNS labels, e.g. \"s2026\"")
NAME = ValueType("name", _parse_name, f"an identifier: {_NAME_HELP}")
OPTIONAL_NAME = ValueType("name or \"\"", _parse_optional_name,
                          f"an identifier ({_NAME_HELP}), or \"\" for none")
WEIGHTED = ValueType("weighted sources", _parse_weighted, "an array of source names (weight 1) "
                     "or {source = \"name\", weight = N} tables, N in 1..1000")
PATH_LIST = ValueType("path list", _parse_path_list, "an array of file paths (relative to "
                      "the config file's directory)")
WORKERS = ValueType("workers", _parse_workers, 'an integer 1..1024, or "auto": one per CPU '
                    "(os.cpu_count())")
RATE = ValueType("rate", parse_rate, RATE_HELP + ", or \"\" for no limit")
PERCENT = ValueType("percent", _parse_percent, "a number 0..100: a percentage (0.2 is 0.2 %)")
START_TIME = ValueType("start time", _parse_start_time, "\"\" (none), \"now\" (the first "
                       "start that sees it; kept in the state file), or a TOML date or "
                       "date-time, or such a string (UTC unless it has an offset)")
SCHEDULE = ValueType("schedule", _parse_schedule, "an array of daily message counts, "
                     "each at least the one before and at most twice it")
# The config's types, in the order of docs/config.md's value-type table.
VALUE_TYPES = (CHOICE, TEXT, HOSTNAME, OPTIONAL_HOSTNAME, HEADER_NAME, INT, BOOL, SIZE,
               DURATION, PATH, OPTIONAL_PATH, IP_ADDRESS, CIDR_LIST, HOSTPORT, HOSTPORT_LIST, ROUTES, HEADER_LIST, TEXT_LIST, SELECTOR,
               NAME, OPTIONAL_NAME, WEIGHTED, PATH_LIST, RATE, PERCENT, START_TIME,
               SCHEDULE, WORKERS)


def _parse_limit(value: object, base: Path) -> int | None:
    if value == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise Invalid(f"expected an integer 1..1000000 or \"unlimited\", got {describe(value)}")
    return value


def _parse_regex(value: object, base: Path) -> str:
    text = _parse_str(value, base)
    if not text:
        raise Invalid("an empty regular expression would match everything")
    try:
        re.compile(text)
    except re.error as e:
        raise Invalid(f"{render(text)} is not a regular expression: {e}") from None
    return text


def _parse_regex_list(value: object, base: Path) -> tuple[str, ...]:
    return _parse_each(value, base, _parse_regex, "regular expressions")


# Types only the shaping and rule files use (not in the config's docs).
LIMIT = ValueType("limit", _parse_limit, 'an integer 1..1000000, or "unlimited"')
REGEX = ValueType("regex", _parse_regex, "a regular expression (Python syntax), not empty")
REGEX_LIST = ValueType("regex list", _parse_regex_list, "an array of regular expressions "
                       "(Python syntax)")


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a TOML table: in the config, the metadata of a section dataclass field."""

    # How the TOML value is checked and converted.
    type: ValueType
    # Default in TOML form (None when `inherit` names the default instead).
    default: object
    # One line for the docs (docs/config.md, `describe()` of shaping) and messages.
    doc: str
    # Inclusive bounds in TOML form ("1MiB"), or None for unbounded.
    lo: object = None
    hi: object = None
    # Allowed values of a CHOICE key.
    choices: tuple[str, ...] = ()
    # "section.key" whose value is the default, e.g. listener.hostname <- server.hostname.
    inherit: str | None = None
    # The key has no default: a table without it is an error.
    required: bool = False
    # A running daemon keeps its value until a restart: a reload (SIGHUP) that changes it
    # logs a warning naming the key and keeps the old value.
    restart: bool = False

    def allowed(self) -> str:
        """What this key accepts, beyond its type: the docs' 'allowed' column."""
        if self.required:
            return "required"
        if self.choices:
            return ", ".join(render(c) for c in self.choices)
        if self.lo is not None:
            return f"{_bound(self.lo)}..{_bound(self.hi)}"
        return ""


def _bound(value: object) -> str:
    return value if isinstance(value, str) else render(value)


def check_value(k: Key, raw: object, base: Path) -> Any:
    """One value through its key's type, choices and bounds; raises Invalid."""
    value = k.type.parse(raw, base)
    if k.choices and value not in k.choices:
        allowed = ", ".join(render(c) for c in k.choices)
        raise Invalid(f"{render(value)} is not one of {allowed}")
    if k.lo is not None:
        lo, hi = k.type.parse(k.lo, base), k.type.parse(k.hi, base)
        # Written so NaN (a valid TOML float) fails too.
        if not lo <= value <= hi:
            raise Invalid(f"{render(raw)} is out of range "
                          f"(allowed {_bound(k.lo)}..{_bound(k.hi)})")
    return value


def unknown_key(name: str, allowed: Iterable[str]) -> str:
    """The problem text for a key no table of this kind has."""
    return f"{name}: unknown key (allowed: {', '.join(allowed)})"


def check_table(raw: object, keys: Mapping[str, Key], base: Path) -> dict[str, Any]:
    """Every key of a table through check_value; absent keys take their default (None
    stays None). Raises Invalid "KEY: problem" for the first unknown, missing or bad key."""
    if not isinstance(raw, dict):
        raise Invalid(f"expected a table, got {describe(raw)}")
    for name in raw:
        if name not in keys:
            raise Invalid(unknown_key(name, keys))
    out: dict[str, Any] = {}
    for name, k in keys.items():
        if name not in raw and k.required:
            raise Invalid(f"{name}: required ({k.doc})")
        value = raw.get(name, k.default)
        try:
            out[name] = None if value is None else check_value(k, value, base)
        except Invalid as e:
            raise Invalid(f"{name}{e.at}: {e}") from None
    return out


# --- files -------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A TOML file's text; Invalid if it cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Invalid(f"cannot read the file: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid(f"not UTF-8 (TOML files must be): invalid byte at offset "
                      f"{e.start}") from None


# tomllib (3.11) puts the position only in the text: "Invalid value (at line 3, column 8)".
_SYNTAX_RE = re.compile(r"(.*) \(at (line \d+, column \d+|end of document)\)", re.DOTALL)


def parse_toml(text: str) -> dict[str, Any]:
    """A TOML document; Invalid "TOML syntax error at line L, column C: ..." if it is not one."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _SYNTAX_RE.fullmatch(str(e))
        where = f" at {m[2]}: {m[1]}" if m else f": {e}"
        raise Invalid(f"TOML syntax error{where}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's document: read_text, then parse_toml."""
    return parse_toml(read_text(path))
