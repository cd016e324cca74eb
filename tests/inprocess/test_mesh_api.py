"""The peer protocol's handlers (`shoal.api.mesh`) between real nodes, over mutual TLS."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aiohttp
import pytest

from shoal.events import LoadChanged, PeerRemoved, PeerStateChanged
from shoal.protocol import STATE_PATH
from tests.cluster import cluster, wait_until


async def test_a_snapshot_must_be_the_connecting_nodes_own(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3, mode="secret") as (a, b, c):
        await a.node.admission.meet(b.url, "join")
        await a.node.admission.meet(c.url, "join")
        await wait_until(lambda: len(a.alive_peers()) == 2, 10, "a to see b and c")
        link = a.node.peers.link(b.node_id)
        # a presents its own certificate with c's snapshot: refused.
        forged = dataclasses.replace(c.node.own_state.snapshot(), seq=10**6)
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            await link._transport.post(STATE_PATH, forged.encode(), 5)
        assert caught.value.status == 403
        for garbage in (b"", b"{", b"[]", b'{"v": 99}'):
            with pytest.raises(aiohttp.ClientResponseError) as caught:
                await link._transport.post(STATE_PATH, garbage, 5)
            assert caught.value.status == 400
        assert not b.seen(PeerStateChanged, peer_id=c.node_id, state=forged)


async def test_the_peer_protocol_is_refused_on_the_api_port(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,):
        body = a.node.own_state.snapshot().encode()
        async with (
            aiohttp.ClientSession() as session,
            session.post(a.url + STATE_PATH, data=body) as response,
        ):
            assert response.status == 403
            error = (await response.json())["error"]
            assert "peer port" in error["message"]


async def test_goodbye_removes_the_peer_that_says_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await wait_until(
            lambda: a.alive_peers() == [b.node_id] and b.alive_peers() == [a.node_id],
            10,
            "a and b to see each other",
        )
        await a.node.peers.say_goodbye()
        removed = await b.wait_for(PeerRemoved, peer_id=a.node_id)
        assert removed.reason == "left"


async def test_load_crossing_the_threshold_is_pushed_with_the_figure_the_advert_carries(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        await a.node.admission.meet(b.url, "join")
        await wait_until(lambda: b.alive_peers() == [a.node_id], 10, "b to see a")
        gate = a.backend.gate = asyncio.Event()
        threshold = a.node.settings.routing.spillover_max_local_in_flight
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"X-Shoal-Local-Only": "1"}
        async with aiohttp.ClientSession() as session:

            async def chat() -> int:
                url = a.url + "/v1/chat/completions"
                async with session.post(url, json=body, headers=headers) as response:
                    return response.status

            requests = [asyncio.create_task(chat()) for _ in range(threshold)]
            await a.wait_for(LoadChanged, in_flight=threshold)
            await wait_until(
                lambda: any(
                    e.state.load.in_flight == threshold  # type: ignore[attr-defined]
                    for e in b.seen(PeerStateChanged, peer_id=a.node_id)
                ),
                5,
                "b to receive a's load, pushed",
            )
            gate.set()
            assert await asyncio.gather(*requests) == [200] * threshold
        await wait_until(lambda: a.node.ledger.local_in_flight == 0, 5, "a's ledger to drain")
