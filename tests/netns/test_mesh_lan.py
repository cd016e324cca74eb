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
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.trust.secret import new_secret
from tests.conftest import LLAMA_SERVER_ALIAS, SMOLLM_ID, llama_server_command
from tests.netns.cluster import HERE, PORT, Agent, Cluster, Node, require_netns, wait_until
from tests.netns.lan import Lan

pytestmark = [pytest.mark.netns, pytest.mark.engine]

LLAMA_PORT = 18081
ALIASES = {"smol": [SMOLLM_ID, LLAMA_SERVER_ALIAS]}
CLUSTER_SECRET = new_secret()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, f16_gguf: Path) -> Iterator[Cluster]:
    require_netns()
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
        common = {
            "secret": CLUSTER_SECRET,
            "env": {"SHOAL_ROUTING__MODEL_ALIASES": json.dumps(ALIASES)},
        }
        nodes = {
            "n1": Node("n1", h1, home / "n1", **common),
            "n2": Node(
                "n2", h2, home / "n2",
                ("--no-embedded", "--backend", f"http://127.0.0.1:{LLAMA_PORT}"), **common,
            ),
            "n3": Node("n3", h3, home / "n3", ("--no-embedded",), **common),
        }  # fmt: skip
        built = Cluster(lan, hc, Agent(lan, hc), nodes)
        try:
            yield built
        finally:
            lan.teardown()
            built.agent.close()
            built.report()


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
        cluster.measured(
            f"discovery: last peer's start → all healthy at {viewer}", when - last_start
        )

    # Routable: n3 (no models of its own) lists both holders' models.
    def listed_at_n3() -> set[str]:
        document = cluster.agent.json(cluster.nodes["n3"].url + "/v1/models") or {"data": []}
        return {m["id"] for m in document["data"]}

    routable = wait_until(
        lambda: {SMOLLM_ID, LLAMA_SERVER_ALIAS} <= listed_at_n3(), 60, "n3 to list the models"
    )
    cluster.measured("start → all three routable from n3 (incl. engine load)", routable - started)
    sources = {p["sources"][0] for p in cluster.peers_of("n3").values()}
    assert sources <= {"mdns", "peer", "introduced"}, sources  # nothing was configured


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
        # The spoofer leaves: its mDNS goodbye withdraws an advert carrying n3's ID, as a
        # forged goodbye for n3 would. A withdrawal is a hint: n3 answers, and stays.
        cluster.lan.stop(spoofer)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for viewer in ("n1", "n2"):
                health = cluster.peers_of(viewer)["n3"]["health"]
                assert health == "healthy", f"{viewer} dropped n3 on a forged mDNS goodbye"
            time.sleep(0.3)
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
    cluster.measured("SIGKILL → n3 (sending requests) stops routing to it", stopped - killed)
    stopped = wait_until(lambda: cluster.health("n1", "n2") != "healthy", 30, "n1 to drop n2")
    cluster.measured("SIGKILL → n1 (heartbeats only) stops routing to it", stopped - killed)
    wait_until(lambda: cluster.health("n3", "n2") == "unreachable", 30, "n2 to be removed")


def test_a_restarted_node_rejoins_by_itself(cluster: Cluster) -> None:
    n2 = cluster.nodes["n2"]
    cluster.start(n2)
    back = wait_until(
        lambda: cluster.health("n3", "n2") == "healthy" and cluster.health("n1", "n2") == "healthy",
        60, "n2 to rejoin",
    )  # fmt: skip
    cluster.measured("restart → healthy again at n1 and n3", back - n2.started)
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
    cluster.measured("SIGTERM → peers drop the node", gone - stopped)
    assert gone - stopped <= 1.5  # 1 s, plus the agent's own request time
    n1.process.wait(10)
