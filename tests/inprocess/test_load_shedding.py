"""A real node whose only backend serves one request at a time, flooded: requests wait
in a bounded queue in weighted fair order, and those that cannot be served in time get
429 with Retry-After (`shoal.routing.admission`). Nothing is lost, nothing is a 500."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from shoal.backends.base import BackendStatus, Health, Operation
from shoal.events import EventBus
from shoal.node import Node
from shoal.routing.rank import HopPolicy
from tests.cluster import FakeBackend, FakeUpstream, node_settings, wait_until

pytestmark = [pytest.mark.timeout(120)]


class OneAtATime(FakeBackend):
    """Says it serves one request at once, takes `service_s` for each, and records the
    first message of each (the test's class marker) in the order served."""

    def __init__(self, service_s: float) -> None:
        super().__init__("one", ("m",))
        self.service_s = service_s
        self.running = 0
        self.most = 0
        self.served: list[str] = []

    async def probe(self) -> BackendStatus:
        return BackendStatus(Health.HEALTHY, self.models, detail={"capacity": 1})

    async def send(self, op: Operation, body: bytes) -> FakeUpstream:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.service_s)
            self.served.append(orjson.loads(body)["messages"][0]["content"])
            return await super().send(op, body)
        finally:
            self.running -= 1


@contextlib.asynccontextmanager
async def flooded_node(
    tmp_path: Path, backend: OneAtATime, **routing: Any
) -> AsyncIterator[tuple[Node, str]]:
    settings = node_settings(tmp_path, "n", "open", routing=routing)
    node = Node(settings, EventBus())
    node.registry.add(backend)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        await wait_until(
            lambda: node.url and any(e.status.detail for e in node.registry.entries()),
            10,
            "the node to listen, its backend probed (it says its capacity)",
        )
        yield node, node.url
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def body(marker: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": marker}]}


async def test_a_flood_is_served_or_shed_honestly(tmp_path: Path) -> None:
    backend = OneAtATime(service_s=0.02)
    async with (
        flooded_node(tmp_path, backend, queue_max=20, queue_wait_s=2.0) as (node, url),
        aiohttp.ClientSession() as session,
    ):

        async def one(i: int) -> tuple[int, dict[str, str], Any]:
            async with session.post(url + "/v1/chat/completions", json=body(str(i))) as r:
                return r.status, dict(r.headers), await r.json()

        flood = [asyncio.create_task(one(i)) for i in range(50)]
        await wait_until(lambda: node.queue.queued() >= 10, 10, "a queue to form")
        started = time.monotonic()
        async with session.get(url + "/healthz") as health:  # the node stays responsive
            assert health.status == 200
        health_s = time.monotonic() - started
        advertised = node.own_state.snapshot().load  # what peers rank this node by
        assert advertised.queued >= 10 and advertised.wait_s > 0, advertised
        answers = await asyncio.gather(*flood)

    statuses = collections.Counter(status for status, _, _ in answers)
    print(f"50 clients at capacity 1: {dict(statuses)}, /healthz in {health_s * 1000:.0f} ms")
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] + statuses[429] == 50  # offered = completed + rejected
    assert statuses[200] == len(backend.served) >= 20  # the queue's worth, at least
    assert statuses[429] > 0  # 50 at once into 1 slot + a queue of 20: some are shed
    assert backend.most == 1  # never more than its capacity at once
    for status, headers, answer in answers:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert answer["error"]["type"] == "rate_limit_error"
            assert answer["error"]["code"] in ("queue_full", "queue_timeout")
    assert node.queue.queued() == 0 and node.ledger.queued == 0
    assert health_s < 2.0, health_s


async def test_two_classes_share_by_their_weights(tmp_path: Path) -> None:
    """This node's clients (local, 70) and requests forwarded by peers (peer, 30; the
    hop header marks them) both keep the queue full: the backend serves them 70/30."""
    backend = OneAtATime(service_s=0.005)
    hop = {"X-Shoal-Hop": "1"}
    served_enough = asyncio.Event()
    async with (
        flooded_node(tmp_path, backend, queue_max=64, queue_wait_s=30.0) as (_, url),
        aiohttp.ClientSession() as session,
    ):

        async def client(marker: str, headers: dict[str, str]) -> None:
            while not served_enough.is_set():
                async with session.post(
                    url + "/v1/chat/completions", json=body(marker), headers=headers
                ) as r:
                    assert r.status == 200, await r.text()
                if len(backend.served) >= 260:
                    served_enough.set()

        clients = [client("local", {}) for _ in range(12)] + [
            client("peer", hop) for _ in range(12)
        ]
        await asyncio.gather(*clients)
    steady = backend.served[30:260]  # once both classes are queued
    share = steady.count("local") / len(steady)
    print(f"local share of {len(steady)} served while both queued: {share:.3f}")
    assert share == pytest.approx(0.7, abs=0.06)


async def test_a_client_leaving_the_queue_frees_its_place(tmp_path: Path) -> None:
    backend = OneAtATime(service_s=0.0)
    backend.gate = asyncio.Event()  # the first request holds the only slot
    async with (
        flooded_node(tmp_path, backend) as (node, url),
        aiohttp.ClientSession() as session,
    ):
        first = asyncio.create_task(session.post(url + "/v1/chat/completions", json=body("1")))
        await wait_until(lambda: backend.running == 1, 10, "the first request to run")
        second = asyncio.create_task(session.post(url + "/v1/chat/completions", json=body("2")))
        await wait_until(lambda: node.queue.queued() == 1, 10, "the second to queue")
        second.cancel()  # its client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await second
        await wait_until(lambda: node.queue.queued() == 0, 5, "the queue to empty")
        backend.gate.set()
        async with await first as response:
            assert response.status == 200
        async with session.post(url + "/v1/chat/completions", json=body("3")) as response:
            assert response.status == 200  # no slot was lost to the one that left
    assert backend.served == ["1", "3"]
    assert node.ledger.local_in_flight == 0


async def test_api_keys_share_by_their_weights(tmp_path: Path) -> None:
    """Two LAN clients' keys, weights 3 and 1, both keeping the queue full: served 3:1
    (the class and weight the access layer hands the dispatcher, `api.openai`)."""
    backend = OneAtATime(service_s=0.004)
    served_enough = asyncio.Event()
    async with flooded_node(tmp_path, backend, queue_max=64, queue_wait_s=30.0) as (node, _):

        async def client(marker: str, weight: float) -> None:
            raw = orjson.dumps(body(marker))
            while not served_enough.is_set():
                async with node.dispatcher.open(
                    Operation.CHAT, "m", raw, HopPolicy(), cls=f"key:{marker}", weight=weight
                ) as opened:
                    await opened.answer.read()
                if len(backend.served) >= 250:
                    served_enough.set()

        await asyncio.gather(
            *(client("heavy", 3.0) for _ in range(10)), *(client("light", 1.0) for _ in range(10))
        )
    steady = backend.served[30:250]
    share = steady.count("heavy") / len(steady)
    print(f"weight-3 key's share of {len(steady)} served while both queued: {share:.3f}")
    assert share == pytest.approx(0.75, abs=0.06)
