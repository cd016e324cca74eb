"""The dashboard's event stream (`GET /shoal/v1/events`) and its files, in process.

No browser here: real nodes on loopback (tests/cluster.py), read with aiohttp. What the
stream promises: a snapshot first, then deltas as things happen; it ends with `bye` when
the node shuts down, without holding the shutdown up; a reader that goes away leaves no
subscription behind. And what a batch of events becomes (`changes`), and the activity
record, as pure functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from shoal.backends.base import Operation
from shoal.dashboard import DASHBOARD
from shoal.dashboard.activity import Activity
from shoal.dashboard.stream import changes
from shoal.events import (
    Event,
    LoadChanged,
    ModelPullFailed,
    ModelPullProgress,
    PeerSuspect,
    RequestFinished,
    RequestRouted,
    TrustChanged,
)
from shoal.trust.store import TrustState
from tests.cluster import chat, cluster, wait_until

EVENTS = "/shoal/v1/events"


async def frames(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) of each frame; ("comment", text) for a comment line."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            kind, data = "message", b""
            for line in block.split(b"\n"):
                if line.startswith(b":"):
                    yield "comment", line[1:].strip().decode()
                elif line.startswith(b"event: "):
                    kind = line[7:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
            if data:
                yield kind, orjson.loads(data)


async def next_frame(stream: AsyncIterator[tuple[str, Any]], kind: str, within: float = 5) -> Any:
    async with asyncio.timeout(within):
        async for got, data in stream:
            if got == kind:
                return data
    raise AssertionError(f"the stream ended before a {kind!r} frame")


async def test_a_snapshot_then_each_request_as_it_is_served(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path, 2, mode="secret", models=lambda i: (f"m{i}",)) as (n0, n1),
        aiohttp.ClientSession() as session,
        session.get(n0.url + EVENTS) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-store"
        stream = frames(response)
        snapshot = await next_frame(stream, "snapshot")
        assert snapshot["operator"] is True  # loopback: this machine's operator
        assert snapshot["node"]["name"] == "n0"
        assert snapshot["pairs"] is not None
        assert snapshot["peers"] == []
        assert await n0.node.admission.meet(n1.url, "static") is not None
        while not any(p["name"] == "n1" for p in await next_frame(stream, "peers")):
            pass  # the peer, as the peers view shows it, as soon as it joins
        await n0.wait_for_model("m1")
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        status, _, _ = await chat(n0.url, body)
        assert status == 200
        while (row := await next_frame(stream, "request"))["state"] != "done":
            pass
        assert row["model"] == "m1" and row["node"] == "n1" and row["route"] == "peer"
        assert row["status"] == 200 and row["outcome"] == "ok"
        assert set(row) >= {"first_byte_ms", "total_ms", "at", "op"}


async def test_the_stream_ends_with_bye_when_the_node_stops_without_holding_it_up(
    tmp_path: Path,
) -> None:
    got: list[str] = []
    async with aiohttp.ClientSession() as session:
        async with cluster(tmp_path, 1) as (n0,):
            response = await session.get(n0.url + EVENTS)
            stream = frames(response)
            await next_frame(stream, "snapshot")

            async def read_to_the_end() -> None:
                async for kind, _ in stream:
                    got.append(kind)

            reader = asyncio.create_task(read_to_the_end())
            stopping = time.monotonic()
        # The cluster's exit stopped the node: its shutdown did not wait for the stream.
        assert time.monotonic() - stopping < 5
        await asyncio.wait_for(reader, 5)
        response.release()
    assert got[-1:] == ["bye"]


async def test_a_reader_that_goes_away_leaves_no_subscription(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (n0,), aiohttp.ClientSession() as session:
        dashboard = n0.node.app[DASHBOARD]
        observers = len(dashboard.bus._handlers.get(Event, []))
        response = await session.get(n0.url + EVENTS)
        await next_frame(frames(response), "snapshot")
        assert dashboard.open_streams == 1
        assert len(dashboard.bus._handlers[Event]) == observers + 1
        response.close()  # the connection is gone, not just the body unread
        await wait_until(lambda: dashboard.open_streams == 0, 5, "the stream to end")
        assert len(dashboard.bus._handlers[Event]) == observers


async def test_the_page_and_its_files_are_served_with_headers_that_keep_them_safe(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 1) as (n0,), aiohttp.ClientSession() as session:
        for path, kind in (
            ("/", "text/html"),
            ("/dashboard/app.js", "text/javascript"),
            ("/dashboard/app.css", "text/css"),
            ("/dashboard/icon.svg", "image/svg+xml"),
        ):
            async with session.get(n0.url + path) as response:
                assert response.status == 200, path
                assert response.content_type == kind
                assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
                assert response.headers["X-Frame-Options"] == "DENY"
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert len(await response.read()) > 100
        for path in ("/dashboard/index.html", "/dashboard/../pyproject.toml", "/dashboard/x.js"):
            async with session.get(n0.url + path) as response:
                assert response.status == 404, path
                assert "error" in await response.json()  # the API's shape, not a page


# -- pure parts ---------------------------------------------------------------------------


def test_a_batch_of_events_becomes_each_view_once_and_each_row_once() -> None:
    routed = RequestRouted(7, Operation.CHAT, "m", "n2", "b" * 64, "peer", 0)
    finished = RequestFinished(7, Operation.CHAT, "m", "peer", "n2", 200, "ok", 0.01, 0.02)
    found = changes(
        [
            routed,
            finished,
            PeerSuspect("a" * 64, "n2"),
            TrustChanged("a" * 64, "n2", "", TrustState.PENDING, TrustState.PAIRED),
            LoadChanged(1, 0),
            LoadChanged(0, 0),
            ModelPullProgress(3, "org/repo", "f.gguf", 10, 100, 5.0),
        ]
    )
    assert found.views == {"peers", "models", "pairs"}
    assert list(found.requests) == [7]
    assert list(found.pulls) == [3]
    assert found.load == LoadChanged(0, 0)


def test_activity_keeps_the_last_requests_and_pulls_without_their_content() -> None:
    activity = Activity("a" * 64, "here", max_requests=2, now=lambda: 1000.0)
    for request_id in (1, 2, 3):
        activity.record(
            RequestRouted(request_id, Operation.CHAT, "m", "engine", "a" * 64, "local", 0)
        )
    assert [r["id"] for r in activity.requests()] == [2, 3]
    activity.record(RequestFinished(3, Operation.CHAT, "m", "local", "engine", 200, "ok", 0.5, 1.0))
    assert activity.request(3) == {
        "id": 3, "at": 1000.0, "op": "chat/completions", "model": "m", "state": "done",
        "route": "local", "node": "here", "node_id": "a" * 64, "backend": "engine",
        "attempt": 0, "status": 200, "outcome": "ok", "first_byte_ms": 500.0,
        "total_ms": 1000.0,
    }  # fmt: skip
    # A request no target took: only its end is heard.
    activity.record(RequestFinished(4, Operation.CHAT, "x", None, None, 404, "error", None, 0.001))
    assert activity.request(4) is not None and activity.request(4)["node"] is None  # type: ignore[index]
    activity.record(ModelPullProgress(1, "org/repo", "f.gguf", 50, 100, 10.0))
    activity.record(ModelPullFailed(1, "org/repo", "insufficient_storage", "no space in /x"))
    assert activity.pulls() == [
        {"id": 1, "at": 1000.0, "model": "org/repo", "state": "failed", "file": "f.gguf",
         "completed": 50, "total": 100, "rate_bps": 0, "code": "insufficient_storage",
         "message": "no space in /x"},
    ]  # fmt: skip
