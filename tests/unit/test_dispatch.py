"""`Dispatcher.open`: the best candidate first, the next one on failure, and the books
(in-flight counts, closed answers, downed backends) always balanced."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from shoal.backends.base import GENERATION, BackendStatus, Health, ModelInfo, Operation
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ShoalError,
    UpstreamFailed,
    UpstreamTimeout,
)
from shoal.events import EventBus, RequestFinished, RequestFirstByte, RequestRouted
from shoal.mesh.membership import PeerState
from shoal.mesh.peers import Peers
from shoal.mesh.state import ModelAdvert, NodeState
from shoal.routing.dispatch import Dispatcher
from shoal.routing.ledger import LoadLedger
from shoal.routing.rank import HopPolicy
from shoal.routing.router import Router
from shoal.settings import LimitSettings, MeshSettings, RoutingSettings

ANYWHERE = HopPolicy()


class InOrder(random.Random):
    """Ties keep the registry's order, so tests can name who is tried first."""

    def shuffle(self, x: Any, random: Any = None) -> None:
        return None


BUS = EventBus()  # the registry's own bus; the dispatcher gets one per test


def dispatcher_over(
    registry: BackendRegistry, deadline_s: float = 60.0, bus: EventBus | None = None
) -> Dispatcher:
    bus = bus or EventBus()
    ledger = LoadLedger(bus)
    router = Router("self", "me", registry, None, ledger, RoutingSettings(), rng=InOrder())
    return Dispatcher(router, ledger, bus, deadline_s=deadline_s)


def ledger_of(dispatcher: Dispatcher) -> LoadLedger:
    return dispatcher._ledger


CHAT = Operation.CHAT
EMBED = Operation.EMBEDDING
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


class FakeUpstream:
    def __init__(
        self, status: int = 200, body: bytes = b"{}", *, read_error: ShoalError | None = None
    ) -> None:
        self.status = status
        self.content_type = "application/json"
        self.body = body
        self.read_error = read_error
        self.closed = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    async def read(self) -> bytes:
        if self.read_error is not None:
            raise self.read_error
        return self.body

    def close(self) -> None:
        self.closed += 1


class FakeBackend:
    kind = "fake"

    def __init__(self, name: str, outcome: FakeUpstream | BaseException | None = None) -> None:
        self.name = name
        self.location = f"http://{name}:8080"
        self.outcome = outcome if outcome is not None else FakeUpstream()
        self.sent: list[tuple[Operation, bytes]] = []
        self.ledger: LoadLedger | None = None
        self.in_flight_during_send: int | None = None

    async def probe(self) -> BackendStatus:
        return BackendStatus(Health.HEALTHY)

    async def send(self, op: Operation, body: bytes) -> Any:
        self.sent.append((op, body))
        if self.ledger is not None:
            self.in_flight_during_send = self.ledger.backend(self.name)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    async def aclose(self) -> None:
        pass


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "server_error"}})


def make(
    *outcomes: FakeUpstream | BaseException | None,
    models: tuple[ModelInfo, ...] = (ModelInfo("m"),),
    deadline_s: float = 60.0,
) -> tuple[Dispatcher, BackendRegistry, list[FakeBackend], list[BackendEntry]]:
    """A dispatcher over healthy backends a, b, c... in candidate order."""
    registry = BackendRegistry(BUS, interval_s=30)
    backends, entries = [], []
    for i, outcome in enumerate(outcomes):
        backend = FakeBackend("abcdefgh"[i], outcome)
        entry = registry.add(backend)
        registry.record(entry, BackendStatus(Health.HEALTHY, models=models), now=0)
        backends.append(backend)
        entries.append(entry)
    dispatcher = dispatcher_over(registry, deadline_s)
    for backend in backends:
        backend.ledger = ledger_of(dispatcher)
    return dispatcher, registry, backends, entries


def in_flight(dispatcher: Dispatcher, entry: BackendEntry) -> int:
    return ledger_of(dispatcher).backend(entry.backend.name)


def assert_idle(dispatcher: Dispatcher, entries: list[BackendEntry]) -> None:
    ledger = ledger_of(dispatcher)
    assert ledger.requests == 0
    assert ledger.local_in_flight == 0
    assert [in_flight(dispatcher, e) for e in entries] == [0] * len(entries)
    assert ledger.model("m") == 0


# -- the first candidate answers ---------------------------------------------------------


async def test_success_from_the_first_candidate() -> None:
    upstream = FakeUpstream(200, b'{"ok": true}')
    dispatcher, _, backends, entries = make(upstream, None)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is upstream
        assert opened.target.name == "a"
        assert opened.retried is False
        assert ledger_of(dispatcher).requests == 1
        assert in_flight(dispatcher, entries[0]) == 1
        assert upstream.closed == 0
    assert upstream.closed == 1
    assert backends[0].sent == [(CHAT, BODY)]
    assert backends[1].sent == []
    assert_idle(dispatcher, entries)


async def test_the_least_busy_candidate_is_tried_first() -> None:
    dispatcher, _, backends, entries = make(None, None)
    busy = [ledger_of(dispatcher).hold("local", "a", "m") for _ in range(2)]
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.target.name == "b"
        assert opened.retried is False
    assert backends[0].sent == []
    for slot in busy:
        slot.release()
    assert_idle(dispatcher, entries)


async def test_in_flight_counts_while_sending() -> None:
    dispatcher, _, backends, entries = make(UpstreamFailed("x"), None)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
        pass
    assert backends[0].in_flight_during_send == 1
    assert backends[1].in_flight_during_send == 1
    assert_idle(dispatcher, entries)


# -- falling through ---------------------------------------------------------------------


FAILURES = [
    pytest.param(lambda: BackendUnavailable("cannot connect"), id="unavailable"),
    pytest.param(lambda: UpstreamFailed("reset"), id="failed"),
    pytest.param(lambda: UpstreamTimeout("slow"), id="timeout"),
    pytest.param(lambda: FakeUpstream(500, error_body("boom")), id="500"),
    pytest.param(lambda: FakeUpstream(502, b"Bad Gateway"), id="502"),
    pytest.param(lambda: FakeUpstream(503, error_body("loading")), id="503"),
    pytest.param(lambda: FakeUpstream(504, b""), id="504"),
]


@pytest.mark.parametrize("failure", FAILURES)
async def test_falls_through_to_the_next_candidate(failure: Any) -> None:
    first = failure()
    good = FakeUpstream(200)
    dispatcher, _, backends, entries = make(first, good)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is good
        assert opened.target.name == "b"
        assert opened.retried is True
        assert in_flight(dispatcher, entries[0]) == 0
        assert in_flight(dispatcher, entries[1]) == 1
    assert backends[1].sent == [(CHAT, BODY)]
    if isinstance(first, FakeUpstream):
        assert first.closed == 1
    assert good.closed == 1
    assert_idle(dispatcher, entries)


async def test_falls_through_several_candidates() -> None:
    good = FakeUpstream(200)
    dispatcher, _, backends, entries = make(
        UpstreamTimeout("slow"), FakeUpstream(500), UpstreamFailed("reset"), good
    )
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is good
        assert opened.retried is True
    assert [len(b.sent) for b in backends] == [1, 1, 1, 1]
    assert_idle(dispatcher, entries)


async def test_backend_unavailable_marks_the_backend_down() -> None:
    dispatcher, registry, _, entries = make(BackendUnavailable("connection refused"), None)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
        pass
    assert entries[0].status.health is Health.DOWN
    assert entries[0].status.reason == "connection refused"
    assert entries[1].healthy
    assert registry.candidates("m", CHAT) == [entries[1]]


@pytest.mark.parametrize(
    "failure",
    [UpstreamFailed("reset"), UpstreamTimeout("slow"), FakeUpstream(500), FakeUpstream(503)],
)
async def test_other_failures_leave_the_backend_up(failure: Any) -> None:
    dispatcher, _, _, entries = make(failure, None)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
        pass
    assert entries[0].healthy


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 429])
async def test_4xx_passes_through_without_retry(status: int) -> None:
    answer = FakeUpstream(status, error_body("bad"))
    dispatcher, _, backends, entries = make(answer, None)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is answer
        assert opened.upstream.status == status
        assert opened.retried is False
    assert backends[1].sent == []
    assert answer.closed == 1
    assert entries[0].healthy
    assert_idle(dispatcher, entries)


# -- everything fails --------------------------------------------------------------------


async def test_all_fail_raises_the_last_failure() -> None:
    last = UpstreamTimeout("second too")
    dispatcher, _, _, entries = make(UpstreamFailed("first"), last)
    with pytest.raises(UpstreamTimeout) as caught:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pytest.fail("no answer should be open")
    assert caught.value is last
    assert_idle(dispatcher, entries)


@pytest.mark.parametrize(
    ("status", "body", "error", "text"),
    [
        (500, error_body("boom"), UpstreamFailed, "the backend answered 500: boom"),
        (502, b"<html>bad gateway</html>", UpstreamFailed, "the backend answered 502"),
        (500, b'{"error": "plain string"}', UpstreamFailed, "answered 500: plain string"),
        (500, b'{"detail": "x"}', UpstreamFailed, "the backend answered 500"),
        (500, b"[1]", UpstreamFailed, "the backend answered 500"),
        (503, error_body("Loading model"), BackendUnavailable, "503: Loading model"),
        (504, b"", UpstreamTimeout, "the backend answered 504"),
    ],
)
async def test_a_5xx_from_the_last_candidate_becomes_an_error(
    status: int, body: bytes, error: type[ShoalError], text: str
) -> None:
    answer = FakeUpstream(status, body)
    dispatcher, _, _, entries = make(answer)
    with pytest.raises(error) as caught:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert type(caught.value) is error
    assert text in caught.value.message
    assert answer.closed >= 1
    assert_idle(dispatcher, entries)


async def test_a_5xx_whose_body_cannot_be_read_reports_the_read_failure() -> None:
    broken = UpstreamTimeout("no body in time")
    answer = FakeUpstream(500, read_error=broken)
    dispatcher, _, _, entries = make(answer)
    with pytest.raises(UpstreamTimeout) as caught:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert caught.value is broken
    assert answer.closed >= 1
    assert_idle(dispatcher, entries)


async def test_the_deadline_stops_falling_through() -> None:
    first = UpstreamFailed("first")
    dispatcher, _, backends, entries = make(first, None, deadline_s=0)
    with pytest.raises(UpstreamFailed) as caught:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert caught.value is first
    assert backends[1].sent == []
    assert_idle(dispatcher, entries)


async def test_the_first_candidate_is_tried_even_with_no_time_left() -> None:
    dispatcher, _, backends, _entries = make(None, deadline_s=0)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.target.name == "a"
    assert len(backends[0].sent) == 1


# -- no candidate ------------------------------------------------------------------------


async def test_unknown_model_is_model_not_found() -> None:
    dispatcher, _, backends, entries = make(None)
    with pytest.raises(ModelNotFound) as caught:
        async with dispatcher.open(CHAT, "nope", BODY, ANYWHERE):
            pass
    assert caught.value.status == 404
    assert caught.value.param == "model"
    assert "nope" in caught.value.message
    assert backends[0].sent == []
    assert_idle(dispatcher, entries)


async def test_known_model_on_a_down_backend_is_503() -> None:
    dispatcher, registry, backends, entries = make(None)
    registry.mark_down(entries[0], "connection refused")
    with pytest.raises(BackendUnavailable) as caught:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert caught.value.status == 503
    assert caught.value.retry_after == 2
    assert "a: connection refused" in caught.value.message
    assert backends[0].sent == []
    assert_idle(dispatcher, entries)


async def test_model_without_the_operation_is_invalid_request() -> None:
    dispatcher, _, backends, entries = make(None, models=(ModelInfo("m", operations=GENERATION),))
    with pytest.raises(InvalidRequest) as caught:
        async with dispatcher.open(EMBED, "m", BODY, ANYWHERE):
            pass
    assert caught.value.status == 400
    assert caught.value.param == "model"
    assert "embeddings" in caught.value.message
    assert backends[0].sent == []
    assert_idle(dispatcher, entries)


async def test_model_on_a_down_backend_beside_a_healthy_one_without_it_is_503() -> None:
    dispatcher, registry, _, entries = make(None, None)
    registry.record(entries[1], BackendStatus(Health.HEALTHY, models=(ModelInfo("other"),)))
    registry.mark_down(entries[0], "refused")
    with pytest.raises(BackendUnavailable):
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass


async def test_down_holder_of_the_operation_is_503_even_if_another_holder_is_up() -> None:
    registry = BackendRegistry(BUS, interval_s=30)
    chat_backend = registry.add(FakeBackend("chat"))
    registry.record(chat_backend, BackendStatus(Health.HEALTHY, models=(ModelInfo("m"),)))
    embed_backend = registry.add(FakeBackend("embed"))
    embedding_model = ModelInfo("m", operations=frozenset({EMBED}))
    registry.record(embed_backend, BackendStatus(Health.HEALTHY, models=(embedding_model,)))
    registry.mark_down(embed_backend, "refused")
    dispatcher = dispatcher_over(registry)
    with pytest.raises(BackendUnavailable):
        async with dispatcher.open(EMBED, "m", BODY, ANYWHERE):
            pass


# -- the books balance whatever happens ----------------------------------------------------


async def test_an_exception_in_the_body_releases_and_closes() -> None:
    upstream = FakeUpstream(200)
    dispatcher, _, _, entries = make(upstream)
    with pytest.raises(RuntimeError, match="client went away"):
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            raise RuntimeError("client went away")
    assert upstream.closed == 1
    assert_idle(dispatcher, entries)


async def test_cancelled_while_relaying_releases_and_closes() -> None:
    upstream = FakeUpstream(200)
    dispatcher, _, _, entries = make(upstream)
    inside = asyncio.Event()

    async def relay() -> None:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(relay())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upstream.closed == 1
    assert_idle(dispatcher, entries)


async def test_concurrent_opens_count_and_release() -> None:
    dispatcher, _, _, entries = make(None)
    async with (
        dispatcher.open(CHAT, "m", BODY, ANYWHERE),
        dispatcher.open(CHAT, "m", BODY, ANYWHERE),
    ):
        assert ledger_of(dispatcher).requests == 2
        assert in_flight(dispatcher, entries[0]) == 2
    assert_idle(dispatcher, entries)


class HangingBackend(FakeBackend):
    """A backend whose answer never starts (a busy engine queueing the request)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.waiting = asyncio.Event()

    async def send(self, op: Operation, body: bytes) -> Any:
        self.waiting.set()
        await asyncio.Event().wait()


async def test_cancelled_while_sending_releases_the_backend() -> None:
    registry = BackendRegistry(BUS, interval_s=30)
    backend = HangingBackend("a")
    entry = registry.add(backend)
    registry.record(entry, BackendStatus(Health.HEALTHY, models=(ModelInfo("m"),)))
    dispatcher = dispatcher_over(registry)

    async def request() -> None:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass

    task = asyncio.create_task(request())
    await asyncio.wait_for(backend.waiting.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_idle(dispatcher, [entry])


# -- the story of a request, as events ---------------------------------------------------


def recorder(bus: EventBus) -> list[object]:
    seen: list[object] = []
    for kind in (RequestRouted, RequestFirstByte, RequestFinished):
        bus.subscribe(kind, seen.append)
    return seen


async def test_a_served_request_is_routed_then_finished_ok() -> None:
    _, registry, _, _ = make(FakeUpstream(500), FakeUpstream(200))
    bus = EventBus()
    seen = recorder(bus)
    dispatcher = dispatcher_over(registry, bus=bus)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        opened.first_byte()
        opened.first_byte()  # once only
    routed, first, finished = seen
    assert isinstance(routed, RequestRouted)
    assert (routed.target, routed.route, routed.attempt, routed.model) == ("b", "retried", 1, "m")
    assert isinstance(first, RequestFirstByte)
    assert first.request_id == routed.request_id
    assert isinstance(finished, RequestFinished)
    assert (finished.outcome, finished.status, finished.route, finished.target) == (
        "ok",
        200,
        "retried",
        "b",
    )
    assert finished.first_byte_s == first.elapsed_s
    assert finished.total_s >= first.elapsed_s


@pytest.mark.parametrize(
    ("answer", "broke", "outcome", "status"),
    [(FakeUpstream(404), False, "error", 404), (FakeUpstream(200), True, "broken", 200)],
)
async def test_a_4xx_or_a_broken_stream_is_told_apart(
    answer: FakeUpstream, broke: bool, outcome: str, status: int
) -> None:
    _, registry, _, _ = make(answer)
    bus = EventBus()
    seen = recorder(bus)
    async with dispatcher_over(registry, bus=bus).open(CHAT, "m", BODY, ANYWHERE) as opened:
        if broke:
            opened.broke()
    finished = seen[-1]
    assert isinstance(finished, RequestFinished)
    assert (finished.outcome, finished.status) == (outcome, status)


async def test_a_request_no_target_answers_finishes_failed_with_its_status() -> None:
    _, registry, _, _ = make(UpstreamTimeout("slow"))
    bus = EventBus()
    seen = recorder(bus)
    with pytest.raises(UpstreamTimeout):
        async with dispatcher_over(registry, bus=bus).open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert len(seen) == 1
    finished = seen[0]
    assert isinstance(finished, RequestFinished)
    assert (finished.outcome, finished.status, finished.route) == ("failed", 504, None)


async def test_a_cancelled_request_finishes_cancelled() -> None:
    _, registry, _, _ = make(FakeUpstream(200))
    bus = EventBus()
    seen = recorder(bus)
    dispatcher = dispatcher_over(registry, bus=bus)
    inside = asyncio.Event()

    async def request() -> None:
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    finished = seen[-1]
    assert isinstance(finished, RequestFinished)
    assert (finished.outcome, finished.status) == ("cancelled", 499)
    assert ledger_of(dispatcher).requests == 0


# -- peers: alive ones are tried, away ones never (issue 9, items 13 and 15) -------------
#
# A real `Peers` table driven by its inputs (a state received: alive; a request failed:
# suspect; a goodbye: removed; sighted again: joining), with each peer's link replaced
# by a fake that records what was sent to it. No socket is opened.

ME = "0" * 64
KITCHEN, ATTIC = "a" * 64, "b" * 64
CHAT_ONLY = (CHAT.value,)


class Dialer:
    def peer_url(self, node_id: str, host: str) -> str:
        return f"https://{host}:11451"

    def client_context(self, node_id: str) -> ssl.SSLContext:
        return ssl.create_default_context()


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Operation] = []

    async def send(self, op: Operation, body: bytes) -> FakeUpstream:
        self.sent.append(op)
        return FakeUpstream(200)


def peer_state(node_id: str, name: str, *models: ModelAdvert) -> NodeState:
    return NodeState(node_id, name, "0", 11450, 1, 1.0, models=models)


def with_peers(
    *held: tuple[str, str, tuple[ModelAdvert, ...]],
    local: tuple[ModelInfo, ...] = (),
    aliases: dict[str, list[str]] | None = None,
) -> tuple[Dispatcher, Peers, dict[str, FakeLink]]:
    """A dispatcher over alive peers (id, name, models) and, if given, one local backend."""
    registry = BackendRegistry(BUS, interval_s=30)
    if local:
        entry = registry.add(FakeBackend("here"))
        registry.record(entry, BackendStatus(Health.HEALTHY, models=local), now=0)
    bus = EventBus()
    peers = Peers(ME, lambda: peer_state(ME, "me"), Dialer(), bus, MeshSettings(), LimitSettings())
    links: dict[str, FakeLink] = {}
    for node_id, name, models in held:
        peers.received(peer_state(node_id, name, *models), f"http://10.0.0.{len(links) + 2}:1")
        links[node_id] = FakeLink()
    peers.link = links.__getitem__  # type: ignore[assignment]
    ledger = LoadLedger(bus)
    settings = RoutingSettings(model_aliases=aliases or {})
    router = Router(ME, "me", registry, peers, ledger, settings, rng=InOrder())
    return Dispatcher(router, ledger, bus, deadline_s=60), peers, links


def chat_model(name: str = "m") -> tuple[ModelAdvert, ...]:
    return (ModelAdvert(name, operations=CHAT_ONLY),)


def away(peers: Peers, peer_id: str, how: str) -> None:
    """Make an alive peer suspect, removed, or removed and then sighted again."""
    if how == "suspect":
        peers.request_failed(peer_id)
    else:
        peers.goodbye(peer_id)
        if how == "joining":
            peers.sighted(peer_id, "http://10.0.0.9:1", "mdns")
    (view,) = [p.view for p in peers.peers() if p.view.peer_id == peer_id]
    assert view.state is PeerState(how)


async def refused(dispatcher: Dispatcher, op: Operation, model: str, policy: HopPolicy) -> Any:
    started = time.monotonic()
    with pytest.raises(ShoalError) as caught:
        async with dispatcher.open(op, model, BODY, policy):
            pytest.fail("no answer should be open")
    assert time.monotonic() - started < 0.5  # decided at once: nothing was dialled
    return caught.value


async def test_an_alive_peer_holding_the_model_serves_it() -> None:
    dispatcher, _, links = with_peers((KITCHEN, "kitchen", chat_model()))
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert (opened.target.route, opened.target.name) == ("peer", "kitchen")
    assert links[KITCHEN].sent == [CHAT]


@pytest.mark.parametrize(("how", "retry_after"), [("suspect", 2), ("removed", 5), ("joining", 5)])
async def test_when_the_only_holder_is_away_the_answer_is_503_with_retry_after(
    how: str, retry_after: float
) -> None:
    """Item 13: not 400 "does not support", and item 15: the away peer is not dialled."""
    dispatcher, peers, links = with_peers((KITCHEN, "kitchen", chat_model()))
    away(peers, KITCHEN, how)
    error = await refused(dispatcher, CHAT, "m", ANYWHERE)
    assert type(error) is BackendUnavailable
    assert (error.status, error.code) == (503, "backend_unavailable")
    assert error.retry_after == retry_after
    assert f"kitchen ({how})" in error.message
    assert "cannot be reached" in error.message
    assert links[KITCHEN].sent == []


async def test_all_holders_away_names_each_and_waits_for_the_slowest() -> None:
    dispatcher, peers, _ = with_peers(
        (KITCHEN, "kitchen", chat_model()), (ATTIC, "attic", chat_model())
    )
    away(peers, KITCHEN, "suspect")
    away(peers, ATTIC, "removed")
    error = await refused(dispatcher, CHAT, "m", ANYWHERE)
    assert isinstance(error, BackendUnavailable)
    assert error.retry_after == 5
    assert "kitchen (suspect)" in error.message
    assert "attic (removed)" in error.message


async def test_an_away_holder_is_skipped_for_an_alive_one() -> None:
    dispatcher, peers, links = with_peers(
        (KITCHEN, "kitchen", chat_model()), (ATTIC, "attic", chat_model())
    )
    away(peers, KITCHEN, "suspect")
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.target.name == "attic"
        assert opened.retried is False
    assert (links[KITCHEN].sent, links[ATTIC].sent) == ([], [CHAT])


async def test_an_away_holder_under_an_alias_is_503_too() -> None:
    dispatcher, peers, _ = with_peers((KITCHEN, "kitchen", chat_model()), aliases={"llama": ["m"]})
    away(peers, KITCHEN, "removed")
    error = await refused(dispatcher, CHAT, "llama", ANYWHERE)
    assert isinstance(error, BackendUnavailable)


async def test_pinned_to_an_away_holder_is_503() -> None:
    dispatcher, peers, _ = with_peers(
        (KITCHEN, "kitchen", chat_model()), (ATTIC, "attic", chat_model())
    )
    away(peers, KITCHEN, "removed")
    error = await refused(dispatcher, CHAT, "m", HopPolicy(pinned="kitchen"))
    assert isinstance(error, BackendUnavailable)
    assert "kitchen (removed)" in error.message


@pytest.mark.parametrize("policy", [HopPolicy(local_only=True), HopPolicy(forwarded=True)])
async def test_an_away_holder_does_not_count_when_forwarding_is_not_allowed(
    policy: HopPolicy,
) -> None:
    dispatcher, peers, _ = with_peers((KITCHEN, "kitchen", chat_model()))
    away(peers, KITCHEN, "removed")
    error = await refused(dispatcher, CHAT, "m", policy)
    assert type(error) is ModelNotFound
    assert "this node" in error.message


@pytest.mark.parametrize("how", ["alive", "suspect", "removed"])
async def test_a_model_held_but_not_for_the_operation_is_still_400(how: str) -> None:
    dispatcher, peers, _ = with_peers((KITCHEN, "kitchen", chat_model()))
    if how != "alive":
        away(peers, KITCHEN, how)
    error = await refused(dispatcher, EMBED, "m", ANYWHERE)
    assert type(error) is InvalidRequest
    assert (error.status, error.param) == (400, "model")
    assert "does not support embeddings" in error.message


async def test_an_away_holder_of_the_operation_wins_over_a_local_holder_without_it() -> None:
    embedding = (ModelAdvert("m", operations=(EMBED.value,)),)
    dispatcher, peers, _ = with_peers(
        (KITCHEN, "kitchen", embedding), local=(ModelInfo("m", operations=GENERATION),)
    )
    away(peers, KITCHEN, "removed")
    error = await refused(dispatcher, EMBED, "m", ANYWHERE)
    assert isinstance(error, BackendUnavailable)


@pytest.mark.parametrize("how", ["alive", "suspect", "removed"])
async def test_a_model_no_node_holds_is_still_404(how: str) -> None:
    dispatcher, peers, _ = with_peers((KITCHEN, "kitchen", chat_model("other")))
    if how != "alive":
        away(peers, KITCHEN, how)
    error = await refused(dispatcher, CHAT, "m", ANYWHERE)
    assert type(error) is ModelNotFound
    assert error.status == 404
    assert "this cluster" in error.message
