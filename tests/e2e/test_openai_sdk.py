"""The official `openai` SDK against a real `shoal serve`, on every kind of real backend.

One contract, run against the embedded engine and against a real llama.cpp
llama-server behind Shoal: whatever serves the tokens, clients see the same API.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import openai
import pytest

from tests.conftest import LLAMA_SERVER_ALIAS, MINILM_ID, SMOLLM_ID
from tests.support import NodeProcess, openai_client

pytestmark = pytest.mark.engine


@dataclass
class Target:
    node: NodeProcess
    chat_model: str
    embedding_model: str
    embedding_dim: int

    def client(self) -> openai.OpenAI:
        return openai_client(self.node.url)


@pytest.fixture(params=["embedded", "llama-server"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "embedded":
        return Target(request.getfixturevalue("engine_node"), SMOLLM_ID, MINILM_ID, 384)
    node = request.getfixturevalue("llama_node")
    return Target(node, LLAMA_SERVER_ALIAS, LLAMA_SERVER_ALIAS, 576)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_models_lists_the_backend_models(target: Target) -> None:
    raw = target.client().models.with_raw_response.list()
    ids = {m.id for m in raw.parse().data}
    assert target.chat_model in ids
    assert target.embedding_model in ids
    assert raw.headers["x-shoal-served-by"]


def test_chat_completion(target: Target) -> None:
    raw = target.client().chat.completions.with_raw_response.create(
        model=target.chat_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.usage.prompt_tokens > 5
    assert raw.headers["x-shoal-served-by"]
    assert raw.headers["x-shoal-route"] == "local"


def test_chat_with_text_content_parts(target: Target) -> None:
    """OpenAI's content parts: a message's text parts read as their text joined by
    newlines, so at temperature 0 the answer is the one to that text as a string."""
    client = target.client()
    question = ["What is the capital", "of France?"]

    def ask(content: object, system: object) -> str | None:
        completion = client.chat.completions.create(
            model=target.chat_model,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": content},
            ],
            max_tokens=8,
            temperature=0,
        )
        return completion.choices[0].message.content

    answer = ask(
        [{"type": "text", "text": t} for t in question], [{"type": "text", "text": "Be brief."}]
    )
    assert answer
    assert answer == ask("\n".join(question), "Be brief.")


def test_chat_stream_arrives_incrementally_with_usage(target: Target) -> None:
    stream = target.client().chat.completions.create(
        model=target.chat_model,
        messages=[{"role": "user", "content": "Write a long story about a fox."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 10, pieces
    # A buffering proxy would deliver every chunk in one burst at the end; token by
    # token, the first chunk arrives while the rest are still being generated.
    assert arrivals[-1] - arrivals[0] > 0.1
    assert len({round(t, 3) for t in arrivals}) > len(arrivals) // 2
    assert usage is not None
    assert 0 < usage.completion_tokens <= 48
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion(target: Target) -> None:
    completion = target.client().completions.create(
        model=target.chat_model, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8


def test_embeddings(target: Target) -> None:
    client = target.client()
    sentence = "The quick brown fox jumps over the lazy dog."
    first = client.embeddings.create(model=target.embedding_model, input=sentence)
    again = client.embeddings.create(model=target.embedding_model, input=sentence)
    batch = client.embeddings.create(
        model=target.embedding_model, input=[sentence, "Stock markets fell sharply today."]
    )
    vector = first.data[0].embedding
    assert len(vector) == target.embedding_dim
    assert _cosine(vector, again.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    # (llama-server embeds a batch with a generative model slightly differently from a
    # single input, so the batch is compared for order and distinctness only.)
    assert [d.index for d in batch.data] == [0, 1]
    assert _cosine(batch.data[0].embedding, batch.data[1].embedding) < 0.95


def test_embeddings_float_format(target: Target) -> None:
    result = target.client().embeddings.create(
        model=target.embedding_model, input="hello", encoding_format="float"
    )
    assert len(result.data[0].embedding) == target.embedding_dim


def test_unknown_model_is_a_404(target: Target) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        target.client().chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
