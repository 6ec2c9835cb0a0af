"""Which process this is: the node of a cluster and the worker on that node.

One value, made once at start and handed to `Server(config, worker=...)`: the
supervisor (`workers = N`) gives each worker process its index; a daemon with one
worker, or the library embedded, gets the default `WorkerSlot()`. Components that
share limits (host shared memory, Redis) key their entries by `node` and `index`,
so a restarted worker with the same index takes over what its predecessor held.
Reads and writes nothing.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path


def _hostname() -> str:
    return socket.gethostname() or "localhost"


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    index: int = 0            # 0 .. count-1 on this node
    count: int = 1            # worker processes on this node
    node: str = field(default_factory=_hostname)   # cluster-wide node name

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} outside 0..{self.count - 1}")
        if not self.node:
            raise ValueError("node name must not be empty")

    @property
    def name(self) -> str:
        """`node/wN`: how logs and the admin API name this worker."""
        return f"{self.node}/w{self.index}"

    def host_dir(self, spool_directory: Path) -> Path:
        """Where this host's workers share files (the shared limit and peer tables): the
        spool root, of which a worker's spool directory is the subdirectory wN."""
        if self.count > 1 and spool_directory.name == f"w{self.index}":
            return spool_directory.parent
        return spool_directory

    def admin_port(self, base: int) -> int:
        """This worker's admin API port: the configured [admin] listen port + index."""
        return base + self.index

    def admin_ports(self, own: int) -> list[int]:
        """Every worker's admin port on this node, from this worker's own (`admin_port`)."""
        base = own - self.index
        return [base + i for i in range(self.count)]
