"""A backend that fails, stalls, breaks off or disappears: clear errors, a node that stays up.

The backend here is a small fake server (tests/fakes.py), because these are failures a
real engine cannot be made to produce on demand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest

from tests.fakes import FakeServer
from tests.support import NodeProcess, http, openai_client, start_node, wait_for

MODEL = "fake-model"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer([MODEL]).start()
    yield server
    server.close()


@pytest.fixture
def node(fake: FakeServer, tmp_path: Path) -> Iterator[NodeProcess]:
    running = start_node(
        tmp_path,
        "--no-embedded",
        "--backend",
        fake.url,
        "--name",
        "n1",
        wait_backend=f"openai@127.0.0.1:{fake.port}",
        env={"SHOAL_LIMITS__READ_TIMEOUT_S": "1.5", "SHOAL_DETECT__INTERVAL_S": "2"},
    )
    yield running
    running.stop()


def _chat(node: NodeProcess, stream: bool = False) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return http(
        "POST", node.url + "/v1/chat/completions", orjson.dumps(body),
        {"Content-Type": "application/json"},
    )  # fmt: skip


def _error(raw: bytes) -> dict[str, str]:
    return dict(orjson.loads(raw)["error"])


def test_healthy_fake_answers(node: NodeProcess) -> None:
    status, headers, raw = _chat(node)
    assert status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "hello from fake"
    assert headers["X-Shoal-Served-By"] == "n1"


@pytest.mark.parametrize("mode", ["500", "html500", "reset"])
def test_backend_failure_is_a_502(node: NodeProcess, fake: FakeServer, mode: str) -> None:
    fake.mode = mode
    status, _, raw = _chat(node)
    assert status == 502
    assert _error(raw)["type"] == "server_error"
    fake.mode = "ok"
    assert _chat(node)[0] == 200


def test_stalled_backend_is_a_504(node: NodeProcess, fake: FakeServer) -> None:
    fake.mode = "stall"
    status, _, raw = _chat(node)
    assert status == 504
    assert _error(raw)["code"] == "upstream_timeout"


def test_backend_down_is_a_503_then_comes_back(node: NodeProcess, fake: FakeServer) -> None:
    fake.stop()
    status, headers, raw = _chat(node)
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert _error(raw)["code"] == "backend_unavailable"
    # Down backends leave the model list...
    assert wait_for(
        lambda: not any(m["id"] == MODEL for m in http_json(node, "/v1/models")["data"]),
        5, "the model to leave the list",
    )  # fmt: skip
    # ...and come back by themselves when the server does.
    fake.restart()
    wait_for(lambda: _chat(node)[0] == 200, 15, "the backend to be re-probed and used")


def test_break_off_mid_stream_ends_with_an_error_event(node: NodeProcess, fake: FakeServer) -> None:
    fake.mode = "die_mid_stream"
    client = openai_client(node.url)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="broke off"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received[:2] == ["hello", " from"]


def http_json(node: NodeProcess, path: str) -> dict[str, object]:
    status, _, raw = http("GET", node.url + path)
    assert status == 200
    return dict(orjson.loads(raw))
