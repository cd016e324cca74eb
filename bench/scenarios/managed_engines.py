"""Managed engines: the same GGUF loaded on demand by llama-server vs the embedded worker.

Two `shoal serve` nodes, each with the packaged SmolLM2 (Q4_1) in a configured folder and
no embedded engine: one loads it with llama.cpp's llama-server, the other with the
embedded llama-cpp-python worker (both 2 threads, 1024 tokens, one slot). Each round
unloads the model on both, then asks each for a chat: the client's wait until the first
200 (polling every 0.1 s, not the SDK's Retry-After) and the engine's own load time
(`load_s`), with the statuses seen while it loaded; then a streamed generation of N
tokens (end-of-generation masked, temperature 0) through each node, decode speed
counted from the first token to the last.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Result, Row
from bench.processes import free_port
from tests.conftest import llama_server_command, packaged_gguf
from tests.support import NodeProcess, start_node
from tests.support import http as request

NAME = "managed_engines"
TITLE = "Managed engines: load time and decode tokens/s, llama-server vs the worker"
MODEL = "smollm2-135m-instruct:q4_1"
PROMPT = "Write a long story about a lighthouse keeper."
EOS = 2  # SmolLM2's <|im_end|>, masked so that every run generates N tokens


def _node(home: Path, folder: Path, engine: str) -> NodeProcess:
    home.mkdir()
    settings = [
        f'folders = ["{folder}"]', f'store = "{home / "hub"}"', "adopt_ollama = false",
        "adopt_lmstudio = false", "context = 1024", "parallel = 1", "threads = 2",
        "keep_alive_s = 3600",
    ]  # fmt: skip
    env: dict[str, str] = {}
    if engine == "llama-server":
        binary, env = llama_server_command()
        settings.append(f'llama_server = "{binary}"')
    else:
        env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])}
    config = home / "shoal.toml"
    config.write_text("[models]\n" + "\n".join(settings) + "\n")
    args = ("--no-embedded", "--config", str(config))
    return start_node(home, *args, wait_backend="managed", env=env, port=free_port())


def _post(node: NodeProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, raw = request(
        "POST", node.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(raw)


def _load(node: NodeProcess, seen: Counter[int]) -> tuple[float, float]:
    """Unload, then chat until answered: (client's wait, the engine's load_s)."""
    _post(node, "/shoal/v1/models/unload", {"model": MODEL})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    started = time.perf_counter()
    while True:
        status, _ = _post(node, "/v1/chat/completions", body)
        seen[status] += 1
        if status == 200:
            break
        time.sleep(0.1)  # a client polling
    waited = time.perf_counter() - started
    local = json.loads(request("GET", node.url + "/shoal/v1/models/local")[2])["data"]
    load_s = next(m["load_s"] for m in local if m["name"] == MODEL)
    return waited, float(load_s)


def _decode(node: NodeProcess, tokens: int) -> float:
    host, port = node.url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens,
            "temperature": 0,
            "seed": 1,
            "stream": True,
            "logit_bias": {str(EOS): -100},
        }
    )
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    stamps = [
        time.perf_counter()
        for line in connection.getresponse()
        if line.startswith(b"data: {") and b'"content"' in line
    ]
    connection.close()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run(quick: bool) -> Result:
    rounds, tokens = (1, 32) if quick else (5, 256)
    loads: dict[str, list[float]] = {"worker": [], "llama-server": []}
    waits: dict[str, list[float]] = {"worker": [], "llama-server": []}
    speeds: dict[str, list[float]] = {"worker": [], "llama-server": []}
    seen: dict[str, Counter[int]] = {"worker": Counter(), "llama-server": Counter()}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        folder = home / "gguf"
        folder.mkdir()
        (folder / packaged_gguf().name).symlink_to(packaged_gguf())
        nodes = {engine: _node(home / engine, folder, engine) for engine in loads}
        try:
            for node in nodes.values():  # warm: the file in the page cache
                _load(node, Counter())
                _decode(node, 8)
            for _ in range(rounds):
                for engine, node in nodes.items():
                    waited, load_s = _load(node, seen[engine])
                    waits[engine].append(waited)
                    loads[engine].append(load_s)
                    speeds[engine].append(_decode(node, tokens))
        finally:
            for node in nodes.values():
                node.stop()

    def row(metric: str, unit: str, values: dict[str, list[float]], higher: bool) -> Row:
        return Row(
            metric=metric,
            unit=unit,
            baseline_name="embedded worker",
            baseline=values["worker"],
            shoal=values["llama-server"],
            shoal_name="llama-server",
            higher_is_better=higher,
        )

    return Result(
        scenario=NAME,
        title=TITLE,
        command=f"python -m bench {NAME}{' --quick' if quick else ''}",
        rows=[
            row("engine load time (load_s)", "s", loads, higher=False),
            row("first request to first 200", "s", waits, higher=False),
            row(f"decode speed, {tokens} tokens", "tokens/s", speeds, higher=True),
        ],
        notes=[
            f"statuses while loading, {engine}: "
            + ", ".join(f"{n} × {status}" for status, n in sorted(seen[engine].items()))
            for engine in ("worker", "llama-server")
        ],
    )
