"""A real node fronting a real HTTP server that says its slots as llama-server does
(`GET /props` → `total_slots`): the node's capacity becomes what the server says, or what
its config entry says over it, and the admission queue runs that many at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal.backends.base import Health
from shoal.backends.detect import make_backend
from shoal.backends.registry import BackendEntry
from shoal.events import EventBus
from shoal.node import Node
from shoal.settings import BackendSettings, LimitSettings
from tests.cluster import node_settings, wait_until
from tests.conftest import llama_server_command

pytestmark = [pytest.mark.timeout(120)]


class SlotServer:
    """An OpenAI-compatible server with one model, "m", that answers /props with
    `total_slots` (404 when None, as vLLM or LM Studio do), and holds every chat request
    until `gate` opens, counting how many it runs at once."""

    def __init__(self, total_slots: int | None) -> None:
        self.total_slots = total_slots
        self.gate = asyncio.Event()
        self.running = 0
        self.most = 0
        self.props_asked = 0
        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/models", self._models),
                web.get("/props", self._props),
                web.post("/v1/chat/completions", self._chat),
            ]
        )
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def _props(self, request: web.Request) -> web.Response:
        self.props_asked += 1
        if self.total_slots is None:
            raise web.HTTPNotFound()
        return web.json_response(
            {
                "default_generation_settings": {"n_ctx": 4096},
                "total_slots": self.total_slots,
                "model_alias": "m",
                "build_info": "test",
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
            }
        )


@contextlib.asynccontextmanager
async def slot_server(total_slots: int | None) -> AsyncIterator[SlotServer]:
    served = SlotServer(total_slots)
    await served.server.start_server()
    try:
        yield served
    finally:
        served.gate.set()
        await served.server.close()


@contextlib.asynccontextmanager
async def node_before(
    tmp_path: Path, url: str, *, capacity: int | None = None, **routing: Any
) -> AsyncIterator[Node]:
    """A node whose one backend is the configured server at `url`, probed healthy."""
    settings = node_settings(
        tmp_path,
        "n",
        "open",
        backends=[{"url": url, "capacity": capacity}],
        routing=routing,
        # No GGUF of this machine's stores joins as a managed backend with slots of its own.
        models={"store": tmp_path / "store", "adopt_ollama": False, "adopt_lmstudio": False},
    )
    node = Node(settings, EventBus())
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        await wait_until(
            lambda: node.url and all(e.healthy for e in node.registry.entries()),
            10,
            "the node to listen and its backend to be probed healthy",
        )
        yield node
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def only_entry(node: Node) -> BackendEntry:
    (entry,) = node.registry.entries()
    return entry


async def test_the_node_runs_as_many_at_once_as_the_server_has_slots(tmp_path: Path) -> None:
    async with (
        slot_server(total_slots=3) as served,
        node_before(tmp_path, served.url) as node,
        aiohttp.ClientSession() as session,
    ):
        detail = only_entry(node).status.detail
        assert detail["capacity"] == 3 and detail["capacity_from"] == "backend"
        assert node.own_state.snapshot().load.slots == 3  # what peers are told

        async def one(i: int) -> int:
            body = {"model": "m", "messages": [{"role": "user", "content": str(i)}]}
            async with session.post(node.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        clients = [asyncio.create_task(one(i)) for i in range(6)]
        await wait_until(
            lambda: served.running == 3 and node.queue.queued() == 3,
            10,
            "three requests at the server and three queued at the node",
        )
        served.gate.set()
        statuses = await asyncio.gather(*clients)

    assert statuses == [200] * 6
    assert served.most == 3  # the queue held the other three back


async def test_the_configured_capacity_wins_over_the_servers(tmp_path: Path) -> None:
    async with (
        slot_server(total_slots=3) as served,
        node_before(tmp_path, served.url, capacity=1) as node,
    ):
        assert only_entry(node).status.detail == {"capacity": 1, "capacity_from": "configured"}
        assert node.own_state.snapshot().load.slots == 1
    assert served.props_asked == 0  # the operator's word: the server is not asked


@pytest.mark.parametrize(("default", "slots"), [(None, None), (2, 2)])
async def test_a_server_that_does_not_say_falls_back_to_the_default(
    tmp_path: Path, default: int | None, slots: int | None
) -> None:
    async with (
        slot_server(total_slots=None) as served,
        node_before(tmp_path, served.url, default_capacity=default) as node,
    ):
        entry = only_entry(node)
        assert entry.status.health is Health.HEALTHY  # a 404 at /props is no failure
        assert "capacity" not in entry.status.detail
        assert node.own_state.snapshot().load.slots == slots  # None: it queues by itself
    assert served.props_asked >= 1


# -- a real llama.cpp llama-server -------------------------------------------------------


@pytest.fixture
def real_llama_server(request: pytest.FixtureRequest) -> str:
    """The session's llama-server (`--parallel 2`), or a skip where there is no binary."""
    try:
        binary, _ = llama_server_command()
    except ImportError:
        pytest.skip("no llama-server binary (scripts/bootstrap --test builds one)")
    if not binary.exists():
        pytest.skip(f"no llama-server binary at {binary}")
    url: str = request.getfixturevalue("llama_server")
    return url


@pytest.mark.engine
async def test_a_real_llama_server_says_its_slots(real_llama_server: str) -> None:
    backend = make_backend(BackendSettings(url=real_llama_server), LimitSettings())
    try:
        status = await backend.probe()
    finally:
        await backend.aclose()
    assert status.health is Health.HEALTHY, status.reason
    assert status.detail == {"capacity": 2, "capacity_from": "backend"}


@pytest.mark.engine
async def test_a_node_fronting_a_real_llama_server_advertises_its_slots(
    real_llama_server: str, tmp_path: Path
) -> None:
    async with node_before(tmp_path, real_llama_server) as node:
        assert node.own_state.snapshot().load.slots == 2
