"""Admission: a request that no candidate in the cluster can take now waits its turn.

Theory of operation. The dispatcher asks `may_start` with the targets routing found. A
request starts at once when one of them has a free slot (in flight below capacity, as
the load ledger and the peers' snapshots count it) and nobody is waiting for this
pool: that is the hot path, one look at a dict and a sum. Otherwise it `wait`s in its
pool's `Scheduler` (`shoal.routing.scheduler`: bounded, weighted fair between classes,
each request with a deadline) and holds its ticket until it ends (`done`).

A pool is one model for one operation (and one pinned node, if a client pins one): the
requests that compete for the same slots, whoever sent them, so that the weights hold
between this node's clients and peers' forwarded requests. Its scheduler's capacity is
kept at what it runs plus the slots free now (`free()`, routing again, as the widest
kind of request queued sees them: a forwarded request may use only this node's own
slots, a client's request any node's): so queued requests start when a slot
frees on this node (the dispatcher calls `changed` whenever a request ends) or on a
peer (a peer's pushed snapshot, `PeerStateChanged`), within one event, not a polling
interval. A full queue, or a deadline passed, is 429 with Retry-After (the scheduler's
estimate of the wait); a client that leaves while queued leaves the queue at once.
Requests that started on the hot path hold no ticket: they are in the load the next
`free()` counts.

A full peer is not waited on as if it were a local backend: its own queue shares its
slots (weighted fair between its clients and peers' requests), and takes each slot as
it frees, so a request of ours waiting here for it to look free would wait for ever.
Requests of ours go to wait in its queue instead, as many as it has slots
(`PARKED_PER_SLOT`); the rest wait here, and go there as those end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from shoal.errors import BusyError, QueueFull, QueueTimeout
from shoal.events import EventBus, PeerStateChanged
from shoal.routing.rank import UNBOUNDED, Candidate
from shoal.routing.router import Target
from shoal.routing.scheduler import (
    DEFAULT_WEIGHTS,
    Queued,
    Rejected,
    Scheduler,
    Started,
    State,
    Ticket,
)

log = logging.getLogger(__name__)

PoolKey = tuple[str, ...]

#: A peer's slots are shared out by its own queue, weighted fair between its clients
#: and peers' requests: a full peer's slot freed goes to its own queue at once, so peers
#: that only waited for it to look free would never get one (measured: 0 % of the
#: service against a weight of 30 %). So requests of ours wait in its queue instead,
#: this many per slot it serves (the rest wait here, in ours): its `peer` class stays
#: backlogged and gets its share.
PARKED_PER_SLOT = 1


def free_slots(targets: Sequence[Target]) -> int:
    """Requests the targets could take now: the sum of their free slots, and of the
    room a full peer has in its queue for requests of ours (`PARKED_PER_SLOT` per slot
    it serves, less those of ours already there)."""
    return sum(_free(t.candidate) + _parking(t.candidate) for t in targets)


def with_room_first(targets: list[Target]) -> list[Target]:
    """`targets` in their order, but those with a free slot first, then full peers with
    room in their queue, then the rest (a request admitted because one target has room
    goes there, not to a full one the strategy ranks first)."""
    if len(targets) < 2:
        return targets  # the usual case: nothing to reorder
    return sorted(targets, key=_lack_of_room)


def _lack_of_room(target: Target) -> int:
    c = target.candidate
    return 0 if _free(c) else 1 if _parking(c) else 2


def _free(c: Candidate) -> int:
    return c.slots - c.in_flight if c.healthy and c.in_flight < c.slots else 0


def _parking(c: Candidate) -> int:
    """Room for requests of ours in a full, bounded peer's queue."""
    if not c.healthy or c.local or c.in_flight < c.slots or c.slots >= UNBOUNDED:
        return 0
    return max(0, PARKED_PER_SLOT * c.slots - c.sent)


@dataclass(slots=True)
class _Pool:
    scheduler: Scheduler
    # Slots free now, by scope (what a kind of request may use: see the dispatcher).
    frees: dict[tuple[str, ...], Callable[[], int]] = field(default_factory=dict)
    waiters: dict[Ticket, asyncio.Future[None]] = field(default_factory=dict)
    # Started, not yet counted by the load ledger (their requests have not been sent):
    # the slots they will take look free to `free()` until then.
    pending: set[Ticket] = field(default_factory=set)


class AdmissionQueue:
    def __init__(
        self,
        bus: EventBus,
        *,
        max_queue: int = 64,
        max_wait_s: float = 30.0,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._weights = dict(weights)
        self._clock = clock
        self._pools: dict[PoolKey, _Pool] = {}
        self._timer: asyncio.TimerHandle | None = None
        bus.subscribe(PeerStateChanged, lambda event: self.changed())

    # -- the dispatcher's side ------------------------------------------------------------

    def may_start(self, key: PoolKey, targets: Sequence[Target]) -> bool:
        pool = self._pools.get(key)
        if pool is not None and pool.scheduler.depth():
            return False  # others wait: their turn first
        return free_slots(targets) > 0

    async def wait(
        self,
        key: PoolKey,
        cls: str,
        free: Callable[[], int],
        scope: tuple[str, ...] = (),
        weight: float | None = None,
    ) -> Ticket:
        """Queue until a slot is free for this request (its ticket, to give back to
        `done`), or raise QueueFull / QueueTimeout (429 with Retry-After)."""
        pool = self._pools.get(key)
        if pool is None:
            scheduler = Scheduler(
                0, max_queue=self._max_queue, max_wait_s=self._max_wait_s, weights=self._weights
            )
            pool = self._pools[key] = _Pool(scheduler)
        pool.frees.setdefault(scope, free)
        now = self._clock()
        decision = pool.scheduler.submit(cls, now, weight=weight)
        if isinstance(decision, Rejected):
            raise _rejected(decision)
        if isinstance(decision, Started):  # capacity left over from a request just ended
            pool.pending.add(decision.ticket)
            return decision.ticket
        assert isinstance(decision, Queued)
        if decision.displaced is not None:  # a fuller class's newest made room for us
            self._reject(pool, decision.displaced)
        ticket = decision.ticket
        future = pool.waiters[ticket] = asyncio.get_running_loop().create_future()
        self._refill(pool, now)  # a slot may have freed since routing looked
        self._arm()
        try:
            await future
        except asyncio.CancelledError:  # the client left
            if pool.waiters.pop(ticket, None) is not None:  # still queued: leave at once
                self._started(pool, pool.scheduler.cancel(ticket, self._clock()))
            elif ticket.state is State.RUNNING:  # it started as the client left
                self.done(key, ticket)
            raise
        return ticket

    def dispatched(self, key: PoolKey, ticket: Ticket) -> None:
        """The request of a started ticket is being sent: the ledger counts it now."""
        pool = self._pools.get(key)
        if pool is not None:
            pool.pending.discard(ticket)

    def done(self, key: PoolKey, ticket: Ticket) -> None:
        """A request that waited has ended (or left): its slot goes to the next."""
        pool = self._pools.get(key)
        if pool is None:
            return
        now = self._clock()
        pool.pending.discard(ticket)
        self._started(pool, pool.scheduler.release(ticket, now))
        self._refill(pool, now)
        self._forget_if_idle(key, pool)

    def changed(self) -> None:
        """Slots may have freed (a request ended here, a peer's load dropped)."""
        if not self._pools:
            return
        now = self._clock()
        for pool in list(self._pools.values()):
            if pool.scheduler.depth():
                self._refill(pool, now)

    # -- reading ----------------------------------------------------------------------------

    def queued(self) -> int:
        return sum(p.scheduler.depth() for p in self._pools.values())

    def estimated_wait_s(self) -> float:
        waits = [p.scheduler.estimated_wait() for p in self._pools.values() if p.waiters]
        return max(waits, default=0.0)

    # -- inside -------------------------------------------------------------------------------

    def _refill(self, pool: _Pool, now: float) -> None:
        try:
            free = max(count() for count in pool.frees.values())
        except Exception:  # the model is gone, say: the waiters time out with a 429
            log.debug("cannot count the free slots of a pool", exc_info=True)
            free = 0
        scheduler = pool.scheduler
        free = max(0, free - len(pool.pending))
        self._started(pool, scheduler.set_capacity(scheduler.in_use + free, now))

    def _started(self, pool: _Pool, tickets: Sequence[Ticket]) -> None:
        for ticket in tickets:
            future = pool.waiters.pop(ticket, None)
            if future is None or future.done():  # its client left as it started
                self._started(pool, pool.scheduler.release(ticket, self._clock()))
            else:
                pool.pending.add(ticket)
                future.set_result(None)

    def _reject(self, pool: _Pool, rejected: Rejected) -> None:
        future = pool.waiters.pop(rejected.ticket, None)
        if future is not None and not future.done():
            future.set_exception(_rejected(rejected))

    def _arm(self) -> None:
        """One timer, at the earliest deadline of any pool."""
        deadlines = [d for p in self._pools.values() if (d := p.scheduler.next_deadline())]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            loop = asyncio.get_running_loop()
            delay = max(0.0, min(deadlines) - self._clock())
            self._timer = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        for key, pool in list(self._pools.items()):
            for rejected in pool.scheduler.expire(now):
                self._reject(pool, rejected)
            self._forget_if_idle(key, pool)
        self._arm()

    def _forget_if_idle(self, key: PoolKey, pool: _Pool) -> None:
        if not (pool.waiters or pool.pending or pool.scheduler.depth() or pool.scheduler.in_use):
            self._pools.pop(key, None)


def _rejected(rejected: Rejected) -> BusyError:
    if rejected.reason == "queue_full":
        return QueueFull(
            "every node that serves this model is busy and its queue is full; retry later",
            retry_after=rejected.retry_after_s,
        )
    return QueueTimeout(
        "every node that serves this model stayed busy while this request waited; retry later",
        retry_after=rejected.retry_after_s,
    )
