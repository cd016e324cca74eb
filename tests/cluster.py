"""Several real `Node`s in one process: real sockets, real mutual TLS, fake backends.

For fast tests of the shells (peers, admission, the mesh handlers, the composition
root): each node runs `Node.run` in a task of the test's event loop, on free loopback
ports, with no engine and no detection, and serves one in-process `FakeBackend`. Every
node's events are recorded (`RunningNode.events`), so tests wait for what happened
instead of sleeping. Nothing here replaces the subprocess and namespace tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from shoal.backends.base import BackendStatus, Health, ModelInfo, Operation
from shoal.events import Event, EventBus
from shoal.mesh.membership import PeerState
from shoal.node import Node
from shoal.settings import ClusterMode, Settings
from shoal.trust import secret as secret_mod

E = TypeVar("E", bound=Event)
ALIVE = PeerState.ALIVE


class FakeUpstream:
    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.content_type = "application/json"
        self.served_by: str | None = None
        self._body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self) -> bytes:
        return self._body

    def close(self) -> None:
        pass


class FakeBackend:
    """An in-process Backend: healthy, holding `models`, answering every chat at once."""

    kind = "fake"

    def __init__(self, name: str, models: tuple[str, ...]) -> None:
        self.name = name
        self.location = f"fake://{name}"
        self.models = tuple(ModelInfo(m) for m in models)
        self.sent: list[tuple[Operation, bytes]] = []
        self.gate: asyncio.Event | None = None  # set: answers wait for it

    async def probe(self) -> BackendStatus:
        return BackendStatus(Health.HEALTHY, self.models)

    async def send(self, op: Operation, body: bytes) -> FakeUpstream:
        self.sent.append((op, body))
        if self.gate is not None:
            await self.gate.wait()
        model = orjson.loads(body)["model"]
        message = {"role": "assistant", "content": "hi"}
        answer = {"object": "chat.completion", "model": model, "served": self.name,
                  "choices": [{"index": 0, "message": message}]}  # fmt: skip
        return FakeUpstream(orjson.dumps(answer))

    async def aclose(self) -> None:
        pass


@dataclass
class RunningNode:
    node: Node
    backend: FakeBackend
    events: list[Event] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def seen(self, kind: type[E], **match: Any) -> list[E]:
        """The recorded events of `kind` whose fields equal `match`."""
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait_for(self, kind: type[E], within: float = 10.0, **match: Any) -> E:
        """The first recorded event of `kind` matching `match`, waiting up to `within` s."""
        return (await wait_until(lambda: self.seen(kind, **match), within, kind.__name__))[0]

    async def wait_for_model(self, model: str, holders: int = 1) -> None:
        """Until this node lists `model` as held by `holders` nodes of the cluster."""

        def listed() -> bool:
            found = self.node.views.models(local_only=False)["data"]
            return any(m["id"] == model and len(m["nodes"]) >= holders for m in found)

        await wait_until(listed, 10, f"{self.node.name} to know {holders} holder(s) of {model}")

    def alive_peers(self) -> list[str]:
        return [p.view.peer_id for p in self.node.peers.peers() if p.view.state is ALIVE]


T = TypeVar("T")


async def chat(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    """POST a chat completion to the node at `url`: status, headers and JSON answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        return response.status, dict(response.headers), await response.json()


async def wait_until(condition: Callable[[], T], within: float, what: str) -> T:
    """Poll `condition` on the event loop until it is truthy, or fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


def node_settings(home: Path, name: str, mode: ClusterMode, **overrides: Any) -> Settings:
    mesh = {"new_interval_s": 5.0, "push_min_interval_s": 0.05, **overrides.pop("mesh", {})}
    return Settings(
        name=name,
        port=0,
        data_dir=home / name,
        engine={"enabled": False},
        detect={"enabled": False},
        cluster={"mode": mode},
        mesh=mesh,
        **overrides,
    )


@contextlib.asynccontextmanager
async def cluster(
    home: Path,
    count: int,
    *,
    mode: ClusterMode = "open",
    models: Callable[[int], tuple[str, ...]] = lambda i: ("m",),
    **overrides: Any,
) -> AsyncIterator[list[RunningNode]]:
    """`count` nodes, serving and healthy; stopped (goodbyes said) on exit."""
    running: list[RunningNode] = []
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    secret = secret_mod.new_secret()
    try:
        for i in range(count):
            settings = node_settings(home, f"n{i}", mode, **overrides)
            if mode == "secret":
                secret_mod.write_secret(settings.data_dir, secret)
            bus = EventBus()
            events: list[Event] = []
            bus.subscribe(Event, events.append)
            node = Node(settings, bus)
            backend = FakeBackend(f"fake{i}", models(i))
            node.registry.add(backend)
            stop = asyncio.Event()
            tasks.append(asyncio.create_task(node.run(stop)))
            stops.append(stop)
            member = RunningNode(node, backend, events)
            running.append(member)
        for member in running:
            await wait_until(
                lambda m=member: (
                    m.node.url  # type: ignore[misc]
                    and all(e.healthy for e in m.node.registry.entries())
                ),
                10,
                "a node to listen with its backend healthy",
            )
        yield running
    finally:
        for stop in stops:
            stop.set()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()  # a node that crashed fails the test


@contextlib.asynccontextmanager
async def model_node(home: Path, name: str, **models: Any) -> AsyncIterator[RunningNode]:
    """One node in open mode with these `[models]` settings and its own store under
    `home/name/hub` (other stores not adopted), stopped on exit."""
    store = {"store": home / name / "hub", "adopt_ollama": False, "adopt_lmstudio": False}
    settings = node_settings(home, name, "open", models={**store, **models})
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(Event, events.append)
    node = Node(settings, bus)
    member = RunningNode(node, FakeBackend(f"fake-{name}", ()), events)
    node.registry.add(member.backend)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        await wait_until(lambda: node.url, 10, f"{name} to listen")
        yield member
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
