"""The contract of `Backend`: the same tests, run against every implementation.

Whatever serves the tokens (a fake, a real llama-server, the embedded engine, Ollama),
the node relies on the same behaviour: a probe that never raises, OpenAI answers passed
through as an `Upstream`, a refused request answered rather than raised, a stream that
can be abandoned, a clear error once the server is gone. The implementations are in
this folder's conftest; the ones marked `engine` start real servers.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shoal.backends.base import Backend, BackendStatus, Health, ModelInfo, Operation, Upstream
from shoal.errors import BackendUnavailable
from tests.contract.conftest import Subject, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Few tokens: the real engines answer in well under a second.
MAX_TOKENS = 8


def chat_body(model: str, *, stream: bool = False, max_tokens: int = MAX_TOKENS) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
    )


async def models_for(backend: Backend, op: Operation) -> list[ModelInfo]:
    status = await backend.probe()
    return [m for m in status.models if op in m.operations]


async def a_chat_model(backend: Backend) -> str:
    models = await models_for(backend, Operation.CHAT)
    assert models, "every backend here serves at least one chat model"
    return models[0].id


def events_of(stream: bytes) -> list[str]:
    """Server-sent events, each as its text (`data: ...`)."""
    return [event for event in stream.decode().split("\n\n") if event.strip()]


async def read_json(upstream: Upstream) -> Any:
    try:
        return orjson.loads(await upstream.read())
    finally:
        upstream.close()


# -- what it is and what it serves -------------------------------------------------------


async def test_probe_is_healthy_and_lists_models(subject: Subject) -> None:
    status = await subject.backend.probe()
    assert isinstance(status, BackendStatus)
    assert status.health is Health.HEALTHY, status.reason
    assert status.models
    for model in status.models:
        assert isinstance(model, ModelInfo)
        assert isinstance(model.id, str) and model.id
        assert isinstance(model.operations, frozenset) and model.operations
        assert all(isinstance(op, Operation) for op in model.operations)


async def test_names_itself_for_people(subject: Subject) -> None:
    backend = subject.backend
    for fact in (backend.name, backend.kind, backend.location):
        assert isinstance(fact, str) and fact


# -- answers -----------------------------------------------------------------------------


async def test_chat_completion(subject: Subject) -> None:
    upstream = await subject.backend.send(
        Operation.CHAT, chat_body(await a_chat_model(subject.backend))
    )
    assert upstream.status == 200
    assert upstream.content_type.startswith("application/json")
    document = await read_json(upstream)
    assert document["object"] == "chat.completion"
    message = document["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)


async def test_streamed_chat_completion(subject: Subject) -> None:
    model = await a_chat_model(subject.backend)
    upstream = await subject.backend.send(Operation.CHAT, chat_body(model, stream=True))
    try:
        assert upstream.status == 200
        assert upstream.content_type.startswith("text/event-stream")
        stream = b"".join([chunk async for chunk in upstream.chunks()])
    finally:
        upstream.close()
    events = events_of(stream)
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert chunks
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


async def test_embeddings_where_a_model_embeds(subject: Subject) -> None:
    models = await models_for(subject.backend, Operation.EMBEDDING)
    if not models:
        pytest.skip("lists no embedding model")
    for model in models:
        body = orjson.dumps({"model": model.id, "input": ["A fox.", "The stock market."]})
        upstream = await subject.backend.send(Operation.EMBEDDING, body)
        assert upstream.status == 200, model.id
        assert upstream.content_type.startswith("application/json")
        document = await read_json(upstream)
        assert [item["index"] for item in document["data"]] == [0, 1]
        vectors = [item["embedding"] for item in document["data"]]
        assert len(vectors[0]) == len(vectors[1]) > 0
        assert all(isinstance(x, float) for vector in vectors for x in vector)


# -- refusals and abandoned answers ------------------------------------------------------

# What each server answers to a chat body whose `messages` is not a list. No status is
# common to all: the node validates a request before any backend sees it
# (tests/e2e/test_bad_input.py), and the servers behind it check more or less. (An
# unknown model is no refusal at all: the fakes and the engine answer with their own.)
MALFORMED_STATUS = {
    "fake-openai": 200,  # the fake reads only `model` and `stream`
    "fake-ollama": 200,
    # llama.cpp throws std::invalid_argument ("Expected 'messages' to be an array"),
    # which its server answers as an invalid_request_error.
    "llama-server": 400,
    # The worker parses bodies with the node's own request models: a client's mistake
    # is a 400 naming the parameter.
    "engine": 400,
}


async def test_a_malformed_request_is_answered_not_raised(subject: Subject) -> None:
    model = await a_chat_model(subject.backend)
    body = orjson.dumps({"model": model, "messages": "hi", "max_tokens": MAX_TOKENS})
    upstream = await subject.backend.send(Operation.CHAT, body)
    try:
        assert upstream.status == MALFORMED_STATUS[subject.label]
        assert await upstream.read()
    finally:
        upstream.close()

    again = await subject.backend.send(Operation.CHAT, chat_body(model))
    assert again.status == 200
    assert (await read_json(again))["choices"][0]["message"]


async def test_closing_a_stream_midway_leaves_the_backend_serving(subject: Subject) -> None:
    model = await a_chat_model(subject.backend)
    upstream = await subject.backend.send(
        Operation.CHAT, chat_body(model, stream=True, max_tokens=64)
    )
    try:
        assert upstream.status == 200
        # Left as the relay leaves it when its client goes away: closed after a chunk,
        # its iterator abandoned.
        assert await anext(upstream.chunks())
        upstream.close()
    finally:
        upstream.close()  # a second close is as safe as the first

    again = await subject.backend.send(Operation.CHAT, chat_body(model))
    assert again.status == 200
    assert (await read_json(again))["choices"][0]["message"]


# -- when the server goes away, and closing ----------------------------------------------


async def test_a_backend_whose_server_is_gone(fresh_subject: Subject) -> None:
    backend, stop_server = fresh_subject.backend, fresh_subject.stop_server
    assert stop_server is not None
    model = await a_chat_model(backend)
    await stop_server()

    async def down() -> BackendStatus | None:
        status = await backend.probe()
        return status if status.health is Health.DOWN else None

    status = await wait_until(down, 10, f"{backend.name} to be seen down")
    assert status.reason
    with pytest.raises(BackendUnavailable):
        await backend.send(Operation.CHAT, chat_body(model))


async def test_aclose_twice(fresh_subject: Subject) -> None:
    backend = fresh_subject.backend
    assert (await backend.probe()).health is Health.HEALTHY  # its connections are open
    await backend.aclose()
    await backend.aclose()
