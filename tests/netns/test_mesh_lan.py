"""Three Shoal nodes on a real LAN of network namespaces, finding each other by mDNS alone.

n1 runs the embedded engine; n2 fronts a real llama-server (started in its namespace);
n3 holds no model and is where clients come in. Nothing is configured but `--lan`: no
static peers. The tests run in order on one cluster and print what they measure
(discovery time, time from SIGKILL to no routing). Every process and namespace is torn
down when the module ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal.trust.keys import KeyStore
from shoal.trust.secret import new_secret, write_secret
from tests.conftest import LLAMA_SERVER_ALIAS, SMOLLM_ID, llama_server_command
from tests.netns.lan import Host, Lan, netns_available

pytestmark = [pytest.mark.netns, pytest.mark.engine]

PORT = 11450
LLAMA_PORT = 18081
ALIASES = {"smol": [SMOLLM_ID, LLAMA_SERVER_ALIAS]}
HERE = Path(__file__).parent
CLUSTER_SECRET = new_secret()


class Agent:
    """tests/netns/agent.py inside a namespace: our HTTP client on the LAN."""

    def __init__(self, lan: Lan, host: Host) -> None:
        self.process = lan.run(host, [sys.executable, str(HERE / "agent.py")], pipes=True)
        self.api_keys: dict[str, str] = {}  # node URL -> the API key it gave this client

    def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        key = next((k for base, k in self.api_keys.items() if url.startswith(base + "/")), None)
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        request = {"method": method, "url": url, "headers": headers, "timeout": timeout}
        if body is not None:
            request["body"] = json.dumps(body)
            request["headers"] = {"Content-Type": "application/json", **(headers or {})}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def json(self, url: str) -> Any:
        answer = self.call("GET", url, timeout=5)
        if answer.get("status") != 200:
            return None
        return json.loads(answer["body"])


@dataclass
class Node:
    name: str
    host: Host
    home: Path
    args: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{PORT}"


@dataclass
class Cluster:
    lan: Lan
    agent_host: Host
    agent: Agent
    nodes: dict[str, Node]
    figures: dict[str, float] = field(default_factory=dict)

    def start(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        # A secured cluster: every node holds the same cluster secret (`shoal join --token`
        # puts it in the same place); they admit each other by challenge-response.
        write_secret(node.home / "data", CLUSTER_SECRET)
        # The client is on the LAN: it needs an API key from each node (`shoal keys create`).
        if node.url not in self.agent.api_keys:
            keys = KeyStore.in_data_dir(node.home / "data")
            self.agent.api_keys[node.url] = keys.create("netns-agent")[1]
        env = {
            "XDG_CONFIG_HOME": str(node.home / "config"),
            "SHOAL_ROUTING__MODEL_ALIASES": json.dumps(ALIASES),
            "PYTHONUNBUFFERED": "1",
            **node.env,
        }
        command = [
            sys.executable, "-m", "shoal", "serve", "--lan", "--port", str(PORT),
            "--name", node.name, "--data-dir", str(node.home / "data"), "--no-detect",
            *node.args,
        ]  # fmt: skip
        node.started = time.monotonic()
        with (node.home / "node.log").open("ab") as log:
            log.write(b"---- start ----\n")
        node.process = self.lan.run(node.host, command, env=env, log=node.home / "node.log")

    def peers_of(self, name: str) -> dict[str, dict[str, Any]]:
        document = self.agent.json(self.nodes[name].url + "/shoal/v1/peers")
        return {p["name"]: p for p in (document or {"peers": []})["peers"]}

    def health(self, viewer: str, peer: str) -> str | None:
        found = self.peers_of(viewer).get(peer)
        return None if found is None else str(found["health"])

    def chat(self, name: str, model: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return self.agent.call("POST", self.nodes[name].url + "/v1/chat/completions", body, headers)


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll `condition` until true; return when it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, f16_gguf: Path) -> Iterator[Cluster]:
    reason = netns_available()
    if reason is not None:
        if os.environ.get("SHOAL_REQUIRE_NETNS"):
            pytest.fail(f"network namespace tests cannot run: {reason}")
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("lan")
    binary, env = llama_server_command()
    with Lan() as lan:
        h1, h2, h3, hc = (lan.add_host(n) for n in ("n1", "n2", "n3", "client"))
        lan.run(
            h2,
            [str(binary), "-m", str(f16_gguf), "--alias", LLAMA_SERVER_ALIAS,
             "--host", "127.0.0.1", "--port", str(LLAMA_PORT), "-t", "1", "-tb", "2"],
            env=env, log=home / "llama-server.log",
        )  # fmt: skip
        nodes = {
            "n1": Node("n1", h1, home / "n1", ()),
            "n2": Node(
                "n2", h2, home / "n2",
                ("--no-embedded", "--backend", f"http://127.0.0.1:{LLAMA_PORT}"),
            ),
            "n3": Node("n3", h3, home / "n3", ("--no-embedded",)),
        }  # fmt: skip
        built = Cluster(lan, hc, Agent(lan, hc), nodes)
        try:
            yield built
        finally:
            lan.teardown()
            built.agent.close()
            print("\nmeasured on the namespace LAN:")
            for key, value in built.figures.items():
                print(f"  {key}: {value:.2f} s")
            for node in nodes.values():
                log = (node.home / "node.log").read_text(errors="replace")[-3000:]
                print(f"--- {node.name} log (tail) ---\n{log}")


def test_nodes_find_each_other_by_mdns_alone(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        cluster.start(node)
    started = min(n.started for n in cluster.nodes.values())
    names = set(cluster.nodes)
    seen: dict[str, float] = {}  # when each node first saw all the others healthy
    deadline = time.monotonic() + 60
    while len(seen) < len(names) and time.monotonic() < deadline:
        for viewer in names - set(seen):
            if all(cluster.health(viewer, other) == "healthy" for other in names - {viewer}):
                seen[viewer] = time.monotonic()
        time.sleep(0.05)
    assert set(seen) == names, f"only {sorted(seen)} saw every other node within 60 s"
    for viewer, when in sorted(seen.items()):
        last_start = max(cluster.nodes[n].started for n in names - {viewer})
        cluster.figures[f"discovery: last peer's start → all healthy at {viewer}"] = (
            when - last_start
        )

    # Routable: n3 (no models of its own) lists both holders' models.
    def listed_at_n3() -> set[str]:
        document = cluster.agent.json(cluster.nodes["n3"].url + "/v1/models") or {"data": []}
        return {m["id"] for m in document["data"]}

    routable = wait_until(
        lambda: {SMOLLM_ID, LLAMA_SERVER_ALIAS} <= listed_at_n3(), 60, "n3 to list the models"
    )
    cluster.figures["start → all three routable from n3 (incl. engine load)"] = routable - started
    sources = {p["sources"][0] for p in cluster.peers_of("n3").values()}
    assert sources <= {"mdns", "peer"}, sources  # nothing was configured


def test_requests_are_served_by_the_holder(cluster: Cluster) -> None:
    answer = cluster.chat("n3", SMOLLM_ID)
    assert answer["status"] == 200, answer
    assert answer["headers"]["X-Shoal-Served-By"] == "n1"
    assert answer["headers"]["X-Shoal-Route"] == "peer"
    answer = cluster.chat("n3", LLAMA_SERVER_ALIAS)
    assert (answer["status"], answer["headers"]["X-Shoal-Served-By"]) == (200, "n2")
    answer = cluster.chat("n1", LLAMA_SERVER_ALIAS)
    assert (answer["status"], answer["headers"]["X-Shoal-Served-By"]) == (200, "n2")


def test_delay_and_loss_cause_no_false_removal(cluster: Cluster) -> None:
    n1 = cluster.nodes["n1"].host
    cluster.lan.netem(n1, delay_ms=150, jitter_ms=50, loss_pct=10)
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            for viewer in ("n2", "n3"):
                assert cluster.health(viewer, "n1") != "unreachable", f"{viewer} dropped n1"
            time.sleep(0.5)
        answer = cluster.chat("n3", SMOLLM_ID)
        assert (answer.get("status"), answer["headers"]["X-Shoal-Served-By"]) == (200, "n1")
    finally:
        cluster.lan.clear_netem(n1)


def test_a_spoofed_advert_gets_no_trust(cluster: Cluster) -> None:
    """Someone on the LAN advertises n3's node ID at its own address."""
    n3 = cluster.peers_of("n1")["n3"]
    client = cluster.agent_host
    spoofer = cluster.lan.run(
        client,
        [sys.executable, str(HERE / "probe.py"), "mdns-register", "--service-type",
         "_shoal._tcp.local.", "--name", f"evil-{n3['node_id'][:8]}", "--ip", client.ip,
         "--port", str(PORT), "--txt", "v=1", "--txt", f"id={n3['node_id']}",
         "--txt", f"port={PORT}", "--txt", "m=secret"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for viewer in ("n1", "n2"):
                seen = cluster.peers_of(viewer)["n3"]
                assert seen["health"] == "healthy", f"{viewer} lost n3 to a spoofed advert"
                assert seen["address"] == n3["address"], f"{viewer} moved n3 to {seen['address']}"
            time.sleep(0.3)
        # Requests keep flowing to n2 through n3's neighbours as before.
        answer = cluster.chat("n3", LLAMA_SERVER_ALIAS)
        assert (answer["status"], answer["headers"]["X-Shoal-Served-By"]) == (200, "n2")
    finally:
        cluster.lan.stop(spoofer)


def test_sigkill_loses_no_request_and_peers_stop_routing(cluster: Cluster) -> None:
    n2 = cluster.nodes["n2"]
    assert n2.process is not None
    for _ in range(4):  # both holders of "smol" serve it while both are up
        assert cluster.chat("n3", "smol")["status"] == 200
    os.kill(n2.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    served, stopped = [], None
    for _ in range(8):  # requests keep coming; n3 must stop choosing n2 after one failure
        served.append(cluster.chat("n3", "smol"))
        if stopped is None and cluster.health("n3", "n2") != "healthy":
            stopped = time.monotonic()
    assert [a.get("status") for a in served] == [200] * 8, served
    assert {a["headers"]["X-Shoal-Served-By"] for a in served} == {"n1"}
    assert stopped is not None, "n3 still trusts n2 after 8 requests"
    cluster.figures["SIGKILL → n3 (sending requests) stops routing to it"] = stopped - killed
    stopped = wait_until(lambda: cluster.health("n1", "n2") != "healthy", 30, "n1 to drop n2")
    cluster.figures["SIGKILL → n1 (heartbeats only) stops routing to it"] = stopped - killed
    wait_until(lambda: cluster.health("n3", "n2") == "unreachable", 30, "n2 to be removed")


def test_a_restarted_node_rejoins_by_itself(cluster: Cluster) -> None:
    n2 = cluster.nodes["n2"]
    cluster.start(n2)
    back = wait_until(
        lambda: cluster.health("n3", "n2") == "healthy" and cluster.health("n1", "n2") == "healthy",
        60, "n2 to rejoin",
    )  # fmt: skip
    cluster.figures["restart → healthy again at n1 and n3"] = back - n2.started
    answer = cluster.chat("n3", "smol", {"X-Shoal-Node": "n2"})
    assert (answer["status"], answer["headers"]["X-Shoal-Served-By"]) == (200, "n2")


def test_a_clean_shutdown_is_seen_within_a_second(cluster: Cluster) -> None:
    n1 = cluster.nodes["n1"]
    assert n1.process is not None
    n1.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    gone = wait_until(
        lambda: cluster.health("n3", "n1") == "unreachable", 5, "n3 to drop n1", interval=0.05
    )
    cluster.figures["SIGTERM → peers drop the node"] = gone - stopped
    assert gone - stopped <= 1.5  # 1 s, plus the agent's own request time
    n1.process.wait(10)
