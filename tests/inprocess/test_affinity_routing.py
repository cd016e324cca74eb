"""Cache-affine routing through real nodes (issue 13, item 4): a conversation's turns go
to the node that served the last one, and go elsewhere while that node is full.

Two nodes over real mutual TLS, both holding the model, routing `round_robin`: without
affinity the turns of one conversation alternate between the nodes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from shoal.protocol import NODE_HEADER
from tests.cluster import RunningNode, chat, cluster, wait_until

SYSTEM = "You keep the lighthouse logbook; answer from it. " * 50  # ~2.5k characters


class Conversation:
    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        self.served: list[str] = []

    async def turn(self) -> str:
        self.messages.append({"role": "user", "content": f"question {len(self.served) + 1}"})
        status, _, answer = await chat(self.url, {"model": "m", "messages": self.messages})
        assert status == 200, answer
        self.messages.append(answer["choices"][0]["message"])
        self.served.append(answer["served"])
        return str(answer["served"])


async def pinned_chat(url: str, node: str) -> int:
    """A short chat that must run on `node` (it holds a slot there until released)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hold"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers={NODE_HEADER: node}) as r,
    ):
        return r.status


async def two_nodes(a: RunningNode, b: RunningNode) -> None:
    await a.node.admission.meet(b.url, "join")
    await a.wait_for_model("m", holders=2)


async def test_a_conversation_sticks_to_one_node_and_lets_go_while_it_is_full(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 2, routing={"strategy": "round_robin"}) as (a, b):
        await two_nodes(a, b)
        talk = Conversation(a.url)
        for _ in range(5):
            await talk.turn()
        assert len(set(talk.served)) == 1, talk.served
        home = {"fake0": a, "fake1": b}[talk.served[0]]
        other = b if home is a else a

        # Fill the affine node: as many held requests as it serves at once.
        capacity = a.node.settings.routing.spillover_max_local_in_flight
        gate = home.backend.gate = asyncio.Event()
        held = [asyncio.create_task(pinned_chat(a.url, home.node.name)) for _ in range(capacity)]
        await wait_until(
            lambda: len(home.backend.sent) >= 5 + capacity, 5, "the affine node to be full"
        )
        # The next turn does not wait behind them: it goes to the other node...
        assert await asyncio.wait_for(talk.turn(), 5) == other.backend.name
        gate.set()
        assert await asyncio.gather(*held) == [200] * capacity
        await wait_until(lambda: a.node.ledger.requests == 0, 5, "a's books to balance")
        # ... which now holds the conversation's cache: it stays there.
        for _ in range(3):
            assert await talk.turn() == other.backend.name
        assert a.node.router.affinity is not None
        assert a.node.router.affinity.statistics()["hits"] >= 8


async def test_without_affinity_round_robin_bounces_the_conversation(tmp_path: Path) -> None:
    routing = {"strategy": "round_robin", "affinity": False}
    async with cluster(tmp_path, 2, routing=routing) as (a, b):
        await two_nodes(a, b)
        talk = Conversation(a.url)
        for _ in range(4):
            await talk.turn()
        assert talk.served[0::2] != talk.served[1::2]  # alternating
        assert a.node.router.affinity is None


async def test_short_conversations_are_not_steered(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, routing={"strategy": "round_robin"}) as (a, b):
        await two_nodes(a, b)
        served = []
        messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
        for i in range(4):
            messages.append({"role": "user", "content": f"q{i}"})
            _, _, answer = await chat(a.url, {"model": "m", "messages": messages})
            messages.append(answer["choices"][0]["message"])
            served.append(answer["served"])
        assert served[0::2] != served[1::2]
        assert a.node.router.affinity is not None
        assert len(a.node.router.affinity) == 0
