"""The node's backends: which are up, which models they hold, and keeping that fresh.

Theory of operation: every backend is probed at start and then every `interval_s`
seconds. A backend that fails a probe, or a request's connection, is DOWN at once: its
models leave the model index, and it is re-probed with a backoff (1 s, 2 s, 4 s, ... up
to the interval) until it answers again. Local servers on the standard ports are
looked for at start and on every interval; explicitly configured backends win over a
detected one at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal.backends.base import Backend, BackendStatus, Health, ModelInfo, Operation

log = logging.getLogger(__name__)

FIRST_RETRY_S = 1.0


def next_probe_delay(failures: int, interval_s: float) -> float:
    """Seconds until the next probe: the interval when healthy, exponential when down."""
    if failures <= 0:
        return interval_s
    # The exponent is capped: a backend down for days must not overflow a float.
    return min(interval_s, FIRST_RETRY_S * 2.0 ** min(failures - 1, 32))


@dataclass(slots=True)
class BackendEntry:
    backend: Backend
    detected: bool = False
    status: BackendStatus = field(default_factory=lambda: BackendStatus(Health.STARTING))
    failures: int = 0
    next_probe: float = 0.0
    in_flight: int = 0
    # The models it held when last healthy: a request for one while the backend is
    # down is "try again later" (503), not "no such model" (404).
    last_models: tuple[ModelInfo, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.status.health is Health.HEALTHY


class BackendRegistry:
    def __init__(self, *, interval_s: float) -> None:
        self.interval_s = interval_s
        self._entries: dict[str, BackendEntry] = {}
        self._wake = asyncio.Event()
        # Called when the set of servable models may have changed (a backend came or went).
        self.on_change: Callable[[], None] = lambda: None

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
        """Healthy backends that hold `model` for `op`: loaded first, then least busy."""
        found = []
        for entry in self._entries.values():
            if not entry.healthy:
                continue
            for info in entry.status.models:
                if info.id == model and op in info.operations:
                    found.append((not info.loaded, entry.in_flight, entry))
                    break
        found.sort(key=lambda item: (item[0], item[1]))
        return [entry for _, _, entry in found]

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
                info.id == model and op in info.operations
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
        was, models_before = entry.status.health, entry.last_models
        entry.status = status
        entry.failures = 0 if status.health is Health.HEALTHY else entry.failures + 1
        entry.next_probe = now + next_probe_delay(entry.failures, self.interval_s)
        if status.health is Health.HEALTHY:
            entry.last_models = status.models
        self._wake.set()
        if was is not status.health or (
            status.health is Health.HEALTHY and status.models != models_before
        ):
            self.on_change()
        if was is not status.health:
            log.info(
                "backend %s (%s) is %s%s",
                entry.backend.name,
                entry.backend.location,
                status.health,
                f": {status.reason}" if status.reason else "",
            )

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, soonest - time.monotonic()))

    async def aclose(self) -> None:
        await asyncio.gather(*(e.backend.aclose() for e in self._entries.values()))
