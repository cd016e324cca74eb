"""A peer that stops answering while requests are in flight to it (issue 9, item 11).

Suspecting a peer closes its pooled connections: a request waiting for its answer fails
at once and, since nothing reached the client yet, is retried on another holder, instead
of waiting out the read timeout (300 s) on a peer that no longer answers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from shoal.events import PeerSuspect
from tests.cluster import chat, cluster, wait_until

CHAT = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_request_in_flight_to_a_peer_gone_suspect_is_retried_on_another_holder(
    tmp_path: Path,
) -> None:
    holds = {0: ("m",), 1: ("m", "x"), 2: ("m", "x")}
    async with cluster(tmp_path, 3, mode="secret", models=holds.__getitem__) as (a, b, c):
        for other in (b, c):
            await a.node.admission.meet(other.url, "join")
        await a.wait_for_model("x", holders=2)
        for holder in (b, c):
            holder.backend.gate = asyncio.Event()  # neither answers yet

        request = asyncio.create_task(chat(a.url, CHAT))
        first = await wait_until(
            lambda: next((h for h in (b, c) if h.backend.sent), None), 5, "a holder to get it"
        )
        other = c if first is b else b
        assert other.backend.gate is not None
        other.backend.gate.set()
        started = time.monotonic()
        a.node.peers.request_failed(first.node_id)  # as a failed heartbeat would
        await a.wait_for(PeerSuspect, peer_id=first.node_id)
        status, _, answer = await asyncio.wait_for(request, 5)
        assert (status, answer["served"]) == (200, other.backend.name)
        assert time.monotonic() - started < 2.0
        assert first.backend.gate is not None
        first.backend.gate.set()
