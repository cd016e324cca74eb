"""`ConnectionBook` and `HeadClock`: who may hold a connection, and when its head is due.

Pure: no sockets, no loop; every `now` is passed by hand. A Hypothesis state machine
checks the book's counts and evictions against a model through any order of admits,
requests, answers, handshakes, proofs and (repeated) releases.
"""

from __future__ import annotations

import resource
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shoal.api.connections import (
    RESERVED_FDS_MIN,
    UNKNOWN_SOURCE,
    ConnectionBook,
    ConnectionCaps,
    HeadClock,
    Lease,
    Phase,
    Refused,
    connection_caps,
    source_of,
)
from shoal.process import FD_LIMIT_CAP, AcceptErrorHandler, open_file_limit


def loopback(source: str) -> bool:
    return source.startswith("127.") or source == "::1"


def book(per_source: int = 2, total: int = 3) -> ConnectionBook:
    return ConnectionBook(ConnectionCaps(per_source, total), exempt=loopback)


def lease(decision: Lease | Refused) -> Lease:
    assert isinstance(decision, Lease), decision
    return decision


# -- caps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "total"),
    [
        (1024, 1024 - RESERVED_FDS_MIN),  # the usual soft limit: 768 for the LAN
        (4096, 3072),  # a quarter kept back
        (65536, 49152),
        (300, 44),  # the floor of 256 kept back
        (256, 1),  # nothing left: one, not zero (zero would refuse every LAN client)
        (10, 1),
    ],
)
def test_the_total_cap_keeps_a_quarter_of_the_open_file_limit(limit: int, total: int) -> None:
    assert connection_caps(128, 0, limit) == ConnectionCaps(128, total)


def test_a_configured_total_cap_is_taken_as_it_is() -> None:
    assert connection_caps(4, 5000, 1024) == ConnectionCaps(4, 5000)


@pytest.mark.parametrize(("per_source", "total"), [(0, 1), (1, 0), (-1, 5)])
def test_caps_below_one_are_refused(per_source: int, total: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionCaps(per_source, total)


@pytest.mark.parametrize(
    ("peername", "source"),
    [
        (("192.168.1.20", 51000), "192.168.1.20"),
        (("fe80::1%eth0", 51000, 0, 2), "fe80::1"),
        (("::ffff:192.168.1.20", 51000, 0, 0), "192.168.1.20"),
        (("2001:DB8:0:0::1", 1, 0, 0), "2001:db8::1"),
        (("::1", 1, 0, 0), "::1"),
        (None, UNKNOWN_SOURCE),
        ((), UNKNOWN_SOURCE),
        ("/run/shoal.sock", UNKNOWN_SOURCE),
        (("not-an-address", 1), UNKNOWN_SOURCE),
        ((b"10.0.0.1", 1), UNKNOWN_SOURCE),
    ],
)
def test_a_source_is_one_address_per_host(peername: object, source: str) -> None:
    assert source_of(peername) == source


# -- admission ------------------------------------------------------------------------------


def watched(b: ConnectionBook, source: str, closed: list[str], name: str, **kw: bool) -> Lease:
    """Admit a connection that records `name` in `closed` if the book evicts it."""
    item = lease(b.admit(source, **kw))
    item.on_evict = lambda: closed.append(name)
    return item


def test_an_address_is_refused_past_its_cap_and_admitted_again_after_a_release() -> None:
    b = book(per_source=2, total=10)
    first, _second = lease(b.admit("10.0.0.9")), lease(b.admit("10.0.0.9"))
    assert b.admit("10.0.0.9") is Refused.SOURCE_FULL
    assert lease(b.admit("10.0.0.10")).source == "10.0.0.10"  # other addresses unaffected
    first.release()
    lease(b.admit("10.0.0.9"))
    stats = b.statistics()
    assert (stats.open, stats.sources, stats.refused_source, stats.evicted) == (3, 2, 1, 0)


def test_a_full_node_evicts_the_connection_idle_the_longest_whatever_its_address() -> None:
    b, closed = book(per_source=5, total=3), list[str]()
    old = watched(b, "10.0.0.1", closed, "old")
    watched(b, "10.0.0.2", closed, "middle")
    watched(b, "10.0.0.1", closed, "young")
    newcomer = lease(b.admit("10.0.0.3"))
    assert (closed, newcomer.displaced) == (["old"], "10.0.0.1")
    assert (b.open_from("10.0.0.1"), b.statistics().open, b.statistics().evicted) == (1, 3, 1)
    old.release()  # its close, when it comes, changes nothing more
    assert b.statistics().open == 3


def test_a_connection_handling_a_request_is_never_evicted() -> None:
    b, closed = book(per_source=5, total=2), list[str]()
    watched(b, "10.0.0.1", closed, "first").busy()
    watched(b, "10.0.0.1", closed, "second")
    watched(b, "10.0.0.2", closed, "newcomer")
    lease(b.admit("10.0.0.3"))
    assert closed == ["second", "newcomer"]


def test_when_every_connection_is_busy_the_newcomer_is_refused() -> None:
    b = book(per_source=5, total=2)
    for item in [lease(b.admit("10.0.0.1")), lease(b.admit("10.0.0.2"))]:
        item.busy()
    assert b.admit("10.0.0.3") is Refused.NODE_FULL
    assert b.statistics().refused_total == 1


def test_an_answered_connection_is_the_most_recently_idle() -> None:
    b, closed = book(per_source=5, total=2), list[str]()
    first = watched(b, "10.0.0.1", closed, "first")
    watched(b, "10.0.0.2", closed, "second")
    first.busy()
    first.idle()  # answered after the second connection came: now the younger
    lease(b.admit("10.0.0.3"))
    assert closed == ["second"]


def test_the_oldest_unfinished_handshake_makes_room_for_a_new_one() -> None:
    b, closed = ConnectionBook(ConnectionCaps(10, 10, handshakes=2), exempt=loopback), list[str]()
    watched(b, "10.0.0.1", closed, "stalled", tls=True)
    peer = watched(b, "10.0.0.2", closed, "peer", tls=True)
    peer.handshake_done()
    watched(b, "10.0.0.1", closed, "stalled 2", tls=True)
    lease(b.admit("10.0.0.3", tls=True))
    assert closed == ["stalled"]
    assert b.statistics().handshaking == 2
    lease(b.admit("10.0.0.3"))  # plain connections do not count as handshakes
    assert closed == ["stalled"]


def test_a_proven_peer_leaves_its_address_count_and_is_never_evicted() -> None:
    b, closed = book(per_source=1, total=2), list[str]()
    peer = watched(b, "10.0.0.7", closed, "peer", tls=True)
    peer.handshake_done()
    peer.proven()
    peer.proven()  # idempotent
    peer.idle()  # answered: still not evictable
    assert b.open_from("10.0.0.7") == 0
    watched(b, "10.0.0.7", closed, "second")  # the address may open another
    lease(b.admit("10.0.0.8"))  # evicts the idle stranger, not the peer
    assert closed == ["second"]
    stats = b.statistics()
    assert (stats.open, stats.proven_open, stats.sources) == (2, 1, 1)
    peer.release()
    assert b.statistics().proven_open == 0


def test_loopback_is_never_counted_nor_refused() -> None:
    b = book(per_source=1, total=1)
    lease(b.admit("10.0.0.1")).busy()  # the LAN is full
    local = [lease(b.admit(source)) for source in ["127.0.0.1"] * 50 + ["::1"] * 50]
    assert all(item.exempt for item in local)
    stats = b.statistics()
    assert (stats.open, stats.exempt_open, stats.sources) == (1, 100, 1)
    for item in local:
        item.busy()
        item.idle()
        item.proven()
        item.release()
    assert b.statistics().exempt_open == 0
    assert b.admit("10.0.0.2") is Refused.NODE_FULL  # loopback gave back nothing counted


def test_the_exemption_is_the_callers_to_choose() -> None:
    b = ConnectionBook(ConnectionCaps(1, 10), exempt=lambda source: source == "127.0.0.1")
    lease(b.admit("127.0.0.2"))
    assert b.admit("127.0.0.2") is Refused.SOURCE_FULL
    assert lease(b.admit("127.0.0.1")).exempt


def test_a_release_counts_once_however_often_it_is_called() -> None:
    b = book(per_source=2, total=2)
    first = lease(b.admit("10.0.0.1"))
    lease(b.admit("10.0.0.1"))
    for _ in range(3):
        first.release()
    first.idle()  # a late answer of a closed connection does not bring it back
    assert b.open_from("10.0.0.1") == 1
    assert b.statistics().open == 1


class BookMachine(RuleBasedStateMachine):
    """Any interleaving of admits, requests, answers, handshakes, proofs and (repeated)
    releases keeps the counts exact, and evicts only as documented."""

    SOURCES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "127.0.0.1")

    def __init__(self) -> None:
        super().__init__()
        self.caps = ConnectionCaps(per_source=3, total=5, handshakes=2)
        self.book = ConnectionBook(self.caps, exempt=loopback)
        self.live: list[Lease] = []
        self.released: list[Lease] = []
        self.proven: set[int] = set()  # ids of proven live leases
        self.idle: list[Lease] = []  # evictable, longest idle first
        self.handshaking: list[Lease] = []  # oldest first
        self.evicted: list[Lease] = []

    def counted(self, source: str | None = None) -> list[Lease]:
        return [
            item
            for item in self.live
            if not item.exempt
            and (source is None or (item.source == source and id(item) not in self.proven))
        ]

    def forget(self, item: Lease) -> None:
        self.live.remove(item)
        self.proven.discard(id(item))
        for queue in (self.idle, self.handshaking):
            if item in queue:
                queue.remove(item)
        self.released.append(item)

    @rule(source=st.sampled_from(SOURCES), tls=st.booleans())
    def admit(self, source: str, tls: bool) -> None:
        held, total = len(self.counted(source)), len(self.counted())
        expected: list[Lease] = []
        if not loopback(source) and held < self.caps.per_source and self.idle:
            if tls and len(self.handshaking) >= self.caps.handshakes:
                expected.append(self.handshaking[0])
            if total - len(expected) >= self.caps.total:
                expected.append(next(i for i in self.idle if i not in expected))
        assert set(map(id, self.handshaking)) <= set(map(id, self.idle))
        evictions = len(self.evicted)
        decision = self.book.admit(source, tls=tls)
        assert self.evicted[evictions:] == expected
        for victim in expected:
            self.forget(victim)
        if loopback(source):
            assert isinstance(decision, Lease) and decision.exempt
            self.live.append(decision)
            return
        if held >= self.caps.per_source:
            assert decision is Refused.SOURCE_FULL
        elif total >= self.caps.total and not expected:
            assert decision is Refused.NODE_FULL
        else:
            assert isinstance(decision, Lease) and not decision.exempt
            assert decision.displaced == (expected[-1].source if expected else None)
            decision.on_evict = lambda item=decision: self.evicted.append(item)
            self.live.append(decision)
            self.idle.append(decision)
            if tls:
                self.handshaking.append(decision)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.live))
        item.release()
        self.forget(item)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def busy(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.live))
        item.busy()
        for queue in (self.idle, self.handshaking):
            if item in queue:
                queue.remove(item)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def answered(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.live))
        item.idle()
        if not item.exempt and id(item) not in self.proven:
            if item in self.idle:
                self.idle.remove(item)
            self.idle.append(item)

    @precondition(lambda self: self.handshaking)
    @rule(data=st.data(), prove=st.booleans())
    def handshake_done(self, data: st.DataObject, prove: bool) -> None:
        item = data.draw(st.sampled_from(self.handshaking))
        item.handshake_done()
        self.handshaking.remove(item)
        if prove:
            item.proven()
            self.proven.add(id(item))
            if item in self.idle:
                self.idle.remove(item)

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def late_calls(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(self.released))
        item.release()
        item.idle()
        item.busy()
        item.handshake_done()
        item.proven()

    @invariant()
    def counts_match(self) -> None:
        stats = self.book.statistics()
        assert stats.open == len(self.counted()) <= self.caps.total
        assert stats.exempt_open == len(self.live) - len(self.counted())
        assert stats.proven_open == len(self.proven)
        assert stats.handshaking == len(self.handshaking) <= self.caps.handshakes
        assert stats.idle == len(self.idle)
        assert stats.evicted == len(self.evicted)
        for source in self.SOURCES[:3]:
            assert self.book.open_from(source) == len(self.counted(source)) <= self.caps.per_source


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


# -- the request head's deadline --------------------------------------------------------------


def test_the_first_head_is_due_from_the_connection() -> None:
    clock = HeadClock(10.0, now=100.0)
    assert (clock.phase, clock.deadline) == (Phase.AWAITING, 110.0)
    clock.bytes_received(105.0)  # trickled bytes move nothing
    assert not clock.expired(109.99)
    assert clock.expired(110.0)


def test_a_received_head_stops_the_clock_for_the_whole_request() -> None:
    clock = HeadClock(10.0, now=0.0)
    clock.head_received()
    clock.bytes_received(5.0)  # the body, or a pipelined request: no deadline
    assert (clock.phase, clock.deadline) == (Phase.IN_REQUEST, None)
    assert not clock.expired(1e9)


def test_after_an_answer_the_next_byte_starts_the_clock() -> None:
    clock = HeadClock(10.0, now=0.0)
    clock.head_received()
    clock.answered()
    assert (clock.phase, clock.deadline) == (Phase.IDLE, None)
    assert not clock.expired(500.0)  # idle keep-alive: the idle timeout's business
    clock.bytes_received(600.0)
    assert (clock.phase, clock.deadline) == (Phase.AWAITING, 610.0)
    clock.bytes_received(609.0)  # more of the same head: the deadline stands
    assert clock.deadline == 610.0
    assert clock.expired(610.0)


def test_a_pipelined_head_already_in_stops_the_clock_at_once() -> None:
    clock = HeadClock(10.0, now=0.0)
    clock.head_received()
    clock.answered()
    clock.head_received()  # the next request was parsed while the first was handled
    assert (clock.phase, clock.deadline) == (Phase.IN_REQUEST, None)


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_the_header_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        HeadClock(timeout, now=0.0)


# -- the process around the listeners ------------------------------------------------------


class RecordingLoop:
    def __init__(self) -> None:
        self.delegated: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.delegated.append(context)


def test_retries_of_accept_run_after_their_listener_closed_are_dropped() -> None:
    """asyncio schedules a retry per failed accept() while descriptors are short; those
    left when the listener closes fail with a traceback each (thousands, measured)."""
    handler, loop = AcceptErrorHandler(10.0, clock=lambda: 0.0), RecordingLoop()
    stale = {
        "message": "Exception in callback BaseSelectorEventLoop._start_serving(functools.par"
        "tial(<function Server...>), <socket>, None, <Server sockets=()>, 1024, None, None)",
        "exception": ValueError("Invalid file descriptor: -1"),
    }
    other = {"message": "Exception in callback something_else()", "exception": ValueError()}
    for _ in range(1000):
        handler(loop, stale)  # type: ignore[arg-type]
    handler(loop, other)  # type: ignore[arg-type]
    assert loop.delegated == [other]


def test_the_open_file_limit_is_the_soft_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert open_file_limit() == (FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft)
