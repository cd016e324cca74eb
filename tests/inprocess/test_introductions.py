"""A mesh found piecemeal completes itself (issue 9, item 14), through real nodes.

With mDNS off, one node's discovery can reach the others while they reach only it: a
knows b and c, b and c know only a. Peers' snapshots introduce their peers, and each
node meets the ones it is introduced to through its own admission: the handshake checks
the secret (or the node waits for the operator), and an introduction that leads nowhere
is tried a bounded number of times.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import pytest

from shoal.backoff import Backoff
from shoal.events import PeerStateChanged
from shoal.mesh.introductions import Introductions
from shoal.mesh.state import Introduction
from shoal.trust import admission
from shoal.trust.store import TrustState
from tests.cluster import RunningNode, chat, cluster, wait_until
from tests.support import free_port


def sources(node: RunningNode, peer_id: str) -> frozenset[str]:
    view = node.node.peers.membership.view(peer_id)
    return frozenset() if view is None else frozenset(view.sources)


async def test_two_nodes_that_know_only_a_third_meet_through_its_introduction(
    tmp_path: Path,
) -> None:
    holds = {0: ("m",), 1: ("m",), 2: ("m", "only-on-c")}
    async with cluster(tmp_path, 3, mode="secret", models=holds.__getitem__) as (a, b, c):
        started = time.monotonic()
        for other in (b, c):  # a's static peers; b and c find nobody themselves
            assert await a.node.admission.meet(other.url, "static") is not None
        await wait_until(
            lambda: (
                set(b.alive_peers()) == {a.node_id, c.node_id}
                and set(c.alive_peers()) == {a.node_id, b.node_id}
            ),
            10,
            "b and c to be peers of each other",
        )
        met_in = time.monotonic() - started
        assert "introduced" in sources(b, c.node_id) | sources(c, b.node_id)
        for node, other in ((b, c), (c, b)):
            assert node.node.trust.store.state(other.node_id) is TrustState.PAIRED
        # And b routes straight to c for the model only c holds.
        await b.wait_for_model("only-on-c")
        status, headers, answer = await chat(
            b.url, {"model": "only-on-c", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert (status, headers["X-Shoal-Route"], answer["served"]) == (200, "peer", "fake2")
        assert met_in < 5.0, met_in


async def test_in_pairing_mode_an_introduced_node_waits_for_the_operator(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 3, mode="pairing") as (a, b, c):
        for other in (b, c):  # both operators accept: a is paired with b and with c
            await a.node.admission.meet(other.url, "join")
            other.node.admission.decide(a.node_id, "accept")
            a.node.admission.decide(other.node_id, "accept")
        await wait_until(
            lambda: set(a.alive_peers()) == {b.node_id, c.node_id}, 10, "a to have b and c"
        )
        # Introduced, b and c handshake, and each waits for its operator: pending.
        await wait_until(
            lambda: (
                b.node.trust.store.state(c.node_id) is TrustState.PENDING
                and c.node.trust.store.state(b.node_id) is TrustState.PENDING
            ),
            10,
            "b and c to list each other as pending",
        )
        assert c.node_id not in b.alive_peers() and b.node_id not in c.alive_peers()


async def test_an_introduction_that_leads_nowhere_is_tried_a_bounded_number_of_times(
    tmp_path: Path, handshakes: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ghost = Introduction("9" * 64, nowhere)
    # Admission's own backoff after a failed meeting (5 s, 10 s …), shrunk likewise.
    monkeypatch.setattr(admission, "SIGHTING_RETRY", Backoff(0.01, 0.02))
    async with cluster(tmp_path, 2, mode="secret", mesh={"push_min_interval_s": 0.0}) as (a, b):
        # b's book with shrunk timers: 3 attempts, 0.05 s then 0.1 s apart.
        book = b.node.introducer.book = Introductions(
            b.node_id, retry=Backoff(0.05, 0.1), max_attempts=3
        )
        a.node.own_state.introductions = lambda: (ghost,)
        await a.node.admission.meet(b.url, "join")

        async def introduce(times: int) -> None:
            """a pushes its state to b (introducing the ghost) until b has heard it
            `times` more times."""
            heard = len(b.seen(PeerStateChanged, peer_id=a.node_id))
            while len(b.seen(PeerStateChanged, peer_id=a.node_id)) < heard + times:
                # A new snapshot each time (its seq grows only when something changed).
                own = a.node.own_state
                own.hardware = dataclasses.replace(own.hardware, cores=own.hardware.cores + 1)
                a.node.peers.changed()
                await wait_until(lambda: not a.node.peers._push.is_set(), 5, "a's push to go")

        deadline = time.monotonic() + 10
        while handshakes[nowhere] < 3 and time.monotonic() < deadline:
            await introduce(1)
        assert handshakes[nowhere] == 3
        await introduce(20)  # b has given up: introduced again and again, never dialled
        assert book.attempts(ghost.node_id) == 3
        assert handshakes[nowhere] == 3
        assert b.node.peers.membership.view(ghost.node_id) is None  # never in the table
