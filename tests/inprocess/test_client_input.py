"""Client input on the client API (issue 9, items 8 to 10).

A body is checked once and what was checked is what the backend receives; a client
mistake is a 400 naming the parameter and reaches no backend; a compressed body is
inflated by the node itself, within the body cap. One in-process node serving a
recording fake backend; real sockets; the official SDK where it can send the request.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import ClientSession

from shoal.api.requests import ChatRequest, encode, parse
from shoal.backends.base import Operation
from shoal.backends.http import HttpTransport
from shoal.backends.ollama import OllamaBackend
from tests.cluster import RunningNode, cluster
from tests.fakes import FakeServer

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
CAP = 64 * 1024  # limits.max_body_bytes for these tests


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with cluster(tmp_path, 1, limits={"max_body_bytes": CAP}) as (running,):
        yield running


@pytest.fixture
async def sdk(node: RunningNode) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


async def post(
    url: str, raw: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    data = io.BytesIO(raw)  # a large `bytes` body warns: it would be sent in one write
    async with (
        ClientSession() as session,
        session.post(url + CHAT, data=data, headers=headers) as r,
    ):
        return r.status, dict(r.headers), orjson.loads(await r.read())


def forwarded(node: RunningNode) -> list[dict[str, Any]]:
    return [orjson.loads(body) for _, body in node.backend.sent]


def error_of(document: Any) -> dict[str, Any]:
    assert list(document) == ["error"]
    assert set(document["error"]) == {"message", "type", "param", "code"}
    return dict(document["error"])


# -- item 8: what is checked is what is forwarded ------------------------------------------


async def test_text_parts_from_the_sdk_reach_the_backend_as_checked(
    node: RunningNode, sdk: openai.AsyncOpenAI
) -> None:
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    answer = await sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}], max_tokens=3
    )
    assert answer.choices[0].message.content == "hi"
    assert forwarded(node) == [
        {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 3}
    ]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "3"}, "max_tokens"),
        ({"stream": "false"}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"n": 1.0}, "n"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, None),
    ],
)
async def test_a_value_of_the_wrong_type_is_a_400_and_reaches_no_backend(
    node: RunningNode, sdk: openai.AsyncOpenAI, fields: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="m", messages=USER, **fields)
    assert caught.value.code == "invalid_type"
    assert caught.value.param == (param or "stream_options.include_usage")
    assert node.backend.sent == []


async def test_a_duplicate_key_reaches_the_backend_once_with_the_value_checked(
    node: RunningNode,
) -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
    raw += b'"stream": true, "max_tokens": 0, "stream": false, "max_tokens": 5}'
    status, _, _ = await post(node.url, raw)
    assert status == 200
    ((_, body),) = node.backend.sent
    assert body.count(b'"stream"') == body.count(b'"max_tokens"') == 1
    assert orjson.loads(body) == {"model": "m", "messages": USER, "stream": False, "max_tokens": 5}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"[]", "invalid_type"),
        (b'{"model": "m"}', "missing_required_parameter"),
        (b'{"model": "m", "messages": [{"role": "user", "content": []}]}', "invalid_value"),
    ],
)
async def test_refusals_carry_a_fitting_code(node: RunningNode, raw: bytes, code: str) -> None:
    status, _, document = await post(node.url, raw)
    assert status == 400
    error = error_of(document)
    assert (error["type"], error["code"]) == ("invalid_request_error", code)


# -- item 10: the node inflates bodies itself, within the cap --------------------------------


def body_of(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (padded with JSON whitespace)."""
    raw = orjson.dumps({"model": "m", "messages": USER})
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def zlib_stream(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


def bomb(inflated: int) -> bytes:
    """The start of a gzip stream of `inflated` zero bytes, built in milliseconds: after
    a full flush each MiB of zeros compresses to the same bytes. (No trailer: a node
    must refuse it long before the end.)"""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (inflated // len(zeros) - 1)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("gzip", lambda raw: gzip.compress(raw[:50]) + gzip.compress(raw[50:])),  # 2 members
        ("deflate", lambda raw: zlib_stream(raw, zlib.MAX_WBITS)),  # RFC 9110's: zlib
        ("deflate", lambda raw: zlib_stream(raw, -zlib.MAX_WBITS)),  # raw, as some send
        ("identity", lambda raw: raw),
    ],
)
async def test_a_compressed_body_is_inflated(
    node: RunningNode, encoding: str, compress: Any
) -> None:
    raw = body_of(CAP)  # inflated, exactly at the cap: accepted
    status, _, _ = await post(node.url, compress(raw), {"Content-Encoding": encoding})
    assert status == 200
    assert forwarded(node) == [{"model": "m", "messages": USER}]


@pytest.mark.parametrize("inflated", [CAP + 1, 1 << 30])
async def test_a_body_that_inflates_past_the_cap_is_a_413(node: RunningNode, inflated: int) -> None:
    body = bomb(inflated) if inflated > CAP + 1 else gzip.compress(body_of(CAP + 1))
    status, _, document = await post(node.url, body, {"Content-Encoding": "gzip"})
    assert status == 413
    assert error_of(document)["code"] == "payload_too_large"
    assert node.backend.sent == []


@pytest.mark.parametrize(
    "encodings",
    [["br"], ["zstd"], ["compress"], ["gzip, gzip"], ["gzip", "deflate"], ["gzip;q=1"]],
)
async def test_an_encoding_the_node_does_not_inflate_is_a_415(
    node: RunningNode, encodings: list[str]
) -> None:
    headers = [("Content-Type", "application/json")]
    headers += [("Content-Encoding", value) for value in encodings]
    async with (
        ClientSession() as session,
        session.post(node.url + CHAT, data=gzip.compress(body_of(100)), headers=headers) as r,
    ):
        status, accepted, document = r.status, r.headers["Accept-Encoding"], await r.json()
    assert status == 415
    assert accepted == "gzip, deflate"
    assert error_of(document)["code"] == "unsupported_content_encoding"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"\x1f\x8b not gzip at all"),
        ("gzip", gzip.compress(body_of(200))[:-12]),  # cut short
        ("gzip", gzip.compress(body_of(200)) + b"junk"),
        ("deflate", zlib_stream(body_of(200), zlib.MAX_WBITS) + b"\x78\x9c"),  # data after
        ("deflate", b"\x78\x9c garbage"),
    ],
)
async def test_malformed_compressed_data_is_a_400(
    node: RunningNode, encoding: str, body: bytes
) -> None:
    status, _, document = await post(node.url, body, {"Content-Encoding": encoding})
    assert status == 400
    assert encoding in error_of(document)["message"]
    assert node.backend.sent == []


# -- translation for Ollama ------------------------------------------------------------------


async def test_ollama_gets_a_message_of_text_parts_as_one_string() -> None:
    ollama = FakeServer(["llama3"], ollama=True).start()
    backend = OllamaBackend(
        "ollama", HttpTransport(ollama.url, connect_timeout_s=3, read_timeout_s=10)
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]},
    ]
    body = encode(parse(ChatRequest, orjson.dumps({"model": "llama3", "messages": messages})))
    try:
        upstream = await backend.send(Operation.CHAT, body)
        assert upstream.status == 200
        upstream.close()
    finally:
        await backend.aclose()
        ollama.close()
    (received,) = ollama.requests
    assert received["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        messages[2],  # an image: Ollama's to read
    ]
