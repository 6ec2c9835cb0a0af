"""Ready queue per (egress source, site): messages due now, waiting for a connection.

One lane per queue class present (transactional, bulk, ...), each bounded on
its own: when a lane is full, `offer` parks the message in its scheduled
queue's backlog and marks that queue blocked here. Each `pop`
refills from the blocked queues (round-robin), so a slow site with a million
due messages costs no polling and no timer churn: they wait in place. Because
every class has its own lane and bound, a bulk flood can never fill the room a
transactional message needs.

Order of service: lanes by smooth weighted round-robin over the non-empty
lanes (class weights: transactional 16 turns per bulk turn by default); inside
a lane one FIFO per scheduled queue, served round-robin, so one campaign
cannot starve another of the same class. A lane with a message-rate limit
(queue_class.max_message_rate) is skipped while its throttle is empty;
`pop` then returns None and `wait_hint` says when to look again.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from mta.egress.sites import Site
    from mta.model.queued import QueuedMessage


class Throttle(Protocol):
    def delay(self, now: float) -> float: ...   # 0: a token was taken; else seconds to wait


class Upstream(Protocol):
    """A scheduled queue as its ready queues see it (ScheduledQueue in scheduled.py);
    hashable, one FIFO per upstream in its lane."""
    name: str                        # the queue name, for per_queue()
    klass: str                       # its queue class: the lane it goes to
    backlog: deque[QueuedMessage]    # due messages parked while the lane was full


class _Lane:
    __slots__ = ("name", "weight", "credit", "fifos", "blocked", "len", "throttle")

    def __init__(self, name: str, weight: int, throttle: Throttle | None):
        self.name = name
        self.weight = weight
        self.credit = 0
        self.fifos: OrderedDict[Upstream, deque[QueuedMessage]] = OrderedDict()
        self.blocked: OrderedDict[Upstream, None] = OrderedDict()  # queues with a backlog for us
        self.len = 0
        self.throttle = throttle


class ReadyQueue:
    def __init__(self, source: str, site: Site, capacity: int,
                 lane_for: dict[str, tuple[int, Throttle | None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.source = source            # egress source name
        self.site = site                # the destination MX set (refreshed when DNS changes)
        self.capacity = capacity        # per lane
        self.name = f"{source}->{site.name}"
        # class name -> (weight, throttle or None); classes not listed get weight 1
        self._lane_for = lane_for or {}
        self._lanes: dict[str, _Lane] = {}
        self._len = 0
        self.wait_hint = 0.0            # after a None pop with messages left: seconds to wait
        self._clock = clock             # the class throttles' clock (the loop's, in the engine)

    def __len__(self) -> int:
        return self._len

    @property
    def lanes(self) -> int:
        """Lanes with messages or blocked queues (a queue's backlog waits for this one)."""
        return len(self._lanes)

    def _lane(self, queue: Upstream) -> _Lane:
        lane = self._lanes.get(queue.klass)
        if lane is None:
            weight, throttle = self._lane_for.get(queue.klass, (1, None))
            lane = self._lanes[queue.klass] = _Lane(queue.klass, weight, throttle)
        return lane

    def push(self, msg: QueuedMessage) -> bool:
        lane = self._lane(msg.queue)
        if lane.len >= self.capacity:
            return False
        fifo = lane.fifos.get(msg.queue)
        if fifo is None:
            fifo = lane.fifos[msg.queue] = deque()
        fifo.append(msg)
        lane.len += 1
        self._len += 1
        return True

    def offer(self, msg: QueuedMessage) -> bool:
        """A due message: into its lane (True), or, the lane being full, parked at the end
        of its scheduled queue's backlog with the queue marked blocked here, so `pop`
        pulls it in as room frees (False). Nothing polls: this is the whole backlog protocol."""
        if self.push(msg):
            return True
        msg.queue.backlog.append(msg)
        self.block(msg.queue)
        return False

    def block(self, queue: Upstream) -> None:
        self._lane(queue).blocked[queue] = None

    def _refill(self, lane: _Lane) -> None:
        while lane.blocked and lane.len < self.capacity:
            queue = next(iter(lane.blocked))
            backlog = queue.backlog
            if backlog:
                self.push(backlog.popleft())
            if backlog:
                lane.blocked.move_to_end(queue)
            else:
                del lane.blocked[queue]

    def backlog(self) -> int:
        return sum(len(q.backlog) for lane in self._lanes.values() for q in lane.blocked)

    def pop(self) -> QueuedMessage | None:
        """Next message: weighted turns between classes, round-robin between queues."""
        self.wait_hint = 0.0
        lanes = self._lanes
        if not lanes:
            return None
        if len(lanes) == 1:                   # the common case: one class at this site
            lane = next(iter(lanes.values()))
            return self._take(lane, self._clock() if lane.throttle else 0.0)
        # Smooth weighted round-robin over the lanes that have something to give.
        now = self._clock()
        candidates = []
        total = 0
        for lane in lanes.values():
            if lane.len or lane.blocked:
                candidates.append(lane)
                total += lane.weight
                lane.credit += lane.weight
        candidates.sort(key=lambda ln: ln.credit, reverse=True)
        for lane in candidates:
            msg = self._take(lane, now)
            if msg is not None:
                lane.credit -= total
                return msg
        for lane in candidates:              # every lane throttled: no turn was used
            lane.credit -= lane.weight
        return None

    def _take(self, lane: _Lane, now: float) -> QueuedMessage | None:
        if lane.blocked and lane.len < self.capacity:
            self._refill(lane)
        if not lane.fifos:
            if not lane.blocked:
                self._lanes.pop(lane.name, None)
            return None
        if lane.throttle is not None:
            wait = lane.throttle.delay(now)
            if wait > 0:
                self.wait_hint = wait
                return None
        queue, fifo = next(iter(lane.fifos.items()))
        msg = fifo.popleft()
        if fifo:
            lane.fifos.move_to_end(queue)
        else:
            del lane.fifos[queue]
        lane.len -= 1
        self._len -= 1
        return msg

    def drain(self, queue: Upstream | None = None) -> list[QueuedMessage]:
        """Everything waiting (backlogs included), or only `queue`'s messages: a site-level
        failure defers them all; a rebind or a source suspension moves them elsewhere."""
        out: list[QueuedMessage] = []
        for lane in list(self._lanes.values()):
            for q in [queue] if queue is not None else list(lane.fifos):
                fifo = lane.fifos.pop(q, None)
                if fifo:
                    out.extend(fifo)
                    lane.len -= len(fifo)
                    self._len -= len(fifo)
            for q in [queue] if queue is not None else list(lane.blocked):
                if q in lane.blocked:
                    out.extend(q.backlog)
                    q.backlog.clear()
                    del lane.blocked[q]
            if not lane.len and not lane.blocked:
                del self._lanes[lane.name]
        return out

    def entries(self):
        """Every message in the lanes (not the backlogs, which the scheduler shows): for
        operator scans."""
        for lane in self._lanes.values():
            for fifo in lane.fifos.values():
                yield from fifo

    def per_queue(self) -> dict[str, int]:
        return {q.name: len(f) for lane in self._lanes.values() for q, f in lane.fifos.items()}
