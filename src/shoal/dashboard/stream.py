"""`GET /shoal/v1/events`: the node's live view as Server-Sent Events.

Theory of operation: a stream subscribes to the bus (`Subscription`, bounded: a reader
that lags loses its oldest events and never slows the node), then sends one `snapshot`
of the views, then deltas. It wakes on the first event of a burst, lets the burst
gather for `COALESCE_S`, and answers the whole batch with one write: each view an
event touched is sent once, as the views module shapes it (`node`, `peers`, `models`,
`pairs`), each request or pull an event changed as its `Activity` row (`request`,
`pull`), and the last `load`. A stream that lost events (`Subscription.dropped`) is
sent a fresh snapshot instead, so the page is never wrong for long.

    event: snapshot   {"operator", "node", "peers", "models", "pairs", "requests", "pulls"}
    event: node       the status view (backends as last probed)
    event: peers      the peers view's list           event: models   the model list
    event: pairs      the pairing view (operator)     event: load     {"in_flight", "queued"}
    event: request    a request row                   event: pull     a pull row
    event: bye        {} : the node is shutting down
    : keep-alive      a comment after `HEARTBEAT_S` of silence (proxies, dead peers)

Who sees what: the route is the client API's (`Audience.CLIENT`); the pairing view, a
pull's error message (it may name paths on this disk) are sent only to a caller the one
access decision lets use `Audience.LOCAL` routes: the node's own operator.

A stream ends when its client goes away (aiohttp cancels the handler), or when the node
shuts down: `Dashboard.shut`, an `on_shutdown` hook, runs before aiohttp waits for
handlers to finish, and every stream says `bye` and returns at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from shoal.api.access import CALLER
from shoal.api.audience import Audience, Verdict, decide
from shoal.api.views import Views
from shoal.dashboard.activity import Activity
from shoal.events import (
    BackendDown,
    BackendModelsChanged,
    BackendReported,
    BackendUp,
    EngineExited,
    EngineStarted,
    Event,
    EventBus,
    LoadChanged,
    ModelLoaded,
    ModelLoading,
    ModelPulled,
    ModelPullFailed,
    ModelPullProgress,
    ModelRefused,
    ModelUnloaded,
    ModelUnloading,
    PeerEvent,
    RequestFinished,
    RequestRouted,
    TrustChanged,
)
from shoal.settings import ClusterMode

log = logging.getLogger(__name__)

COALESCE_S = 0.2  # a burst of events becomes one write: at most ~5 a second per page
HEARTBEAT_S = 15.0  # a comment after this much silence keeps idle proxies from cutting it
RETRY_MS = 2000  # the reconnect delay a reader should use (the SSE `retry` field)
MAX_QUEUED = 4096  # events held for a lagging page (each a small frozen value)

_BACKEND_EVENTS = (
    BackendUp, BackendDown, BackendModelsChanged, BackendReported, ModelLoaded,
    ModelUnloaded, EngineStarted, EngineExited, ModelLoading, ModelUnloading, ModelRefused,
)  # fmt: skip
_PULL_EVENTS = (ModelPullProgress, ModelPulled, ModelPullFailed)


class Dashboard:
    """What the stream handler needs: the bus, the views, the activity, the shutdown."""

    def __init__(
        self, bus: EventBus, views: Views, activity: Activity, mode: Callable[[], ClusterMode]
    ) -> None:
        self.bus = bus
        self.views = views
        self.activity = activity
        self.mode = mode
        self.closing = asyncio.Event()
        self.open_streams = 0

    async def shut(self, app: web.Application) -> None:
        self.closing.set()


DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)


def install(
    app: web.Application, bus: EventBus, views: Views, mode: Callable[[], ClusterMode]
) -> Dashboard:
    """Make the node's dashboard service: its activity record hears requests and pulls
    from now on, and its streams end when the application shuts down."""
    activity = Activity(views.node_id, views.name)
    for kind in (RequestRouted, RequestFinished, *_PULL_EVENTS):
        bus.subscribe(kind, activity.record)
    dashboard = app[DASHBOARD] = Dashboard(bus, views, activity, mode)
    app.on_shutdown.append(dashboard.shut)
    return dashboard


# -- deciding what a batch of events changes (pure) ---------------------------------------


@dataclass
class Changes:
    views: set[str] = field(default_factory=set)  # "node", "peers", "models", "pairs"
    requests: dict[int, None] = field(default_factory=dict)  # ordered, each once
    pulls: dict[int, None] = field(default_factory=dict)
    load: LoadChanged | None = None


def changes(events: Iterable[Event]) -> Changes:
    """What a batch of events makes a page redraw."""
    found = Changes()
    for event in events:
        if isinstance(event, RequestRouted | RequestFinished):
            found.requests[event.request_id] = None
        elif isinstance(event, _PULL_EVENTS):
            found.pulls[event.pull_id] = None
        elif isinstance(event, LoadChanged):
            found.load = event
        elif isinstance(event, PeerEvent):
            found.views |= {"peers", "models"}
        elif isinstance(event, TrustChanged):
            found.views |= {"peers", "models", "pairs"}
        elif isinstance(event, _BACKEND_EVENTS):
            found.views |= {"node", "models"}
    return found


# -- the stream ---------------------------------------------------------------------------


def frame(kind: str, document: object) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(document) + b"\n\n"


class _Page:
    """One open stream: what its reader may see, and the frames it is sent."""

    def __init__(self, dashboard: Dashboard, operator: bool) -> None:
        self.dashboard = dashboard
        self.operator = operator

    async def snapshot(self, *, probe: bool) -> bytes:
        views, activity = self.dashboard.views, self.dashboard.activity
        document = {
            "operator": self.operator,
            "node": await views.status(probe=probe),
            "peers": views.peers()["peers"],
            "models": views.models(local_only=False)["data"],
            "pairs": views.pairs() if self.operator else None,
            "requests": activity.requests(),
            "pulls": [self._pull(row) for row in activity.pulls()],
        }
        return frame("snapshot", document)

    async def delta(self, found: Changes) -> bytes:
        views, activity = self.dashboard.views, self.dashboard.activity
        frames: list[bytes] = []
        if "node" in found.views:
            frames.append(frame("node", await views.status(probe=False)))
        if "peers" in found.views:
            frames.append(frame("peers", views.peers()["peers"]))
        if "models" in found.views:
            frames.append(frame("models", views.models(local_only=False)["data"]))
        if "pairs" in found.views and self.operator:
            frames.append(frame("pairs", views.pairs()))
        for request_id in found.requests:
            if (row := activity.request(request_id)) is not None:
                frames.append(frame("request", row))
        for pull_id in found.pulls:
            if (row := activity.pull(pull_id)) is not None:
                frames.append(frame("pull", self._pull(row)))
        if found.load is not None:
            load = {"in_flight": found.load.in_flight, "queued": found.load.queued}
            frames.append(frame("load", load))
        return b"".join(frames)

    def _pull(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.operator:
            row.pop("message", None)
        return row


async def events(request: web.Request) -> web.StreamResponse:
    """`GET /shoal/v1/events`: the live view (see the module docstring)."""
    dashboard = request.app[DASHBOARD]
    verdict = decide(Audience.LOCAL, request[CALLER], dashboard.mode())
    page = _Page(dashboard, operator=verdict is Verdict.ALLOW)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a reverse proxy must not hold the frames back
        }
    )
    # Subscribe before the snapshot is taken: an event between the two is sent after it.
    subscription = dashboard.bus.subscription(Event, maxsize=MAX_QUEUED)
    closing: asyncio.Future[Any] = asyncio.ensure_future(dashboard.closing.wait())
    getter: asyncio.Future[Any] | None = None
    dashboard.open_streams += 1
    try:
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode() + await page.snapshot(probe=True))
        dropped = subscription.dropped
        while not closing.done():
            getter = getter or asyncio.ensure_future(subscription.get())
            done, _ = await asyncio.wait(
                {getter, closing}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if closing in done:
                break
            if getter not in done:
                await response.write(b": keep-alive\n\n")
                continue
            batch: list[Event] = [getter.result()]
            getter = None
            await asyncio.wait({closing}, timeout=COALESCE_S)  # let the burst gather
            batch += subscription.drain()
            if subscription.dropped != dropped:  # it lagged: start it afresh
                dropped = subscription.dropped
                await response.write(await page.snapshot(probe=False))
            elif chunk := await page.delta(changes(batch)):
                await response.write(chunk)
        await response.write(frame("bye", {}))
    except ConnectionResetError:  # the page went away while we wrote
        pass
    finally:
        dashboard.open_streams -= 1
        subscription.close()
        for waiter in (getter, closing):
            if waiter is not None:
                waiter.cancel()
    return response
