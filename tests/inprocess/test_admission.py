"""Admission and the peer table across real nodes in one process (`tests.cluster`).

Who becomes trusted, when, and what the peer table and the event bus say about it:
first contact, pairing, the operator's decisions, sightings, and that a heartbeat
never admits.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shoal.events import PeerJoined, PeerRemoved, PeerSuspect, TrustChanged
from shoal.mesh.identity import short_id
from shoal.mesh.link import PeerLink
from shoal.mesh.state import NodeState
from shoal.trust.store import TrustState
from tests.cluster import RunningNode, cluster, wait_until

PAIRED, PENDING, UNPAIRED = TrustState.PAIRED, TrustState.PENDING, TrustState.UNPAIRED


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """State exchanges sent, by the TLS URL they went to."""
    sent: Counter[str] = Counter()
    original = PeerLink.exchange

    async def counted(self: PeerLink, ours: NodeState, timeout_s: float) -> NodeState:
        sent[self.url] += 1
        return await original(self, ours, timeout_s)

    monkeypatch.setattr(PeerLink, "exchange", counted)
    return sent


async def operator(node: RunningNode, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, node.url + path, json={}) as response,
    ):
        return response.status, await response.json()


async def both_alive(a: RunningNode, b: RunningNode) -> None:
    await wait_until(
        lambda: a.alive_peers() == [b.node_id] and b.alive_peers() == [a.node_id],
        10,
        "both nodes to list each other alive",
    )


async def test_first_contact_pairs_both_sides_with_one_state_exchange(
    tmp_path: Path, exchanges: Counter[str]
) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        met = await a.node.admission.meet(b.url, "join")
        assert met is not None and met.state is PAIRED
        await both_alive(a, b)
        assert sum(exchanges.values()) == 1  # a's; b learnt a from it and waits its turn
        for node, other in ((a, b), (b, a)):
            changed = node.seen(TrustChanged, node_id=other.node_id)
            assert [(e.previous, e.state) for e in changed] == [(None, PAIRED)]
            assert len(node.seen(PeerJoined, peer_id=other.node_id)) == 1


async def test_pairing_needs_both_operators_and_then_routes(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="pairing") as (a, b):
        met = await a.node.admission.meet(b.url, "join")
        assert met is not None and met.state is PENDING
        for node, other in ((a, b), (b, a)):
            await node.wait_for(TrustChanged, node_id=other.node_id, state=PENDING)
            assert node.node.peers.peers() == []  # pending: not in the table

        # Accept on one side, by the short ID `shoal pair list` prints.
        status, done = await operator(b, "POST", f"/shoal/v1/pairs/{short_id(a.node_id)}/accept")
        assert (status, done["node_id"]) == (200, a.node_id)
        # b now tries a, which refuses it: a has not accepted yet. A positive witness
        # that the attempt happened, then that it did not pair a.
        await wait_until(
            lambda: [p.view.misses for p in b.node.peers.peers()] == [1], 5, "b's refused beat"
        )
        assert a.node.peers.peers() == []
        assert a.node.trust.store.state(b.node_id) is PENDING

        status, _ = await operator(a, "POST", f"/shoal/v1/pairs/{b.node_id[:12]}/accept")
        assert status == 200
        await both_alive(a, b)


@pytest.mark.parametrize("action", ["decline", "forget"])
async def test_declining_or_forgetting_a_pending_node_answers_and_changes_trust(
    tmp_path: Path, action: str
) -> None:
    """Regression: these answered "internal error" (UnboundLocalError in Peers.forget)."""
    async with cluster(tmp_path, 2, mode="pairing") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await b.wait_for(TrustChanged, node_id=a.node_id, state=PENDING)
        status, done = await operator(b, "POST", f"/shoal/v1/pairs/{a.node_id}/{action}")
        assert (status, done["done"]) == (200, action)
        expected = None if action == "forget" else UNPAIRED
        event = await b.wait_for(TrustChanged, node_id=a.node_id, state=expected)
        assert event.previous is PENDING
        assert b.node.trust.store.state(a.node_id) is expected


async def test_unpairing_a_live_peer_cuts_it_off_on_both_sides(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await both_alive(a, b)
        status, _ = await operator(a, "POST", f"/shoal/v1/pairs/{b.node_id}/unpair")
        assert status == 200
        removed = await a.wait_for(PeerRemoved, peer_id=b.node_id)
        assert removed.reason == "untrusted"
        assert a.node.peers.peers() == []
        # b's next exchange meets a listener that no longer trusts it.
        b.node.peers.changed()
        await b.wait_for(PeerSuspect, peer_id=a.node_id)
        assert a.node.peers.peers() == []  # and its attempt did not bring it back


async def test_a_sighting_of_an_unknown_node_meets_it_once(
    tmp_path: Path, handshakes: Counter[str]
) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        for _ in range(3):  # an advert seen three times while the handshake runs
            b.node.admission.sighted(a.node_id, a.url, "mdns")
        await both_alive(a, b)
        assert handshakes == Counter({a.url: 1})
        b.node.admission.sighted(a.node_id, a.url, "mdns")  # paired: to the table only
        assert handshakes == Counter({a.url: 1})


async def test_sightings_of_a_pending_node_and_heartbeats_never_admit(
    tmp_path: Path, handshakes: Counter[str]
) -> None:
    async with cluster(tmp_path, 2, mode="pairing") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await b.wait_for(TrustChanged, node_id=a.node_id, state=PENDING)
        b.node.admission.sighted(a.node_id, a.url, "mdns")
        a.node.admission.sighted(b.node_id, b.url, "scan")
        assert handshakes == Counter({b.url: 1})  # the join only
        assert a.node.peers.peers() == b.node.peers.peers() == []
