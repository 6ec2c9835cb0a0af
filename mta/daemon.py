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
import resource
import signal
import sys

import uvloop

from mta.config import Config
from mta.server import Server

log = logging.getLogger("mta.daemon")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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
    nofile = raise_nofile()
    log.info("open files limit %d", nofile)
    try:
        uvloop.run(_serve(config, ready_line))
    except OSError as exc:
        print(f"mta: {exc}", file=sys.stderr)
        return 1
    return 0
