"""The node's backends: which are up, which models they hold, and keeping that fresh.

Theory of operation: every backend is probed at start and then every `interval_s`
seconds. A backend that fails a probe, or a request's connection, is DOWN at once: its
models leave the model index, and it is re-probed with a backoff (1 s, 2 s, 4 s, ... up
to the interval) until it answers again. A backend that watches itself (the engine
supervisor) reports its status at once with a `BackendReported` event. Every change is
published: `BackendUp`, `BackendDown`, `BackendModelsChanged`, and `ModelLoaded` /
`ModelUnloaded` per model. Local servers on the standard ports are looked for at start
and on every interval; explicitly configured backends win over a detected one at the
same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.backends.base import Backend, BackendStatus, Health, ModelInfo, Operation
from shoal.backoff import Backoff
from shoal.events import (
    BackendDown,
    BackendModelsChanged,
    BackendReported,
    BackendUp,
    EventBus,
    ModelLoaded,
    ModelUnloaded,
)

FIRST_RETRY_S = 1.0


def next_probe_delay(failures: int, interval_s: float) -> float:
    """Seconds until the next probe: the interval when healthy, exponential when down."""
    if failures <= 0:
        return interval_s
    return Backoff(min(FIRST_RETRY_S, interval_s), interval_s).delay(failures)


@dataclass(slots=True)
class BackendEntry:
    backend: Backend
    detected: bool = False
    status: BackendStatus = field(default_factory=lambda: BackendStatus(Health.STARTING))
    failures: int = 0
    next_probe: float = 0.0
    # The models it held when last healthy: a request for one while the backend is
    # down is "try again later" (503), not "no such model" (404).
    last_models: tuple[ModelInfo, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.status.health is Health.HEALTHY


class BackendRegistry:
    def __init__(self, bus: EventBus, *, interval_s: float) -> None:
        self.interval_s = interval_s
        self._bus = bus
        self._entries: dict[str, BackendEntry] = {}
        self._wake = asyncio.Event()
        bus.subscribe(BackendReported, self._reported)

    # -- membership ---------------------------------------------------------------

    def add(self, backend: Backend, *, detected: bool = False) -> BackendEntry:
        if backend.name in self._entries:
            raise ValueError(f"two backends are named {backend.name!r}")
        entry = BackendEntry(backend, detected=detected)
        self._entries[backend.name] = entry
        self._wake.set()
        return entry

    def has_location(self, location: str) -> bool:
        return any(e.backend.location == location for e in self._entries.values())

    def entries(self) -> Iterable[BackendEntry]:
        return self._entries.values()

    def get(self, name: str) -> BackendEntry | None:
        return self._entries.get(name)

    # -- the model index ----------------------------------------------------------

    def candidates(self, model: str, op: Operation) -> list[BackendEntry]:
        """Healthy backends that hold `model` for `op` (routing ranks them)."""
        return [
            entry
            for entry in self._entries.values()
            if entry.healthy
            and any(
                info.answers_to(model) and op in info.operations for info in entry.status.models
            )
        ]

    def models(self) -> list[tuple[ModelInfo, BackendEntry]]:
        return [
            (info, entry)
            for entry in self._entries.values()
            if entry.healthy
            for info in entry.status.models
        ]

    def holders(self, model: str, op: Operation) -> list[BackendEntry]:
        """Backends, up or down, that hold or last held `model` for `op`."""
        return [
            entry
            for entry in self._entries.values()
            if any(
                info.answers_to(model) and op in info.operations
                for info in (entry.status.models or entry.last_models)
            )
        ]

    def knows_model(self, model: str) -> bool:
        """Whether any backend, up or down, holds or last held `model`."""
        return any(
            info.id == model
            for entry in self._entries.values()
            for info in (entry.status.models or entry.last_models)
        )

    # -- health -------------------------------------------------------------------

    def record(self, entry: BackendEntry, status: BackendStatus, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        before = entry.status
        entry.status = status
        entry.failures = 0 if status.health is Health.HEALTHY else entry.failures + 1
        entry.next_probe = now + next_probe_delay(entry.failures, self.interval_s)
        if status.health is Health.HEALTHY:
            entry.last_models = status.models
        self._wake.set()
        self._publish_change(entry, before, status)

    def _reported(self, event: BackendReported) -> None:
        entry = self._entries.get(event.backend)
        if entry is not None:
            self.record(entry, event.status)

    def _publish_change(
        self, entry: BackendEntry, before: BackendStatus, now: BackendStatus
    ) -> None:
        name = entry.backend.name
        up_before, up_now = before.health is Health.HEALTHY, now.health is Health.HEALTHY
        if up_now and not up_before:
            backend = entry.backend
            self._bus.publish(BackendUp(name, backend.kind, backend.location, now.models))
        elif (up_before and not up_now) or (not up_now and before.health is not now.health):
            self._bus.publish(BackendDown(name, now.health, now.reason))
        elif up_now and now.models != before.models:
            self._bus.publish(BackendModelsChanged(name, now.models))
        was_loaded = {m.id for m in before.models if m.loaded} if up_before else set()
        is_loaded = {m.id for m in now.models if m.loaded} if up_now else set()
        for model in sorted(is_loaded - was_loaded):
            self._bus.publish(ModelLoaded(name, model))
        for model in sorted(was_loaded - is_loaded):
            self._bus.publish(ModelUnloaded(name, model))

    def mark_down(self, entry: BackendEntry, reason: str) -> None:
        """A request could not reach the backend: out of the index until a probe succeeds."""
        if entry.status.health is Health.DOWN:
            return
        self.record(entry, BackendStatus(Health.DOWN, reason=reason))

    async def probe(self, entry: BackendEntry) -> None:
        status = await entry.backend.probe()
        self.record(entry, status)

    async def run(self) -> None:
        """Probe each backend when it is due, forever (cancel to stop)."""
        while True:
            now = time.monotonic()
            due = [e for e in self._entries.values() if e.next_probe <= now]
            if due:
                await asyncio.gather(*(self.probe(e) for e in due))
            soonest = min((e.next_probe for e in self._entries.values()), default=now + 60)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see Peers._heartbeats
                async with asyncio.timeout(max(0.05, soonest - time.monotonic())):
                    await self._wake.wait()

    async def aclose(self) -> None:
        await asyncio.gather(*(e.backend.aclose() for e in self._entries.values()))
