"""Managed engines, end to end (issue 10, item 3): a real `shoal serve`, real GGUFs in a
configured folder, loaded on demand by a real llama-server and by the embedded worker.

Two distinct models: the packaged SmolLM2 (Q4_1) and its F16 re-quantization
(`f16_gguf`). Each test starts its own node with the embedded engine off, so the only
models it serves are the folder's, through the managed engines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import llama_server_command, packaged_gguf
from tests.support import NodeProcess, get_json, http, start_node, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.timeout(180)]

Q4 = "smollm2-135m-instruct:q4_1"
F16 = "smollm2:f16"
ENGINES = ["llama-server", "worker"]
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


@pytest.fixture
def folder(tmp_path: Path, f16_gguf: Path) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / packaged_gguf().name).symlink_to(packaged_gguf())
    (folder / f16_gguf.name).symlink_to(f16_gguf)
    return folder


StartNode = Callable[..., NodeProcess]


@pytest.fixture
def managed_node(tmp_path: Path, folder: Path) -> Iterator[StartNode]:
    """`start(engine, **models_settings)`: a node serving `folder` through that engine."""
    nodes: list[NodeProcess] = []

    def start(engine: str, **models: Any) -> NodeProcess:
        home = tmp_path / f"node{len(nodes)}"
        home.mkdir()
        settings: dict[str, Any] = {
            "store": str(home / "hub"),
            "folders": [str(folder)],
            "adopt_ollama": False,
            "adopt_lmstudio": False,
            "context": 1024,
            "parallel": 2,
            **models,
        }
        env: dict[str, str] = {}
        if engine == "llama-server":
            binary, env = llama_server_command()
            settings["llama_server"] = str(binary)
        else:  # no llama-server to be found: the worker serves
            env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])}
        config = home / "shoal.toml"
        lines = "".join(f"{key} = {_toml(value)}\n" for key, value in settings.items())
        config.write_text("[models]\n" + lines)
        node = start_node(
            home, "--no-embedded", "--config", str(config), wait_backend="managed", env=env
        )
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def local(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in get_json(node.url + "/shoal/v1/models/local")["data"]}


def post(node: NodeProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = http(
        "POST", node.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return status, headers, json.loads(raw)


def chat(node: NodeProcess, model: str) -> tuple[int, dict[str, str], Any]:
    return post(node, "/v1/chat/completions", {"model": model, **CHAT})


def sdk_chat(node: NodeProcess, model: str) -> tuple[Any, list[tuple[int, str | None]]]:
    """A chat through the official SDK, which retries 503s by itself; what it saw."""
    seen: list[tuple[int, str | None]] = []

    def hook(response: Any) -> None:
        seen.append((response.status_code, response.headers.get("Retry-After")))

    with openai.OpenAI(
        base_url=node.url + "/v1",
        api_key="x",
        max_retries=8,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [hook]}),
    ) as client:
        completion = client.chat.completions.create(model=model, **CHAT)  # type: ignore[call-overload]
    return completion, seen


def wait_loaded(node: NodeProcess, model: str, loaded: bool = True) -> dict[str, Any]:
    def row() -> dict[str, Any] | None:
        found = local(node)[model]
        return found if found["loaded"] is loaded else None

    return wait_for(row, 60, f"{model} to be {'loaded' if loaded else 'unloaded'}")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_gguf_in_a_folder_is_listed_then_loaded_on_demand(
    managed_node: StartNode, engine: str
) -> None:
    node = managed_node(engine)
    listed = {m["id"]: m for m in get_json(node.url + "/v1/models")["data"]}
    assert listed[Q4]["loaded"] is False
    assert listed[Q4]["backends"] == ["managed"]
    assert (listed[Q4]["quantization"], listed[Q4]["context_length"]) == ("Q4_1", 1024)
    row = local(node)[Q4]
    assert (row["store"], row["state"], row["loaded"], row["engine"]) == (
        "folder", "unloaded", False, engine,
    )  # fmt: skip
    assert row["path"].endswith(packaged_gguf().name)

    status, headers, answer = chat(node, Q4)
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert answer["error"]["code"] == "model_loading"
    assert f"model '{Q4}' is loading ({engine}): about" in answer["error"]["message"]

    completion, seen = sdk_chat(node, Q4)  # retried by the SDK until loaded
    assert completion.model == Q4
    assert completion.choices[0].message.content
    assert seen[-1] == (200, None)
    assert all(status == 503 and retry for status, retry in seen[:-1])

    row = local(node)[Q4]
    assert (row["state"], row["loaded"]) == ("ready", True)
    assert row["memory_bytes"] > 50 * 1024 * 1024  # the engine's resident memory
    assert row["load_s"] > 0
    assert get_json(node.url + "/shoal/v1/status")["backends"][0]["detail"]["capacity"] == (
        2 if engine == "llama-server" else 1
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_max_loaded_unloads_the_least_recently_used(managed_node: StartNode, engine: str) -> None:
    node = managed_node(engine, max_loaded=1)
    sdk_chat(node, Q4)
    pid = local(node)[Q4]["pid"]
    sdk_chat(node, F16)  # one at a time: Q4 makes room
    rows = local(node)
    assert (rows[Q4]["state"], rows[F16]["state"]) == ("unloaded", "ready")
    wait_for(lambda: not _alive(pid), 10, "the evicted engine to exit")
    listed = {m["id"]: m["loaded"] for m in get_json(node.url + "/v1/models")["data"]}
    assert listed == {Q4: False, F16: True}


@pytest.mark.parametrize("engine", ENGINES)
def test_an_idle_model_unloads_after_its_keep_alive(managed_node: StartNode, engine: str) -> None:
    node = managed_node(engine, keep_alive_per_model={Q4: 1.0})
    sdk_chat(node, Q4)
    pid = local(node)[Q4]["pid"]
    started = time.monotonic()
    wait_loaded(node, Q4, loaded=False)
    assert time.monotonic() - started >= 0.9
    wait_for(lambda: not _alive(pid), 10, "its engine to exit")
    assert local(node)[Q4]["keep_alive_s"] == 1.0
    assert local(node)[F16]["keep_alive_s"] == 300.0


def test_a_model_too_large_for_memory_is_refused_clearly(managed_node: StartNode) -> None:
    node = managed_node("llama-server", memory_limit_bytes=64 * 1024 * 1024)
    status, headers, answer = chat(node, Q4)
    assert status == 400
    assert "Retry-After" not in headers
    error = answer["error"]
    assert (error["code"], error["param"]) == ("model_too_large", "model")
    assert f"model '{Q4}' cannot be loaded on this node: it needs" in error["message"]
    assert "models.memory_limit_bytes allows 64 MiB" in error["message"]
    assert local(node)[Q4]["state"] == "unloaded"
    with pytest.raises(openai.BadRequestError, match="cannot be loaded"):
        sdk_chat(node, Q4)


def test_operator_load_and_unload(managed_node: StartNode) -> None:
    node = managed_node("llama-server")
    status, _, row = post(node, "/shoal/v1/models/load", {"model": Q4})
    assert status == 200
    assert (row["name"], row["state"], row["loaded"]) == (Q4, "ready", True)
    assert local(node)[Q4]["loaded"] is True
    status, _, answer = chat(node, Q4)
    assert status == 200  # no 503: it was loaded ahead
    status, _, row = post(node, "/shoal/v1/models/unload", {"model": Q4})
    assert (status, row["state"], row["loaded"]) == (200, "unloaded", False)

    status, _, answer = post(node, "/shoal/v1/models/load", {"model": "../../etc/passwd"})
    assert (status, answer["error"]["param"]) == (400, "model")
    status, _, answer = post(node, "/shoal/v1/models/load", {"model": "no-such:q4"})
    assert (status, answer["error"]["code"]) == (404, "model_not_found")
    status, _, answer = post(node, "/shoal/v1/models/load", {"name": Q4})
    assert status == 400


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
