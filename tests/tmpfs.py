"""A small tmpfs mounted for one test: a disk that really fills up (ENOSPC), then frees.

Needs root (the test machines run as root); unmounted (lazily, so an open file
never leaves it behind) when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", *options: str) -> Iterator[Path]:
    """`options`: more mount options, e.g. "ro" for a read-only file system."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", "mode=0755", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the filesystem holding `path`; returns the filler file (remove it to free space)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
