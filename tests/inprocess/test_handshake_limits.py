"""The unauthenticated handshake routes against a stranger: size caps before reading,
and malformed messages refused as 403 or 400, never 500 (issue 9, items 2, 3 and 8)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from shoal.api.mesh import HANDSHAKE_MAX_BYTES, STATE_MAX_BYTES
from shoal.mesh import identity
from shoal.protocol import HELLO_PATH, STATE_PATH
from shoal.trust import certs
from tests.cluster import cluster, wait_until


async def raw_request(
    url: str, head: bytes, body: bytes = b"", within: float = 3.0, tls: ssl.SSLContext | None = None
) -> bytes:
    """Send a request by hand on a fresh connection; what came back within `within` s."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=tls)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(within):
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in status_and_headers.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return status_and_headers + await reader.readexactly(length)
    finally:
        writer.close()


def error_of(response: bytes) -> dict[str, Any]:
    return dict(orjson.loads(response.split(b"\r\n\r\n", 1)[1])["error"])


async def test_a_huge_declared_hello_is_refused_at_once_without_reading(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,):
        head = (
            f"POST {HELLO_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
        ).encode()
        response = await raw_request(a.url, head, b"{")  # the body never comes
        assert response.startswith(b"HTTP/1.1 413 ")
        error = error_of(response)
        assert (error["code"], error["type"]) == ("payload_too_large", "invalid_request_error")
        assert str(HANDSHAKE_MAX_BYTES) in error["message"]


async def test_a_chunked_hello_is_cut_off_at_the_cap(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,):
        head = (
            f"POST {HELLO_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"x" * 4096
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 20 KiB
        response = await raw_request(a.url, head, body)  # and never a last chunk
        assert response.startswith(b"HTTP/1.1 413 ")
        assert error_of(response)["code"] == "payload_too_large"


async def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        return response.status, dict(await response.json())


def _hello(home: Path, **fields: Any) -> dict[str, Any]:
    me = identity.load_or_create(home)
    cert = certs.load_or_create_cert(me, home).decode()
    doc = {
        "v": 2, "mode": "open", "node_id": me.node_id, "name": "stranger",
        "public_key": base64.b64encode(me.public_key).decode(), "cert": cert,
        "api_port": 11450, "peer_port": 11451,
        "nonce": base64.b64encode(b"n" * 32).decode(),
    }  # fmt: skip
    return {**doc, **fields}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"peer_port": "11451"}, "'peer_port': Input should be a valid integer"),
        ({"api_port": 1e30}, "'api_port': Input should be a valid integer"),
        ({"api_port": -5}, "'api_port': Input should be greater than or equal to 1"),
        ({"cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "parse"),
        ({"cert": "garbage"}, "'cert': certificate must be one PEM certificate"),
        ({"name": "\x1b]0;owned\x07"}, "'name': name must be printable"),
        ({"padding": "x" * 8000}, "'padding': Extra inputs are not permitted"),
    ],
)
async def test_a_malformed_hello_is_403_with_the_reason_not_500(
    tmp_path: Path, fields: dict[str, Any], reason: str
) -> None:
    async with cluster(tmp_path, 1) as (a,):
        status, body = await _post(a.url + HELLO_PATH, orjson.dumps(_hello(tmp_path, **fields)))
        assert status == 403, body
        assert body["error"]["message"].startswith("handshake refused: malformed hello")
        assert reason in body["error"]["message"]
        assert a.node.trust.open_handshakes() == 0
        # The well-formed hello is answered.
        status, body = await _post(a.url + HELLO_PATH, orjson.dumps(_hello(tmp_path)))
        assert status == 200 and a.node.trust.open_handshakes() == 1


async def test_a_hello_that_is_not_json_is_400(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,):
        for garbage in (b"", b"{", b"\xff\xfe", b"[" * 5000):
            status, body = await _post(a.url + HELLO_PATH, garbage)
            assert status == 400, (garbage[:10], body)


async def test_a_state_snapshot_declared_over_the_cap_is_413_at_once(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await wait_until(lambda: a.alive_peers() == [b.node_id], 10, "a to see b")
        head = (
            f"POST {STATE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {STATE_MAX_BYTES + 1}\r\n\r\n"
        ).encode()
        response = await raw_request(  # as a paired node, on the peer port
            a.node.trust.peer_url(b.node_id, "127.0.0.1"),
            head,
            tls=a.node.trust.client_context(b.node_id),
        )
        assert response.startswith(b"HTTP/1.1 413 ")
        assert str(STATE_MAX_BYTES) in error_of(response)["message"]
