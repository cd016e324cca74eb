"""Unfinished requests do not hold a node's connections (issue 9, item 2, in part).

A body that stalls gets 408 after `limits.body_timeout_s`, on the client API and on the
unauthenticated handshake alike; an idle keep-alive connection is closed after
`limits.idle_timeout_s`. Timers shrunk to fractions of a second; raw sockets, deadlines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from tests.cluster import cluster

FAST = {"body_timeout_s": 0.3, "idle_timeout_s": 0.3}


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/shoal/v1/trust/hello"])
async def test_a_body_that_stalls_is_refused_with_408(tmp_path: Path, path: str) -> None:
    async with cluster(tmp_path, 1, limits=FAST) as (node,):
        reader, writer = await connect(node.url)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"model":'.encode()
        )
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        waited = time.monotonic() - started
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert 0.2 < waited < 3.0


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1, limits=FAST) as (node,):
        reader, writer = await connect(node.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200"
        )
        started = time.monotonic()
        while await asyncio.wait_for(reader.read(65536), 5):  # the body, then the close
            pass
        assert time.monotonic() - started < 3.0
        writer.close()
