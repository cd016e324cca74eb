"""The Ollama adapter, and finding local servers on their standard ports by itself.

Ollama has no installable binary here, so its adapter is tested against a fake that
follows Ollama's documented API (tests/fakes.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes import FakeServer
from tests.support import NodeProcess, get_json, openai_client, start_node, wait_for

CHAT_MODEL = "llama3:8b-instruct-q4_K_M"
EMBED_MODEL = "nomic-embed-text:latest"


@pytest.fixture
def ollama() -> Iterator[FakeServer]:
    server = FakeServer([CHAT_MODEL, EMBED_MODEL], ollama=True).start()
    yield server
    server.close()


def _models(node: NodeProcess) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in get_json(node.url + "/v1/models")["data"]}


def test_ollama_backend(ollama: FakeServer, tmp_path: Path) -> None:
    node = start_node(
        tmp_path, "--no-embedded", "--ollama", ollama.url,
        wait_backend=f"ollama@127.0.0.1:{ollama.port}",
    )  # fmt: skip
    try:
        models = _models(node)
        assert models[CHAT_MODEL]["loaded"] is True  # listed by /api/ps
        assert models[EMBED_MODEL]["loaded"] is False
        assert models[CHAT_MODEL]["quantization"] == "Q4_K_M"
        assert models[CHAT_MODEL]["context_length"] == 4096
        assert models[EMBED_MODEL]["operations"] == ["embeddings"]

        client = openai_client(node.url)
        answer = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "hello from fake"
        pieces = [
            c.choices[0].delta.content
            for c in client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if c.choices and c.choices[0].delta.content
        ]
        assert "".join(pieces) == "hello from fake"
        vectors = client.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
        assert len(vectors.data) == 2
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=CHAT_MODEL, input="chat models do not embed")
        assert [r["model"] for r in ollama.requests] == [CHAT_MODEL, CHAT_MODEL]
    finally:
        node.stop()


def test_local_servers_are_detected_and_come_and_go(ollama: FakeServer, tmp_path: Path) -> None:
    other = start_node(tmp_path / "other", "--no-embedded", wait_backend=None)
    other_port = int(other.url.rsplit(":", 1)[1])
    ports = [{"port": ollama.port, "kind": "ollama"}, {"port": other_port, "kind": "openai"}]
    node = start_node(
        tmp_path / "node", "--no-embedded", "--detect",
        wait_backend=f"ollama@127.0.0.1:{ollama.port}",
        env={"SHOAL_DETECT__PORTS": json.dumps(ports), "SHOAL_DETECT__INTERVAL_S": "1"},
    )  # fmt: skip
    try:
        backends = node.status()["backends"]
        assert [b["detected"] for b in backends] == [True]  # another Shoal node is no backend
        assert CHAT_MODEL in _models(node)

        ollama.stop()
        wait_for(lambda: CHAT_MODEL not in _models(node), 10, "the model to leave the list")
        ollama.restart()
        wait_for(lambda: CHAT_MODEL in _models(node), 10, "the server to be found again")
    finally:
        node.stop()
        other.stop()
