"""The composition root (`shoal.node`): what it wires, seen from outside.

Requests through real nodes in one process: where they go, how the ledger counts them,
the story the events tell, the views; and the reactions the root subscribes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from shoal.backends.base import BackendStatus, Health, Operation
from shoal.events import (
    BackendDown,
    BackendReported,
    PeerStateChanged,
    RequestFinished,
    RequestFirstByte,
    RequestRouted,
)
from shoal.node import Node
from shoal.routing.rank import hop_policy
from shoal.trust import secret as secret_mod
from tests.cluster import chat, cluster, node_settings, wait_until

CHAT = {"model": "only-on-b", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_request_for_a_peers_model_is_forwarded_counted_and_told(
    tmp_path: Path,
) -> None:
    models = {0: ("m",), 1: ("m", "only-on-b")}
    async with cluster(tmp_path, 2, mode="secret", models=models.__getitem__) as (a, b):
        await a.node.admission.meet(b.url, "join")
        await a.wait_for_model("only-on-b")
        gate = b.backend.gate = asyncio.Event()
        request = asyncio.create_task(chat(a.url, CHAT))
        await wait_until(lambda: a.node.ledger.peer(b.node_id) == 1, 5, "a to count the hop")
        assert a.node.ledger.local_in_flight == 0
        assert b.node.ledger.local_in_flight == 1

        def b_runs() -> int:
            held = {h.peer_id: h.state for h in a.node.peers.holders()}
            return held[b.node_id].load.in_flight

        await wait_until(lambda: b_runs() == 1, 5, "b's state, counting our request, at a")
        [target] = a.node.router.route(Operation.CHAT, "only-on-b", hop_policy({}))
        assert target.candidate.in_flight == 1  # ours, counted once: by b and by a's books
        gate.set()
        status, headers, answer = await request
        assert (status, answer["served"]) == (200, "fake1")
        assert headers["X-Shoal-Route"] == "peer"
        assert headers["X-Shoal-Served-By"] == "n1"
        assert a.node.ledger.peer(b.node_id) == 0

        routed = a.seen(RequestRouted)[-1]
        assert (routed.route, routed.node_id, routed.target) == ("peer", b.node_id, "n1")
        finished = await a.wait_for(RequestFinished, request_id=routed.request_id)
        assert (finished.outcome, finished.status, finished.route) == ("ok", 200, "peer")
        assert a.seen(RequestFirstByte, request_id=routed.request_id)
        served = await b.wait_for(RequestFinished, outcome="ok")
        assert served.route == "local"  # b served what a forwarded, locally


async def test_an_unknown_model_is_a_404_and_finishes_failed(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,):
        status, _, answer = await chat(a.url, {**CHAT, "model": "nope"})
        assert status == 404
        assert answer["error"]["code"] == "model_not_found"
        finished = await a.wait_for(RequestFinished)
        assert (finished.outcome, finished.status, finished.route) == ("failed", 404, None)
        assert a.node.ledger.requests == 0


async def test_a_backend_going_down_is_pushed_to_peers_at_once(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await wait_until(lambda: b.alive_peers() == [a.node_id], 10, "b to see a")
        assert any(e.state.models for e in b.seen(PeerStateChanged, peer_id=a.node_id))  # type: ignore[attr-defined]
        a.node.bus.publish(
            BackendReported("fake0", BackendStatus(Health.DOWN, reason="pulled the plug"))
        )
        await a.wait_for(BackendDown, backend="fake0")
        await wait_until(
            lambda: any(
                not e.state.models  # type: ignore[attr-defined]
                for e in b.seen(PeerStateChanged, peer_id=a.node_id)
            ),
            5,
            "b to hear that a has no model now",
        )


async def test_status_and_peers_views(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await wait_until(lambda: a.alive_peers() == [b.node_id], 10, "a to see b")
        status = await a.node.views.status()
        assert status["node_id"] == a.node_id
        assert status["short_id"].startswith("SHOAL-")
        assert status["peers"] == 1
        assert status["cluster_mode"] == "secret"
        assert status["backends"][0]["health"] == "healthy"
        assert status["load"]["requests"] == 0
        (peer,) = a.node.views.peers()["peers"]
        assert (peer["node_id"], peer["health"], peer["name"]) == (b.node_id, "healthy", "n1")
        pairs = a.node.views.pairs()
        assert [(n["node_id"], n["state"]) for n in pairs["nodes"]] == [(b.node_id, "paired")]


@pytest.mark.parametrize(("secret", "warned"), [("shoal-ct-abc", True), (None, False)])
async def test_a_weak_cluster_secret_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, secret: str | None, warned: bool
) -> None:
    settings = node_settings(tmp_path, "n0", "secret")
    secret_mod.write_secret(settings.data_dir, secret or secret_mod.new_secret())
    node = Node(settings)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="shoal.node"):
        task = asyncio.create_task(node.run(stop))
        await wait_until(lambda: "listening on" in caplog.text, 10, "the node to start")
        stop.set()
        await task
    assert ("not one `shoal token create` makes" in caplog.text) is warned
