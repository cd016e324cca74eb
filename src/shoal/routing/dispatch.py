"""The executor: open an answer from the best candidate, falling back to the next.

A candidate that fails before the first byte of its answer (cannot connect, reset,
timeout, 5xx) is skipped for the next one, within one overall deadline. Once an answer
is open it is the caller's to relay; `Dispatch` closes it and releases the in-flight
counts on exit, whatever happens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson

from shoal.backends.base import Operation, Upstream
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ShoalError,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Opened:
    upstream: Upstream
    entry: BackendEntry
    retried: bool


class Dispatcher:
    def __init__(self, registry: BackendRegistry, *, deadline_s: float) -> None:
        self._registry = registry
        self._deadline_s = deadline_s
        self.in_flight = 0

    @asynccontextmanager
    async def open(self, op: Operation, model: str, body: bytes) -> AsyncIterator[Opened]:
        self.in_flight += 1
        try:
            opened = await self._open_first(op, model, body)
            try:
                yield opened
            finally:
                opened.upstream.close()
                opened.entry.in_flight -= 1
        finally:
            self.in_flight -= 1

    async def _open_first(self, op: Operation, model: str, body: bytes) -> Opened:
        candidates = self._registry.candidates(model, op)
        if not candidates:
            raise self._no_candidate(op, model)
        deadline = time.monotonic() + self._deadline_s
        failure: ShoalError | None = None
        for attempt, entry in enumerate(candidates):
            if attempt and time.monotonic() >= deadline:
                break
            entry.in_flight += 1
            opened = False
            try:
                upstream = await entry.backend.send(op, body)
                if upstream.status < 500:
                    opened = True
                    return Opened(upstream, entry, retried=attempt > 0)
                failure = await _server_error(upstream)
            except BackendUnavailable as exc:
                self._registry.mark_down(entry, exc.message)
                failure = exc
            except UpstreamError as exc:
                failure = exc
            finally:
                if not opened:  # failed, or cancelled while waiting for the answer
                    entry.in_flight -= 1
            log.warning("backend %s failed: %s", entry.backend.name, failure.message)
        assert failure is not None
        raise failure

    def _no_candidate(self, op: Operation, model: str) -> ShoalError:
        holders = self._registry.holders(model, op)
        if holders:  # all of them down, or they would have been candidates
            reasons = "; ".join(
                f"{e.backend.name}: {e.status.reason or e.status.health}" for e in holders
            )
            return BackendUnavailable(
                f"model {model!r} is temporarily unavailable ({reasons})", retry_after=2
            )
        if self._registry.knows_model(model):
            return InvalidRequest(f"model {model!r} does not support {op.value}", param="model")
        return ModelNotFound(
            f"the model {model!r} does not exist on this cluster; see GET /v1/models",
            param="model",
        )


async def _server_error(upstream: Upstream) -> ShoalError:
    """A 5xx answer, read and closed, as the error to report if no candidate succeeds."""
    try:
        raw = await upstream.read()
    except UpstreamError as exc:
        return exc
    finally:
        upstream.close()
    message = f"the backend answered {upstream.status}"
    try:
        detail = orjson.loads(raw)["error"]
        message += f": {detail['message'] if isinstance(detail, dict) else detail}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    if upstream.status == 503:
        return BackendUnavailable(message, retry_after=2)
    if upstream.status == 504:
        return UpstreamTimeout(message)
    return UpstreamFailed(message)
