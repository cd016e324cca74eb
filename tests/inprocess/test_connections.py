"""A node's listeners against strangers (issue 9, items 1, 2 and 9), over real sockets.

Connection caps per address and in total, on both ports, with loopback always served;
the request head timeout (slowloris), TLS handshakes that never finish; aiohttp's own
refusals in the API's JSON error shape. Every address here is loopback, which the caps
never count: the node is told to exempt 127.0.0.1 only (`Node.uncapped`), and clients
bind to other 127/8 addresses to play strangers. Timers are shrunk; no test sleeps to
wait for something, it waits for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shoal.api.listener import ListenerStatistics
from shoal.node import Node
from tests.cluster import node_settings, wait_until

LOCAL = "127.0.0.1"  # the operator's address: exempt
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def serving(home: Path, **limits: Any) -> AsyncIterator[Node]:
    """One node whose caps exempt only 127.0.0.1, stopped on exit."""
    node = Node(node_settings(home, "n0", "open", limits=limits))
    node.uncapped = lambda source: source == LOCAL
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        await wait_until(lambda: node.url or task.done(), 10, "the node to listen")
        yield node
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def stats(node: Node) -> ListenerStatistics:
    assert node.listeners is not None
    return node.listeners.statistics()


@contextlib.asynccontextmanager
async def connections() -> AsyncIterator[list[Stream]]:
    """Raw connections opened inside, all closed on exit."""
    opened: list[Stream] = []
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def connect(opened: list[Stream], source: str, port: int) -> Stream:
    stream = await asyncio.open_connection(LOCAL, port, local_addr=(source, 0))
    opened.append(stream)
    return stream


async def closed_unanswered(stream: Stream) -> bool:
    """Whether the node closes the connection without a byte of answer."""
    try:
        return await asyncio.wait_for(stream[0].read(1), 5) == b""
    except ConnectionResetError:
        return True


async def healthz(source: str, port: int) -> int:
    async with connections() as opened:
        reader, writer = await connect(opened, source, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    return int(answer.split(b" ", 2)[1])


async def hold(opened: list[Stream], node: Node, source: str, port: int, count: int) -> None:
    """Open `count` idle connections from `source`, and wait until the node holds them."""
    before = stats(node).connections.open
    for _ in range(count):
        await connect(opened, source, port)
    await wait_until(
        lambda: stats(node).connections.open == before + count, 5, f"{count} held connections"
    )


# -- caps -------------------------------------------------------------------------------------


async def test_an_address_over_its_cap_is_refused_at_once_and_others_are_served(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, max_connections_per_source=3) as node, connections() as opened:
        await hold(opened, node, "127.0.0.2", node.port, 3)
        assert await closed_unanswered(await connect(opened, "127.0.0.2", node.port))
        assert stats(node).connections.refused_source == 1
        assert await healthz("127.0.0.3", node.port) == 200  # another LAN address
        for _ in range(10):  # the operator, however many connections it opens
            await connect(opened, LOCAL, node.port)
        assert await healthz(LOCAL, node.port) == 200
        assert stats(node).connections.exempt_open >= 10


async def busy(opened: list[Stream], source: str, port: int) -> None:
    """A connection handling a request: its head sent, its body awaited."""
    _, writer = await connect(opened, source, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )


async def test_a_full_node_evicts_the_connection_idle_the_longest(tmp_path: Path) -> None:
    limits = {"max_connections_per_source": 4, "max_connections": 4}
    async with serving(tmp_path, **limits) as node, connections() as opened:
        await hold(opened, node, "127.0.0.2", node.port, 4)
        assert await healthz("127.0.0.3", node.port) == 200
        assert await closed_unanswered(opened[0])  # the oldest, which never sent a request
        assert stats(node).connections.evicted == 1


async def test_a_full_node_whose_connections_are_all_busy_refuses_but_never_loopback(
    tmp_path: Path,
) -> None:
    async with (
        serving(tmp_path, max_connections_per_source=3, max_connections=2) as node,
        connections() as opened,
    ):
        await busy(opened, "127.0.0.2", node.port)
        await busy(opened, "127.0.0.3", node.port)

        def both_busy() -> bool:
            book = stats(node).connections
            return book.open == 2 and book.idle == 0

        await wait_until(both_busy, 5, "two connections handling requests")
        assert await closed_unanswered(await connect(opened, "127.0.0.4", node.port))
        assert stats(node).connections.refused_total == 1
        assert await healthz(LOCAL, node.port) == 200
        # A place given back is taken again.
        _, writer = opened.pop(0)
        writer.close()
        await wait_until(lambda: stats(node).connections.open == 1, 5, "a place given back")
        assert await healthz("127.0.0.4", node.port) == 200


async def test_the_peer_port_shares_the_caps_and_bounds_its_handshakes(tmp_path: Path) -> None:
    limits = {"max_connections_per_source": 3, "header_timeout_s": 0.3}
    async with serving(tmp_path, **limits) as node, connections() as opened:
        peer_port = node.trust.peer_port
        await hold(opened, node, "127.0.0.2", node.port, 1)  # the API port counts too
        for _ in range(2):
            await connect(opened, "127.0.0.2", peer_port)
        await wait_until(lambda: stats(node).connections.open == 3, 5, "three held")
        assert await closed_unanswered(await connect(opened, "127.0.0.2", peer_port))
        assert stats(node).connections.refused_source == 1
        # No handshake begun, no request sent: all closed after the header timeout, and
        # their places given back.
        for stream in opened:
            assert await closed_unanswered(stream)
        await wait_until(lambda: stats(node).connections.open == 0, 5, "the places back")
        assert stats(node).head_timeouts == 1  # the API port's; TLS ones time out before


async def test_a_failed_handshake_gives_its_place_back(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections_per_source=1) as node:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for _ in range(3):  # no client certificate: refused by the handshake, each time
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                _, writer = await asyncio.open_connection(
                    LOCAL, node.trust.peer_port, ssl=context, local_addr=("127.0.0.2", 0)
                )
                writer.close()
                await writer.wait_closed()
            await wait_until(lambda: stats(node).connections.open == 0, 5, "the place back")
        assert stats(node).connections.refused_source == 0


# -- the request head's deadline ----------------------------------------------------------------


async def test_a_slowloris_connection_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, header_timeout_s=0.5) as node, connections() as opened:
        reader, writer = await connect(opened, "127.0.0.2", node.port)
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 10_000
        closed = asyncio.ensure_future(reader.read())
        for byte in head:  # a byte every 20 ms: the head would take 200 s
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)  # the attacker's pace, not a wait
        assert await asyncio.wait_for(closed, 5) == b""
        assert stats(node).head_timeouts == 1


async def test_a_connection_that_never_sends_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, header_timeout_s=0.3) as node, connections() as opened:
        assert await closed_unanswered(await connect(opened, "127.0.0.2", node.port))
        await wait_until(lambda: stats(node).connections.open == 0, 5, "the place back")


async def test_an_idle_keep_alive_connection_is_left_to_the_idle_timeout(tmp_path: Path) -> None:
    """After an answer the header timeout waits for the next request's first byte."""
    limits = {"header_timeout_s": 0.2, "idle_timeout_s": 30.0}
    async with serving(tmp_path, **limits) as node, connections() as opened:
        reader, writer = await connect(opened, "127.0.0.2", node.port)
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for _ in range(2):
            writer.write(request)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
                b"HTTP/1.1 200"
            )
            length = 0
            while not length:
                length = len(await asyncio.wait_for(reader.read(65536), 5))
            await asyncio.sleep(0.6)  # idle for three header timeouts: still open
        # The next head begun and never finished: closed.
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert stats(node).head_timeouts == 1


# -- aiohttp's refusals in the API's shape ------------------------------------------------------

_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
_POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (_HEAD + b"Host: evil.example\r\n\r\n", "invalid_request"),
        (_HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(64)) + b"\r\n",
         "request_header_fields_too_large"),
        (_HEAD + b"X-Big: " + b"b" * 8191 + b"\r\n\r\n", "request_header_fields_too_large"),
        (b"GET /healthz?" + b"a" * 4096 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
         "uri_too_long"),
        (b"G(T /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "invalid_request"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", "invalid_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), "invalid_request"),
        (_POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid_request"),
        (_POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         "invalid_request"),
        (_HEAD + b"Bad Header: x\r\n\r\n", "invalid_request"),
        (_HEAD + b"X-A: a\x00b\r\n\r\n", "invalid_request"),
    ],
    ids=["duplicate-host", "too-many-headers", "long-header", "long-target", "bad-method",
         "no-host", "https-on-http", "bad-chunk", "length-and-chunked", "bad-token", "nul"],
)  # fmt: skip
async def test_aiohttps_own_refusals_are_in_the_error_shape(
    tmp_path: Path, raw: bytes, code: str
) -> None:
    async with serving(tmp_path) as node, connections() as opened:
        reader, writer = await connect(opened, "127.0.0.2", node.port)
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closes
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", head
        assert b"content-type: application/json" in head.lower()
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            code,
            None,
        )
        assert error["message"] and "\\x" not in error["message"]
        assert stats(node).malformed_requests == 1
