"""`mta serve`: runs Server on uvloop until SIGTERM/SIGINT.

Raises RLIMIT_NOFILE's soft limit to the hard limit at start (connections
are file descriptors), logs to stderr, and stops in order on a signal so
sessions waiting for a spool sync still get their 250.
Diagnostics: fatal errors at start (config, bind, spool) print one line and
exit 1; nothing after start is fatal.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

import uvloop

from mta.config import Config
from mta.server import Server

log = logging.getLogger("mta.daemon")


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):   # "unlimited" above the kernel's nr_open
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Descriptors the daemon needs besides connections: spool segments, logs, the
# io_uring and eventfds, DNS sockets, the admin API, listening sockets.
_RESERVED_FDS = 256


def connection_budget_problem(config: Config, nofile: int) -> str | None:
    """A warning when the configured connections cannot all be open at once."""
    outbound = config.egress.max_connections
    inbound = sum(lst.max_connections for lst in config.listener)
    need = outbound + inbound + _RESERVED_FDS
    if need <= nofile:
        return None
    return (f"the open files limit is {nofile} (RLIMIT_NOFILE hard limit), but the configured "
            f"connection budget needs {need}: egress.max_connections {outbound} + listener "
            f"max_connections {inbound} + {_RESERVED_FDS} reserved; connections beyond the "
            f"limit will fail with EMFILE. Raise the hard limit (systemd LimitNOFILE=, "
            f"ulimit -Hn) or lower the budgets")


async def _serve(config: Config, ready_line: bool) -> None:
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addrs = ", ".join(f"{h}:{p}" for h, p in server.addresses)
    log.info("listening on %s; spool %s; %d messages queued", addrs,
             config.spool.directory, len(server.spool))
    if ready_line:
        print(f"mta: ready on {addrs}", flush=True)
    await stop.wait()
    log.info("stopping")
    health = server.spool.health()
    await server.stop()
    if health.get("syncs"):
        per_sync = health["records"] / max(health["syncs"], 1)
        line = (f"spool wrote {health['records']} records in {health['batches']} batches with "
                f"{health['syncs']} fdatasyncs ({per_sync:.1f} records per sync)")
        log.info("%s", line)
        if ready_line:
            print(f"mta: {line}", flush=True)


def serve(config: Config, *, ready_line: bool = True) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Spool, quarantine, suppression store and logs hold message content and addresses:
    # nothing the daemon creates is readable by other local users unless a file is given
    # its mode on purpose ([log] mode).
    os.umask(0o077)
    nofile = raise_nofile()
    problem = connection_budget_problem(config, nofile)
    if problem:
        log.warning("%s", problem)
        print(f"mta: warning: {problem}", file=sys.stderr, flush=True)
    else:
        log.info("open files limit %d", nofile)
    try:
        uvloop.run(_serve(config, ready_line))
    except OSError as exc:
        # e.g. "mta: /var/spool/mta: Read-only file system": the path and the errno text
        where = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        print(f"mta: {where}", file=sys.stderr)
        return 1
    return 0
