"""`mta config show`: the effective configuration as TOML (Postfix `postconf -d` / `-n`).

render(config) writes every key of every section of SECTIONS (schema.py) with the value
in force, defaults and inherited values included; render(config, changed=True) writes
only what differs from the defaults (a [[source]], [[pool]] ... table always shows its
required keys; [[listener]] tables are shown unless there is exactly one, all default).

Values are written in the form an operator types ("64MiB", "5m", "600/m",
"127.0.0.1:8025"), and relative paths come out absolute, as the daemon resolved them.
The output is a valid config: loading it gives the same Config (tests/test_cli.py checks
both renderings round-trip). Reads and writes nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mta.config.load import DEFAULT_CONFIG_PATH
from mta.config.schema import SECTIONS, Config, keys_of
from mta.config.values import (
    CIDR_LIST,
    DURATION,
    HOSTPORT,
    HOSTPORT_LIST,
    OPTIONAL_PATH,
    PATH,
    PATH_LIST,
    RATE,
    ROUTES,
    SIZE,
    WEIGHTED,
    Key,
    check_value,
    parse_duration,
)

_SIZE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_DURATION_UNITS = (("d", 86400_000), ("h", 3600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def base_dir(config: Config) -> Path:
    """The directory the config's relative paths resolved against (as load_config does)."""
    if config.origin in (str(DEFAULT_CONFIG_PATH), "<string>"):
        return Path.cwd()
    return Path(config.origin).absolute().parent


def _size(n: int) -> object:
    for unit, mult in _SIZE_UNITS:
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return n


def _duration(seconds: float) -> object:
    ms = round(seconds * 1000)
    if ms == 0 and seconds == 0:
        return "0s"
    for unit, mult in _DURATION_UNITS:
        if ms and ms % mult == 0:
            text = f"{ms // mult}{unit}"
            if parse_duration(text) == seconds:
                return text
            break
    return seconds


def _hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def toml_value(k: Key, value: Any) -> object:
    """A checked value back in the form the TOML file would hold it."""
    t = k.type
    if t is SIZE:
        return _size(value)
    if t is DURATION:
        return _duration(value)
    if t is RATE:
        return "" if value is None and k.default == "" else ("unlimited" if value is None
                                                              else str(value))
    if t is HOSTPORT:
        return "" if value is None else _hostport(value)
    if t is HOSTPORT_LIST:
        return [_hostport(v) for v in value]
    if t is ROUTES:
        return {domain: _hostport(hp) for domain, hp in value.items()}
    if t is CIDR_LIST:
        return [str(n) for n in value]
    if t is PATH:
        return os.fspath(value)
    if t is OPTIONAL_PATH:
        return "" if value is None else os.fspath(value)
    if t is PATH_LIST:
        return [os.fspath(p) for p in value]
    if t is WEIGHTED:
        return [name if weight == 1 else {"source": name, "weight": weight}
                for name, weight in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _toml(value: object) -> str:
    """TOML text of a plain value (str, int, float, bool, list, dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)   # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _default(k: Key, name: str, config: Config, base: Path) -> Any:
    """The value `k` has when the file does not set it (inherited from its section)."""
    if k.required:
        return _NO_DEFAULT
    if k.inherit is not None:
        section, key = k.inherit.split(".")
        return getattr(getattr(config, section), key)
    return check_value(k, k.default, base)


_NO_DEFAULT = object()


def render(config: Config, *, changed: bool = False) -> str:
    """The config as TOML: every key (changed=False), or what differs from the defaults."""
    base = base_dir(config)
    what = "differs from the defaults" if changed else "is in force, defaults included"
    out = [f"# mta config show{' --changed' if changed else ''}: what {what}",
           f"# config: {config.origin}"]
    for s in SECTIONS:
        keys = keys_of(s.cls)
        value = getattr(config, s.name)
        tables = list(value) if s.many else [value]
        if changed and s.many and s.required and len(tables) == 1 and all(
                getattr(tables[0], n) == _default(k, n, config, base) for n, k in keys.items()):
            continue            # one [[listener]] with every default: what an empty file gives
        for table in tables:
            lines = []
            for name, k in keys.items():
                v = getattr(table, name)
                if changed and not k.required and v == _default(k, name, config, base):
                    continue
                lines.append(f"{name} = {_toml(toml_value(k, v))}")
            if lines or s.many:
                out.append("")
                out.append(f"[[{s.name}]]" if s.many else f"[{s.name}]")
                out.extend(lines)
    return "\n".join(out) + "\n"
