"""`Scheduler`: admission, the bounded queue and weighted fair sharing, on explicit timelines.

Every test passes `now` by hand: nothing sleeps and no clock is read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shoal.routing.scheduler import (
    DEFAULT_WEIGHT,
    DEFAULT_WEIGHTS,
    MIN_RETRY_S,
    Queued,
    Rejected,
    Scheduler,
    Started,
    State,
    Ticket,
)


def start(s: Scheduler, cls: str, now: float = 0.0, **kw: float) -> Ticket:
    d = s.submit(cls, now, **kw)
    assert isinstance(d, Started), d
    return d.ticket


def queue(s: Scheduler, cls: str, now: float = 0.0, **kw: float) -> Ticket:
    d = s.submit(cls, now, **kw)
    assert isinstance(d, Queued), d
    assert d.displaced is None
    return d.ticket


class Server:
    """Drives a scheduler like a pool of slots: each service ends the oldest running."""

    def __init__(self, s: Scheduler, running: list[Ticket] | None = None) -> None:
        self.s = s
        self.running = running or []
        self.now = 0.0
        self.order: list[str] = []  # classes, in the order they started from the queue

    def fill(self, cls: str = "filler") -> None:
        while self.s.in_use < self.s.capacity:
            self.running.append(start(self.s, cls, self.now))

    def serve(self, n: int, dt: float = 1.0) -> list[str]:
        """End `n` running requests, one per `dt`; the classes that started meanwhile."""
        out: list[str] = []
        for _ in range(n):
            self.now += dt
            started = self.s.release(self.running.pop(0), self.now)
            self.running += started
            out += [t.cls for t in started]
        self.order += out
        return out


def backlogged(
    capacity: int = 1,
    *,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    default_weight: float = DEFAULT_WEIGHT,
) -> Server:
    """A pool whose slots are all taken, with room to queue without limit."""
    s = Scheduler(
        capacity,
        max_queue=100_000,
        max_wait_s=1e9,
        weights=weights,
        default_weight=default_weight,
    )
    server = Server(s)
    server.fill()
    return server


# -- admission --------------------------------------------------------------------------


def test_a_free_slot_starts_at_once_and_a_full_pool_queues() -> None:
    s = Scheduler(2)
    a, b = start(s, "local"), start(s, "peer")
    assert (a.state, a.started_at, a.waited_s) == (State.RUNNING, 0.0, 0.0)
    c = queue(s, "local", 1.0)
    assert (c.state, s.depth(), s.depth("local"), s.depth("peer"), s.in_use) == (
        State.QUEUED,
        1,
        1,
        0,
        2,
    )
    assert c.deadline == 31.0  # the default wait: 30 s
    assert s.release(a, 4.0) == (c,)
    assert (c.state, c.started_at, c.waited_s) == (State.RUNNING, 4.0, 3.0)
    assert s.release(b, 5.0) == ()
    assert (s.in_use, s.depth()) == (1, 0)


def test_release_is_idempotent_and_checks_its_ticket() -> None:
    s = Scheduler(1)
    a = start(s, "local")
    b = queue(s, "local")
    assert s.release(a, 1.0) == (b,)
    assert s.release(a, 2.0) == ()  # a second release must not free a second slot
    assert s.cancel(a, 2.0) == ()
    assert (s.in_use, a.state) == (1, State.FINISHED)
    c = queue(s, "peer")
    with pytest.raises(ValueError, match="queued"):
        s.release(c, 2.0)
    with pytest.raises(ValueError, match="another scheduler"):
        Scheduler(1).release(b, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": -1}, "capacity"),
        ({"max_queue": -1}, "max_queue"),
        ({"max_wait_s": 0.0}, "max_wait_s"),
        ({"weights": {"local": 0.0}}, "weight of 'local'"),
        ({"weights": {"local": math.inf}}, "weight of 'local'"),
        ({"default_weight": -1.0}, "default_weight"),
        ({"initial_service_s": math.nan}, "initial_service_s"),
        ({"ewma_weight": 0.0}, "ewma_weight"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"capacity": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        Scheduler(**args)  # type: ignore[arg-type]


def test_bad_costs_weights_and_capacities_are_refused() -> None:
    s = Scheduler(1)
    start(s, "local")
    with pytest.raises(ValueError, match="cost"):
        s.submit("local", 0.0, cost=0.0)
    with pytest.raises(ValueError, match="weight"):
        s.submit("local", 0.0, weight=-2.0)
    with pytest.raises(ValueError, match="capacity"):
        s.set_capacity(-1, 0.0)
    with pytest.raises(ValueError, match="cost"):
        s.submit("local", 0.0, cost=math.nan)
    stats = s.statistics()
    assert (stats.submitted, stats.started, stats.queued) == (1, 1, 0)  # refused: no ticket


# -- weighted fair sharing --------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 2, 5])
def test_steady_mixed_load_is_shared_70_30(capacity: int) -> None:
    server = backlogged(capacity)
    for _ in range(2000):
        queue(server.s, "local")
        queue(server.s, "peer")
    served = Counter(server.serve(1000))
    assert served["local"] + served["peer"] == 1000
    assert abs(served["local"] - 700) <= 5


def test_three_classes_and_per_key_weights_share_by_weight() -> None:
    server = backlogged(2, weights={"peer": 30.0})
    for _ in range(1000):
        queue(server.s, "key:a", weight=50.0)
        queue(server.s, "key:b", weight=20.0)
        queue(server.s, "peer")
    served = Counter(server.serve(1000))
    assert abs(served["key:a"] - 500) <= 3
    assert abs(served["key:b"] - 200) <= 3
    assert abs(served["peer"] - 300) <= 3


def test_an_unknown_class_gets_the_default_weight() -> None:
    server = backlogged(1, default_weight=10.0)
    for _ in range(500):
        queue(server.s, "stranger")
        queue(server.s, "peer")  # 30
    served = Counter(server.serve(400))
    assert abs(served["stranger"] - 100) <= 2


def test_costs_count_against_a_class_share() -> None:
    # Equal weights, but "big" requests cost 3: "big" gets a third as many starts.
    server = backlogged(1, weights={"big": 1.0, "small": 1.0})
    for _ in range(500):
        queue(server.s, "big", cost=3.0)
        queue(server.s, "small")
    served = Counter(server.serve(400))
    assert abs(served["big"] - 100) <= 2


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 100), min_size=2, max_size=4),
    arrivals=st.lists(st.integers(0, 3), min_size=50, max_size=300),
    capacity=st.integers(1, 3),
)
def test_backlogged_classes_never_drift_apart_by_more_than_a_request_each(
    weights: list[int], arrivals: list[int], capacity: int
) -> None:
    """SFQ's bound: over any interval where two classes stay backlogged, their service
    divided by weight differs by at most one request's cost / weight of each."""
    names = [f"c{i}" for i in range(len(weights))]
    weight_of = dict(zip(names, weights, strict=True))
    server = backlogged(capacity, weights={n: float(w) for n, w in weight_of.items()})
    for i in arrivals:  # a random pattern of arrivals, then 20 more of each: all backlogged
        queue(server.s, names[i % len(names)])
    for n in names:
        for _ in range(20):
            queue(server.s, n)
    served = dict.fromkeys(names, 0)
    while all(server.s.depth(n) for n in names):
        for cls in server.serve(1):
            served[cls] += 1
        for a in names:
            for b in names:
                wa, wb = weight_of[a], weight_of[b]
                gap = served[a] / wa - served[b] / wb
                assert gap <= 1 / wa + 1 / wb + 1e-9, (served, weights)


def test_a_class_alone_gets_every_slot() -> None:
    server = backlogged(3)
    for _ in range(50):
        queue(server.s, "peer")
    assert server.serve(50) == ["peer"] * 50  # work conserving: no slot kept for "local"


def test_a_burst_of_one_class_does_not_delay_the_other_behind_it() -> None:
    server = backlogged(1)
    for _ in range(50):
        queue(server.s, "peer")
    server.serve(5)
    for _ in range(5):
        queue(server.s, "local")
    # The local requests start next, interleaved 70/30, not after the peer burst.
    assert Counter(server.serve(7)) == Counter({"local": 5, "peer": 2})


def test_a_light_class_is_never_starved() -> None:
    server = backlogged(1, weights={"heavy": 99.0, "light": 1.0})
    for _ in range(1000):
        queue(server.s, "heavy")
    for _ in range(10):
        queue(server.s, "light")
    order = server.serve(1010)
    positions = [i for i, cls in enumerate(order) if cls == "light"]
    assert len(positions) == 10
    gaps = [b - a for a, b in pairwise([-1, *positions])]
    assert max(gaps) <= 101  # one in every 100 starts, as its weight says


def test_an_idle_class_banks_no_credit() -> None:
    server = backlogged(1)
    for _ in range(1000):
        queue(server.s, "peer")
    server.serve(500)  # "local" idle meanwhile: peer has everything
    for _ in range(300):
        queue(server.s, "local")
    window = server.serve(100)
    # It comes back at its share, 70 %, not at 100 % to catch up on its idle time.
    assert abs(window.count("local") - 70) <= 2
    assert window[:4].count("local") <= 3


def test_a_light_class_cannot_jump_the_line_one_request_at_a_time() -> None:
    """A class that empties its queue keeps its finish tag until virtual time passes it:
    sending one request at a time (each queued only when the last started) gains it no
    more than its weight."""
    server = backlogged(1, weights={"heavy": 9.0, "light": 1.0})
    for _ in range(500):
        queue(server.s, "heavy")
    light = 0
    queue(server.s, "light")
    for _ in range(300):
        started = server.serve(1)
        if "light" in started:
            light += 1
            queue(server.s, "light", server.now)
    assert light <= 31  # 10 % of 300, and one more


def test_a_queue_that_drains_forgets_every_class() -> None:
    server = backlogged(1)
    for i in range(100):
        queue(server.s, f"key:{i}", weight=1.0 + i)
    assert server.s.statistics().tracked_classes == 100
    server.serve(101)
    stats = server.s.statistics()
    assert (stats.queued, stats.tracked_classes, stats.queued_by_class) == (0, 0, {})


def test_an_idle_class_is_forgotten_once_virtual_time_passes_its_finish() -> None:
    server = backlogged(1, weights={"heavy": 10.0, "light": 1.0})
    for _ in range(100):
        queue(server.s, "heavy")
    queue(server.s, "light")
    server.serve(2)  # light started: F = v + 1, heavy at v + 0.1 per request
    assert server.s.statistics().tracked_classes == 2  # light is owed its finish tag
    server.serve(12)  # v has passed light's finish
    assert server.s.statistics().tracked_classes == 1


# -- cancellation -----------------------------------------------------------------------


def test_a_queued_ticket_cancelled_leaves_at_once_and_charges_nobody() -> None:
    server = backlogged(1)
    mine = [queue(server.s, "local") for _ in range(3)]
    queue(server.s, "peer")
    for t in mine:
        assert server.s.cancel(t, 0.5) == ()
        assert t.state is State.CANCELLED
    assert (server.s.depth(), server.s.depth("local")) == (1, 0)
    assert server.serve(1) == ["peer"]
    # Cancelled work was never served, so "local" is not behind: it comes back level.
    for _ in range(10):
        queue(server.s, "local")
        queue(server.s, "peer")
    assert Counter(server.serve(10))["local"] == 7


def test_cancelling_the_head_lets_the_next_of_its_class_take_its_place() -> None:
    server = backlogged(1)
    a, b, c = (queue(server.s, "local") for _ in range(3))
    server.s.cancel(a, 0.0)
    server.s.cancel(c, 0.0)
    assert server.s.release(server.running.pop(), 1.0) == (b,)
    assert server.s.depth() == 0


def test_a_running_ticket_cancelled_frees_its_slot_for_the_next() -> None:
    s = Scheduler(1)
    a = start(s, "local")
    b = queue(s, "peer")
    assert s.cancel(a, 2.0) == (b,)
    assert a.state is State.FINISHED
    assert s.cancel(a, 3.0) == ()


def test_many_cancellations_keep_memory_bounded() -> None:
    server = backlogged(1)
    keep = queue(server.s, "local")
    for _ in range(10_000):
        server.s.cancel(queue(server.s, "local"), 0.0)
        server.s.cancel(queue(server.s, "peer"), 0.0)
    s = server.s
    assert s.depth() == 1
    assert len(s._classes["local"].queue) <= 40
    assert len(s._heads) <= 40 and len(s._deadlines) <= 40
    assert s.release(server.running.pop(), 1.0) == (keep,)


# -- deadlines, Retry-After -------------------------------------------------------------


def test_a_ticket_waiting_past_its_deadline_expires_with_retry_after() -> None:
    s = Scheduler(1, max_wait_s=10.0, initial_service_s=4.0)
    start(s, "local")
    a = queue(s, "local", 1.0)
    b = queue(s, "peer", 2.0)
    c = queue(s, "peer", 3.0, max_wait_s=2.0)  # a forwarded request with less time left
    d = queue(s, "local", 3.0, max_wait_s=100.0)  # never longer than the scheduler's
    assert (c.deadline, d.deadline) == (5.0, 13.0)
    assert s.next_deadline() == 5.0
    assert s.expire(4.9) == []
    [gone] = s.expire(5.0)
    assert (gone.ticket, gone.reason, c.state) == (c, "expired", State.EXPIRED)
    assert s.next_deadline() == 11.0
    expired = s.expire(12.5)
    assert [r.ticket for r in expired] == [a, b]
    assert s.next_deadline() == 13.0
    # One left, one running; 4 s per request: a newcomer would wait 8 s.
    assert {r.retry_after_s for r in expired} == {8.0}
    s.cancel(d, 13.0)
    assert s.next_deadline() is None


def test_a_slot_that_frees_past_a_deadline_before_expiry_still_serves() -> None:
    s = Scheduler(1, max_wait_s=1.0)
    a = start(s, "local")
    b = queue(s, "local")
    assert s.release(a, 5.0) == (b,)  # the client is still there: serve it
    assert s.expire(5.0) == []


def test_retry_after_follows_the_measured_service_time_within_bounds() -> None:
    s = Scheduler(2, max_queue=4, max_wait_s=30.0, initial_service_s=5.0)
    a, b = start(s, "local"), start(s, "local")
    assert s.estimated_wait() == 2.5  # the guess, over two slots
    s.release(a, 10.0)  # measured: 10 s replaces the guess
    assert s.estimated_wait() == 0.0  # a slot is free
    a = start(s, "local", 10.0)
    s.release(a, 12.0)  # 10 + 0.2 × (2 − 10) = 8.4
    assert s.statistics().service_s == pytest.approx(8.4)
    start(s, "local", 12.0)
    for _ in range(4):
        queue(s, "local", 12.0)
    assert s.estimated_wait() == pytest.approx(5 * 8.4 / 2)
    full = s.submit("local", 12.0)
    assert isinstance(full, Rejected)
    assert full.reason == "queue_full"
    assert full.retry_after_s == pytest.approx(21.0)
    assert full.ticket.state is State.REJECTED
    assert b.state is State.RUNNING


@pytest.mark.parametrize(
    ("service_s", "expected"), [(0.01, MIN_RETRY_S), (600.0, 20.0)], ids=["floor", "ceiling"]
)
def test_retry_after_is_at_least_a_second_and_at_most_the_longest_wait(
    service_s: float, expected: float
) -> None:
    s = Scheduler(1, max_queue=0, max_wait_s=20.0, initial_service_s=service_s)
    start(s, "local")
    rejected = s.submit("local", 0.0)
    assert isinstance(rejected, Rejected) and rejected.retry_after_s == expected


# -- the bounded queue ------------------------------------------------------------------


def test_a_full_queue_turns_away_the_class_over_its_share() -> None:
    s = Scheduler(1, max_queue=10)
    start(s, "x")
    flood = [queue(s, "peer") for _ in range(10)]
    refused = s.submit("peer", 1.0)
    assert isinstance(refused, Rejected) and refused.reason == "queue_full"
    # A local request pushes out the newest peer request: the flood cannot shut it out.
    admitted = s.submit("local", 1.0)
    assert isinstance(admitted, Queued) and admitted.displaced is not None
    assert (admitted.displaced.ticket, admitted.displaced.reason) == (flood[-1], "queue_full")
    assert flood[-1].state is State.REJECTED
    assert (s.depth(), s.depth("local"), s.depth("peer")) == (10, 1, 9)


def test_pushing_out_stops_at_the_weighted_share() -> None:
    s = Scheduler(1, max_queue=10)
    start(s, "x")
    for _ in range(10):
        queue(s, "peer")
    displaced = 0
    for _ in range(20):
        d = s.submit("local", 1.0)
        displaced += isinstance(d, Queued)
    # Local pushes peer out while peer holds more than its share: 7 / 70 < 4 / 30, but
    # an eighth would hold 8 / 70 > 3 / 30. The queue ends shared by the weights, 7:3.
    assert (s.depth("local"), s.depth("peer")) == (7, 3)
    assert displaced == 7
    stats = s.statistics()
    assert stats.rejected == 7 + 13  # 7 peer pushed out, 13 local turned away


def test_capacity_growth_starts_queued_work_and_shrinking_stops_none() -> None:
    server = backlogged(2)
    for _ in range(6):
        queue(server.s, "local")
    started = server.s.set_capacity(5, 1.0)
    assert len(started) == 3 and server.s.in_use == 5
    server.running += started
    assert server.s.set_capacity(1, 2.0) == ()
    assert all(t.state is State.RUNNING for t in server.running)
    # Four slots too many: the next four ends start nothing, the fifth starts one.
    assert [len(server.s.release(server.running.pop(0), 3.0)) for _ in range(5)] == [
        0,
        0,
        0,
        0,
        1,
    ]


def test_a_pool_with_no_free_slot_queues_until_capacity_comes() -> None:
    s = Scheduler(0, initial_service_s=4.0)
    a = queue(s, "local")
    assert s.estimated_wait() == 8.0  # finite, as if one slot were there
    assert s.set_capacity(1, 2.0) == (a,)
    assert s.set_capacity(0, 3.0) == ()
    b = queue(s, "peer", 3.0)
    assert s.release(a, 4.0) == ()  # no slot: the pool is taken by others' work
    assert s.set_capacity(1, 5.0) == (b,)


# -- the whole, at random ---------------------------------------------------------------

CLASSES = st.sampled_from(["local", "peer", "key:a", "key:b"])


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, ends, cancellations, expiries and capacity changes, time forward."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(2, max_queue=6, max_wait_s=5.0)
        self.now = 0.0
        self.tickets: list[Ticket] = []
        self.ended: Counter[int] = Counter()  # ticket serial -> final answers given
        self.over_capacity = 0  # running past a capacity cut: allowed, never grown

    def answered(self, ticket: Ticket) -> None:
        self.ended[ticket.serial] += 1
        assert self.ended[ticket.serial] == 1, f"{ticket!r} answered twice"

    def started(self, tickets: tuple[Ticket, ...]) -> None:
        for t in tickets:
            assert t.state is State.RUNNING and t.started_at == self.now

    @rule(dt=st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(
        cls=CLASSES,
        cost=st.sampled_from([1.0, 2.5]),
        weight=st.sampled_from([None, 1.0, 50.0]),
        max_wait_s=st.sampled_from([None, 1.0]),
    )
    def submit(self, cls: str, cost: float, weight: float | None, max_wait_s: float | None) -> None:
        free_before = self.s.in_use < self.s.capacity
        d = self.s.submit(cls, self.now, cost=cost, weight=weight, max_wait_s=max_wait_s)
        self.tickets.append(d.ticket)
        if free_before:
            assert isinstance(d, Started)
        elif isinstance(d, Rejected):
            self.answered(d.ticket)
            assert d.retry_after_s >= MIN_RETRY_S
        else:
            assert isinstance(d, Queued)
            if d.displaced is not None:
                assert d.displaced.ticket.state is State.REJECTED
                self.answered(d.displaced.ticket)

    @precondition(lambda self: any(t.state is State.RUNNING for t in self.tickets))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        running = [t for t in self.tickets if t.state is State.RUNNING]
        t = data.draw(st.sampled_from(running))
        self.started(self.s.release(t, self.now))
        self.answered(t)

    @precondition(lambda self: bool(self.tickets))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        t = data.draw(st.sampled_from(self.tickets))
        before = t.state
        self.started(self.s.cancel(t, self.now))
        if before in (State.QUEUED, State.RUNNING):
            self.answered(t)
            assert t.state is (State.CANCELLED if before is State.QUEUED else State.FINISHED)

    @rule()
    def expire(self) -> None:
        deadline = self.s.next_deadline()
        for r in self.s.expire(self.now):
            assert r.ticket.deadline <= self.now and r.reason == "expired"
            self.answered(r.ticket)
        after = self.s.next_deadline()
        assert after is None or after > self.now
        if deadline is not None and deadline > self.now:
            assert after == deadline

    @rule(capacity=st.integers(0, 4))
    def set_capacity(self, capacity: int) -> None:
        self.started(self.s.set_capacity(capacity, self.now))

    @invariant()
    def books_balance(self) -> None:
        st_ = self.s.statistics()
        states = Counter(t.state for t in self.tickets)
        assert st_.submitted == len(self.tickets)
        assert st_.queued == states[State.QUEUED] == self.s.depth()
        assert st_.in_use == states[State.RUNNING]
        assert st_.rejected == states[State.REJECTED]
        assert st_.expired == states[State.EXPIRED]
        assert st_.cancelled == states[State.CANCELLED]
        assert st_.finished == states[State.FINISHED]
        assert st_.started == st_.finished + st_.in_use
        assert st_.submitted == (
            st_.started + st_.rejected + st_.expired + st_.cancelled + st_.queued
        )
        assert sum(st_.queued_by_class.values()) == st_.queued
        for cls, n in st_.queued_by_class.items():
            assert n == self.s.depth(cls) > 0

    @invariant()
    def work_conserving_and_bounded(self) -> None:
        s = self.s
        if s.depth():
            assert s.in_use >= s.capacity, "a slot idles while requests wait"
            assert s.estimated_wait() >= 0
        assert s.depth() <= 6
        # Above capacity only after a cut, never by a start.
        if s.in_use > s.capacity:
            assert s.in_use <= self.over_capacity
        self.over_capacity = max(s.in_use, s.capacity)

    @invariant()
    def memory_is_bounded(self) -> None:
        stats = self.s.statistics()
        if not stats.queued:
            assert stats.tracked_classes == 0
        assert stats.tracked_classes <= 4


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
