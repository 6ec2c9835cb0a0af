"""Small files that must survive a crash whole: operator and adaptive state, secret keys,
tokens. The spool has its own format; these are the few other files the daemon writes.

- `write_atomic(path, data)`: replace the file's content as one step. Written and
  fsync'd under a temporary name, renamed over the old one, then the directory fsync'd:
  after a crash the file holds the old content or the new, never a mix or nothing.
- `create_once(path, data)`: make a file that must never change once made (a key, a
  token). Written and fsync'd under a temporary name, then hard-linked to its name,
  which fails when another process got there first: returns False and the caller reads
  theirs. A half-written secret is never visible and an existing one never replaced.
- `boot_id()`: this boot of the host; a file of shared memory made before it (its
  CLOCK_MONOTONIC times, its counts of processes gone) is made anew.
Both writers create the file with `mode` (0600 by default) whatever the umask. OSError is
raised for the caller to name the file's role.
Imports nothing of mta (rank 1 in tests/test_layering.py).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes, *, mode: int = 0o600) -> None:
    path = os.fspath(path)
    tmp = _temporary(path)
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _sync_dir(os.path.dirname(path))


def create_once(path: str | os.PathLike, data: bytes, *, mode: int = 0o600) -> bool:
    """True when this call made the file; False when it existed (theirs stands)."""
    path = os.fspath(path)
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        _write_new(tmp, data, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _sync_dir(os.path.dirname(path))
    return True


def boot_id() -> bytes:
    """The kernel's id of this boot, 36 bytes ("unknown" padded where /proc lacks it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()[:36].ljust(36)
    except OSError:
        return b"unknown".ljust(36)
