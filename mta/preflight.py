"""`mta check-config`: everything `mta serve` would refuse, and what would fail later.

check() builds the pieces Server.start() builds from the config, through the same
functions in mta/server.py (signing_domains, build_feedback, build_delivery,
unsubscribe_tls): every DKIM key loaded, the bounce rule files and the suppression key
read, the sources, pools, pool hook and shaping files checked, the TLS certificate
loaded. It binds no listening socket, opens no spool and writes nothing the daemon
owns: the suppression store (and a key file that does not exist yet) are built in a
temporary directory, thrown away afterwards.

Errors (serve would refuse to start) come back one line each, naming the file and the
problem; warnings are what serve accepts but that fails at delivery or surprises:

- a [[source]] address not configured on this host (binding a UDP socket to it gives
  EADDRNOTAVAIL): every connection from it fails and is deferred;
- a shaping file naming a source no [[source]] defines (its limits never apply);
- the connection budget above the open files limit;
- the one-click endpoint configured while suppression is off (serve logs and skips it);
- a spool or log directory this user cannot write (serve, run as another user, may).

Address checks for listeners, the admin API and the one-click endpoint are errors: a
listening address that is not on the host, or one endpoint given twice, stops serve.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mta.config import Config, ConfigError
from mta.control.token import TokenError, read_token, token_path
from mta.egress.shaping import Shaping, ShapingError
from mta.ingest.listener import listener_security
from mta.server import build_delivery, build_feedback, signing_domains, unsubscribe_tls, webhooks
from mta.spool import Spool
from mta.supervisor import config_problems


@dataclass
class Report:
    """What check() found: errors make serve refuse the config, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(config: Config, nofile: int | None = None) -> Report:
    """Check `config` as serve would, without starting anything. `nofile`: the open files
    limit for the connection budget warning (None: skip that check)."""
    report = Report()
    where = config.origin

    def refused(exc: ConfigError) -> None:
        report.errors.extend(str(exc).splitlines())

    def warn(text: str) -> None:
        report.warnings.append(f"{where}: warning: {text}")

    try:
        signing_domains(config)
    except ConfigError as exc:
        refused(exc)
    _check_feedback(config, refused)
    delivery = None
    try:
        delivery = build_delivery(config, Spool(str(config.spool.directory)), None,
                                  lambda *a, **k: None)
    except ConfigError as exc:
        refused(exc)
    try:
        unsubscribe_tls(config)
    except ConfigError as exc:
        refused(exc)
    try:
        webhooks(config)      # [[webhook]] authorization and CA files
    except ConfigError as exc:
        refused(exc)
    for listener in config.listener:   # certificates, AUTH users files
        try:
            listener_security(listener, config.origin)
        except ConfigError as exc:
            refused(exc)
    if config.admin.listen is not None:
        try:
            read_token(token_path(config))
        except FileNotFoundError:
            pass            # the daemon creates it
        except TokenError as exc:
            report.errors.append(f"{where}: [admin] token_file: {exc}")
    for problem in _listening_problems(config):
        report.errors.append(f"{where}: {problem}")
    if config.server.workers > 1:     # what worker processes cannot run with
        report.errors.extend(f"{where}: {problem}" for problem in config_problems(config))
    for problem in _directory_problems(config):
        warn(problem)
    for problem in _source_problems(config):
        warn(problem)
    if delivery is not None:
        for problem in _shaping_source_problems(config, set(delivery.egress.sources)):
            warn(problem)
    if config.unsubscribe.listen is not None and not config.suppression.enabled:
        warn("[unsubscribe] listen is set but [suppression] is disabled: serve starts no "
             "unsubscribe endpoint")
    if nofile is not None:
        from mta.daemon import connection_budget_problem
        problem = connection_budget_problem(config, nofile)
        if problem:
            warn(problem)
    return report


def _check_feedback(config: Config, refused) -> None:
    """build_feedback() on a copy of the config whose suppression store (and key file,
    when there is none yet) live in a temporary directory: the rule files, the VERP
    settings and an existing key file are checked as serve checks them, and nothing the
    daemon owns is created (check-config may run as another user than the daemon)."""
    s = config.suppression
    with tempfile.TemporaryDirectory(prefix="mta-check-") as tmp:
        key_file = s.key_file if Path(s.key_file).exists() else Path(tmp) / "key"
        sandbox = dataclasses.replace(config, suppression=dataclasses.replace(
            s, store=Path(tmp) / "store.sqlite", key_file=key_file))
        try:
            feedback = build_feedback(sandbox)
        except ConfigError as exc:
            refused(exc)
            return
        feedback.close()


def _is_local(address: str) -> bool | None:
    """True when `address` is configured on this host (a UDP bind to it works), False on
    EADDRNOTAVAIL, None when it cannot be told (e.g. no IPv6 at all)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return False if exc.errno == errno.EADDRNOTAVAIL else None
    return True


def _listening_problems(config: Config) -> list[str]:
    """Listening endpoints serve could not bind: an address not on the host, or one
    endpoint used twice (a listener, the admin API, the one-click endpoint)."""
    endpoints: list[tuple[str, tuple[str, int]]] = [
        (f"listener[{i}]", (lst.address, lst.port)) for i, lst in enumerate(config.listener)]
    if config.admin.listen is not None:
        endpoints.append(("admin.listen", config.admin.listen))
    if config.unsubscribe.listen is not None and config.suppression.enabled:
        endpoints.append(("unsubscribe.listen", config.unsubscribe.listen))
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for name, (host, port) in endpoints:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None       # a host name: resolved by the bind, not checked here
        if ip is not None and not ip.is_unspecified and _is_local(host) is False:
            problems.append(f"{name}: {host} is not an address of this host (cannot listen on it)")
        if port and (host, port) in seen:
            problems.append(f"{name}: {host}:{port} is also {seen[(host, port)]}'s address")
        seen.setdefault((host, port), name)
    return problems


def _directory_problems(config: Config) -> list[str]:
    problems: list[str] = []
    for name, path in (("spool.directory", config.spool.directory),
                       ("log.directory", config.log.directory)):
        p = Path(path)
        if p.exists() and not p.is_dir():
            problems.append(f"{name}: {p} exists and is not a directory")
            continue
        existing = p
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{name}: {existing} is not writable by uid {os.geteuid()} "
                            f"(the daemon's user needs to write {p})")
    return problems


def _source_problems(config: Config) -> list[str]:
    problems: list[str] = []
    for i, src in enumerate(config.source):
        if _is_local(src.address) is False:
            problems.append(f"source[{i}] {src.name!r}: {src.address} is not an address of "
                            "this host: every connection from it will fail (EADDRNOTAVAIL) "
                            "and its mail will be deferred")
    return problems


def _shaping_source_problems(config: Config, sources: set[str]) -> list[str]:
    """Source names in the operator shaping files that no [[source]] defines."""
    problems: list[str] = []
    for file in config.egress.shaping:
        try:
            rules = Shaping.load([file], dataclasses.asdict(config.delivery), shipped=False).describe()
        except (ShapingError, ValueError):
            continue        # reported as an error by build_delivery
        tables = [("default", rules["default"])]
        for kind in ("providers", "sites", "domains"):
            tables += [(f"{kind[:-1]} {name}", t) for name, t in rules[kind].items()]
        for label, table in tables:
            for src in table.get("sources", {}):
                if src not in sources:
                    problems.append(f"{file}: {label}: sources.{src}: no [[source]] is named "
                                    f"{src!r} (known: {', '.join(sorted(sources))}); these "
                                    "limits never apply")
    return problems
