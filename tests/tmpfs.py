"""A small tmpfs for spool fault tests (the tests run as root): mount it, fill it
to ENOSPC with a filler file, unmount it lazily (a daemon may still hold it)."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


def mount_tmpfs(path: Path, size: str, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", "mode=0700", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(path: Path) -> None:
    """Write the file `path` until the file system says ENOSPC, down to single pages."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = 1 << 20
        while chunk >= 4096:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk //= 2
    finally:
        os.close(fd)
