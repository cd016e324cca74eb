"""What a live view shows that no other view keeps: recent requests and model pulls.

Theory of operation: `Activity` folds events (`record`) into two small ordered tables,
rows keyed by request or pull ID, oldest dropped first. The node subscribes one
`Activity` when it is built, so a dashboard opened later still sees the last requests;
each live stream reads the row an event changed (`request`, `pull`) rather than
shaping the event again. Rows are plain JSON-ready dicts: no request content, no path on
this disk, no secret ever reaches them. No I/O here; `now` is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from shoal.events import (
    Event,
    ModelPulled,
    ModelPullFailed,
    ModelPullProgress,
    RequestFinished,
    RequestRouted,
)

MAX_REQUESTS = 60  # rows a page shows; a busy node replaces them many times a second
MAX_PULLS = 20  # running and recently ended pulls


class Activity:
    def __init__(
        self,
        node_id: str,
        node_name: str,
        *,
        max_requests: int = MAX_REQUESTS,
        max_pulls: int = MAX_PULLS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._node_id = node_id
        self._node_name = node_name
        self._max_requests = max_requests
        self._max_pulls = max_pulls
        self._now = now
        self._requests: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._pulls: OrderedDict[int, dict[str, Any]] = OrderedDict()

    # -- folding --------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        match event:
            case RequestRouted():
                self._routed(event)
            case RequestFinished():
                self._finished(event)
            case ModelPullProgress():
                row = self._pull(event.pull_id, event.model)
                row.update(
                    file=event.file,
                    completed=event.completed,
                    total=event.total,
                    rate_bps=round(event.rate_bps),
                )
            case ModelPulled():
                row = self._pull(event.pull_id, event.model)
                row.update(
                    state="done",
                    completed=event.size_bytes,
                    total=event.size_bytes,
                    downloaded=event.downloaded_bytes,
                    seconds=round(event.seconds, 2),
                    rate_bps=0,
                )
            case ModelPullFailed():
                row = self._pull(event.pull_id, event.model)
                row.update(state="failed", code=event.code, message=event.message, rate_bps=0)

    def _routed(self, event: RequestRouted) -> None:
        local = event.node_id == self._node_id
        row = self._request(event.request_id, event.op.value, event.model)
        row.update(
            state="running",
            route=event.route,
            node=self._node_name if local else event.target,
            node_id=event.node_id,
            backend=event.target if local else None,
            attempt=event.attempt,
        )

    def _finished(self, event: RequestFinished) -> None:
        row = self._request(event.request_id, event.op.value, event.model)
        row.update(
            state="done",
            route=event.route,
            status=event.status,
            outcome=event.outcome,
            first_byte_ms=_ms(event.first_byte_s),
            total_ms=_ms(event.total_s),
        )
        if row.get("node") is None and event.target is not None:
            local = event.route != "peer"  # retried: a local backend after a failure
            row["node"] = self._node_name if local else event.target

    def _request(self, request_id: int, op: str, model: str) -> dict[str, Any]:
        row = self._requests.get(request_id)
        if row is None:
            row = self._requests[request_id] = {
                "id": request_id, "at": round(self._now(), 3), "op": op, "model": model,
                "state": "running", "route": None, "node": None, "node_id": None,
                "backend": None, "attempt": 0, "status": None, "outcome": None,
                "first_byte_ms": None, "total_ms": None,
            }  # fmt: skip
            while len(self._requests) > self._max_requests:
                self._requests.popitem(last=False)
        return row

    def _pull(self, pull_id: int, model: str) -> dict[str, Any]:
        row = self._pulls.get(pull_id)
        if row is None:
            row = self._pulls[pull_id] = {
                "id": pull_id, "at": round(self._now(), 3), "model": model, "state": "running",
                "file": None, "completed": 0, "total": 0, "rate_bps": 0,
            }  # fmt: skip
            while len(self._pulls) > self._max_pulls:
                self._pulls.popitem(last=False)
        return row

    # -- reading --------------------------------------------------------------------------

    def requests(self) -> list[dict[str, Any]]:
        """The recent requests, oldest first."""
        return [dict(row) for row in self._requests.values()]

    def pulls(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._pulls.values()]

    def request(self, request_id: int) -> dict[str, Any] | None:
        row = self._requests.get(request_id)
        return None if row is None else dict(row)

    def pull(self, pull_id: int) -> dict[str, Any] | None:
        row = self._pulls.get(pull_id)
        return None if row is None else dict(row)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
