"""Read a TOML configuration file and validate it against the schema.

`mta serve` and `mta check-config` call load_config() once at start-up; the Config it
returns is handed section by section to the components daemon.py builds. Every key comes
from the tables in schema.py: a missing key takes its default, an unknown key is an error
(KumoMTA `deny_unknown_fields`), and a value goes through the TOML value checker
(values.py, shared with the shaping and rule files): its type's parser, then its choices,
then its bounds. Command-line flags (--listen, --spool-dir) arrive as overrides
and are checked with the same key definitions.

Reads: the given file, or the built-in mta/config/default.toml. Writes nothing.

Diagnostics: ConfigError, which is *fatal* (the daemon does not start). It carries every
problem found, not just the first, each naming the key path and what is allowed, so one
`mta check-config` run shows an operator everything to fix. Calling with an unknown
override name is a bug in the caller and raises ValueError.

Trust: the file is the operator's, but it is still checked value by value: a banner with a
CRLF or a negative size would otherwise reach the wire or the spool.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mta.config.schema import SECTIONS, Config, ListenerConfig, SpoolConfig, keys_of
from mta.config.values import (
    Invalid,
    Key,
    check_value,
    describe,
    parse_hostport,
    parse_toml,
    read_text,
    render,
    unknown_key,
)

# Shipped in the package; `mta serve` without -c runs on it.
DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")

# Override name (as the CLI passes it) -> the flag it came from, for messages.
OVERRIDE_FLAGS = {"listen": "--listen", "spool_dir": "--spool-dir", "smarthost": "--smarthost",
                  "dns": "--dns", "admin": "--admin", "hold": "--hold"}

# Stands for a value that failed to validate, so later checks can skip it.
_BAD: Any = object()


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists everything wrong with it."""

    def __init__(self, problems: list[str], source: str = "<string>") -> None:
        super().__init__(problems, source)
        # One line per problem, "key.path: what is wrong (what is allowed)".
        self.problems = list(problems)
        # The file the problems are in, or "<string>".
        self.source = source

    def __str__(self) -> str:
        # Problems with a command-line flag are not in the file: no file prefix for those.
        return "\n".join(p if p.startswith("--") else f"{self.source}: {p}"
                         for p in self.problems)


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a config file; None means the built-in default.

    Relative paths in the file resolve against the file's directory, and in the
    built-in default against the current working directory.
    """
    if path is None:
        file, base, source = DEFAULT_CONFIG_PATH, Path.cwd(), str(DEFAULT_CONFIG_PATH)
    else:
        file, source = Path(path), os.fspath(path)
        base = file.absolute().parent
    try:
        text = read_text(file)
    except Invalid as e:
        raise ConfigError([str(e)], source) from None
    return parse_config(text, source, base, overrides)


def parse_config(text: str, source: str = "<string>",
                 base_dir: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """Validate TOML text; relative paths resolve against base_dir (default: the CWD)."""
    problems: list[str] = []
    base = Path(os.path.abspath(base_dir)) if base_dir is not None else Path.cwd()
    try:
        data: dict[str, Any] | None = parse_toml(text)
    except Invalid as e:
        problems.append(str(e))
        data = None
    flags = _parse_overrides(overrides or {}, problems)
    if data is None:
        raise ConfigError(problems, source)
    checker = _Checker(base, problems)
    sections = checker.document(data)
    _apply_overrides(sections, flags)
    _check_unique_listeners(sections["listener"], problems)
    _check_egress_names(sections, problems)
    if problems:
        raise ConfigError(problems, source)
    return _build(sections, source)


class _Checker:
    """Walks a parsed TOML document along SECTIONS, collecting problems."""

    def __init__(self, base: Path, problems: list[str]) -> None:
        # Directory relative paths resolve against.
        self.base = base
        # Shared with the caller; every problem found is appended.
        self.problems = problems

    def document(self, data: dict[str, Any]) -> dict[str, Any]:
        """Section name -> dict of checked values (a list of them for arrays of tables)."""
        names = [s.name for s in SECTIONS]
        self._unknown("", data, names)
        out: dict[str, Any] = {}
        for s in SECTIONS:
            raw = data.get(s.name)
            if not s.many:
                out[s.name] = self.table(s.name, s.cls, {} if raw is None else raw, out)
            elif raw is None:
                out[s.name] = [self.table(f"{s.name}[0]", s.cls, {}, out)] if s.required else []
            elif not isinstance(raw, list):
                self.problems.append(f"{s.name}: expected an array of tables (write "
                                     f"[[{s.name}]]), got {describe(raw)}")
                out[s.name] = []
            elif not raw and s.required:
                self.problems.append(f"{s.name}: at least one [[{s.name}]] is required")
                out[s.name] = []
            else:
                out[s.name] = [self.table(f"{s.name}[{i}]", s.cls, item, out)
                               for i, item in enumerate(raw)]
        return out

    def table(self, path: str, cls: type, raw: object,
              done: dict[str, Any]) -> dict[str, Any] | None:
        """Check one table against a section dataclass; None if it is not a table."""
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: expected a table, got {describe(raw)}")
            return None
        keys = keys_of(cls)
        self._unknown(path + ".", raw, list(keys))
        values: dict[str, Any] = {}
        for name, k in keys.items():
            if name in raw:
                values[name] = self.value(f"{path}.{name}", k, raw[name])
            elif k.required:
                self.problems.append(f"{path}.{name}: required ({k.doc})")
                values[name] = _BAD
            elif k.inherit is not None:
                # The named section was checked earlier in SECTIONS order.
                section, inherited = k.inherit.split(".")
                values[name] = (done.get(section) or {}).get(inherited, _BAD)
            else:
                values[name] = self.value(f"{path}.{name}", k, k.default)
        return values

    def value(self, path: str, k: Key, raw: object) -> Any:
        try:
            return check_value(k, raw, self.base)
        except Invalid as e:
            self.problems.append(f"{path}{e.at}: {e}")
            return _BAD

    def _unknown(self, prefix: str, raw: dict[str, Any], allowed: list[str]) -> None:
        for name in raw:
            if name not in allowed:
                self.problems.append(prefix + unknown_key(name, allowed))


_LISTEN_RE = re.compile(r"\[([^\]]*)\]:(\d+)|([^:\[\]]*):(\d+)", re.ASCII)


def _parse_listen(value: object) -> tuple[str, int]:
    """(address, port) from "HOST:PORT" or "[IPv6]:PORT"."""
    if not isinstance(value, str):
        raise Invalid(f"expected HOST:PORT, got {describe(value)}")
    m = _LISTEN_RE.fullmatch(value)
    if m is None:
        raise Invalid(f"{render(value)} is not HOST:PORT (an IPv6 address goes in "
                      "brackets: \"[::1]:2525\")")
    keys = keys_of(ListenerConfig)
    host = m[1] if m[1] is not None else m[3]
    address = check_value(keys["address"], host, Path.cwd())
    port = check_value(keys["port"], int(m[2] or m[4]), Path.cwd())
    return address, port


def _parse_spool_dir(value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise Invalid(f"expected a directory path, got {describe(value)}")
    # A path typed on the command line is relative to where it was typed.
    path: Path = check_value(keys_of(SpoolConfig)["directory"], os.fspath(value), Path.cwd())
    return path


def _parse_hostport_flag(value: object) -> tuple[str, int] | None:
    return None if value == "" else parse_hostport(value)


_OVERRIDE_PARSERS = {"listen": _parse_listen, "spool_dir": _parse_spool_dir,
                     "smarthost": _parse_hostport_flag, "dns": _parse_hostport_flag,
                     "admin": _parse_hostport_flag, "hold": bool}
# Flag -> (section, key) it replaces as a whole.
_SIMPLE_OVERRIDES = {"smarthost": ("delivery", "smarthost"), "admin": ("admin", "listen"),
                     "hold": ("delivery", "hold")}


def _parse_overrides(overrides: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Check the CLI overrides; a None value means the flag was not given."""
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in OVERRIDE_FLAGS:
            raise ValueError(f"unknown config override {name!r} "
                             f"(known: {', '.join(OVERRIDE_FLAGS)})")
        if value is None:
            continue
        try:
            out[name] = _OVERRIDE_PARSERS[name](value)
        except Invalid as e:
            problems.append(f"{OVERRIDE_FLAGS[name]}: {e}")
    return out


def _apply_overrides(sections: dict[str, Any], flags: dict[str, Any]) -> None:
    listeners = sections["listener"]
    if "listen" in flags and listeners and listeners[0] is not None:
        # Only the endpoint changes; listener[0] keeps its limits, banner and relay list.
        listeners[0]["address"], listeners[0]["port"] = flags["listen"]
    if "spool_dir" in flags and sections["spool"] is not None:
        sections["spool"]["directory"] = flags["spool_dir"]
    for flag, (section, name) in _SIMPLE_OVERRIDES.items():
        if flag in flags and sections[section] is not None:
            sections[section][name] = flags[flag]
    if "dns" in flags and sections["dns"] is not None:
        sections["dns"]["nameservers"] = () if flags["dns"] is None else (flags["dns"],)


def _check_unique_listeners(listeners: list[dict[str, Any] | None], problems: list[str]) -> None:
    # With SO_REUSEPORT a second bind to the same endpoint succeeds silently and the kernel
    # splits connections between two differently configured listeners: refuse it here.
    seen: dict[tuple[str, int], int] = {}
    for i, values in enumerate(listeners):
        if values is None or _BAD in (values["address"], values["port"]):
            continue
        endpoint = (values["address"], values["port"])
        if endpoint in seen:
            address, port = endpoint
            shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            problems.append(f"listener[{i}]: {shown} is already used by listener"
                            f"[{seen[endpoint]}] (address and port must be unique)")
        else:
            seen[endpoint] = i


BUILTIN_CLASSES = ("transactional", "bulk", "admin")


def _check_egress_names(sections: dict[str, Any], problems: list[str]) -> None:
    """Names that tie [[source]], [[pool]], [[egress_rule]] and [[queue_class]] together."""
    def names(section: str) -> dict[str, int]:
        seen: dict[str, int] = {}
        for i, values in enumerate(sections[section]):
            if values is None or values["name"] is _BAD:
                continue
            if values["name"] in seen:
                problems.append(f"{section}[{i}].name: {values['name']!r} is already the name "
                                f"of {section}[{seen[values['name']]}]")
            seen.setdefault(values["name"], i)
        return seen

    sources, pools = names("source"), names("pool")
    classes = set(BUILTIN_CLASSES) | set(names("queue_class"))
    for i, values in enumerate(sections["pool"]):
        for j, (member, _) in enumerate(values["sources"] if values and values["sources"]
                                        is not _BAD else ()):
            if member not in sources:
                problems.append(f"pool[{i}].sources[{j}]: no [[source]] is named {member!r}")
    egress = sections["egress"] or {}
    if egress.get("default_pool") not in ("", _BAD, None) and egress["default_pool"] not in pools:
        problems.append(f"egress.default_pool: no [[pool]] is named {egress['default_pool']!r}")
    if egress.get("default_class") not in (_BAD, None) and egress["default_class"] not in classes:
        problems.append(f"egress.default_class: {egress['default_class']!r} is not a queue "
                        f"class (known: {', '.join(sorted(classes))})")
    for i, values in enumerate(sections["egress_rule"]):
        if values is None:
            continue
        if values["pool"] not in ("", _BAD) and values["pool"] not in pools:
            problems.append(f"egress_rule[{i}].pool: no [[pool]] is named {values['pool']!r}")
        if values["queue_class"] not in ("", _BAD) and values["queue_class"] not in classes:
            problems.append(f"egress_rule[{i}].queue_class: {values['queue_class']!r} is not a "
                            f"queue class (known: {', '.join(sorted(classes))})")


def _build(sections: dict[str, Any], source: str) -> Config:
    fields: dict[str, Any] = {}
    for s in SECTIONS:
        values = sections[s.name]
        fields[s.name] = (tuple(s.cls(**v) for v in values) if s.many else s.cls(**values))
    return Config(**fields, origin=source)
