"""The embedded engine is a supervised child: cancelled with its client, restarted when it
crashes or hangs, and the node stays up meanwhile."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import SMOLLM_ID
from tests.support import NodeProcess, get_json, openai_client, start_node, wait_for

pytestmark = pytest.mark.engine


def _engine(node: NodeProcess) -> dict[str, object]:
    return node.backend("embedded")


def _client(node: NodeProcess) -> openai.OpenAI:
    return openai_client(node.url)


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node whose engine this test may break."""
    node = start_node(
        tmp_path,
        env={
            "SHOAL_ENGINE__RESTART_BACKOFF_S": "0.2",
            "SHOAL_ENGINE__HEALTH_INTERVAL_S": "0.5",
        },
    )
    yield node
    node.stop()


EOS_MASK = {"2": -100, "0": -100}  # SmolLM2's end tokens: the answer cannot end by itself


def _abandon_stream(node: NodeProcess, after_events: int, max_tokens: int = 1500) -> None:
    """Start a streamed chat, read `after_events` events, and hang up."""
    host, port = node.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {
        "model": SMOLLM_ID,
        "messages": [{"role": "user", "content": "Count from one to one thousand in words."}],
        "max_tokens": max_tokens,
        "logit_bias": EOS_MASK,
        "stream": True,
    }
    connection.request(
        "POST", "/v1/chat/completions", orjson.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    received = b""
    while received.count(b"data: ") < after_events:
        received += response.read1(4096)
    connection.close()


def test_client_disconnect_stops_generation(engine_node: NodeProcess) -> None:
    _abandon_stream(engine_node, after_events=5)

    def cancelled() -> dict[str, object] | None:
        detail = _engine(engine_node)["detail"]
        assert isinstance(detail, dict)
        last = detail.get("last_request") or {}
        done = not detail["generating"] and last.get("cancelled")
        return last if done else None

    last = wait_for(cancelled, 20, "the engine to stop the abandoned generation")
    # At ~90 tokens/s, 1500 tokens take 15 s; stopping at the next token leaves far fewer.
    assert 0 < int(last["sampled_tokens"]) < 300


def test_abandoned_streams_leave_the_engine_usable(engine_node: NodeProcess) -> None:
    for after in (1, 2, 3, 8, 1, 5):
        _abandon_stream(engine_node, after_events=after, max_tokens=40)
    answer = _client(engine_node).chat.completions.create(
        model=SMOLLM_ID,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        logit_bias=EOS_MASK,
        timeout=60,
    )
    # With the end tokens masked, the answer runs to the limit: logit_bias is applied.
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 6


def test_engine_killed_mid_stream(own_node: NodeProcess) -> None:
    pid = _engine(own_node)["detail"]["pid"]  # type: ignore[index]
    assert isinstance(pid, int)
    stream = _client(own_node).chat.completions.create(
        model=SMOLLM_ID,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=1500,
        stream=True,
    )
    received = 0
    with pytest.raises(openai.APIError, match="engine stopped"):
        for _ in stream:
            received += 1
            if received == 5:
                os.kill(pid, signal.SIGKILL)
    assert received >= 5

    # The node stays up; the engine comes back with a new process and serves again.
    assert get_json(own_node.url + "/healthz")["status"] == "ok"
    wait_for(
        lambda: _engine(own_node)["health"] == "healthy"
        and _engine(own_node)["detail"]["pid"] not in (None, pid),  # type: ignore[index]
        60, "the engine to restart",
    )  # fmt: skip
    engine = _engine(own_node)
    assert engine["detail"]["restarts"] >= 1  # type: ignore[index]
    assert "SIGKILL" in str(engine["detail"]["last_exit"])  # type: ignore[index]
    answer = _client(own_node).chat.completions.create(
        model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content


def test_requests_while_engine_down_get_503(own_node: NodeProcess) -> None:
    pid = _engine(own_node)["detail"]["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGSTOP)  # a hang: the process lives but answers nothing
    try:
        wait_for(lambda: _engine(own_node)["health"] != "healthy", 20, "the hang to be noticed")
        with pytest.raises(openai.APIStatusError) as caught:
            _client(own_node).chat.completions.create(
                model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # the supervisor killed it already
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _engine(own_node)["health"] == "healthy", 60, "the engine to restart")
    detail = _engine(own_node)["detail"]
    assert detail["pid"] != pid  # type: ignore[index]
    assert "health check" in str(detail["last_exit"])  # type: ignore[index]
