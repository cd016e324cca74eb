"""`shoal models --local | rm | load | unload`, run as a person runs them.

The stores lie under a tmp HOME. The node's operator API is stood in for by a small
HTTP server that records what it is asked and answers in the node's shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal.cli.app import app
from tests.models import (
    PACKAGED_NAME,
    REQUANTIZED_FILE,
    REQUANTIZED_NAME,
    hf_store,
    ollama_store,
    packaged_gguf,
    requantized_gguf,
    store_environment,
)
from tests.support import clean_env, free_port

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
HOSTILE = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\x",
    "qwen\u0430:0.5b",
    "a\x1b[31mred",
    "two words",
    "a//b",
]


def shoal(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**clean_env(home), **store_environment(home), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=60,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    hf_store(home / ".cache" / "huggingface" / "hub", REPO, {REQUANTIZED_FILE: requantized_gguf()})
    ollama_store(home / ".ollama" / "models", {"smollm2:135m": packaged_gguf()})
    return home


class FakeNode:
    """The node's operator API for models: what it was asked, what it answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.url = ""

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        if method == "GET" and path == "/shoal/v1/models/local":
            entry = {"name": REQUANTIZED_NAME, "loaded": True, "state": "ready"}
            idle = {"name": "smollm2:135m", "loaded": False, "state": "unloaded"}
            return 200, {"data": [{**entry, "memory_bytes": 300_000_000}, idle]}
        if method == "POST" and path in ("/shoal/v1/models/load", "/shoal/v1/models/unload"):
            if body.get("model") == "missing:q4_0":
                error = {"message": "no model named missing:q4_0", "type": "invalid_request_error"}
                return 404, {"error": {**error, "code": "model_not_found", "param": "model"}}
            return 200, {
                "model": body["model"],
                "loaded": path.endswith("/load"),
                "memory_bytes": 42,
            }
        return 404, {"error": {"message": "unknown path"}}


@pytest.fixture
def node() -> Iterator[FakeNode]:
    fake = FakeNode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(*fake.answer("GET", self.path, None))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._reply(*fake.answer("POST", self.path, body))

        def _reply(self, status: int, document: Any) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_local_lists_the_disk_without_a_node(home: Path) -> None:
    listed = shoal(home, "models", "--local", "--json", "--url", nowhere())
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    rows = {row["name"]: row for row in document["data"]}
    assert set(rows) == {REQUANTIZED_NAME, "smollm2:135m"}
    assert rows[REQUANTIZED_NAME]["store"] == "hf" and rows[REQUANTIZED_NAME]["writable"]
    assert rows[REQUANTIZED_NAME]["names"] == [REQUANTIZED_NAME, f"{REPO}/{REQUANTIZED_FILE}"]
    assert rows["smollm2:135m"]["quantization"] == "Q4_1"
    assert rows["smollm2:135m"]["context_length"] == 8192
    assert all(row["loaded"] is None for row in rows.values())
    assert document["node_answered"] is False and "no node answers" in document["note"]

    table = shoal(home, "models", "--local", "--url", nowhere())
    assert table.returncode == 0, table.stderr
    assert REQUANTIZED_NAME in table.stdout and "ollama (adopted)" in table.stdout
    assert "145 MB" in table.stdout and "llama" in table.stdout
    assert "loaded state unknown" in table.stderr


def test_local_shows_what_the_node_has_loaded(home: Path, node: FakeNode) -> None:
    listed = shoal(home, "models", "--local", "--json", "--url", node.url)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["data"]}
    assert rows[REQUANTIZED_NAME]["loaded"] is True
    assert rows[REQUANTIZED_NAME]["memory_bytes"] == 300_000_000
    assert rows["smollm2:135m"]["loaded"] is False
    table = shoal(home, "models", "--local", "--url", node.url)
    assert "300 MB" in table.stdout and "ready" in table.stdout and "unloaded" in table.stdout


def test_rm_removes_from_the_store_after_asking(home: Path) -> None:
    declined = shoal(home, "models", "rm", REQUANTIZED_NAME, stdin="n\n")
    assert declined.returncode == 1 and "nothing removed" in declined.stderr
    assert "Delete" in declined.stderr  # the question goes to stderr, not into --json
    removed = shoal(home, "models", "rm", REQUANTIZED_NAME.upper(), stdin="y\n")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {REQUANTIZED_NAME}" in removed.stdout
    assert requantized_gguf().exists()
    names = {row["name"] for row in _local(home)}
    assert names == {"smollm2:135m"}


def test_rm_yes_json(home: Path) -> None:
    removed = shoal(home, "models", "rm", f"{REPO}/{REQUANTIZED_FILE}", "--yes", "--json")
    assert removed.returncode == 0, removed.stderr
    document = json.loads(removed.stdout)
    assert document["model"] == REQUANTIZED_NAME
    assert document["freed_bytes"] == requantized_gguf().stat().st_size
    assert not (
        home
        / ".cache"
        / "huggingface"
        / "hub"
        / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    ).exists()


def test_rm_refuses_adopted_stores_and_unknown_names(home: Path) -> None:
    adopted = shoal(home, "models", "rm", "smollm2:135m", "--yes")
    assert adopted.returncode == 1
    assert "read-only" in adopted.stderr and "ollama rm smollm2:135m" in adopted.stderr
    assert (home / ".ollama" / "models" / "manifests").exists()
    unknown = shoal(home, "models", "rm", "nothing:q4_0", "--yes")
    assert unknown.returncode == 1 and "no model named nothing:q4_0" in unknown.stderr
    assert {row["name"] for row in _local(home)} == {REQUANTIZED_NAME, "smollm2:135m"}


def test_hostile_names_are_refused_before_anything_happens(
    home: Path, node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {**clean_env(home), **store_environment(home)}.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    for name in HOSTILE:  # in this process: a subprocess each would take a minute
        rm, load, unload = (["rm", name, "--yes"], ["load", name], ["unload", name])
        for command in (rm, [*load, "--url", node.url], [*unload, "--url", node.url]):
            result = runner.invoke(app, ["models", *command])
            assert result.exit_code == 2, (command, result.output)
            assert "invalid model name" in result.stderr and "\x1b" not in result.stderr
    assert node.requests == []  # nothing reached the node
    assert len(_local(home)) == 2
    # And once as a person runs it.
    run = shoal(home, "models", "rm", "../../etc/passwd", "--yes")
    assert run.returncode == 2 and "contains '..'" in run.stderr


def test_load_and_unload_ask_the_node(home: Path, node: FakeNode) -> None:
    loaded = shoal(home, "models", "load", PACKAGED_NAME, "--url", node.url)
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded {PACKAGED_NAME}" in loaded.stdout
    unloaded = shoal(home, "models", "unload", PACKAGED_NAME, "--json", "--url", node.url)
    assert unloaded.returncode == 0, unloaded.stderr
    assert json.loads(unloaded.stdout)["loaded"] is False
    assert node.requests == [
        ("POST", "/shoal/v1/models/load", {"model": PACKAGED_NAME}),
        ("POST", "/shoal/v1/models/unload", {"model": PACKAGED_NAME}),
    ]


def test_load_prints_the_nodes_error(home: Path, node: FakeNode) -> None:
    refused = shoal(home, "models", "load", "missing:q4_0", "--url", node.url)
    assert refused.returncode == 1
    assert "did not load missing:q4_0: no model named missing:q4_0" in refused.stderr


def test_load_without_a_node_says_so(home: Path) -> None:
    result = shoal(home, "models", "load", PACKAGED_NAME, "--url", nowhere())
    assert result.returncode == 3 and "no Shoal node answers" in result.stderr


def _local(home: Path) -> list[dict[str, Any]]:
    listed = shoal(home, "models", "--local", "--json", "--url", nowhere())
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)["data"]
    return rows
