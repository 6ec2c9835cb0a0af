"""`mta serve`: runs Server on uvloop until SIGTERM/SIGINT.

Raises RLIMIT_NOFILE's soft limit to the hard limit at start (connections
are file descriptors), logs to stderr, and stops in order on a signal so
sessions waiting for a spool sync still get their 250.
Signals: SIGHUP reloads the config (Server.reload: checked first, refused whole
when it has problems, restart-only keys kept) and reopens the log file; SIGUSR1
reopens the log file (logrotate). SIGTERM/SIGINT drains: new connections get 421,
sessions finish the message in hand, deliveries in flight reach their end-of-data
reply and are recorded, for up to [delivery] shutdown_grace; then the daemon
stops. A second SIGTERM/SIGINT during the drain stops at once (what was in flight
is delivered again after the restart: at least once).
Diagnostics: fatal errors at start (config, bind, spool) print one line and
exit 1; nothing after start is fatal.
A worker process of several (`[server] workers`, mta/supervisor.py) runs the same code with
its WorkerSlot: its log lines carry `mta[wN]`, and it drains and stops as on SIGTERM when
its stdin (a pipe from the supervisor) reaches end of file: the supervisor is gone.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from typing import Callable

import uvloop

from mta.config import Config
from mta.model.node import WorkerSlot
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


def install_signals(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], object],
                    on_reload: Callable[[], object], on_reopen: Callable[[], object]) -> None:
    """SIGTERM/SIGINT -> on_stop, SIGHUP -> on_reload, SIGUSR1 -> on_reopen (the daemon's
    and the supervisor's signals)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    loop.add_signal_handler(signal.SIGUSR1, on_reopen)


def _watch_supervisor(loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
    """A worker: end of file on stdin (the supervisor's pipe) -> on_gone, once."""
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.warning("the supervisor is gone (stdin closed): draining and stopping")
            devnull = os.open(os.devnull, os.O_WRONLY)   # stdout was its pipe too
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            on_gone()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


async def _serve(config: Config, ready_line: bool,
                 loader: Callable[[], Config] | None = None,
                 worker: WorkerSlot | None = None) -> None:
    server = Server(config, worker)
    if loader is not None:
        server.loader = loader
    await server.start()
    # What start built (modules, config, shaping tables, the admin app) lives as long as
    # the daemon: frozen out of the collector's sight, so the full collections that
    # delivery's garbage triggers do not walk it every time (bench/relay_bench.py).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()     # the first SIGTERM/SIGINT: drain, then stop
    now = asyncio.Event()      # the second: stop at once
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        (now if stop.is_set() else stop).set()

    def on_reopen() -> None:
        if server.logs is not None:
            server.logs.reopen()

    install_signals(loop, on_stop, server.reload, on_reopen)
    if worker is not None:
        _watch_supervisor(loop, stop.set)
    addrs = ", ".join(f"{h}:{p}" for h, p in server.addresses)
    log.info("listening on %s; spool %s; %d messages queued", addrs,
             config.spool.directory, len(server.spool))
    if ready_line:
        print(f"mta: ready on {addrs}", flush=True)
    await stop.wait()
    await _drain(server, now)
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


async def _drain(server: Server, now: asyncio.Event) -> None:
    grace = server.config.delivery.shutdown_grace
    log.info("draining for up to %gs: new connections get 421, messages in progress finish "
             "(SIGTERM again to stop at once)", grace)
    server.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while server.busy and not now.is_set() and loop.time() < deadline:
        try:
            await asyncio.wait_for(now.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    if server.busy:
        log.warning("stopping with %d sessions and deliveries unfinished (%s); their messages "
                    "stay queued and go out after the restart", server.busy,
                    "second signal" if now.is_set() else f"grace of {grace:g}s over")


def setup_process(config: Config, tag: str = "", *, say: bool = True) -> None:
    """Logging to stderr (lines tagged `mta[tag]` when given), the umask, RLIMIT_NOFILE
    raised and checked against the connection budgets: the daemon's, the supervisor's and
    each worker's start. `say`: a budget problem is printed on stderr too (once, not by
    every worker)."""
    prefix = f"mta[{tag}] " if tag else ""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s")
    # Spool, quarantine, suppression store and logs hold message content and addresses:
    # nothing the daemon creates is readable by other local users unless a file is given
    # its mode on purpose ([log] mode).
    os.umask(0o077)
    nofile = raise_nofile()
    problem = connection_budget_problem(config, nofile)
    if problem:
        log.warning("%s", problem)
        if say:
            print(f"mta: warning: {problem}", file=sys.stderr, flush=True)
    else:
        log.info("open files limit %d", nofile)


def serve(config: Config, *, ready_line: bool = True,
          loader: Callable[[], Config] | None = None, worker: WorkerSlot | None = None) -> int:
    """Run the daemon (or, with `worker`, one worker process of several); `loader` reads
    the config again for a reload (SIGHUP)."""
    setup_process(config, f"w{worker.index}" if worker is not None else "",
                  say=worker is None)
    try:
        uvloop.run(_serve(config, ready_line, loader, worker))
    except OSError as exc:
        # e.g. "mta: /var/spool/mta: Read-only file system": the path and the errno text
        where = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        print(f"mta: {where}", file=sys.stderr)
        return 1
    return 0
