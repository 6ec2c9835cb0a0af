"""Ready queue per (egress source, site): messages due now, waiting for a connection.

Bounded: when full, `push` refuses; the scheduler parks the message in its
scheduled queue's backlog and marks that queue blocked here. Each `pop`
refills from the blocked queues (round-robin), so a slow site with a million
due messages costs no polling and no timer churn: they wait in place. Fairness: one FIFO per
scheduled queue, served round-robin, so a bulk campaign cannot starve a
transactional queue that shares the site; no per-message priority sorting.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mta.egress.sites import Site
    from mta.message import QueuedMessage
    from mta.queues.scheduled import ScheduledQueue


class ReadyQueue:
    def __init__(self, source: str, site: Site, capacity: int):
        self.source = source            # egress source name
        self.site = site                # the destination MX set (refreshed when DNS changes)
        self.capacity = capacity
        self.name = f"{source}->{site.name}"
        self._fifos: OrderedDict[ScheduledQueue, deque[QueuedMessage]] = OrderedDict()
        self._blocked: OrderedDict[ScheduledQueue, None] = OrderedDict()  # queues with a backlog for us
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, msg: QueuedMessage) -> bool:
        if self._len >= self.capacity:
            return False
        fifo = self._fifos.get(msg.queue)
        if fifo is None:
            fifo = self._fifos[msg.queue] = deque()
        fifo.append(msg)
        self._len += 1
        return True

    def block(self, queue: ScheduledQueue) -> None:
        self._blocked[queue] = None

    def _refill(self) -> None:
        while self._blocked and self._len < self.capacity:
            queue = next(iter(self._blocked))
            backlog = queue.backlog
            if backlog:
                self.push(backlog.popleft())
            if backlog:
                self._blocked.move_to_end(queue)
            else:
                del self._blocked[queue]

    def backlog(self) -> int:
        return sum(len(q.backlog) for q in self._blocked)

    def pop(self) -> QueuedMessage | None:
        """Next message, taking turns between the scheduled queues present."""
        if self._blocked and self._len < self.capacity:
            self._refill()
        while self._fifos:
            queue, fifo = next(iter(self._fifos.items()))
            msg = fifo.popleft()
            if fifo:
                self._fifos.move_to_end(queue)
            else:
                del self._fifos[queue]
            self._len -= 1
            return msg
        return None

    def drain(self) -> list[QueuedMessage]:
        """Everything waiting, backlogs included (a site-level failure defers them all)."""
        out = [m for fifo in self._fifos.values() for m in fifo]
        for queue in self._blocked:
            out.extend(queue.backlog)
            queue.backlog.clear()
        self._fifos.clear()
        self._blocked.clear()
        self._len = 0
        return out

    def per_queue(self) -> dict[str, int]:
        return {q.name: len(f) for q, f in self._fifos.items()}
