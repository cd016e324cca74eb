"""Answers that go silent once begun (issue 9, item 11), from real socket backends.

A backend (or a peer) that sends a few chunks and then nothing, its connection open —
a pulled cable, a hung engine — must not hold the client for `limits.read_timeout_s`
(300 s): a stream ends with an error event `limits.stall_timeout_s` after its last
chunk; an answer of which nothing has reached the client yet is retried on another
holder instead. The wait for the first byte stays `read_timeout_s`. Timers shrunk to
fractions of a second; `tests.fakes.FakeServer` is the silent backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from shoal.backends.http import HttpTransport
from shoal.backends.openai_compat import OpenAICompatBackend
from shoal.protocol import ROUTE_HEADER
from tests.cluster import RunningNode, chat, cluster, wait_until
from tests.fakes import FakeServer

MODEL = "slow"
STALL_S = 0.5
FAST = {"stall_timeout_s": STALL_S, "read_timeout_s": 30.0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def silent() -> Iterator[FakeServer]:
    server = FakeServer([MODEL]).start()
    yield server
    server.close()


@pytest.fixture
def healthy() -> Iterator[FakeServer]:
    server = FakeServer([MODEL]).start()
    yield server
    server.close()


async def serve_from(member: RunningNode, fake: FakeServer) -> None:
    """`member` serves MODEL from `fake`, over HTTP, with the node's own limits."""
    limits = member.node.settings.limits
    transport = HttpTransport(
        fake.url,
        connect_timeout_s=limits.connect_timeout_s,
        read_timeout_s=limits.read_timeout_s,
        stall_timeout_s=limits.stall_timeout_s,
    )
    member.node.registry.add(OpenAICompatBackend(f"real-{fake.port}", transport))
    await member.wait_for_model(MODEL)


async def meet(a: RunningNode, b: RunningNode) -> None:
    """a pairs with b and learns that b holds MODEL (both clusters name their node n0)."""
    await a.node.admission.meet(b.url, "join")

    def b_holds_it() -> bool:
        return any(
            p.state is not None and any(m.id == MODEL for m in p.state.models)
            for p in a.node.peers.routable()
        )

    await wait_until(b_holds_it, 10, "a to know that b holds the model")


async def stream(url: str) -> tuple[dict[str, str], list[tuple[float, Any]]]:
    """Stream a chat from `url`: the headers, and each event with when it came."""
    started = time.monotonic()
    events: list[tuple[float, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                data = line.removeprefix(b"data: ").strip()
                event = data.decode() if data == b"[DONE]" else orjson.loads(data)
                events.append((time.monotonic() - started, event))
        return dict(response.headers), events


def text_of(events: list[tuple[float, Any]]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for _, e in events
        if isinstance(e, dict) and "choices" in e
    )


async def test_a_stream_that_goes_silent_ends_with_an_error_event_after_the_stall_timeout(
    tmp_path: Path, silent: FakeServer
) -> None:
    silent.mode = "silent_mid_stream"
    async with cluster(tmp_path, 1, limits=FAST) as (a,):
        await serve_from(a, silent)
        _, events = await stream(a.url)
    assert text_of(events) == "hello from"
    (last_chunk_at, _), (error_at, error) = events[-2], events[-1]
    assert error["error"]["code"] == "upstream_timeout"
    assert "stall timeout" in error["error"]["message"]
    assert STALL_S * 0.9 < error_at - last_chunk_at < STALL_S + 1.0


async def test_a_stream_through_a_peer_that_goes_silent_ends_after_the_stall_timeout(
    tmp_path: Path, silent: FakeServer
) -> None:
    # b's own stall timer is long: what ends the stream is a's, on its link to b.
    silent.mode = "silent_mid_stream"
    async with (
        cluster(tmp_path / "a", 1, limits=FAST) as (a,),
        cluster(tmp_path / "b", 1, limits={"stall_timeout_s": 60.0}) as (b,),
    ):
        await serve_from(b, silent)
        await meet(a, b)
        headers, events = await stream(a.url)
        assert headers[ROUTE_HEADER] == "peer"
        assert text_of(events) == "hello from"
        (last_chunk_at, _), (error_at, error) = events[-2], events[-1]
        assert error["error"]["code"] == "upstream_timeout"
        assert STALL_S * 0.9 < error_at - last_chunk_at < STALL_S + 1.0
        await wait_until(lambda: a.node.ledger.requests == 0, 5, "a's books to balance")


async def test_an_answer_that_stalls_before_reaching_the_client_is_retried_elsewhere(
    tmp_path: Path, silent: FakeServer, healthy: FakeServer
) -> None:
    # Half a non-streamed answer, then silence: nothing reached the client, so the
    # request goes to the other holder after the stall timeout, not an error.
    silent.mode = "silent_mid_body"
    async with (
        cluster(tmp_path / "a", 1, limits=FAST) as (a,),
        cluster(tmp_path / "b", 1) as (b,),
    ):
        await serve_from(a, silent)
        await serve_from(b, healthy)
        await meet(a, b)
        started = time.monotonic()
        status, headers, answer = await chat(a.url, CHAT)
        elapsed = time.monotonic() - started
        assert status == 200, answer
        assert headers[ROUTE_HEADER] == "retried"
        assert answer["choices"][0]["message"]["content"] == "hello from fake"
        assert (len(silent.requests), len(healthy.requests)) == (1, 1)
        assert STALL_S * 0.9 < elapsed < STALL_S + 1.5


async def test_the_first_chunk_is_awaited_for_the_read_timeout_then_retried_elsewhere(
    tmp_path: Path, silent: FakeServer, healthy: FakeServer
) -> None:
    # A stream's headers, then nothing: the stall timeout (0.2 s) does not apply before
    # the first chunk, the read timeout (1 s) does; no byte reached the client, so the
    # stream is served whole by the other holder.
    silent.mode = "silent_before_first_chunk"
    limits = {"stall_timeout_s": 0.2, "read_timeout_s": 1.0}
    async with (
        cluster(tmp_path / "a", 1, limits=limits) as (a,),
        cluster(tmp_path / "b", 1) as (b,),
    ):
        await serve_from(a, silent)
        await serve_from(b, healthy)
        await meet(a, b)
        headers, events = await stream(a.url)
        assert headers[ROUTE_HEADER] == "retried"
        assert text_of(events) == "hello from fake"
        assert events[-1][1] == "[DONE]"
        first_at = events[0][0]
        assert 0.9 < first_at < 3.0
