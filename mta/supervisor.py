"""`mta serve` with `[server] workers = N` (N > 1): one supervisor and N worker processes.

The supervisor runs no mail itself. It executes a fresh interpreter per worker (the same
`mta` command line plus `--worker I/N`; never a fork of a running event loop), and each
worker is a whole daemon (`Server(config, worker=WorkerSlot(I, N, node))` on uvloop, see
daemon.py) with, from `worker_config`:
- its own listener sockets on the configured addresses and ports (SO_REUSEPORT: the kernel
  spreads connections over the workers);
- its own spool directory `<spool directory>/wI`: a worker that dies loses nothing, its
  restart recovers that shard (its operator state, adaptive and warm-up state too);
- its own log file `<log directory>/mta.wI.jsonl` (grep `mta.w*.jsonl`), and its stderr
  lines tagged `mta[wI]`;
- its own admin API on `[admin] listen` port + I (worker 0 on the configured port), one
  token file for all (default <spool directory>/admin.token); `mta queue ...` and `?node=1`
  on any worker's admin API answer for the node (mta/control/nodeview.py);
- its share of the node's budgets: [egress] max_connections, each listener's
  max_connections, [server] data_memory_budget and [spool] hot_cache divided by N
  (rounded up, at least 1), so N workers together hold what the config says;
- the [unsubscribe] endpoint on the same port in every worker (SO_REUSEPORT).
Delivery limits (connection_limit, rates, warm-up caps) are held by each worker by itself:
N workers may use up to N times a limit unless shared limits are configured.

Supervision: a worker that exits is started again after a backoff (0.5 s, doubling while
it keeps dying within 30 s of its start, up to 30 s; every restart is logged with the exit
status); a worker that fails before its first start ever completed (bad config, cannot
bind) stops the whole start: the supervisor stops the others and exits 1.
Signals: SIGTERM/SIGINT are forwarded as SIGTERM (the workers drain; a second one stops
them at once) and the supervisor exits when every worker has stopped: 0 when all exited
0. SIGHUP (reload) and SIGUSR1 (reopen logs) are forwarded to every worker.
The workers run in their own session (a terminal's ^C reaches the supervisor only) and
watch their stdin, a pipe from the supervisor: when the supervisor is gone (even by
SIGKILL) they drain and stop. Under systemd use KillMode=mixed.
A spool the workers do not read (segments of a single-process run in the spool root, a
shard wI with I >= N after the count was lowered) is moved in by worker 0 at its start
(mta/control/adopt.py).
Health: `<spool directory>/workers.json` (written on every change: supervisor pid, per
worker pid, state, start time, restarts, last exit status, admin address); `mta workers`
prints it with each worker's GET /ready answer.
Ready: the supervisor prints `mta: ready on ADDRS (N workers)` once every worker is ready;
other stdout lines of a worker are passed on as `mta: wI: ...`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import uvloop

from mta.config import Config, ConfigError
from mta.control.worker_config import slot_of, worker_config
from mta.daemon import install_signals, setup_process
from mta.files import write_atomic
from mta.model.node import WorkerSlot

log = logging.getLogger("mta.supervisor")

STATUS_NAME = "workers.json"   # in the (root) spool directory
BACKOFF_FIRST = 0.5            # seconds before the first restart of a worker that died
BACKOFF_MAX = 30.0             # ... doubling up to this while it keeps dying
STABLE_AFTER = 30.0            # a worker that ran this long starts again from BACKOFF_FIRST
MAX_LINE = 4096                # a worker's stdout line passed on (longer: cut)


def config_problems(config: Config) -> list[str]:
    """What workers = N cannot run with."""
    n = config.server.workers
    problems = []
    listen = config.admin.listen
    if listen is not None and listen[1] and listen[1] + n - 1 > 65535:
        problems.append(f"[admin] listen port {listen[1]} + {n - 1} workers is above 65535")
    return problems


@dataclasses.dataclass
class Worker:
    slot: WorkerSlot
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"       # starting, running, restarting, stopped
    started: float = 0.0          # wall clock of the last start
    restarts: int = 0
    last_exit: str = ""           # "exit 1", "signal SIGKILL"
    ever_ready: bool = False

    def as_json(self, config: Config) -> dict:
        listen = worker_config(config, self.slot).admin.listen
        return {"index": self.slot.index, "name": self.slot.name, "state": self.state,
                "pid": self.proc.pid if self.proc is not None and self.state != "stopped"
                else None,
                "started": self.started, "restarts": self.restarts, "last_exit": self.last_exit,
                "admin": f"{listen[0]}:{listen[1]}" if listen else None}


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit {rc}"


class Supervisor:
    def __init__(self, config: Config, argv: list[str], *, ready_line: bool = True):
        self.config = config
        self.argv = list(argv)        # the mta command's arguments (serve and its options)
        self.ready_line = ready_line
        n = config.server.workers
        self.workers = [Worker(slot_of(f"{i}/{n}", config)) for i in range(n)]
        self.stopping = asyncio.Event()
        self.failed: str | None = None   # a worker could not start at all
        self.started = time.time()
        self.status_path = Path(config.spool.directory) / STATUS_NAME
        self._all_ready: asyncio.Future | None = None

    # -- the processes ------------------------------------------------------------------

    def command(self, slot: WorkerSlot) -> list[str]:
        return [sys.executable, "-m", "mta", *self.argv, "--worker",
                f"{slot.index}/{slot.count}"]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._all_ready = loop.create_future()
        install_signals(loop, self._on_stop, lambda: self._forward(signal.SIGHUP),
                        lambda: self._forward(signal.SIGUSR1))
        tasks = [asyncio.ensure_future(self._keep(w)) for w in self.workers]
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([self._all_ready, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if self._all_ready.done() and not self.stopping.is_set():
            addrs = ", ".join(f"{lst.address}:{lst.port}" for lst in self.config.listener)
            log.info("all %d workers ready on %s", len(self.workers), addrs)
            if self.ready_line:
                print(f"mta: ready on {addrs} ({len(self.workers)} workers)", flush=True)
        await asyncio.gather(*tasks)
        stop_wait.cancel()
        self._write_status()
        if self.failed:
            print(f"mta: {self.failed}", file=sys.stderr, flush=True)
            return 1
        bad = [w for w in self.workers if w.last_exit not in ("", "exit 0")]
        for w in bad:
            log.warning("worker %s ended with %s", w.slot.name, w.last_exit)
        log.info("all workers stopped")
        return 1 if bad else 0

    def _on_stop(self) -> None:
        """SIGTERM/SIGINT: the first drains every worker, a second stops them at once."""
        if not self.stopping.is_set():
            log.info("stopping: workers drain (SIGTERM again to stop them at once)")
        self.stopping.set()
        self._forward(signal.SIGTERM)

    def _forward(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def _keep(self, w: Worker) -> None:
        """Run worker `w` until the supervisor stops; start it again when it dies."""
        backoff = BACKOFF_FIRST
        while not self.stopping.is_set():
            w.state = "starting"
            w.started = time.time()
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    *self.command(w.slot), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, start_new_session=True,
                    limit=MAX_LINE)
            except OSError as exc:
                rc_text = f"cannot start: {exc}"
                w.proc = None
            else:
                log.info("worker %s started, pid %d", w.slot.name, w.proc.pid)
                self._write_status()
                await self._read_output(w)
                rc_text = _exit_text(await w.proc.wait())
            w.last_exit = rc_text
            if self.stopping.is_set():
                break
            if not w.ever_ready:
                self.failed = f"worker {w.slot.name} failed to start ({rc_text}); stopping"
                self._on_stop()
                break
            ran = time.time() - w.started
            if ran >= STABLE_AFTER:    # it had been running well: not a crash loop
                backoff = BACKOFF_FIRST
            w.restarts += 1
            w.state = "restarting"
            self._write_status()
            level = logging.ERROR if backoff >= 4 else logging.WARNING
            log.log(level, "worker %s (pid %s) ended with %s after %.1fs; starting it again "
                    "in %.1fs (restart %d%s)", w.slot.name, w.proc.pid if w.proc else "-",
                    rc_text, ran, backoff, w.restarts,
                    ", it keeps dying: restarts slowed" if backoff >= 4 else "")
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_MAX)
        w.state = "stopped"
        self._write_status()

    async def _read_output(self, w: Worker) -> None:
        """The worker's stdout until it closes: its ready line, other lines passed on."""
        assert w.proc is not None and w.proc.stdout is not None
        while True:
            try:
                line = await w.proc.stdout.readline()
            except ValueError:    # a line over MAX_LINE: what was read is dropped
                continue
            except (asyncio.LimitOverrunError, OSError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()[:MAX_LINE]
            if text.startswith("mta: ready"):
                w.state = "running"
                w.ever_ready = True
                self._write_status()
                if (all(x.ever_ready for x in self.workers) and self._all_ready is not None
                        and not self._all_ready.done()):
                    self._all_ready.set_result(None)
                continue
            if self.ready_line:
                print(f"mta: {w.slot.name.rpartition('/')[2]}: "
                      f"{text.removeprefix('mta: ')}", flush=True)

    def _write_status(self) -> None:
        data = {"supervisor": os.getpid(), "node": self.workers[0].slot.node,
                "started": self.started, "stopping": self.stopping.is_set(),
                "updated": time.time(),
                "workers": [w.as_json(self.config) for w in self.workers]}
        try:
            write_atomic(self.status_path, orjson.dumps(data, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.status_path, exc)


def supervise(config: Config, argv: list[str], *, ready_line: bool = True) -> int:
    """Run `[server] workers` worker processes until SIGTERM; the exit status."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, config.origin)
    setup_process(config, "supervisor")
    os.makedirs(config.spool.directory, mode=0o700, exist_ok=True)
    return uvloop.run(Supervisor(config, argv, ready_line=ready_line).run())


# -- `mta workers` -----------------------------------------------------------------------

def read_status(config: Config) -> dict | None:
    """The supervisor's workers.json, or None when there is none."""
    try:
        return orjson.loads((Path(config.spool.directory) / STATUS_NAME).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def workers_report(config: Config, as_json: bool = False) -> tuple[int, str]:
    """`mta workers`: exit status and text (a table, or JSON with each worker's ready)."""
    from mta.control.client import AdminUnreachable, admin_request
    status = read_status(config)
    if status is None:
        return 1, (f"mta: no {STATUS_NAME} in {config.spool.directory}: no supervisor ran "
                   f"there ([server] workers = {config.server.workers})")
    running = _alive(status.get("supervisor"))
    for w in status.get("workers") or []:
        w["alive"] = running and _alive(w.get("pid"))
        w["ready"] = None
        if w["alive"] and w.get("admin"):
            slot = WorkerSlot(int(w["index"]), len(status["workers"]), "n")
            try:
                code, data = admin_request(worker_config(config, slot), "/ready")
                w["ready"] = "ready" if code == 200 else (
                    data.get("error") or data.get("reason") or str(data)
                    if isinstance(data, dict) else str(data))
            except AdminUnreachable as exc:
                w["ready"] = f"unreachable: {exc}"
    status["running"] = running
    if as_json:
        return 0 if running else 1, orjson.dumps(status).decode()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("started") or 0))
    lines = [f"supervisor pid {status.get('supervisor')} on {status.get('node')}: "
             f"{'running' if running else 'NOT RUNNING'} since {when}"
             f"{' (stopping)' if status.get('stopping') else ''}",
             f"{'worker':<8} {'pid':>8} {'state':<11} {'up':>9} {'restarts':>8} "
             f"{'last exit':<16} {'admin':<22} ready"]
    now = time.time()
    for w in status.get("workers") or []:
        up = int(now - (w.get("started") or now)) if w["alive"] else 0
        state = w.get("state") if w["alive"] or w.get("state") == "stopped" else "gone"
        lines.append(f"w{w.get('index'):<7} {w.get('pid') or '-':>8} {state:<11} "
                     f"{up // 3600:>3}h{up // 60 % 60:02d}m{up % 60:02d}s {w.get('restarts'):>8} "
                     f"{w.get('last_exit') or '-':<16} {w.get('admin') or '-':<22} "
                     f"{w['ready'] or '-'}")
    return 0 if running else 1, "\n".join(lines)
