"""A model on one node's disk is served from any node (issue 10, item 4), on a LAN of
namespaces.

n1 has the packaged SmolLM2 GGUF in a folder of its config (`models.folders`), not
loaded; n2 holds no model at all. A client on the LAN asks n2 for it by its catalog
name: n2 knows from n1's advert that n1 holds the file, routes there, and n1 loads it on
demand with a managed llama-server. While it loads the client gets 503 + Retry-After
(what the OpenAI SDKs retry); then 200, served by n1. Nothing was started by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.trust.secret import new_secret
from tests.conftest import llama_server_command, packaged_gguf
from tests.netns.cluster import Agent, Cluster, Node, require_netns, wait_until
from tests.netns.lan import Lan

pytestmark = [pytest.mark.netns, pytest.mark.engine, pytest.mark.timeout(300)]

SECRET = new_secret()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_netns()
    home = tmp_path_factory.mktemp("models-lan")
    folder = home / "gguf"
    folder.mkdir()
    (folder / packaged_gguf().name).symlink_to(packaged_gguf())
    binary, env = llama_server_command()
    with Lan() as lan:
        h1, h2, hc = (lan.add_host(n) for n in ("n1", "n2", "client"))
        nodes = {}
        for name, host in (("n1", h1), ("n2", h2)):
            node_home = home / name
            config = f"""
[models]
store = "{node_home / "hub"}"
folders = [{json.dumps(str(folder)) if name == "n1" else ""}]
adopt_ollama = false
adopt_lmstudio = false
llama_server = "{binary}"
context = 1024
parallel = 1
"""
            nodes[name] = Node(
                name, host, node_home, ("--no-embedded",), secret=SECRET, config=config,
                env={k: v for k, v in env.items() if k.startswith(("LD_", "GGML"))}
                | {"HOME": str(node_home)},
            )  # fmt: skip
        built = Cluster(lan, hc, Agent(lan, hc), nodes)
        try:
            for node in nodes.values():
                built.start(node)
            yield built
        finally:
            lan.teardown()
            built.agent.close()
            built.report()


def models_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    document = cluster.agent.json(cluster.nodes[name].url + "/v1/models") or {"data": []}
    return list(document["data"])


def test_a_model_on_one_nodes_disk_is_served_from_another(cluster: Cluster) -> None:
    wait_until(lambda: cluster.sees_all_healthy("n2", ["n1"]), 60, "n2 to see n1")

    def on_disk_at_n1() -> dict[str, Any] | None:
        listed = [m for m in models_of(cluster, "n2") if "n1" in (m.get("nodes") or ())]
        return next((m for m in listed if not m.get("loaded")), None)

    wait_until(on_disk_at_n1, 30, "n2 to list n1's model as not loaded")
    model = on_disk_at_n1()
    assert model is not None
    print(f"\nn2 lists {model['id']!r} on n1's disk, not loaded: {model}")

    asked = time.monotonic()
    statuses: list[int] = []
    retry_after: set[str] = set()
    while time.monotonic() - asked < 120:
        answer = cluster.chat("n2", model["id"], timeout=60)
        statuses.append(answer["status"])
        if answer["status"] == 200:
            break
        assert answer["status"] == 503, answer  # loading: nothing else is acceptable
        retry_after.add(answer["headers"].get("Retry-After", ""))
        time.sleep(0.5)  # what an SDK does between retries, in small
    served = time.monotonic() - asked
    print(f"statuses while n1 loaded it: {statuses}; Retry-After {sorted(retry_after)}")
    cluster.measured("ask n2 for a model on n1's disk → 200", served)
    assert statuses[-1] == 200, statuses
    assert answer["headers"]["X-Shoal-Served-By"] == "n1"
    assert all(retry_after), "a 503 while loading must say when to retry"
    # Now loaded: n2's view says so, and the next request is answered at once.
    wait_until(
        lambda: any(m["id"] == model["id"] and m.get("loaded") for m in models_of(cluster, "n2")),
        10, "n2 to see the model loaded on n1",
    )  # fmt: skip
    assert cluster.chat("n2", model["id"])["status"] == 200
