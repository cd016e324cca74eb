"""A slot freed on one node goes to a request queued at another (issue 13), on a LAN of
namespaces.

a serves `solo` from a backend that says nothing of its capacity; its config says 1
(`routing.default_capacity`), so its snapshot advertises one slot. b holds no model. A
client sends b three requests of one second each at once: b forwards the first to a,
and, a's only slot taken, queues the other two itself (nothing waits at a). Each time a
finishes one, it pushes its state (a slot freed), and b's queue sends the next. The
hand-off — from the end of one request at a to the start of the next there, counted
from the client's side as the gap between answers minus the service time — is what
the issue bounds (100 ms).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import pytest

from shoal.trust.secret import new_secret
from tests.netns.cluster import Agent, Cluster, Node, require_netns, start_backend, wait_until
from tests.netns.lan import Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

BACKEND_PORT = 18083
SECRET = new_secret()
SERVICE_S = 1.0
A_CONFIG = "[routing]\ndefault_capacity = 1\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_netns()
    home = tmp_path_factory.mktemp("queue")
    with Lan() as lan:
        ha, hb, hc = (lan.add_host(n) for n in ("a", "b", "client"))
        start_backend(lan, ha, BACKEND_PORT, ["solo"])
        holder = ("--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}")
        nodes = {
            "a": Node("a", ha, home / "a", holder, secret=SECRET, config=A_CONFIG),
            "b": Node("b", hb, home / "b", ("--no-embedded",), secret=SECRET),
        }
        built = Cluster(lan, hc, Agent(lan, hc), nodes)
        try:
            for node in nodes.values():
                built.start(node)
            yield built
        finally:
            lan.teardown()
            built.agent.close()
            built.report()


def test_a_slot_freed_on_a_goes_to_a_request_queued_at_b(cluster: Cluster) -> None:
    wait_until(lambda: "solo" in cluster.models_at("b"), 60, "b to list a's model")
    url = cluster.node_url("b") + "/v1/chat/completions"
    body = {
        "model": "solo",
        "messages": [{"role": "user", "content": f"fake: delay={SERVICE_S} words=1"}],
    }
    agent = cluster.agent
    calls = [agent.request("POST", url, body, timeout=30) for _ in range(3)]
    started = time.monotonic()
    agent.send({"batch": calls})

    monitor = Agent(cluster.lan, cluster.agent_host)
    monitor.api_keys = agent.api_keys
    queued_at_b = 0
    try:
        while not agent.ready() and time.monotonic() - started < 20:
            status = monitor.json(cluster.node_url("b") + "/shoal/v1/status") or {}
            queued_at_b = max(queued_at_b, int(status.get("load", {}).get("queued", 0)))
            time.sleep(0.05)
    finally:
        monitor.close()
    results = agent.receive(60)["results"]

    assert [r.get("status") for r in results] == [200, 200, 200], results
    assert all(r["headers"].get("X-Shoal-Served-By") == "a" for r in results)
    ends = sorted(r["started"] + r["seconds"] for r in results)
    handoffs = [later - earlier - SERVICE_S for earlier, later in itertools.pairwise(ends)]
    print(f"\nanswers at {[round(e, 3) for e in ends]} s; hand-offs {handoffs}; "
          f"most queued at b: {queued_at_b}")  # fmt: skip
    cluster.measured("slot freed on a → next queued request started there (worst)", max(handoffs))
    assert queued_at_b >= 1  # b queued them: a was full as its snapshot said
    assert max(handoffs) < 0.1, handoffs  # the bound (measured: 6-8 ms)
    assert json.loads(results[0]["body"])["choices"]
