"""Several nodes on loopback ports, joined by static peers: routing, spillover, failover.

Backends are fakes (tests/fakes.py) so that each node holds exactly the models a test
needs and can be made slow; one test routes to the real embedded engine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import SMOLLM_ID
from tests.fakes import FakeServer
from tests.support import (
    NodeProcess,
    free_port,
    get_json,
    http,
    openai_client,
    start_node,
    wait_for,
)

FAST = {"SHOAL_MESH__SUSPECT_RETRY_S": "0.5"}


class Cluster:
    """Nodes on loopback that list each other as static peers."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.nodes: dict[str, NodeProcess] = {}
        self.fakes: list[FakeServer] = []

    def fake(self, *models: str) -> FakeServer:
        server = FakeServer(list(models)).start()
        self.fakes.append(server)
        return server

    def start(self, specs: dict[str, list[str]], extra_env: dict[str, str] | None = None) -> None:
        ports = {name: free_port() for name in specs}
        for name, args in specs.items():
            peers = [f"http://127.0.0.1:{p}" for n, p in ports.items() if n != name]
            env = {**FAST, "SHOAL_PEERS": json.dumps(peers), **(extra_env or {})}
            self.nodes[name] = start_node(
                self.home / name, "--name", name, *args, port=ports[name],
                wait_backend=None, env=env,
            )  # fmt: skip
        for name in specs:
            self.wait_peers(name, len(specs) - 1)

    def wait_peers(self, name: str, count: int) -> None:
        node = self.nodes[name]
        wait_for(
            lambda: sum(p["health"] == "healthy" for p in peers_of(node)) >= count,
            20, f"{name} to see {count} healthy peer(s)",
        )  # fmt: skip

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for fake in self.fakes:
            fake.close()


def peers_of(node: NodeProcess) -> list[dict[str, object]]:
    return list(get_json(node.url + "/shoal/v1/peers")["peers"])


def models_of(node: NodeProcess) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in get_json(node.url + "/v1/models")["data"]}


def chat(
    node: NodeProcess, model: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return http(
        "POST", node.url + "/v1/chat/completions", orjson.dumps(body),
        {"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = Cluster(tmp_path)
    yield built
    built.close()


def test_requests_are_routed_to_the_holder(cluster: Cluster) -> None:
    a_fake, b_fake = cluster.fake("model-a"), cluster.fake("model-b")
    cluster.start(
        {
            "a": ["--no-embedded", "--backend", a_fake.url],
            "b": ["--no-embedded", "--backend", b_fake.url],
        }
    )
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    wait_for(lambda: "model-b" in models_of(a), 10, "a to list b's model")

    status, headers, raw = chat(a, "model-b")
    assert status == 200, raw
    assert headers["X-Shoal-Served-By"] == "b"
    assert headers["X-Shoal-Route"] == "peer"
    assert len(b_fake.requests) == 1 and not a_fake.requests

    status, headers, _ = chat(b, "model-a")
    assert (status, headers["X-Shoal-Served-By"], headers["X-Shoal-Route"]) == (200, "a", "peer")

    merged = models_of(a)
    assert merged["model-a"]["nodes"] == ["a"]
    assert merged["model-b"]["nodes"] == ["b"]


def test_routing_headers_pin_and_forbid(cluster: Cluster) -> None:
    a_fake, b_fake = cluster.fake("shared"), cluster.fake("shared", "only-b")
    cluster.start(
        {
            "a": ["--no-embedded", "--backend", a_fake.url],
            "b": ["--no-embedded", "--backend", b_fake.url],
        }
    )
    a = cluster.nodes["a"]
    wait_for(lambda: "only-b" in models_of(a), 10, "a to list b's models")
    # Pinned to b, a request b can serve goes there even though a could serve it.
    status, headers, _ = chat(a, "shared", {"X-Shoal-Node": "b"})
    assert (status, headers["X-Shoal-Served-By"]) == (200, "b")
    # Local-only: never forwarded.
    status, _, raw = chat(a, "only-b", {"X-Shoal-Local-Only": "1"})
    assert status == 404, raw
    # A request that already made its hop is never forwarded again: no loops.
    status, _, raw = chat(a, "only-b", {"X-Shoal-Hop": "1"})
    assert status == 404
    assert "this node" in orjson.loads(raw)["error"]["message"]
    assert len(b_fake.requests) == 1  # only the pinned one


def test_spillover_under_load(cluster: Cluster) -> None:
    a_fake, b_fake = cluster.fake("slow"), cluster.fake("slow")
    a_fake.delay_s = b_fake.delay_s = 1.0
    env = {"SHOAL_ROUTING__SPILLOVER_MAX_LOCAL_IN_FLIGHT": "1"}
    cluster.start(
        {
            "a": ["--no-embedded", "--backend", a_fake.url],
            "b": ["--no-embedded", "--backend", b_fake.url],
        },
        env,
    )
    a = cluster.nodes["a"]
    wait_for(lambda: sorted(models_of(a)["slow"]["nodes"]) == ["a", "b"], 10, "b's model at a")
    # Idle: served locally.
    assert chat(a, "slow")[1]["X-Shoal-Served-By"] == "a"
    # Busy: the second concurrent request spills to b, which is idle.
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda _: chat(a, "slow")[1]["X-Shoal-Served-By"], range(4)))
    assert "a" in served and "b" in served, served


def test_retry_when_a_peer_is_killed(cluster: Cluster) -> None:
    b_fake, c_fake = cluster.fake("m"), cluster.fake("m")
    cluster.start(
        {
            "a": ["--no-embedded"],
            "b": ["--no-embedded", "--backend", b_fake.url],
            "c": ["--no-embedded", "--backend", c_fake.url],
        }
    )
    a = cluster.nodes["a"]
    wait_for(lambda: sorted(models_of(a).get("m", {}).get("nodes") or []) == ["b", "c"], 10, "m")
    cluster.nodes["b"].process.send_signal(signal.SIGKILL)
    cluster.nodes["b"].process.wait()
    killed_at = time.monotonic()
    # No request that had not started fails: each goes to c, at once or after b fails.
    results = [chat(a, "m") for _ in range(6)]
    assert [status for status, _, _ in results] == [200] * 6
    assert {headers["X-Shoal-Served-By"] for _, headers, _ in results} == {"c"}
    routes = [headers["X-Shoal-Route"] for _, headers, _ in results]
    assert set(routes) <= {"peer", "retried"}
    # b is suspect at the first failed connection, so at most one request paid a retry.
    assert routes.count("retried") <= 1
    wait_for(
        lambda: next(p for p in peers_of(a) if p["name"] == "b")["health"] != "healthy",
        5, "a to stop trusting b",
    )  # fmt: skip
    assert time.monotonic() - killed_at < 5


def test_peer_dying_mid_stream_ends_with_an_error_event(cluster: Cluster) -> None:
    b_fake = cluster.fake("m")
    b_fake.chunk_gap_s = 0.3
    b_fake.words = tuple(f" w{i}" for i in range(20))
    cluster.start({"a": ["--no-embedded"], "b": ["--no-embedded", "--backend", b_fake.url]})
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    wait_for(lambda: "m" in models_of(a), 10, "a to list b's model")
    client = openai_client(a.url)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = 0
    with pytest.raises(openai.APIError):
        for _ in stream:
            received += 1
            if received == 3:
                os.kill(b.process.pid, signal.SIGKILL)
    assert 3 <= received < 20


def test_clean_shutdown_leaves_peers_within_a_second(cluster: Cluster) -> None:
    cluster.start({"a": ["--no-embedded"], "b": ["--no-embedded"]})
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    b.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(
        lambda: next(p for p in peers_of(a) if p["name"] == "b")["health"] == "unreachable",
        1.0, "a to drop b after its goodbye",
    )  # fmt: skip
    assert time.monotonic() - stopped <= 1.0
    b.process.wait(10)


def test_embedded_engine_on_a_peer(cluster: Cluster) -> None:
    cluster.start({"engine": [], "front": ["--no-embedded"]})
    front = cluster.nodes["front"]
    wait_for(lambda: SMOLLM_ID in models_of(front), 60, "the engine's model to be listed")
    client = openai_client(front.url)
    raw = client.chat.completions.with_raw_response.create(
        model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert raw.headers["x-shoal-served-by"] == "engine"
    assert raw.parse().choices[0].message.content
