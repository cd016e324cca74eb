"""Every implementation of `Backend`, started, with a way to make its server go away.

    param          backend               its server
    fake-openai    OpenAICompatBackend   tests.fakes.FakeServer
    fake-ollama    OllamaBackend         FakeServer(ollama=True)
    llama-server   OpenAICompatBackend   a real llama.cpp llama-server   (marked engine)
    engine         EngineBackend         its own supervised llama.cpp child (marked engine)

`subject` may be shared between tests (the real servers take seconds to start) and no
test breaks it; `fresh_subject` is a test's own, for the tests that stop or close it.
The HTTP backends are built by `make_backend`, as the node builds them from its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import pytest_asyncio

from shoal.backends.base import Backend, Health
from shoal.backends.detect import make_backend
from shoal.engine.supervisor import EngineBackend
from shoal.settings import BackendKind, BackendSettings, EngineSettings, LimitSettings
from tests.conftest import LLAMA_SERVER_ALIAS, llama_server_command
from tests.fakes import FakeServer
from tests.support import free_port

T = TypeVar("T")

KINDS = [
    pytest.param("fake-openai"),
    pytest.param("fake-ollama"),
    pytest.param("llama-server", marks=pytest.mark.engine),
    pytest.param("engine", marks=pytest.mark.engine),
]

# Seconds for an engine to stop: its child gets 2 s after its stdin closes, then SIGKILL.
STOP_WITHIN_S = 10.0

FAKE_MODELS = ["fake-chat", "fake-embed"]
# Ollama says what a model does through its family: "embed" makes the fake's a bert.
FAKE_OLLAMA_MODELS = ["llama3.2:1b", "nomic-embed-text:latest"]


@dataclass
class Subject:
    backend: Backend
    # Makes the server go away for good, leaving the backend object as a registry holds
    # it; None on a shared subject, which no test may break.
    stop_server: Callable[[], Awaitable[None]] | None = None
    # The param that made it ("fake-openai", ...), for expectations that differ.
    label: str = ""


async def wait_until(
    condition: Callable[[], Awaitable[T | None]],
    within_s: float,
    what: str,
    interval_s: float = 0.05,
) -> T:
    """`tests.support.wait_for` for async conditions: polls without blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {within_s} s waiting for {what}")


@pytest.fixture(params=KINDS)
def subject(request: pytest.FixtureRequest) -> Subject:
    """A started backend of every kind; shared where starting its server takes seconds."""
    label = str(request.param)
    found: Subject = request.getfixturevalue(f"{label.replace('-', '_')}_subject")
    return dataclasses.replace(found, label=label)


@pytest.fixture(params=KINDS)
def fresh_subject(request: pytest.FixtureRequest) -> Subject:
    """A started backend of every kind with a server of its own, which the test may stop."""
    label = str(request.param)
    found: Subject = request.getfixturevalue(f"fresh_{label.replace('-', '_')}_subject")
    return dataclasses.replace(found, label=label)


# -- the fakes: cheap, so every test gets its own ----------------------------------------


def _http_backend(url: str, kind: BackendKind) -> Backend:
    return make_backend(BackendSettings(url=url, kind=kind), LimitSettings())


@contextlib.asynccontextmanager
async def _fake(*, ollama: bool) -> AsyncIterator[Subject]:
    server = FakeServer(FAKE_OLLAMA_MODELS if ollama else FAKE_MODELS, ollama=ollama)
    # A gap between chunks, as a real server's, so that a stream can be left midway.
    server.chunk_gap_s = 0.02
    server.start()
    backend = _http_backend(server.url, "ollama" if ollama else "openai")

    async def stop_server() -> None:
        server.stop()

    try:
        yield Subject(backend, stop_server)
    finally:
        await backend.aclose()
        server.close()


@pytest_asyncio.fixture(loop_scope="module")
async def fake_openai_subject() -> AsyncIterator[Subject]:
    async with _fake(ollama=False) as subject:
        yield subject


@pytest_asyncio.fixture(loop_scope="module")
async def fake_ollama_subject() -> AsyncIterator[Subject]:
    async with _fake(ollama=True) as subject:
        yield subject


@pytest.fixture
def fresh_fake_openai_subject(fake_openai_subject: Subject) -> Subject:
    return fake_openai_subject


@pytest.fixture
def fresh_fake_ollama_subject(fake_ollama_subject: Subject) -> Subject:
    return fake_ollama_subject


# -- llama.cpp's llama-server ------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def llama_server_subject(llama_server: str) -> AsyncIterator[Subject]:
    """The session's llama-server: other modules use it too, so it is never stopped."""
    backend = _http_backend(llama_server, "openai")
    try:
        yield Subject(backend)
    finally:
        await backend.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_llama_server_subject(f16_gguf: Path, tmp_path: Path) -> AsyncIterator[Subject]:
    """A second llama-server of the test's own, with the session's model, to be stopped."""
    binary, env = llama_server_command()
    port = free_port()
    args = [
        "-m", str(f16_gguf), "--alias", LLAMA_SERVER_ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "1024",
    ]  # fmt: skip
    log = tmp_path / "llama-server.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    backend = _http_backend(f"http://127.0.0.1:{port}", "openai")

    async def stop_server() -> None:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)

    async def healthy() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"llama-server exited {process.returncode}: {log.read_text()}")
        return (await backend.probe()).health is Health.HEALTHY

    try:
        await wait_until(healthy, 60, "a second llama-server to load its model")
        yield Subject(backend, stop_server)
    finally:
        await backend.aclose()
        await stop_server()


# -- the embedded engine -----------------------------------------------------------------


def make_engine_backend(settings: EngineSettings, limits: LimitSettings) -> EngineBackend:
    """The engine as the node builds it, before and after its status hook became events.

    The supervisor reported its state through an `on_status` callback and is being
    changed to publish events on an `EventBus` it is given; either constructor is served.
    """
    extra: dict[str, Any] = {}
    if "bus" in inspect.signature(EngineBackend).parameters:
        from shoal.events import EventBus

        extra["bus"] = EventBus()
    return EngineBackend(settings, limits, **extra)


def _engine_children() -> set[int]:
    """This process's engine children, found without the supervisor's internals."""
    pids = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "shoal.engine.worker" in child.cmdline():
                pids.add(child.pid)
    return pids


@contextlib.asynccontextmanager
async def _running_engine(settings: EngineSettings) -> AsyncIterator[tuple[EngineBackend, int]]:
    """A healthy engine under supervision, and its child's pid; stopped as the node does."""
    before = _engine_children()
    backend = make_engine_backend(settings, LimitSettings())
    supervisor = asyncio.create_task(backend.run())

    async def healthy() -> bool:
        if supervisor.done():
            supervisor.result()  # its error, if it has one
            raise AssertionError("the engine supervisor returned")
        return (await backend.probe()).health is Health.HEALTHY

    try:
        await wait_until(healthy, 120, "the embedded engine to become healthy")
        (child,) = _engine_children() - before
        yield backend, child
    finally:
        supervisor.cancel()
        try:
            # Bounded: a supervisor that outlives its cancellation fails here, not at
            # the suite's timeout minutes later.
            async with asyncio.timeout(STOP_WITHIN_S):
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
        except TimeoutError:
            raise AssertionError(
                f"the engine supervisor still ran {STOP_WITHIN_S} s after its cancellation"
            ) from None
        finally:
            await backend.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine_subject() -> AsyncIterator[Subject]:
    async with _running_engine(EngineSettings()) as (backend, _):
        yield Subject(backend)


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_engine_subject() -> AsyncIterator[Subject]:
    # A killed child is restarted after the backoff: a long one keeps this one down
    # while the test looks at it.
    settings = EngineSettings(restart_backoff_s=600, restart_backoff_max_s=600)
    async with _running_engine(settings) as (backend, child):

        async def stop_server() -> None:
            os.kill(child, signal.SIGKILL)

        yield Subject(backend, stop_server)
