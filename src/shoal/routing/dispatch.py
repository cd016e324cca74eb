"""The executor: open an answer from the best target, falling back to the next.

A target that fails before the first byte of its answer (cannot connect, reset,
timeout, 5xx) is skipped for the next one, within one overall deadline, and is blamed
(a local backend is marked down, a peer suspect). Once an answer is open it is the
caller's to relay; `Dispatcher.open` closes it and releases every count on exit,
whatever happens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson

from shoal.backends.base import Operation, Upstream
from shoal.errors import (
    BackendUnavailable,
    ShoalError,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
)
from shoal.routing.rank import HopPolicy
from shoal.routing.router import Router, Target

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Opened:
    upstream: Upstream
    target: Target
    retried: bool

    @property
    def route(self) -> str:
        return "retried" if self.retried else self.target.route


class Dispatcher:
    def __init__(
        self,
        router: Router,
        *,
        deadline_s: float,
        on_load_change: Callable[[int], None] = lambda in_flight: None,
    ) -> None:
        self._router = router
        self._deadline_s = deadline_s
        self._on_load_change = on_load_change
        self.in_flight = 0

    @asynccontextmanager
    async def open(
        self, op: Operation, model: str, body: bytes, policy: HopPolicy
    ) -> AsyncIterator[Opened]:
        self._count(+1)
        try:
            opened = await self._open_first(op, model, body, policy)
            try:
                yield opened
            finally:
                opened.upstream.close()
                opened.target.end()
        finally:
            self._count(-1)

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        self._on_load_change(self.in_flight)

    async def _open_first(
        self, op: Operation, model: str, body: bytes, policy: HopPolicy
    ) -> Opened:
        targets = self._router.route(op, model, policy)
        deadline = time.monotonic() + self._deadline_s
        failure: ShoalError | None = None
        for attempt, target in enumerate(targets):
            if attempt and time.monotonic() >= deadline:
                break
            target.begin()
            opened = False
            try:
                upstream = await target.send(op, _for_target(body, model, target.model))
                if upstream.status < 500:
                    opened = True
                    return Opened(upstream, target, retried=attempt > 0)
                failure = await _server_error(upstream)
            except (BackendUnavailable, UpstreamError) as exc:
                failure = exc
                target.failed(exc)
            finally:
                if not opened:  # failed, or cancelled while waiting for the answer
                    target.end()
            log.warning("%s %s failed: %s", target.route, target.name, failure.message)
        assert failure is not None
        raise failure


def _for_target(body: bytes, requested: str, served_as: str) -> bytes:
    """The body as the target must see it: re-encoded only when an alias renames the model."""
    if served_as == requested:
        return body
    document = orjson.loads(body)
    document["model"] = served_as
    return orjson.dumps(document)


async def _server_error(upstream: Upstream) -> ShoalError:
    """A 5xx answer, read and closed, as the error to report if no target succeeds."""
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
