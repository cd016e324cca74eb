"""The engine worker's answers to client input (issue 9, item 8): a malformed body or a
request the model cannot serve is a 400 in OpenAI's shape naming the parameter, never a
500. The worker's HTTP app on a real loopback socket, with a recording generator in
place of llama.cpp (these refusals come before any generation)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web

from shoal.engine.worker import _DONE, Worker, refuse_unsupported, text_messages
from shoal.errors import InvalidRequest

ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop"}]}


class RecordingGenerator:
    """Answers every generation with ANSWER, keeping the llama-cpp-python arguments."""

    model_id = "smol"

    def __init__(self) -> None:
        self.turn = asyncio.Lock()
        self.waiting = 0
        self.calls: list[dict[str, Any]] = []

    def run(
        self,
        chat: bool,
        kwargs: dict[str, Any],
        emit: Callable[[object], None],
        cancel: threading.Event,
    ) -> None:
        self.calls.append(kwargs)
        emit(dict(ANSWER))
        emit(_DONE)


class Embedder:
    model_id = "minilm"
    dimensions = 384


@pytest.fixture
async def worker() -> AsyncIterator[tuple[str, RecordingGenerator]]:
    generator = RecordingGenerator()
    runner = web.AppRunner(Worker(generator, Embedder()).app())  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", generator
    await runner.cleanup()


async def post(url: str, raw: bytes) -> tuple[int, Any]:
    async with ClientSession() as session, session.post(url, data=raw) as response:
        return response.status, orjson.loads(await response.read())


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "raw", "param", "code"),
    [
        ("/v1/chat/completions", b"{not json", None, "invalid_json"),
        ("/v1/chat/completions", b"", None, "invalid_json"),
        ("/v1/chat/completions", b'{"model": "smol"}', "messages", "missing_required_parameter"),
        ("/v1/completions", b'{"model": "smol", "prompt": "x", "max_tokens": "3"}', "max_tokens",
         "invalid_type"),
        ("/v1/completions", b'{"model": "smol", "prompt": "x", "logprobs": 2}', "logprobs",
         "unsupported_parameter"),
        ("/v1/completions", b'{"model": "smol", "prompt": ["a", "b"]}', "prompt",
         "unsupported_value"),
        ("/v1/embeddings", b'{"model": "minilm"}', "input", "missing_required_parameter"),
        ("/v1/embeddings", b'{"model": "minilm", "input": [1, 2]}', "input", "unsupported_value"),
        ("/v1/embeddings", b'{"model": "minilm", "input": "x", "dimensions": 3}', "dimensions",
         "unsupported_value"),
        ("/v1/embeddings", b"[1]", None, "invalid_type"),
    ],
)  # fmt: skip
async def test_malformed_or_unservable_bodies_are_400s(
    worker: tuple[str, RecordingGenerator], path: str, raw: bytes, param: str | None, code: str
) -> None:
    url, generator = worker
    status, document = await post(url + path, raw)
    assert status == 400
    assert document["error"]["type"] == "invalid_request_error"
    assert (document["error"]["param"], document["error"]["code"]) == (param, code)
    assert generator.calls == []


@pytest.mark.parametrize(
    ("part", "index"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, 1),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, 1),
    ],
)
async def test_a_part_that_is_not_text_is_a_400_naming_it(
    worker: tuple[str, RecordingGenerator], part: dict[str, Any], index: int
) -> None:
    url, generator = worker
    content = [{"type": "text", "text": "what is this?"}, part]
    raw = orjson.dumps({"model": "smol", "messages": [*USER, {"role": "user", "content": content}]})
    status, document = await post(url + "/v1/chat/completions", raw)
    assert status == 400
    assert document["error"]["param"] == f"messages[1].content[{index}].type"
    assert document["error"]["code"] == "unsupported_value"
    assert part["type"] in document["error"]["message"]
    assert generator.calls == []


async def test_text_parts_reach_llama_cpp_as_one_string(
    worker: tuple[str, RecordingGenerator],
) -> None:
    url, generator = worker
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    raw = orjson.dumps({"model": "smol", "messages": [{"role": "user", "content": parts}]})
    status, document = await post(url + "/v1/chat/completions", raw)
    assert (status, document["model"]) == (200, "smol")
    assert generator.calls[0]["messages"] == [{"role": "user", "content": "Say\nhi"}]


# -- the pure parts -------------------------------------------------------------------------


def test_text_messages_leave_string_content_alone() -> None:
    messages = [{"role": "system", "content": "x"}, {"role": "assistant", "content": None}]
    assert text_messages(messages) == messages


@pytest.mark.parametrize(
    ("chat", "fields", "param"),
    [
        (True, {"logprobs": True}, "logprobs"),
        (True, {"logprobs": True, "top_logprobs": 2}, "logprobs"),
        (True, {"top_logprobs": 2}, "top_logprobs"),
        (False, {"logprobs": 0}, "logprobs"),
        (False, {"logprobs": 5}, "logprobs"),
    ],
)
def test_logprobs_are_refused_as_unsupported(
    chat: bool, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        refuse_unsupported(fields, chat)
    assert (caught.value.param, caught.value.code) == (param, "unsupported_parameter")


@pytest.mark.parametrize(
    ("chat", "fields"),
    [
        (True, {}),
        (True, {"logprobs": False, "top_logprobs": 0}),
        (True, {"logprobs": None}),
        (False, {"logprobs": None}),
    ],
)
def test_asking_for_no_logprobs_is_fine(chat: bool, fields: dict[str, Any]) -> None:
    refuse_unsupported(fields, chat)
