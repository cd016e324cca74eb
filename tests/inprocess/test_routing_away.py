"""Routing when the only holder of a model is away (issue 9, item 13), through real nodes.

Two nodes over real mutual TLS: b holds a model a does not. b stops cleanly (says
goodbye), so a keeps b in its table as removed, with b's last snapshot. A request to a
for b's model must then be 503 with Retry-After, naming b, at once; a model no node ever
held stays 404.
"""

from __future__ import annotations

import time
from pathlib import Path

from shoal.events import PeerRemoved
from shoal.mesh.membership import PeerState
from tests.cluster import RunningNode, chat, cluster, wait_until

CHAT = {"model": "only-on-b", "messages": [{"role": "user", "content": "hi"}]}


def state_of(a: RunningNode, peer_id: str) -> PeerState | None:
    return next((p.view.state for p in a.node.peers.peers() if p.view.peer_id == peer_id), None)


async def test_a_holder_that_said_goodbye_makes_its_model_503_with_retry_after(
    tmp_path: Path,
) -> None:
    # Two one-node clusters in open mode, so that a can meet b and b can stop alone.
    async with cluster(tmp_path / "a", 1) as (a,):
        async with cluster(tmp_path / "b", 1, models=lambda i: ("m", "only-on-b")) as (b,):
            await a.node.admission.meet(b.url, "join")
            await a.wait_for_model("only-on-b")
            status, _, answer = await chat(a.url, CHAT)
            assert (status, answer["served"]) == (200, "fake0")  # b served it, via a
        # b has stopped and said goodbye; a keeps its last snapshot.
        await a.wait_for(PeerRemoved, peer_id=b.node_id, reason="left")
        # About one run in three, a state b sent as it stopped reaches a after the
        # goodbye and a takes b back (a race in the node's shutdown, reported apart);
        # then a's next heartbeats find b gone and remove it within seconds.
        await wait_until(lambda: state_of(a, b.node_id) is PeerState.REMOVED, 15, "a to remove b")
        (peer,) = a.node.peers.peers()
        assert peer.state is not None and any(m.id == "only-on-b" for m in peer.state.models)

        started = time.monotonic()
        status, headers, answer = await chat(a.url, CHAT)
        elapsed = time.monotonic() - started
        assert status == 503
        assert headers["Retry-After"] == "5"
        error = answer["error"]
        assert (error["code"], error["type"]) == ("backend_unavailable", "server_error")
        assert "cannot be reached" in error["message"]
        assert "(removed)" in error["message"]
        assert elapsed < 1.0  # nothing was dialled

        status, _, answer = await chat(a.url, {**CHAT, "model": "never-held"})
        assert (status, answer["error"]["code"]) == (404, "model_not_found")
        assert b.backend.sent  # the first request reached b; none since
        assert len(b.backend.sent) == 1
        await wait_until(lambda: a.node.ledger.requests == 0, 5, "a's books to balance")
