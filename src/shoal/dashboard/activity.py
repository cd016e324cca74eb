"""What a live view shows that no other view keeps: recent requests and model pulls.

Theory of operation: `Activity` folds events (`record`) into two small ordered tables,
rows keyed by request or pull ID, oldest dropped first. A request's row keeps its events
as they came and is shaped into a dict only when read: requests come by the thousand a
second, pages read a few of them. The node subscribes one
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
        self._requests: OrderedDict[int, _Request] = OrderedDict()
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
        self._request(event.request_id).routed = event

    def _finished(self, event: RequestFinished) -> None:
        self._request(event.request_id).finished = event

    def _request(self, request_id: int) -> _Request:
        row = self._requests.get(request_id)
        if row is None:
            row = self._requests[request_id] = _Request(self._now())
            if len(self._requests) > self._max_requests:
                self._requests.popitem(last=False)
        return row

    def _row(self, request_id: int, request: _Request) -> dict[str, Any]:
        routed, finished = request.routed, request.finished
        some = routed or finished
        assert some is not None  # a row is made by one of them
        row: dict[str, Any] = {
            "id": request_id, "at": round(request.at, 3), "op": some.op.value,
            "model": some.model, "state": "running", "route": None, "node": None,
            "node_id": None, "backend": None, "attempt": 0, "status": None,
            "outcome": None, "first_byte_ms": None, "total_ms": None,
        }  # fmt: skip
        if routed is not None:
            local = routed.node_id == self._node_id
            row.update(
                route=routed.route,
                node=self._node_name if local else routed.target,
                node_id=routed.node_id,
                backend=routed.target if local else None,
                attempt=routed.attempt,
            )
        if finished is not None:
            row.update(
                state="done",
                route=finished.route,
                status=finished.status,
                outcome=finished.outcome,
                first_byte_ms=_ms(finished.first_byte_s),
                total_ms=_ms(finished.total_s),
            )
            if row["node"] is None and finished.target is not None:
                local = finished.route != "peer"  # retried: a local backend after a failure
                row["node"] = self._node_name if local else finished.target
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
        return [self._row(request_id, row) for request_id, row in self._requests.items()]

    def pulls(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._pulls.values()]

    def request(self, request_id: int) -> dict[str, Any] | None:
        row = self._requests.get(request_id)
        return None if row is None else self._row(request_id, row)

    def pull(self, pull_id: int) -> dict[str, Any] | None:
        row = self._pulls.get(pull_id)
        return None if row is None else dict(row)


class _Request:
    """A request's row as its events came: shaped when read (`Activity._row`)."""

    __slots__ = ("at", "finished", "routed")

    def __init__(self, at: float) -> None:
        self.at = at
        self.routed: RequestRouted | None = None
        self.finished: RequestFinished | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
