"""Who runs next when a pool's slots are full: a bounded queue shared by weighted fair queuing.

Theory of operation
-------------------
`Scheduler` does no I/O and reads no clock: every method that can change what runs takes
`now` (monotonic seconds). One scheduler guards one pool of slots (one model's capacity,
as the caller counts it); it knows only its own tickets and `capacity`.

`submit` answers at once. A request that finds a free slot starts (`Started`): with
nothing queued there is nothing to be fair about, so the hot path is one comparison and
one count. Otherwise it waits (`Queued`) with a deadline (`max_wait_s`), or is turned
away (`Rejected`, "queue_full", with a Retry-After). The driver reports the end of each
running request (`release`), a client that left (`cancel`: queued or running), capacity
changes (`set_capacity`), and calls `expire(now)` when `next_deadline()` comes, in the
manner of aioquic's `get_timer()`. Each call that frees a slot returns the tickets that
start now, so a slot never idles while anything waits (work conservation).

    submit ─► RUNNING ─────────────── release / cancel ──► FINISHED
       │        ▲ a slot frees (release, cancel, set_capacity)
       ├─► QUEUED ──► CANCELLED (cancel) · EXPIRED (expire) · REJECTED (pushed out)
       └─► REJECTED (queue full)

Every ticket ends exactly once: submitted = started + rejected + expired + cancelled +
queued, and started = finished + running (`statistics()`).

Sharing: start-time fair queuing (Goyal, Vin and Cheng, SIGCOMM 1996) over classes
("local" 70 and "peer" 30 by default, as reference 001's RequestScheduler; a class per
API key when keys are in use, its weight given at `submit`). Each class queues FIFO.
A class's head gets the start tag S = max(v, F), where F is the finish tag of the class's
last started request and v the virtual time (the tag of the last request started); the
head with the lowest S starts next (earliest arrival on a tie), and then F = S + cost /
weight. So two backlogged classes' service, counted in cost / weight, never differs by
more than one request each (`cost/w_a + cost/w_b`), whatever the pattern of arrivals;
none starves; and one that was idle comes back at v, with no credit banked for its idle
time. Tags are given when a request reaches its class's head, so a request that
leaves the queue (cancelled, expired) charges its class nothing.

Bounded memory: a class with nothing queued is forgotten once v passes its F (until
then it must remember F, or a light class could jump the line by sending one request at
a time); when the queue empties, v moves past every F and all are forgotten. Cancelled
tickets are dropped lazily from the per-class queues and heaps, which are compacted when
dead entries outnumber live ones: every operation is O(log n) amortized, but for pushing
out of a full queue, which scans the classes that have requests queued.

The queue bound is per pool (per scheduler), not per class: the wait it bounds is this
pool's, `max_queue` requests at its service rate, however they are classed. So that a
flood of one class cannot fill the queue and shut out the others, a full queue
admits a request of a class holding less than its weighted share of the queue by
pushing out the newest request of the class furthest over its share (the newest has
waited least); otherwise the arriving request is rejected.

Wait estimate: an exponential moving average of service times (start to end of each
request) divided by capacity gives the interval between freed slots; a request arriving
now waits about (queued + 1) of those intervals (FIFO, not per class). Retry-After is
that estimate, at least a second and at most `max_wait_s`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

#: Reference 001's RequestScheduler: the node's own clients 70, work from peers 30.
DEFAULT_WEIGHTS: Final[Mapping[str, float]] = {"local": 70.0, "peer": 30.0}
#: A class without a configured weight (an API key without one) counts as a local client.
DEFAULT_WEIGHT: Final = 70.0
#: Below a second a client would only come back to be turned away again (and HTTP's
#: Retry-After counts whole seconds).
MIN_RETRY_S: Final = 1.0
#: Heaps and per-class queues are compacted when they hold this many more dead entries
#: than live ones: rebuilding tiny ones would cost more than it saves.
_SLACK: Final = 16

Reason = Literal["queue_full", "expired"]


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"  # ran, and ended (release, or cancel while running)
    REJECTED = "rejected"  # the queue was full, at submit or pushed out later
    EXPIRED = "expired"  # waited `max_wait_s` without a slot
    CANCELLED = "cancelled"  # left the queue (the client went away)


_QUEUED, _RUNNING = State.QUEUED, State.RUNNING  # globals: faster than class attributes


class Ticket:
    """One request's place in one scheduler. Read its fields; the scheduler writes them."""

    __slots__ = (
        "cls",
        "cost",
        "deadline",
        "owner",
        "serial",
        "started_at",
        "state",
        "submitted_at",
    )

    def __init__(
        self, owner: Scheduler, serial: int, cls: str, cost: float, now: float, deadline: float
    ) -> None:
        self.owner = owner
        self.serial = serial  # submission order: ties go to the earlier
        self.cls = cls
        self.cost = cost
        self.submitted_at = now
        self.deadline = deadline
        self.started_at: float | None = None
        self.state = _QUEUED

    @property
    def waited_s(self) -> float | None:
        """Time spent queued, once started."""
        return None if self.started_at is None else self.started_at - self.submitted_at

    def __repr__(self) -> str:
        return f"<Ticket {self.serial} {self.cls} {self.state}>"


# The answers are not frozen: a frozen dataclass sets each field through
# object.__setattr__, which doubles the cost of `Started` on the hot path.
@dataclass(slots=True)
class Started:
    ticket: Ticket


@dataclass(slots=True)
class Rejected:
    """Turned away: HTTP 429 with `Retry-After: ceil(retry_after_s)`."""

    ticket: Ticket
    reason: Reason
    retry_after_s: float


@dataclass(slots=True)
class Queued:
    ticket: Ticket
    # A request pushed out of the full queue to make room for this one: answer it 429.
    displaced: Rejected | None = None


Admission = Started | Queued | Rejected


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    capacity: int
    in_use: int
    queued: int
    queued_by_class: dict[str, int]
    tracked_classes: int  # classes whose state is kept: queued, or still owed a finish tag
    submitted: int
    started: int  # immediately or from the queue
    rejected: int
    expired: int
    cancelled: int  # while queued
    finished: int
    service_s: float  # the moving average of service times (or the initial guess)
    estimated_wait_s: float


@dataclass(slots=True, eq=False)
class _Class:
    weight: float
    finish: float  # the finish tag of its last started request
    queue: deque[Ticket] = field(default_factory=deque)  # FIFO; dead entries dropped lazily
    live: int = 0  # queued tickets in `queue`


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, not {value!r}")


class Scheduler:
    def __init__(
        self,
        capacity: int,
        *,
        max_queue: int = 64,
        max_wait_s: float = 30.0,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        default_weight: float = DEFAULT_WEIGHT,
        initial_service_s: float = 5.0,  # a guess at one completion, until one is measured
        ewma_weight: float = 0.2,  # of the newest service time
    ) -> None:
        if capacity < 0 or max_queue < 0:
            raise ValueError("need capacity >= 0 and max_queue >= 0")
        for name, weight in weights.items():
            _positive(f"weight of {name!r}", weight)
        _positive("default_weight", default_weight)
        _positive("max_wait_s", max_wait_s)
        _positive("initial_service_s", initial_service_s)
        if not 0 < ewma_weight <= 1:
            raise ValueError("need 0 < ewma_weight <= 1")
        self._capacity = capacity
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._weights = dict(weights)
        self._default_weight = default_weight
        self._ewma_weight = ewma_weight
        self._service_s = initial_service_s
        self._measured = False
        self._in_use = 0
        self._depth = 0
        self._serial = 0
        self._v = 0.0  # virtual time: the start tag of the last request started from the queue
        self._classes: dict[str, _Class] = {}  # classes with something queued
        self._owed: dict[str, float] = {}  # idle classes whose finish tag is ahead of v
        self._owed_heap: list[tuple[float, str]] = []  # the same, by finish tag
        self._heads: list[tuple[float, int, Ticket]] = []  # (start tag, serial, head)
        self._deadlines: list[tuple[float, int, Ticket]] = []
        # Tickets that reached each state, in all (plain ints: the hot path counts one).
        self._submitted = self._started = self._finished = 0
        self._rejected = self._expired = self._cancelled = 0

    # -- the driver's calls --------------------------------------------------------------

    def submit(
        self,
        cls: str,
        now: float,
        *,
        cost: float = 1.0,
        weight: float | None = None,
        max_wait_s: float | None = None,
    ) -> Admission:
        """A request of class `cls` arrives: it starts, waits, or is turned away.

        `weight` overrides the configured weight of `cls` from now on (per-key weights
        come from the key store); `max_wait_s` shortens the wait (a forwarded request has
        spent part of its deadline already), never lengthens it past the scheduler's.
        """
        if cost != 1.0:
            _positive("cost", cost)
        if weight is not None:
            _positive("weight", weight)
        self._serial += 1
        self._submitted += 1
        wait = self._max_wait_s if max_wait_s is None else min(max_wait_s, self._max_wait_s)
        ticket = Ticket(self, self._serial, cls, cost, now, now + wait)
        # The hot path. Work conservation means a free slot implies an empty queue.
        if self._in_use < self._capacity:
            self._start(ticket, now)
            return Started(ticket)
        displaced = None
        if self._depth >= self._max_queue:
            victim = self._victim(cls, weight)
            if victim is None:
                ticket.state = State.REJECTED
                self._rejected += 1
                return Rejected(ticket, "queue_full", self._retry_after_s())
            self._leave(victim, State.REJECTED)
            displaced = Rejected(victim, "queue_full", self._retry_after_s())
        self._enqueue(ticket, weight)
        return Queued(ticket, displaced)

    def release(self, ticket: Ticket, now: float) -> tuple[Ticket, ...]:
        """A running request ended; returns the tickets that start in its slot.

        Idempotent: releasing an ended ticket again does nothing.
        """
        self._check(ticket)
        if ticket.state is State.QUEUED:
            raise ValueError(f"{ticket!r} is queued, not running: cancel it")
        if ticket.state is not State.RUNNING:
            return ()
        return self._finish(ticket, now)

    def cancel(self, ticket: Ticket, now: float) -> tuple[Ticket, ...]:
        """The client left: a queued ticket leaves the queue, a running one ends.

        Returns the tickets that start in a slot it freed. Idempotent.
        """
        self._check(ticket)
        if ticket.state is State.QUEUED:
            self._leave(ticket, State.CANCELLED)
            return ()
        if ticket.state is State.RUNNING:
            return self._finish(ticket, now)
        return ()

    def expire(self, now: float) -> list[Rejected]:
        """Queued tickets whose deadline has come, removed from the queue.

        A ticket still queued at its deadline has not started; one that a freed slot
        started a moment past its deadline, before this call, runs (its client is there).
        """
        gone: list[Ticket] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            ticket = heapq.heappop(deadlines)[2]
            if ticket.state is State.QUEUED:
                self._leave(ticket, State.EXPIRED)
                gone.append(ticket)
        if not gone:
            return []
        retry = self._retry_after_s()
        return [Rejected(t, "expired", retry) for t in gone]

    def set_capacity(self, capacity: int, now: float) -> tuple[Ticket, ...]:
        """The pool's slots changed; returns the tickets that start in new ones.

        Fewer slots than running requests stops nothing: no new start until enough end.
        Zero is allowed: a pool whose slots are all taken by others (peers' own work)
        queues everything until some free.
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        self._capacity = capacity
        return self._fill(now)

    def next_deadline(self) -> float | None:
        """When the earliest queued ticket expires: call `expire` then."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state is not State.QUEUED:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    # -- reading -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    def depth(self, cls: str | None = None) -> int:
        """Requests queued: in all, or of class `cls`."""
        if cls is None:
            return self._depth
        c = self._classes.get(cls)
        return c.live if c else 0

    def estimated_wait(self) -> float:
        """Seconds a request arriving now would wait for a slot (see the module docstring)."""
        if self._in_use < self._capacity:
            return 0.0
        # With no slot at all, one is assumed: the estimate must stay finite for adverts.
        return (self._depth + 1) * self._service_s / max(self._capacity, 1)

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            capacity=self._capacity,
            in_use=self._in_use,
            queued=self._depth,
            queued_by_class={name: c.live for name, c in self._classes.items()},
            tracked_classes=len(self._classes) + len(self._owed),
            submitted=self._submitted,
            started=self._started,
            rejected=self._rejected,
            expired=self._expired,
            cancelled=self._cancelled,
            finished=self._finished,
            service_s=self._service_s,
            estimated_wait_s=self.estimated_wait(),
        )

    # -- inside --------------------------------------------------------------------------

    def _check(self, ticket: Ticket) -> None:
        if ticket.owner is not self:
            raise ValueError(f"{ticket!r} belongs to another scheduler")

    def _start(self, ticket: Ticket, now: float) -> None:
        self._in_use += 1
        self._started += 1
        ticket.state = _RUNNING
        ticket.started_at = now

    def _finish(self, ticket: Ticket, now: float) -> tuple[Ticket, ...]:
        ticket.state = State.FINISHED
        self._finished += 1
        self._in_use -= 1
        assert ticket.started_at is not None
        sample = max(0.0, now - ticket.started_at)
        if self._measured:
            self._service_s += self._ewma_weight * (sample - self._service_s)
        else:  # the first measurement replaces the guess
            self._service_s, self._measured = sample, True
        return self._fill(now)

    def _fill(self, now: float) -> tuple[Ticket, ...]:
        if not self._depth or self._in_use >= self._capacity:
            return ()  # the hot path: nobody waits
        started: list[Ticket] = []
        while self._depth and self._in_use < self._capacity:
            started.append(self._start_next(now))
        return tuple(started)

    def _retry_after_s(self) -> float:
        return min(max(self.estimated_wait(), MIN_RETRY_S), max(self._max_wait_s, MIN_RETRY_S))

    def _weight(self, cls: str, weight: float | None) -> float:
        if weight is not None:
            return weight
        c = self._classes.get(cls)
        return c.weight if c else self._weights.get(cls, self._default_weight)

    def _enqueue(self, ticket: Ticket, weight: float | None) -> None:
        cls = ticket.cls
        c = self._classes.get(cls)
        if c is None:
            w = self._weights.get(cls, self._default_weight) if weight is None else weight
            c = self._classes[cls] = _Class(w, self._owed.pop(cls, -math.inf))
        elif weight is not None:
            c.weight = weight
        c.queue.append(ticket)
        c.live += 1
        self._depth += 1
        if c.live == 1:
            self._tag_head(c)
        heapq.heappush(self._deadlines, (ticket.deadline, ticket.serial, ticket))

    def _tag_head(self, c: _Class) -> None:
        queue = c.queue
        while queue[0].state is not State.QUEUED:
            queue.popleft()
        head = queue[0]
        heapq.heappush(self._heads, (max(self._v, c.finish), head.serial, head))

    def _start_next(self, now: float) -> Ticket:
        heads = self._heads
        while True:
            tag, _, ticket = heapq.heappop(heads)
            if ticket.state is State.QUEUED:  # else it left the queue after being tagged
                break
        c = self._classes[ticket.cls]
        if tag > self._v:
            self._v = tag
            self._forget_paid()
        c.finish = tag + ticket.cost / c.weight
        c.queue.popleft()  # the tagged ticket is its class's head
        self._dequeued(ticket.cls, c)
        if c.live:
            self._tag_head(c)
        self._start(ticket, now)
        return ticket

    def _leave(self, ticket: Ticket, state: State) -> None:
        """A queued ticket leaves without starting; its class is charged nothing."""
        ticket.state = state
        if state is State.CANCELLED:
            self._cancelled += 1
        elif state is State.EXPIRED:
            self._expired += 1
        else:
            self._rejected += 1
        c = self._classes[ticket.cls]
        queue = c.queue
        if queue[0] is ticket:
            queue.popleft()
            self._dequeued(ticket.cls, c)
            if c.live:
                self._tag_head(c)  # the old head's tag is now a dead heap entry
        else:
            self._dequeued(ticket.cls, c)
            if len(queue) > 2 * c.live + _SLACK:
                c.queue = deque(t for t in queue if t.state is State.QUEUED)
        self._compact()

    def _dequeued(self, cls: str, c: _Class) -> None:
        """Count one ticket out of `c`'s queue; forget the class when that was its last."""
        c.live -= 1
        self._depth -= 1
        if c.live:
            return
        del self._classes[cls]
        if c.finish > self._v:
            self._owed[cls] = c.finish
            heapq.heappush(self._owed_heap, (c.finish, cls))
        if not self._depth:
            # Nobody waits: a new busy period starts level, every finish tag paid.
            if self._owed:
                self._v = max(self._v, *self._owed.values())
            self._owed.clear()
            self._owed_heap.clear()

    def _forget_paid(self) -> None:
        owed, heap, v = self._owed, self._owed_heap, self._v
        while heap and heap[0][0] <= v:
            finish, cls = heapq.heappop(heap)
            if owed.get(cls) == finish:
                del owed[cls]

    def _compact(self) -> None:
        if len(self._heads) > 2 * len(self._classes) + _SLACK:
            self._heads = [e for e in self._heads if e[2].state is State.QUEUED]
            heapq.heapify(self._heads)
        if len(self._deadlines) > 2 * self._depth + _SLACK:
            self._deadlines = [e for e in self._deadlines if e[2].state is State.QUEUED]
            heapq.heapify(self._deadlines)

    def _victim(self, cls: str, weight: float | None) -> Ticket | None:
        """The newest request of the class furthest over its share of a full queue, if
        pushing it out for one more request of `cls` brings the shares closer."""
        c = self._classes.get(cls)
        mine = ((c.live if c else 0) + 1) / self._weight(cls, weight)
        worst: _Class | None = None
        worst_share = mine
        for name, other in self._classes.items():
            share = other.live / other.weight
            if name != cls and share > worst_share:
                worst, worst_share = other, share
        if worst is None:
            return None
        queue = worst.queue
        while queue[-1].state is not State.QUEUED:
            queue.pop()
        return queue[-1]
