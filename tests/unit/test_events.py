"""The event bus, the load ledger and the one Backoff: small pieces the spine rests on."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.backends.base import Health
from shoal.backoff import Backoff
from shoal.events import (
    BackendDown,
    BackendUp,
    Event,
    EventBus,
    LoadChanged,
    PeerEvent,
    PeerJoined,
    PeerSuspect,
)
from shoal.routing.ledger import LoadLedger


def test_subscribers_get_their_kind_and_its_subclasses_in_order() -> None:
    bus = EventBus()
    everything: list[Event] = []
    peers: list[PeerEvent] = []
    joined: list[PeerJoined] = []
    bus.subscribe(Event, everything.append)
    bus.subscribe(PeerEvent, peers.append)
    bus.subscribe(PeerJoined, joined.append)
    events = [PeerJoined("a", "n", "http://x"), PeerSuspect("a", "n"), LoadChanged(1, 0)]
    for event in events:
        bus.publish(event)
    assert everything == events
    assert peers == events[:2]
    assert joined == events[:1]


def test_unsubscribe_and_wants() -> None:
    bus = EventBus()
    seen: list[Event] = []
    assert not bus.wants(LoadChanged)
    unsubscribe = bus.subscribe(Event, seen.append)
    assert bus.wants(LoadChanged)
    unsubscribe()
    unsubscribe()  # twice is fine
    assert not bus.wants(LoadChanged)
    bus.publish(LoadChanged(1, 0))
    assert seen == []


def test_a_failing_subscriber_is_logged_and_never_reaches_the_publisher(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    after: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    bus.subscribe(Event, broken)
    bus.subscribe(Event, after.append)
    with caplog.at_level(logging.ERROR, logger="shoal.events"):
        bus.publish(BackendDown("b", Health.DOWN, "refused"))
    assert len(after) == 1
    assert "an observer of BackendDown failed" in caplog.text


async def test_a_subscription_queues_and_drops_the_oldest_when_full() -> None:
    bus = EventBus()
    sub = bus.subscription(LoadChanged, maxsize=2)
    for n in range(3):
        bus.publish(LoadChanged(n, 0))
    bus.publish(BackendUp("b", "fake", "x", ()))  # not its kind
    assert sub.dropped == 1
    assert await sub.get() == LoadChanged(1, 0)
    assert await sub.get() == LoadChanged(2, 0)
    waiting = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    bus.publish(LoadChanged(3, 0))
    assert await asyncio.wait_for(waiting, 1) == LoadChanged(3, 0)
    sub.close()
    bus.publish(LoadChanged(4, 0))
    assert not bus.wants(LoadChanged)


def test_the_ledger_counts_once_and_publishes_local_changes() -> None:
    bus = EventBus()
    changes: list[LoadChanged] = []
    bus.subscribe(LoadChanged, changes.append)
    ledger = LoadLedger(bus)
    here = ledger.hold("local", "engine", "m")
    there = ledger.hold("peer", "p1", "m")
    assert (ledger.local_in_flight, ledger.backend("engine"), ledger.peer("p1")) == (1, 1, 1)
    assert ledger.model("m") == 2
    here.release()
    here.release()  # idempotent: the books cannot go negative
    there.release()
    assert (ledger.local_in_flight, ledger.peer("p1"), ledger.model("m")) == (0, 0, 0)
    assert changes == [LoadChanged(1, 0), LoadChanged(0, 0)]  # peers' holds are not ours


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(-1, 0.0), (0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10**6, 3.0)],
)
def test_backoff(failures: int, delay: float) -> None:
    assert Backoff(0.5, 3.0).delay(failures) == delay


@pytest.mark.parametrize(("first", "ceiling", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_backoff_refuses_nonsense(first: float, ceiling: float, factor: float) -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(first, ceiling, factor)
