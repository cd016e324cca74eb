"""Aborting a transport frees every request on it at once (issue 9, item 11).

A peer found silent sends no RST: its requests would each wait out a timeout (connect,
first byte, stall). `HttpTransport.abort()` — what `Peers` calls when it suspects or
removes a peer — ends them wherever they are, with the reason, and any later request
on the transport fails at once. Timeouts here are far longer than the test's deadline,
so only the abort can end the waits.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from shoal.backends.base import Operation
from shoal.backends.http import HttpTransport
from shoal.errors import BackendUnavailable, UpstreamFailed
from tests.fakes import FakeServer

MODEL = "m"
LONG = 60.0  # no timeout of the transport's could end a wait within a test
ABORT_WITHIN_S = 1.0
CHAT = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer([MODEL]).start()
    yield server
    server.close()


def transport_to(url: str) -> HttpTransport:
    return HttpTransport(url, connect_timeout_s=LONG, read_timeout_s=LONG, stall_timeout_s=LONG)


async def abort_soon(transport: HttpTransport, after_s: float = 0.2) -> float:
    await asyncio.sleep(after_s)  # let the request reach its wait
    transport.abort("lost the peer")
    return time.monotonic()


async def test_a_request_waiting_for_its_answer_fails_at_once(fake: FakeServer) -> None:
    fake.mode = "silent_before_first_chunk"
    transport = transport_to(fake.url)
    try:
        aborted = asyncio.create_task(abort_soon(transport))
        upstream = await transport.send(Operation.CHAT, CHAT)  # headers come, then nothing
        with pytest.raises(UpstreamFailed, match="lost the peer"):
            await upstream.read()
        assert time.monotonic() - await aborted < ABORT_WITHIN_S
        upstream.close()
    finally:
        await transport.aclose()


async def test_a_stream_under_way_ends_at_once(fake: FakeServer) -> None:
    fake.mode = "silent_mid_stream"
    transport = transport_to(fake.url)
    try:
        upstream = await transport.send(Operation.CHAT, CHAT)
        chunks = upstream.chunks()
        assert await anext(chunks)
        aborted = asyncio.create_task(abort_soon(transport))
        with pytest.raises(UpstreamFailed, match="lost the peer"):
            async for _ in chunks:
                pass
        assert time.monotonic() - await aborted < ABORT_WITHIN_S
        upstream.close()
    finally:
        await transport.aclose()


async def test_a_request_to_a_server_that_never_answers_fails_at_once() -> None:
    # A listener that accepts (the kernel does) and never reads: the request's head is
    # sent and no answer ever comes, like a peer whose cable was pulled mid-request.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        transport = transport_to(f"http://127.0.0.1:{mute.getsockname()[1]}")
        try:
            aborted = asyncio.create_task(abort_soon(transport))
            with pytest.raises(BackendUnavailable, match="lost the peer"):
                await transport.send(Operation.CHAT, CHAT)
            assert time.monotonic() - await aborted < ABORT_WITHIN_S
            # and any later request fails at once, without touching the network
            with pytest.raises(UpstreamFailed, match="lost the peer"):
                await transport.send(Operation.CHAT, CHAT)
        finally:
            await transport.aclose()
