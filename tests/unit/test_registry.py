"""The backend registry: probe backoff, the model index, and health bookkeeping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.backends.base import (
    GENERATION,
    BackendStatus,
    Health,
    ModelInfo,
    Operation,
)
from shoal.backends.registry import BackendRegistry, next_probe_delay
from shoal.events import (
    BackendDown,
    BackendModelsChanged,
    BackendReported,
    BackendUp,
    Event,
    EventBus,
    ModelLoaded,
    ModelUnloaded,
)

INTERVAL = 30.0
CHAT = Operation.CHAT
EMBED = Operation.EMBEDDING


class FakeBackend:
    kind = "fake"

    def __init__(self, name: str, status: BackendStatus | None = None) -> None:
        self.name = name
        self.location = f"http://{name}:8080"
        self.status = status or BackendStatus(Health.HEALTHY)
        self.probes = 0
        self.closed = 0
        self.probed = asyncio.Event()

    async def probe(self) -> BackendStatus:
        self.probes += 1
        self.probed.set()
        return self.status

    async def send(self, op: Operation, body: bytes) -> Any:
        raise AssertionError("the registry never sends")

    async def aclose(self) -> None:
        self.closed += 1


def healthy(*models: ModelInfo) -> BackendStatus:
    return BackendStatus(Health.HEALTHY, models=models)


def down(reason: str = "gone") -> BackendStatus:
    return BackendStatus(Health.DOWN, reason=reason)


def model(
    model_id: str = "m", *, loaded: bool = True, ops: frozenset[Operation] = GENERATION
) -> ModelInfo:
    return ModelInfo(id=model_id, loaded=loaded, operations=ops)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def registry(bus: EventBus) -> BackendRegistry:
    return BackendRegistry(bus, interval_s=INTERVAL)


# -- next_probe_delay ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "interval", "delay"),
    [
        (0, 30.0, 30.0),
        (-1, 30.0, 30.0),
        (1, 30.0, 1.0),
        (2, 30.0, 2.0),
        (3, 30.0, 4.0),
        (4, 30.0, 8.0),
        (5, 30.0, 16.0),
        (6, 30.0, 30.0),
        (50, 30.0, 30.0),
        (3, 3.0, 3.0),
        (1, 0.5, 0.5),
        (0, 0.5, 0.5),
    ],
)
def test_next_probe_delay(failures: int, interval: float, delay: float) -> None:
    assert next_probe_delay(failures, interval) == delay


def test_backoff_never_exceeds_the_interval_and_never_shrinks() -> None:
    delays = [next_probe_delay(n, INTERVAL) for n in range(1, 200)]
    assert delays == sorted(delays)
    assert max(delays) == INTERVAL


def test_backoff_after_a_very_long_outage_is_still_the_interval() -> None:
    assert next_probe_delay(1100, INTERVAL) == INTERVAL


# -- membership ---------------------------------------------------------------------------


def test_add_and_get(registry: BackendRegistry) -> None:
    backend = FakeBackend("a")
    entry = registry.add(backend, detected=True)
    assert registry.get("a") is entry
    assert entry.backend is backend
    assert entry.detected is True
    assert entry.status.health is Health.STARTING
    assert not entry.healthy
    assert registry.get("b") is None
    assert list(registry.entries()) == [entry]


def test_duplicate_names_are_rejected(registry: BackendRegistry) -> None:
    first = registry.add(FakeBackend("a"))
    with pytest.raises(ValueError, match="'a'"):
        registry.add(FakeBackend("a"))
    assert list(registry.entries()) == [first]


def test_has_location(registry: BackendRegistry) -> None:
    registry.add(FakeBackend("a"))
    assert registry.has_location("http://a:8080")
    assert not registry.has_location("http://b:8080")


# -- candidates ----------------------------------------------------------------------------


def test_only_healthy_backends_are_candidates(registry: BackendRegistry) -> None:
    up = registry.add(FakeBackend("up"))
    registry.record(up, healthy(model()), now=0)
    starting = registry.add(FakeBackend("starting"))
    registry.record(starting, BackendStatus(Health.STARTING, models=(model(),)), now=0)
    gone = registry.add(FakeBackend("gone"))
    registry.record(gone, healthy(model()), now=0)
    registry.record(gone, down(), now=1)
    assert registry.candidates("m", CHAT) == [up]


def test_only_backends_with_the_model_for_the_operation(registry: BackendRegistry) -> None:
    chat_only = registry.add(FakeBackend("chat"))
    registry.record(chat_only, healthy(model("m"), model("other", ops=frozenset(Operation))))
    embed_only = registry.add(FakeBackend("embed"))
    registry.record(embed_only, healthy(model("m", ops=frozenset({EMBED}))))
    assert registry.candidates("m", CHAT) == [chat_only]
    assert registry.candidates("m", EMBED) == [embed_only]
    assert registry.candidates("m", Operation.COMPLETION) == [chat_only]
    assert registry.candidates("other", EMBED) == [chat_only]
    assert registry.candidates("nope", CHAT) == []


def test_ties_keep_the_order_backends_were_added(registry: BackendRegistry) -> None:
    entries = [registry.add(FakeBackend(name)) for name in "xyz"]
    for entry in entries:
        registry.record(entry, healthy(model()))
    assert registry.candidates("m", CHAT) == entries


def test_a_backend_appears_once_even_if_it_lists_the_model_twice(
    registry: BackendRegistry,
) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model(), model()))
    assert registry.candidates("m", CHAT) == [entry]


def test_models_lists_only_healthy_backends(registry: BackendRegistry) -> None:
    a = registry.add(FakeBackend("a"))
    registry.record(a, healthy(model("x"), model("y")))
    b = registry.add(FakeBackend("b"))
    registry.record(b, healthy(model("z")))
    registry.record(b, down())
    assert [(info.id, entry) for info, entry in registry.models()] == [("x", a), ("y", a)]


# -- knows_model ----------------------------------------------------------------------------


def test_knows_model(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    assert not registry.knows_model("m")  # never seen healthy
    registry.record(entry, healthy(model("m")))
    assert registry.knows_model("m")
    assert not registry.knows_model("other")


def test_knows_the_last_models_of_a_backend_that_went_down(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model("m")))
    registry.record(entry, down())
    assert registry.candidates("m", CHAT) == []
    assert entry.last_models == (model("m"),)
    assert registry.knows_model("m")


def test_last_models_follow_the_latest_healthy_list(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model("old")))
    registry.record(entry, healthy(model("new")))
    registry.record(entry, down())
    assert registry.knows_model("new")
    assert not registry.knows_model("old")


# -- record and mark_down ------------------------------------------------------------------


def test_record_counts_failures_and_schedules_the_next_probe(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model()), now=100.0)
    assert (entry.failures, entry.next_probe) == (0, 130.0)
    expected = [(1, 201.0), (2, 202.0), (3, 204.0), (4, 208.0), (5, 216.0), (6, 230.0)]
    for failures, next_probe in expected:
        registry.record(entry, down(), now=200.0)
        assert (entry.failures, entry.next_probe) == (failures, next_probe)
    registry.record(entry, healthy(model()), now=300.0)
    assert (entry.failures, entry.next_probe) == (0, 330.0)
    assert entry.healthy


def test_starting_counts_as_a_failure(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, BackendStatus(Health.STARTING), now=0.0)
    assert (entry.failures, entry.next_probe) == (1, 1.0)


def test_record_uses_the_monotonic_clock_by_default(
    registry: BackendRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shoal.backends.registry.time.monotonic", lambda: 1000.0)
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, down())
    assert entry.next_probe == 1001.0


def test_record_publishes_changes_only(registry: BackendRegistry, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(Event, seen.append)
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model("m"), model("n", loaded=False)), now=0)
    registry.record(entry, healthy(model("m"), model("n", loaded=False)), now=1)  # no change
    registry.record(entry, healthy(model("m", loaded=False), model("n")), now=2)
    registry.record(
        entry, healthy(model("m", loaded=False), model("n"), model("o", loaded=False)), now=3
    )
    registry.record(entry, down("refused"), now=4)
    registry.record(entry, down("refused again"), now=5)  # still down: nothing new
    assert seen == [
        BackendUp("a", "fake", "http://a:8080", (model("m"), model("n", loaded=False))),
        ModelLoaded("a", "m"),
        BackendModelsChanged("a", (model("m", loaded=False), model("n"))),
        ModelLoaded("a", "n"),
        ModelUnloaded("a", "m"),
        BackendModelsChanged("a", (model("m", loaded=False), model("n"), model("o", loaded=False))),
        BackendDown("a", Health.DOWN, "refused"),
        ModelUnloaded("a", "n"),
    ]


def test_a_backend_that_reports_itself_is_recorded_at_once(
    registry: BackendRegistry, bus: EventBus
) -> None:
    entry = registry.add(FakeBackend("a"))
    bus.publish(BackendReported("a", healthy(model("m"))))
    assert entry.healthy
    assert registry.candidates("m", CHAT) == [entry]
    bus.publish(BackendReported("a", BackendStatus(Health.STARTING, reason="restarting")))
    assert registry.candidates("m", CHAT) == []
    bus.publish(BackendReported("unknown", healthy(model("m"))))  # ignored


def test_mark_down(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, healthy(model()), now=0)
    registry.mark_down(entry, "connection refused")
    assert entry.status.health is Health.DOWN
    assert entry.status.reason == "connection refused"
    assert entry.status.models == ()
    assert entry.failures == 1
    assert registry.candidates("m", CHAT) == []
    assert registry.knows_model("m")


def test_mark_down_twice_does_not_push_the_backoff(registry: BackendRegistry) -> None:
    entry = registry.add(FakeBackend("a"))
    registry.record(entry, down("first"), now=0)
    before = (entry.failures, entry.next_probe, entry.status)
    registry.mark_down(entry, "second")
    assert (entry.failures, entry.next_probe, entry.status) == before


# -- probing ---------------------------------------------------------------------------------


async def test_probe_records_the_backend_answer(registry: BackendRegistry) -> None:
    backend = FakeBackend("a", healthy(model("m")))
    entry = registry.add(backend)
    await registry.probe(entry)
    assert backend.probes == 1
    assert entry.healthy
    assert registry.candidates("m", CHAT) == [entry]
    backend.status = down("crashed")
    await registry.probe(entry)
    assert entry.status.reason == "crashed"
    assert entry.failures == 1


async def test_run_probes_new_backends_promptly(registry: BackendRegistry) -> None:
    first = FakeBackend("a", healthy(model("m")))
    registry.add(first)
    task = asyncio.create_task(registry.run())
    try:
        await asyncio.wait_for(first.probed.wait(), 5)
        # The loop now waits for the 30 s interval; adding a backend must wake it.
        second = FakeBackend("b", healthy(model("n")))
        registry.add(second)
        await asyncio.wait_for(second.probed.wait(), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert first.probes == 1
    assert second.probes == 1
    assert registry.knows_model("n")


async def test_aclose_closes_every_backend(registry: BackendRegistry) -> None:
    backends = [FakeBackend(name) for name in "abc"]
    for backend in backends:
        registry.add(backend)
    await registry.aclose()
    assert [b.closed for b in backends] == [1, 1, 1]
