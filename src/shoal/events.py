"""Typed domain events: what happened in the node, for anyone who wants to observe it.

Theory of operation: the parts of a node do not call each other back. Each publishes
what happened, as a small frozen value, on the node's one `EventBus`; the composition
root (`shoal.node`) subscribes the reactions (push our state to peers, rebuild the peer
TLS listener, log), and later observers (metrics, the dashboard, the scheduler)
subscribe beside them without touching the publishers.

    publisher                     events
    ─────────────────────────     ──────────────────────────────────────────────────
    mesh.peers.Peers              PeerJoined PeerSuspect PeerRecovered PeerRemoved
                                  PeerAddressChanged PeerStateChanged HeartbeatAnswered
    trust.admission.Admission     TrustChanged
    backends.registry             BackendUp BackendDown BackendModelsChanged
                                  ModelLoaded ModelUnloaded
    engine.supervisor             BackendReported EngineStarted EngineExited
    engine.managed                BackendReported EngineStarted EngineExited
                                  ModelLoading ModelUnloading ModelRefused
    routing.dispatch              RequestRouted RequestFirstByte RequestFinished
    routing.ledger.LoadLedger     LoadChanged
    api.pull.Pulls                ModelPullProgress ModelPulled ModelPullFailed
    api.share (to be wired)       ModelBytesServed

Delivery is synchronous, in the order of publishing, to plain functions: publishing is
a dictionary lookup and a call per subscriber, cheap enough for the request path. A
subscriber must be quick and must never block; work that waits (I/O) it hands to a task
of its own. An exception in a subscriber is logged and never reaches the publisher.
Async consumers that want a stream (a dashboard's live view) take a `Subscription`: a
bounded queue that drops its oldest event when full, so a slow reader never slows the
node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from shoal.backends.base import BackendStatus, Health, ModelInfo, Operation
from shoal.trust.store import TrustState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: subscribe to it to see them all."""


# -- peers (mesh.peers) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerEvent(Event):
    peer_id: str
    name: str  # the peer's own name, or the start of its ID before its first snapshot


@dataclass(frozen=True, slots=True)
class PeerJoined(PeerEvent):
    """A paired peer answered: it is alive and routable (also after a removal)."""

    address: str


@dataclass(frozen=True, slots=True)
class PeerSuspect(PeerEvent):
    """It missed a heartbeat or a request could not reach it: a last resort only."""


@dataclass(frozen=True, slots=True)
class PeerRecovered(PeerEvent):
    """A suspect peer answered again."""


PeerRemovedReason = Literal["missed", "left", "untrusted"]


@dataclass(frozen=True, slots=True)
class PeerRemoved(PeerEvent):
    """Out of routing: heartbeats missed, a goodbye, or it lost our trust."""

    reason: PeerRemovedReason


@dataclass(frozen=True, slots=True)
class PeerAddressChanged(PeerEvent):
    address: str


@dataclass(frozen=True, slots=True)
class PeerStateChanged(PeerEvent):
    """A newer snapshot of a peer's state arrived (models, load, hardware).

    `state` is a `shoal.mesh.state.NodeState`; typed loosely here to keep this module
    free of the mesh's imports.
    """

    state: object


# -- trust (trust.admission) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustChanged(Event):
    """A node's trust state changed; `state` None means it was forgotten."""

    node_id: str
    name: str
    address: str
    previous: TrustState | None
    state: TrustState | None


# -- backends (backends.registry, engine.supervisor) -------------------------------------


@dataclass(frozen=True, slots=True)
class BackendReported(Event):
    """A backend that watches itself (the engine supervisor) says how it is, at once."""

    backend: str
    status: BackendStatus


@dataclass(frozen=True, slots=True)
class BackendUp(Event):
    backend: str
    kind: str
    location: str
    models: tuple[ModelInfo, ...]


@dataclass(frozen=True, slots=True)
class BackendDown(Event):
    backend: str
    health: Health  # STARTING or DOWN
    reason: str


@dataclass(frozen=True, slots=True)
class BackendModelsChanged(Event):
    """A healthy backend's model list changed (a model pulled, loaded or removed)."""

    backend: str
    models: tuple[ModelInfo, ...]


@dataclass(frozen=True, slots=True)
class ModelLoaded(Event):
    backend: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelUnloaded(Event):
    backend: str
    model: str


@dataclass(frozen=True, slots=True)
class EngineStarted(Event):
    backend: str
    pid: int
    model: str | None = None  # the managed model the child serves; None: the embedded engine


@dataclass(frozen=True, slots=True)
class EngineExited(Event):
    backend: str
    reason: str
    restarts: int  # restarts so far, this one not counted
    model: str | None = None


# -- managed models (engine.managed) -----------------------------------------------------
# Whether a model is loaded is the registry's ModelLoaded / ModelUnloaded, derived from
# the managed backend's reports; these say why it changes.

UnloadReason = Literal["idle", "evicted", "operator", "removed", "failed"]
#: idle: its keep_alive passed. evicted: room for another model (least recently used).
#: operator: `shoal models unload`. removed: its file left the catalog. failed: its
#: engine never became ready, start after start.


@dataclass(frozen=True, slots=True)
class ModelLoading(Event):
    backend: str
    model: str
    engine: str  # "llama-server" or "worker"
    memory_bytes: int  # the estimate it was admitted with (file + KV cache + overhead)
    evicting: tuple[str, ...]  # unloaded first to make room


@dataclass(frozen=True, slots=True)
class ModelUnloading(Event):
    backend: str
    model: str
    reason: UnloadReason


@dataclass(frozen=True, slots=True)
class ModelRefused(Event):
    """A load was refused: the model cannot fit in memory."""

    backend: str
    model: str
    reason: str


# -- requests (routing.dispatch) ---------------------------------------------------------

Route = Literal["local", "peer", "retried"]
Outcome = Literal["ok", "error", "failed", "broken", "cancelled"]
#: ok: answered 2xx/3xx. error: answered 4xx (the request's fault, passed through).
#: failed: no target answered (Shoal's own error went to the client). broken: a stream
#: that had started ended with an error event. cancelled: the client went away.


@dataclass(frozen=True, slots=True)
class RequestRouted(Event):
    """A target accepted the request (after `attempt` failed ones)."""

    request_id: int
    op: Operation
    model: str
    target: str  # the backend's or the peer node's name
    node_id: str  # the node that serves it (ours for a local backend)
    route: Route
    attempt: int


@dataclass(frozen=True, slots=True)
class RequestFirstByte(Event):
    request_id: int
    elapsed_s: float  # since the request reached the dispatcher


@dataclass(frozen=True, slots=True)
class RequestFinished(Event):
    request_id: int
    op: Operation
    model: str
    route: Route | None  # None: no target answered
    target: str | None
    status: int  # the HTTP status the client got
    outcome: Outcome
    first_byte_s: float | None
    total_s: float
    node_id: str | None = None  # the node that served it (ours for a local backend)
    tokens_in: int | None = None  # from the usage the answer carried, if it did
    tokens_out: int | None = None


# -- load (routing.ledger) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadChanged(Event):
    """This node's own load changed: what its advert says and routing reads."""

    in_flight: int  # requests running on this node's backends
    queued: int


# -- heartbeats (mesh.peers) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatAnswered(Event):
    """A state exchange with a peer (a heartbeat or a push) came back.

    Not a `PeerEvent`: those say what changed; this comes with every beat.
    """

    peer_id: str
    round_trip_s: float


# -- the bus -----------------------------------------------------------------------------

E = TypeVar("E", bound=Event)


class EventBus:
    def __init__(self) -> None:
        self._handlers: dict[type[Event], list[Callable[[Event], None]]] = {}
        self._resolved: dict[type[Event], tuple[Callable[[Event], None], ...]] = {}

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> Callable[[], None]:
        """Call `handler` with every event of `kind` or a subclass; returns an unsubscribe."""
        self._handlers.setdefault(kind, []).append(handler)  # type: ignore[arg-type]
        self._resolved.clear()

        def unsubscribe() -> None:
            handlers = self._handlers.get(kind, [])
            if handler in handlers:
                handlers.remove(handler)
                self._resolved.clear()

        return unsubscribe

    def wants(self, kind: type[Event]) -> bool:
        """Whether anyone listens for `kind`: skip building an event nobody reads."""
        handlers = self._resolved.get(kind)
        return bool(self._resolve(kind) if handlers is None else handlers)

    def publish(self, event: Event) -> None:
        kind = type(event)
        handlers = self._resolved.get(kind)  # inline, not a call: this is the request path
        for handler in self._resolve(kind) if handlers is None else handlers:
            try:
                handler(event)
            except Exception:
                log.exception("an observer of %s failed", kind.__name__)

    def subscription(self, kind: type[E], maxsize: int = 1024) -> Subscription[E]:
        """A bounded queue of events of `kind` (`Event`: all), for an async consumer."""
        sub: Subscription[E] = Subscription(maxsize)
        sub._unsubscribe = self.subscribe(kind, sub._put)
        return sub

    def _resolve(self, kind: type[Event]) -> tuple[Callable[[Event], None], ...]:
        handlers = tuple(
            h for base in kind.__mro__ if base in self._handlers for h in self._handlers[base]
        )
        self._resolved[kind] = handlers
        return handlers


class Subscription(Generic[E]):
    """Events for an async reader; the oldest are dropped (and counted) when it lags."""

    def __init__(self, maxsize: int) -> None:
        self._events: collections.deque[E] = collections.deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.dropped = 0
        self._unsubscribe: Callable[[], None] = lambda: None

    def _put(self, event: E) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)
        self._ready.set()

    async def get(self) -> E:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def drain(self) -> list[E]:
        """Every event queued now, oldest first, without waiting (a reader's batch)."""
        events = list(self._events)
        self._events.clear()
        return events

    def close(self) -> None:
        self._unsubscribe()


# -- model pulls (api.pull.Pulls) --------------------------------------------------------
# `pull_id` tells one pull's events from another's; `model` is the REF as asked.


@dataclass(frozen=True, slots=True)
class ModelPullProgress(Event):
    """A file of a pull moved on (at most every 0.25 s; its first and last always)."""

    pull_id: int
    model: str
    file: str  # the path in the repo
    completed: int  # bytes on disk, resumed ones included
    total: int
    rate_bps: float  # bytes per second received by this pull


@dataclass(frozen=True, slots=True)
class ModelPulled(Event):
    pull_id: int
    model: str
    files: tuple[str, ...]  # "org/repo/file.gguf", the parts of a split GGUF in order
    path: str  # the first file's, in the store
    size_bytes: int
    downloaded_bytes: int  # 0: it was already in the store
    seconds: float


@dataclass(frozen=True, slots=True)
class ModelPullFailed(Event):
    pull_id: int
    model: str
    code: str | None  # "checksum_mismatch", "insufficient_storage", "cancelled", ...
    message: str


@dataclass(frozen=True, slots=True)
class ModelBytesServed(Event):
    """Bytes of a model file sent to a paired peer (a range answered by api.share)."""

    peer_id: str
    nbytes: int
