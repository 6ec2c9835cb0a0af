"""Queued mail of spools no process of this node reads, moved in at start (issue 15).

Changing `[server] workers` leaves spools behind: the segments of a single-process run in
the spool root when the count goes from 1 to N, the shards wI with I >= N when it goes
down (every shard when it goes back to 1). Their messages would wait unseen. At start the
daemon (worker 0 of several) moves them in through its own admin API, POST /xfer, the
exactly-once path of `mta drain --spool-dir` (mta/control/drain.py): the receiving
process stores, journals and acknowledges each message before its old copy is
tombstoned, so a stop half-way is finished at the next start, with nothing lost and
nothing twice. Attempts, schedule and age travel with the message.

Runs in a thread with its own event loop: the old spool's recovery scan reads every
segment and must not hold up the daemon's loop. A spool another process has open (a
daemon still running on it) is left alone. Without an admin API to send to (admin.listen
off or port 0) nothing can be moved: a warning names the spools and what to do.
Reads the spool root's listing; writes tombstones into the old spools (their segments are
reclaimed once empty); the receiving side logs a Transfer record (direction "in") per
message.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mta.config import Config
    from mta.control.views import DrainProgress

log = logging.getLogger("mta.adopt")


def _has_segments(directory: Path) -> bool:
    try:
        return any(n.endswith(".seg") for n in os.listdir(directory))
    except OSError:
        return False


def orphaned_spools(root: Path, workers: int) -> list[Path]:
    """The spools under the spool `root` that no process reads with `workers` processes:
    the root itself (segments of a single-process run) when workers > 1, each shard wI
    with I >= workers (every shard when workers is 1) that holds segments."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    out = [root] if workers > 1 and any(n.endswith(".seg") for n in names) else []
    for name in names:
        if name[:1] == "w" and name[1:].isdigit() and (workers == 1 or int(name[1:]) >= workers) \
                and (root / name).is_dir() and _has_segments(root / name):
            out.append(root / name)
    return out


def describe(spool: Path, root: Path, workers: int) -> str:
    if spool == root:
        return (f"{root} holds segment files of a single-process run, and [server] workers "
                f"= {workers}")
    return f"{spool} is the spool of worker {spool.name[1:]}, and [server] workers = {workers}"


def adopt(root: Path, config: Config, admin: tuple[str, int] | None,
          token: str) -> threading.Thread | None:
    """Start moving the orphaned spools under `root` to the admin API at `admin` (this
    process's); the thread, or None when there is nothing to move or no way to."""
    workers = config.server.workers
    spools = orphaned_spools(root, workers)
    if not spools:
        return None
    if admin is None or not admin[1] or not token:
        for s in spools:
            log.warning("%s: its queued messages wait until they are moved (no admin API to "
                        "move them in: set [admin] listen, or run `mta drain --spool-dir %s`)",
                        describe(s, root, workers), s)
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin[0], admin[0])
    url = f"http://[{host}]:{admin[1]}" if ":" in host else f"http://{host}:{admin[1]}"
    t = threading.Thread(target=_run, args=(spools, root, workers, url, token),
                         name="mta-adopt", daemon=True)
    t.start()
    return t


def _run(spools: list[Path], root: Path, workers: int, url: str, token: str) -> None:
    from mta.control.drain import drain_spool, spool_user
    for spool in spools:
        # a process with the spool open runs on it; the root's own files only: workers
        # hold their shards (and the shared tables) under the root
        pid = spool_user(str(spool), nested=spool != root)
        if pid is not None:
            log.warning("%s: not moving its messages in: process %d has it open",
                        describe(spool, root, workers), pid)
            continue
        log.info("%s: moving its queued messages in", describe(spool, root, workers))
        try:
            p: DrainProgress = asyncio.run(drain_spool(str(spool), url, token,
                                                       source=f"spool:{spool}"))
        except Exception:      # a bug or an unreadable spool: its messages stay there
            log.exception("moving the messages of %s in failed", spool)
            continue
        for e in p.errors[:10]:
            log.warning("%s: %s", spool, e)
        log.info("%s: %d messages moved in (%d already here), %d left", spool, p.stored,
                 p.duplicate, p.left)
        if not p.left and not p.errors:
            _remove_segments(spool)


def _remove_segments(spool: Path) -> None:
    """Every message of `spool` moved and tombstoned (durably: the drain awaited each
    removal): its segments hold nothing live. Removed, so the next start finds nothing
    to move (the spool's own reclamation keeps its newest segment until a later run)."""
    for name in os.listdir(spool):
        if name.endswith(".seg"):
            try:
                os.unlink(spool / name)
            except OSError as exc:
                log.warning("%s: %s", spool / name, exc.strerror)
