"""Tests for mta/config: schema defaults, loader messages, overrides, and the generated docs."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mta.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, parse_config
from mta.config.schema import SECTIONS, SpoolConfig, keys_of
from mta.config.values import Invalid, check_value, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def _problems(text: str, **kw: Any) -> list[str]:
    try:
        parse_config(text, **kw)
    except ConfigError as e:
        return e.problems
    return []


# --- defaults ----------------------------------------------------------------------------


# Where the built-in config deliberately differs from the schema default: the local
# test setup resolves through a loopback DNS server, never through /etc/resolv.conf.
DEFAULT_TOML_DIFFERS = {("dns", "nameservers"): (("127.0.0.1", 53),)}


def test_default_config_matches_schema_defaults(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config()
    for s in SECTIONS:
        tables = getattr(config, s.name)
        for i, table in enumerate(tables if s.many else [tables]):
            for name, k in keys_of(s.cls).items():
                got = getattr(table, name)
                if (s.name, name) in DEFAULT_TOML_DIFFERS:
                    want = DEFAULT_TOML_DIFFERS[(s.name, name)]
                elif k.inherit is not None:
                    section, inherited = k.inherit.split(".")
                    want = getattr(getattr(config, section), inherited)
                else:
                    want = check_value(k, k.default, tmp_path)
                assert got == want, f"{s.name}[{i}].{name}: got {got!r}, want {want!r}"
    empty = parse_config('[dns]\nnameservers = ["127.0.0.1:53"]\n')
    assert dataclasses.replace(config, origin="<string>") == empty, \
        f"got {config!r}, want the same as an empty file {empty!r}"


@pytest.mark.parametrize("what, get, want", [
    ("listener count", lambda c: len(c.listener), 1),
    ("listen address", lambda c: c.listener[0].address, "127.0.0.1"),
    ("listen port", lambda c: c.listener[0].port, 2525),
    ("spool directory", lambda c: c.spool.directory, "CWD/var/spool"),
    ("log directory", lambda c: c.log.directory, "CWD/var/log"),
    ("listener hostname", lambda c: c.listener[0].hostname, "mta.localdomain"),
    ("relay cidrs", lambda c: c.listener[0].relay_cidrs,
     (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    ("origin", lambda c: c.origin, str(DEFAULT_CONFIG_PATH)),
])
def test_builtin_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                         what: str, get: Any, want: Any) -> None:
    monkeypatch.chdir(tmp_path)
    if isinstance(want, str) and want.startswith("CWD/"):
        want = tmp_path / want[4:]
    got = get(load_config())
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def test_default_toml_keys_are_in_schema() -> None:
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    sections = {s.name: s for s in SECTIONS}
    for name, body in data.items():
        assert name in sections, f"default.toml: got section {name!r}, want one of {list(sections)}"
        tables = body if sections[name].many else [body]
        for table in tables:
            for k in table:
                assert k in keys_of(sections[name].cls), \
                    f"default.toml: got key {name}.{k}, want a key of the schema"


def test_config_has_one_field_per_section() -> None:
    got = [f.name for f in dataclasses.fields(Config)]
    want = [s.name for s in SECTIONS] + ["origin"]
    assert got == want, f"Config fields: got {got}, want {want}"


def test_config_is_frozen() -> None:
    config = parse_config("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listener[0].port = 25  # type: ignore[misc]


# --- problem messages --------------------------------------------------------------------


@pytest.mark.parametrize("toml, want", [
    ("[[listener]]\nport = 70000", "listener[0].port: 70000 is out of range (allowed 1..65535)"),
    ('[[listener]]\nbare_newline = "lax"',
     'listener[0].bare_newline: "lax" is not one of "reject", "normalize"'),
    ('[spool]\nsegmentsize = "1MiB"',
     "spool.segmentsize: unknown key (allowed: " + ", ".join(keys_of(SpoolConfig)) + ")"),
    ("[server]\nhostname = 5", "server.hostname: expected a string, got integer 5"),
    ('[server]\nhostname = "mta_1.example"',
     'server.hostname: "mta_1.example" is not a valid DNS hostname ('
     "dot-separated labels of letters, digits and inner hyphens, 1..63 characters each, "
     "253 in all, last label not numeric)"),
    ("[log]\nreception_log = 1",
     "log.reception_log: expected a boolean (true or false), got integer 1"),
    ("[spool]\nmax_batch = 2.0", "spool.max_batch: expected an integer, got float 2.0"),
    ("[spool]\nmax_batch = true", "spool.max_batch: expected an integer, got boolean true"),
    ('[spool]\nsegment_size = "8GiB"',
     'spool.segment_size: "8GiB" is out of range (allowed 1MiB..4GiB)'),
    ('[spool]\nsegment_size = "64 megs"',
     'spool.segment_size: "64 megs" is not a size (integer bytes, or a string like '
     '"512KiB", "50MiB", "2GB")'),
    ('[spool]\ndirectory = ""',
     'spool.directory: "" is not a usable path (empty, or contains NUL)'),
    ("[[listener]]\nidle_timeout = nan",
     "listener[0].idle_timeout: nan is out of range (allowed 1s..1h)"),
    ('[[listener]]\nidle_timeout = "5 minutes"',
     'listener[0].idle_timeout: "5 minutes" is not a duration (seconds as a number, or a '
     'string like "250ms", "30s", "5m", "1h", "1h30m")'),
    ('[[listener]]\nbanner = "hi\\r\\n250 ok"',
     'listener[0].banner: "hi\\r\\n250 ok" is not allowed (printable ASCII and tab only, '
     "at most 250 characters)"),
    ('[reception]\ntenant_header = "X-Tenant:"',
     'reception.tenant_header: "X-Tenant:" is not a header field name (printable ASCII, '
     "no spaces or colon; empty to disable)"),
    ('[[listener]]\naddress = "localhost"',
     'listener[0].address: "localhost" is not an IPv4 or IPv6 address'),
    ('[[listener]]\nrelay_cidrs = ["10.0.0.0/8", "10.0.0.0/33"]',
     'listener[0].relay_cidrs[1]: "10.0.0.0/33" is not a CIDR network (like "10.0.0.0/8" '
     'or "2001:db8::/32")'),
    ("[[listener]]\nrelay_cidrs = [5]",
     "listener[0].relay_cidrs[0]: expected a string, got integer 5"),
    ('[[listener]]\nrelay_cidrs = "10.0.0.0/8"',
     'listener[0].relay_cidrs: expected an array of CIDR strings, got string "10.0.0.0/8"'),
    ("[listener]\nport = 25",
     "listener: expected an array of tables (write [[listener]]), got table {port = 25}"),
    ("listener = []", "listener: at least one [[listener]] is required"),
    ("listener = [1]", "listener[0]: expected a table, got integer 1"),
    ("spool = 5", "spool: expected a table, got integer 5"),
    ("smtp = {}", "smtp: unknown key (allowed: " + ", ".join(s.name for s in SECTIONS) + ")"),
    ("[[listener]]\n[[listener]]\nport = 2526\nfoo = 1",
     "listener[1].foo: unknown key (allowed: address, port, hostname, banner, relay_cidrs, "
     "bare_newline, max_message_size, max_recipients, max_line_length, max_errors, "
     "max_junk_commands, max_messages_per_session, idle_timeout, data_timeout, "
     "max_connections, max_connections_per_ip, tls, tls_cert, tls_key, require_tls, "
     "auth_users, auth_concurrency, auth_max_failures, auth_lockout)"),
])
def test_problem_message(toml: str, want: str) -> None:
    got = _problems(toml)
    assert got == [want], f"got {got}, want {[want]}"


def test_all_problems_reported_together() -> None:
    toml = """
        bogus = 1
        [spool]
        segmentsize = 3
        max_batch = 0
        [[listener]]
        port = 70000
        bare_newline = "lax"
        [[listener]]
        address = "::1"
        idle_timeout = "forever"
    """
    got = _problems(toml, overrides={"spool_dir": ""})
    want = [
        "--spool-dir: \"\" is not a usable path (empty, or contains NUL)",
        "bogus: unknown key (allowed: " + ", ".join(s.name for s in SECTIONS) + ")",
        "spool.segmentsize: unknown key (allowed: " + ", ".join(keys_of(SpoolConfig)) + ")",
        "spool.max_batch: 0 is out of range (allowed 1..65536)",
        "listener[0].port: 70000 is out of range (allowed 1..65535)",
        'listener[0].bare_newline: "lax" is not one of "reject", "normalize"',
        'listener[1].idle_timeout: "forever" is not a duration (seconds as a number, or a '
        'string like "250ms", "30s", "5m", "1h", "1h30m")',
    ]
    assert got == want, f"got {got}, want {want}"


def test_error_text_prefixes_source(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text("[spool]\nmax_batch = 0\n[server]\nhostname = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"listen": "nowhere"})
    got = str(info.value).splitlines()
    want = [
        '--listen: "nowhere" is not HOST:PORT (an IPv6 address goes in brackets: '
        '"[::1]:2525")',
        f"{path}: server.hostname: expected a string, got integer 5",
        f"{path}: spool.max_batch: 0 is out of range (allowed 1..65536)",
    ]
    assert got == want, f"got {got}, want {want}"


@pytest.mark.parametrize("toml, want", [
    ("[spool]\ndirectory = \n", "TOML syntax error at line 2, column 13: Invalid value"),
    ("[server]\nhostname 'x'\n", "TOML syntax error at line 2, column 10: "
                                 "Expected '=' after a key in a key/value pair"),
    ("[spool]\n[spool]\n", "TOML syntax error at line 2, column 7: "
                           "Cannot declare ('spool',) twice"),
])
def test_syntax_error(tmp_path: Path, toml: str, want: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = str(info.value)
    want = f"{path}: {want}"
    assert got == want, f"got {got!r}, want {want!r}"


@pytest.mark.parametrize("content, want", [
    (None, "cannot read the file: No such file or directory"),
    (b"[server]\nhostname = \"\xff\"\n", "not UTF-8 (TOML files must be): invalid byte at "
                                         "offset 21"),
])
def test_unreadable_file(tmp_path: Path, content: bytes | None, want: str) -> None:
    path = tmp_path / "mta.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = info.value.problems
    assert got == [want], f"got {got}, want {[want]}"


# --- value types -------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    (0, 0), (1048576, 1048576), ("1024", 1024), ("512B", 512), ("512KiB", 512 * 1024),
    ("50MiB", 50 * 2**20), ("4GiB", 4 * 2**30), ("2KB", 2000), ("2MB", 2 * 10**6),
    ("2GB", 2 * 10**9), ("64 mib", 64 * 2**20), ("1.5KiB", 1536), ("1.5KB", 1500),
])
def test_size_good(text: object, want: int) -> None:
    got = parse_size(text)
    assert got == want, f"parse_size({text!r}): got {got}, want {want}"


@pytest.mark.parametrize("text", ["", "MiB", "-1KiB", "5XB", "1.0001KiB", "5 M B", "0x10",
                                  "1e3", "\u0665MiB", "5\u212aiB", 1.5, True, [1]])
def test_size_bad(text: object) -> None:
    with pytest.raises(Invalid):
        got = parse_size(text)
        pytest.fail(f"parse_size({text!r}): got {got}, want Invalid")


@pytest.mark.parametrize("text, want", [
    (30, 30.0), (0.25, 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("250ms", 0.25), ("1h30m", 5400.0), ("2d", 172800.0), ("1.5s", 1.5), ("0s", 0.0),
])
def test_duration_good(text: object, want: float) -> None:
    got = parse_duration(text)
    assert got == want, f"parse_duration({text!r}): got {got}, want {want}"


@pytest.mark.parametrize("text", ["", "30", "5 m", "5min", "m", "-5s", "1h 30m", "s30",
                                  "\u0665s", True, [30]])
def test_duration_bad(text: object) -> None:
    with pytest.raises(Invalid):
        got = parse_duration(text)
        pytest.fail(f"parse_duration({text!r}): got {got}, want Invalid")


@pytest.mark.parametrize("hostname, ok", [
    ("mta.localdomain", True), ("localhost", True), ("mx-1.example.com", True),
    ("3com.com", True), ("a" * 63 + ".com", True), ("a" * 64 + ".com", False),
    ("-mx.example.com", False), ("mx-.example.com", False),
    ("mx..example.com", False), ("example.com.", False), ("", False), ("1.2.3.4", False),
    ("mx example.com", False), ("ex\u00e4mple.com", False), ("\u212a.example", False),
    (".".join(["a" * 63] * 4), False),
])
def test_hostname(hostname: str, ok: bool) -> None:
    got = _problems(f"[server]\nhostname = {hostname!r}") == []
    assert got == ok, f"hostname {hostname!r} accepted: got {got}, want {ok}"


def test_listener_hostname_inherits_server_hostname() -> None:
    config = parse_config('[server]\nhostname = "mx.example.com"\n'
                          '[[listener]]\n[[listener]]\nport = 2526\nhostname = "in.example.com"')
    got = [lst.hostname for lst in config.listener]
    want = ["mx.example.com", "in.example.com"]
    assert got == want, f"got {got}, want {want}"


# --- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, want", [
    ("spool", "conf/spool"), ("./var/spool", "conf/var/spool"), ("../spool", "spool"),
    ("~/spool", "HOME/spool"), ("/srv/mta/spool", "/srv/mta/spool"),
])
def test_relative_paths_resolve_against_config_dir(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, value: str,
                                                   want: str) -> None:
    (tmp_path / "conf").mkdir()
    text = f"[spool]\ndirectory = {value!r}\n[log]\ndirectory = {value!r}\n"
    (tmp_path / "conf" / "mta.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/mta")
    want_path = Path(want.replace("HOME", "/home/mta")) if want[0] in "/H" else tmp_path / want
    # A relative -c path resolves the same way: against the file's directory, not the CWD.
    for config in (load_config(tmp_path / "conf" / "mta.toml"),
                   load_config(os.path.join("conf", "mta.toml")),
                   parse_config(text, base_dir=tmp_path / "conf")):
        for got in (config.spool.directory, config.log.directory):
            assert got == want_path, f"{value}: got {got}, want {want_path}"


# --- overrides ---------------------------------------------------------------------------


LISTENER_FILE = """
[[listener]]
address = "127.0.0.2"
port = 2600
banner = "kept"
max_recipients = 7
[[listener]]
address = "127.0.0.3"
"""


@pytest.mark.parametrize("toml, listen, want", [
    ("", "127.0.0.9:2526", ("127.0.0.9", 2526, "ESMTP mta", 1000)),
    ("", "[::1]:2525", ("::1", 2525, "ESMTP mta", 1000)),
    ("", "[0:0::1]:25", ("::1", 25, "ESMTP mta", 1000)),
    ("", "0.0.0.0:1", ("0.0.0.0", 1, "ESMTP mta", 1000)),
    (LISTENER_FILE, "127.0.0.4:2700", ("127.0.0.4", 2700, "kept", 7)),
    (LISTENER_FILE, None, ("127.0.0.2", 2600, "kept", 7)),
])
def test_listen_override(toml: str, listen: str | None, want: tuple[Any, ...]) -> None:
    config = parse_config(toml, overrides={"listen": listen})
    first = config.listener[0]
    got = (first.address, first.port, first.banner, first.max_recipients)
    assert got == want, f"--listen {listen}: got {got}, want {want}"
    if toml:
        got_second = config.listener[1].address
        assert got_second == "127.0.0.3", f"listener[1]: got {got_second}, want 127.0.0.3"


def test_spool_dir_override_is_relative_to_cwd(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config('[spool]\ndirectory = "/elsewhere"', base_dir="/etc/mta",
                          overrides={"spool_dir": "myspool"})
    got, want = config.spool.directory, tmp_path / "myspool"
    assert got == want, f"got {got}, want {want}"


@pytest.mark.parametrize("overrides, want", [
    ({"listen": "::1:2525"},
     '--listen: "::1:2525" is not HOST:PORT (an IPv6 address goes in brackets: "[::1]:2525")'),
    ({"listen": "127.0.0.1"},
     '--listen: "127.0.0.1" is not HOST:PORT (an IPv6 address goes in brackets: '
     '"[::1]:2525")'),
    ({"listen": "127.0.0.1:70000"}, "--listen: 70000 is out of range (allowed 1..65535)"),
    ({"listen": "127.0.0.1:0"}, "--listen: 0 is out of range (allowed 1..65535)"),
    ({"listen": "localhost:25"}, '--listen: "localhost" is not an IPv4 or IPv6 address'),
    ({"listen": "[nope]:25"}, '--listen: "nope" is not an IPv4 or IPv6 address'),
    ({"listen": 2525}, "--listen: expected HOST:PORT, got integer 2525"),
    ({"listen": "127.0.0.1:\u0662\u0665"},
     '--listen: "127.0.0.1:\u0662\u0665" is not HOST:PORT (an IPv6 address goes in brackets: '
     '"[::1]:2525")'),
    ({"spool_dir": ""}, '--spool-dir: "" is not a usable path (empty, or contains NUL)'),
    ({"spool_dir": 5}, "--spool-dir: expected a directory path, got integer 5"),
])
def test_bad_override(overrides: dict[str, Any], want: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("", source="mta.toml", overrides=overrides)
    got = (info.value.problems, str(info.value))
    assert got == ([want], want), f"got {got}, want {([want], want)}"


def test_unknown_override_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown config override 'port'"):
        parse_config("", overrides={"port": 25})


# --- listener uniqueness -----------------------------------------------------------------

DUP = "listener[{}]: {} is already used by listener[0] (address and port must be unique)"


@pytest.mark.parametrize("toml, overrides, want", [
    ("[[listener]]\n[[listener]]", {}, [DUP.format(1, "127.0.0.1:2525")]),
    ('[[listener]]\naddress = "::1"\n[[listener]]\naddress = "0::1"\n[[listener]]\n'
     'address = "::1"\nport = 25\n[[listener]]\naddress = "0:0::1"', {},
     [DUP.format(1, "[::1]:2525"), DUP.format(3, "[::1]:2525")]),
    ("[[listener]]\nport = 25\n[[listener]]", {"listen": "127.0.0.1:2525"},
     [DUP.format(1, "127.0.0.1:2525")]),
    ("[[listener]]\nport = 25\n[[listener]]", {}, []),
    ('[[listener]]\n[[listener]]\naddress = "127.0.0.2"', {}, []),
])
def test_duplicate_listeners(toml: str, overrides: dict[str, str], want: list[str]) -> None:
    got = _problems(toml, overrides=overrides)
    assert got == want, f"got {got}, want {want}"


# --- generated docs ----------------------------------------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_config_doc",
                                                  ROOT / "tools" / "gen_config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_are_up_to_date() -> None:
    want = _generator().render_doc()
    got = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert got == want, ("docs/config.md: got a stale file, want the generator's output; "
                         "run python3 tools/gen_config_doc.py")


def _documented_keys(text: str) -> set[str]:
    found, section = set(), None
    for line in text.splitlines():
        if line.startswith("## "):
            m = re.fullmatch(r"## \[\[?(\w+)\]\]?", line)
            section = m[1] if m else None
        elif section and (m := re.match(r"\| `(\w+)` \|", line)):
            found.add(f"{section}.{m[1]}")
    return found


def test_docs_list_exactly_the_schema_keys() -> None:
    documented = _documented_keys((ROOT / "docs" / "config.md").read_text(encoding="utf-8"))
    declared = {f"{s.name}.{k}" for s in SECTIONS for k in keys_of(s.cls)}
    assert declared - documented == set(), \
        f"undocumented keys: got {sorted(declared - documented)}, want none"
    assert documented - declared == set(), \
        f"documented keys missing from the schema: got {sorted(documented - declared)}, want none"


def test_schema_defaults_and_bounds_are_valid(tmp_path: Path) -> None:
    for s in SECTIONS:
        for name, k in keys_of(s.cls).items():
            assert k.doc and "\n" not in k.doc, f"{s.name}.{name}: got doc {k.doc!r}, want one line"
            if k.inherit is None and not k.required:
                check_value(k, k.default, tmp_path)
            if k.lo is not None:
                lo, hi = (k.type.parse(b, tmp_path) for b in (k.lo, k.hi))
                assert lo <= hi, f"{s.name}.{name}: got bounds {lo}..{hi}, want lo <= hi"
