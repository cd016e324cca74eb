"""The managed engines (`ManagedBackend`) for real, against fake engine children.

Each loaded model runs `tests/fake_engine.py` (the worker's contract, no model) in place
of the worker, so loading, eviction, keep_alive, refusals and give-ups are tested in
well under a second each. The real engines are `tests/e2e/test_managed_engines.py`'s.
Timers are shrunk: backoff 0.05 s doubling to 0.4 s, a health check every 0.1 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from shoal.backends.base import Health, Operation, Upstream
from shoal.backends.registry import BackendRegistry
from shoal.engine.managed import ManagedBackend
from shoal.engine.model_engine import GIVE_UP_AFTER, Engine, ModelEngine
from shoal.engine.residency import GIB, MIB, memory_needed
from shoal.errors import ModelNotFound, ModelNotReady, ModelTooLarge, UpstreamFailed
from shoal.events import (
    BackendReported,
    EngineExited,
    Event,
    EventBus,
    ModelLoaded,
    ModelLoading,
    ModelRefused,
    ModelUnloaded,
    ModelUnloading,
)
from shoal.models.catalog import LocalModel
from shoal.settings import EngineSettings, LimitSettings, ModelSettings
from tests.cluster import wait_until

FAKE_ENGINE = Path(__file__).parents[1] / "fake_engine.py"
WORKER = Engine("worker", None)
DEADLINE_S = 10.0
E = TypeVar("E", bound=Event)
T = TypeVar("T")


class TinyCatalog:
    """A `Catalog` over a fixed list (the real one scans stores)."""

    def __init__(self, *models: LocalModel) -> None:
        self.list = list(models)
        self.refreshed = 0

    def models(self) -> list[LocalModel]:
        return list(self.list)

    def find(self, name: str) -> LocalModel | None:
        return next((m for m in self.list if name in m.names), None)

    async def refresh(self) -> None:
        self.refreshed += 1


def gguf(tmp_path: Path, name: str, size: int = 10 * MIB) -> LocalModel:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF")
    # SmolLM2's shape: about 22 MiB of KV cache for 1024 tokens in 1 slot.
    return LocalModel(
        name=name, path=path, size_bytes=size, store="folder",
        layers=30, embedding_length=576, head_count=9, head_count_kv=3,
    )  # fmt: skip


@dataclass
class Managed:
    backend: ManagedBackend
    catalog: TinyCatalog
    registry: BackendRegistry
    control: Path
    events: list[Event] = field(default_factory=list)

    def of(self, kind: type[E], **match: Any) -> list[E]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]

    def loaded(self) -> set[str]:
        return {m.id for m in self.backend.status().models if m.loaded}

    async def wait_loaded(self, name: str) -> None:
        await wait_until(lambda: name in self.loaded(), DEADLINE_S, f"{name} to be loaded")

    async def chat(self, name: str) -> Upstream:
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]})
        return await self.backend.send(Operation.CHAT, body.encode())

    async def loaded_by_request(self, name: str) -> Upstream:
        """The first request starts the load (503); the retry, once loaded, is served."""
        with pytest.raises(ModelNotReady):
            await self.chat(name)
        await self.wait_loaded(name)
        return await self.chat(name)

    def starts(self) -> list[dict[str, Any]]:
        path = self.control / "starts"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


StartManaged = Callable[..., Awaitable[Managed]]


@pytest_asyncio.fixture
async def start_managed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartManaged]:
    control = tmp_path / "control"
    control.mkdir()

    def fake_argv(self: ModelEngine) -> list[str]:
        argv = self._child_argv_real()  # type: ignore[attr-defined]
        socket = argv[argv.index("--socket") + 1]
        return [
            sys.executable, str(FAKE_ENGINE), "--control", str(control), "--socket", socket,
            "--model", str(self.local.path), "--model-id", self.local.name,
            "--embedding-dir", str(tmp_path),
        ]  # fmt: skip

    monkeypatch.setattr(ModelEngine, "_child_argv_real", ModelEngine._child_argv, raising=False)
    monkeypatch.setattr(ModelEngine, "_child_argv", fake_argv)
    made: list[tuple[Managed, asyncio.Task[None]]] = []

    async def start(
        *models: LocalModel,
        plan: tuple[dict[str, Any], ...] = ({},),
        memory: int = 64 * GIB,
        engine: Engine | None = WORKER,
        **settings: Any,
    ) -> Managed:
        (control / "plan.json").write_text(json.dumps(list(plan)))
        bus = EventBus()
        events: list[Event] = []
        bus.subscribe(Event, events.append)
        catalog = TinyCatalog(*models)
        backend = ManagedBackend(
            catalog,
            ModelSettings(**{"context": 1024, "load_timeout_s": 5.0, **settings}),
            EngineSettings(
                restart_backoff_s=0.05, restart_backoff_max_s=0.4, health_interval_s=0.1
            ),
            LimitSettings(),
            bus,
            engine=engine,
            memory=lambda: memory,
        )
        registry = BackendRegistry(bus, interval_s=30)
        registry.add(backend)
        task = asyncio.create_task(backend.run())
        await asyncio.sleep(0)  # run() takes its first step: the engines have an owner
        result = Managed(backend, catalog, registry, control, events)
        made.append((result, task))
        return result

    yield start
    for result, task in made:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await result.backend.aclose()
        pids = [s["pid"] for s in result.starts()]
        await wait_until(lambda: not any(map(_alive, pids)), 5.0, "every child to be gone")  # noqa: B023


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_every_catalogued_model_is_listed_not_loaded(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a:q4"), gguf(tmp_path, "b:q8"))
    status = await m.backend.probe()
    assert status.health is Health.HEALTHY
    assert [(i.id, i.loaded, i.context_length) for i in status.models] == [
        ("a:q4", False, 1024),
        ("b:q8", False, 1024),
    ]
    assert status.detail["capacity"] == 1  # the worker: one generation at a time
    assert m.starts() == []  # nothing loads until asked


async def test_a_request_loads_the_model_503_meanwhile_then_it_is_served(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a:q4"))
    with pytest.raises(ModelNotReady) as refused:
        await m.chat("a:q4")
    error = refused.value
    assert error.status == 503
    assert error.code == "model_loading"
    assert int(error.headers()["Retry-After"]) >= 1
    assert "is loading (worker): about 0% done" in error.message
    (loading,) = m.of(ModelLoading)
    assert (loading.model, loading.engine, loading.evicting) == ("a:q4", "worker", ())

    await m.wait_loaded("a:q4")
    upstream = await m.chat("a:q4")
    assert upstream.status == 200
    assert json.loads(await upstream.read())["pid"] == m.starts()[0]["pid"]
    assert m.backend.local_models()[0]["in_flight"] == 1
    upstream.close()
    upstream.close()  # twice: counted once
    (row,) = m.backend.local_models()
    assert (row["state"], row["loaded"], row["in_flight"]) == ("ready", True, 0)
    assert row["load_s"] > 0
    # The registry heard it at once, and said it as ModelLoaded.
    assert m.of(ModelLoaded, backend="managed", model="a:q4")
    assert len(m.starts()) == 1  # one child, however many requests


async def test_concurrent_first_requests_start_one_engine(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a:q4"))
    results = await asyncio.gather(*(m.chat("a:q4") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ModelNotReady) for r in results)
    await m.wait_loaded("a:q4")
    assert len(m.of(ModelLoading)) == 1
    assert len(m.starts()) == 1


async def test_max_loaded_unloads_the_least_recently_used(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(*(gguf(tmp_path, n) for n in ("a", "b", "c")), max_loaded=2)
    for name in ("a", "b"):
        (await m.loaded_by_request(name)).close()
    (await m.chat("a")).close()  # a is now more recent than b

    with pytest.raises(ModelNotReady):
        await m.chat("c")
    assert m.of(ModelUnloading, model="b", reason="evicted")
    assert m.of(ModelLoading, model="c")[0].evicting == ("b",)
    await m.wait_loaded("c")
    assert m.loaded() == {"a", "c"}
    assert m.of(ModelUnloaded, model="b")


async def test_a_model_serving_requests_is_never_evicted(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a"), gguf(tmp_path, "b"), max_loaded=1)
    busy = await m.loaded_by_request("a")  # open: a request in flight
    with pytest.raises(ModelNotReady) as refused:
        await m.chat("b")
    assert refused.value.code == "model_busy"
    assert "all in use" in refused.value.message
    assert m.loaded() == {"a"}
    busy.close()
    with pytest.raises(ModelNotReady):
        await m.chat("b")  # now it may go
    await m.wait_loaded("b")
    assert m.loaded() == {"b"}


async def test_an_idle_model_unloads_after_its_keep_alive(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(
        gguf(tmp_path, "a"), gguf(tmp_path, "b"), keep_alive_s=0.2, keep_alive_per_model={"b": 60}
    )
    for name in ("a", "b"):
        (await m.loaded_by_request(name)).close()
    unloading = await wait_until(lambda: m.of(ModelUnloading, model="a"), DEADLINE_S, "a to unload")
    assert unloading[0].reason == "idle"
    await wait_until(lambda: m.loaded() == {"b"}, DEADLINE_S, "a to leave the list")
    assert not m.of(ModelUnloading, model="b")  # its own keep_alive: a minute
    first = m.starts()[0]["pid"]
    await wait_until(lambda: not _alive(first), DEADLINE_S, "a's engine to exit")


async def test_too_large_for_the_memory_limit_is_refused_clearly(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "big", size=GIB), memory_limit_bytes=512 * MIB)
    with pytest.raises(ModelTooLarge) as refused:
        await m.chat("big")
    error = refused.value
    assert error.status == 400
    assert error.code == "model_too_large"
    needs = "needs 1.18 GiB (file 1.00 GiB, KV cache 22 MiB for 1024 tokens × 1 slot(s), engine"
    assert needs in error.message
    assert "memory_limit_bytes allows 512 MiB" in error.message
    assert m.of(ModelRefused, model="big")
    assert m.starts() == []  # never started: no OOM kill to wait for


async def test_too_large_for_available_memory_is_refused(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "big", size=2 * GIB), memory=GIB)
    with pytest.raises(ModelTooLarge, match=r"1.00 GiB is available even with every other"):
        await m.chat("big")


async def test_a_model_that_never_starts_is_given_up_and_its_error_shown(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "broken"), plan=({"exit": 3},))
    with pytest.raises(ModelNotReady):
        await m.chat("broken")
    await wait_until(lambda: m.of(ModelUnloading, model="broken"), DEADLINE_S, "the give-up")
    assert m.of(ModelUnloading, model="broken")[0].reason == "failed"
    assert len(m.of(EngineExited, model="broken")) == GIVE_UP_AFTER
    with pytest.raises(UpstreamFailed, match="failed to load: failed to start 3 times"):
        await m.chat("broken")
    assert m.backend.local_models()[0]["error"].startswith("failed to start 3 times")


async def test_a_crashed_engine_is_restarted_and_503_meanwhile(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a"), plan=({"exit": 9, "after_s": 0.5}, {}))
    (await m.loaded_by_request("a")).close()
    await wait_until(lambda: m.of(EngineExited, model="a"), DEADLINE_S, "the crash")
    await m.wait_loaded("a")  # the supervisor started it again
    assert len(m.starts()) == 2
    assert m.backend.local_models()[0]["restarts"] == 1
    unloaded = m.of(ModelUnloaded, model="a")
    assert unloaded  # out of the index while it restarted
    assert not m.of(ModelUnloading)  # yet never unloaded


async def test_operator_load_waits_until_ready_and_unload_stops_it(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a"))
    row = await m.backend.load("a")
    assert (row["state"], row["loaded"]) == ("ready", True)
    pid = row["pid"]
    assert row["memory_bytes"] > 0  # the child's resident memory
    row = await m.backend.unload("a")
    assert (row["state"], row["loaded"]) == ("unloaded", False)
    assert not _alive(pid)
    assert m.of(ModelUnloading, model="a", reason="operator")
    assert (await m.backend.unload("a"))["state"] == "unloaded"  # idempotent
    with pytest.raises(ModelNotFound):
        await m.backend.load("nope")


async def test_a_model_whose_file_left_the_catalog_is_unloaded(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a"), gguf(tmp_path, "b"))
    await m.backend.load("a")
    m.catalog.list = m.catalog.list[1:]
    await m.backend.refresh()
    assert m.catalog.refreshed == 1
    assert m.of(ModelUnloading, model="a", reason="removed")
    reported = m.of(BackendReported)[-1].status
    assert [i.id for i in reported.models] == ["b"]


async def test_no_engine_is_a_backend_down_with_the_reason(
    start_managed: StartManaged, tmp_path: Path
) -> None:
    m = await start_managed(gguf(tmp_path, "a"), engine=None)
    status = await m.backend.probe()
    assert status.health is Health.DOWN
    assert "install llama-server" in status.reason


def test_llama_server_command_line(tmp_path: Path) -> None:
    model = gguf(tmp_path, "a:q4")
    engine = ModelEngine(
        model,
        memory_needed(model, 1024, 2),
        Engine("llama-server", Path("/opt/llama-server")),
        backend="managed",
        settings=ModelSettings(context=1024, parallel=2, threads=3),
        engine_settings=EngineSettings(),
        limits=LimitSettings(),
        bus=EventBus(),
        run_dir=tmp_path,
        number=1,
        on_change=lambda engine: None,
    )
    argv = engine._child_argv()
    port = argv[argv.index("--port") + 1]
    assert argv == [
        "/opt/llama-server", "-m", str(model.path), "--host", "127.0.0.1", "--port", port,
        "-c", "2048", "-np", "2", "--alias", "a:q4", "-t", "3", "-tb", "3",
    ]  # fmt: skip
    assert engine.transport.base_url == f"http://127.0.0.1:{port}"


async def test_an_engine_that_cannot_be_spawned_is_a_failed_load_not_a_crash(
    start_managed: StartManaged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_spawn(self: ModelEngine, argv: list[str]) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "llama-server")

    monkeypatch.setattr(ModelEngine, "_spawn", no_spawn)
    m = await start_managed(gguf(tmp_path, "a"), gguf(tmp_path, "b"))
    with pytest.raises(ModelNotReady):
        await m.chat("a")
    await wait_until(
        lambda: m.of(ModelUnloading, model="a", reason="failed"), DEADLINE_S, "the failure"
    )
    with pytest.raises(UpstreamFailed, match=r"could not be started \(FileNotFoundError"):
        await m.chat("a")
    with pytest.raises(ModelNotReady):  # the backend lives on: another model may load
        await m.chat("b")
