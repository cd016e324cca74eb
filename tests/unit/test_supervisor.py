"""The engine supervisor, for real, against a fake child (`tests/fake_engine.py`).

Each test plans what every start of the child does, runs `EngineBackend.run()` and
waits, with a deadline, for what the supervisor publishes on the bus. Timers are
shrunk: backoff 0.05 s doubling to 0.4 s, a health check every 0.1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from shoal.backends.base import Health, Operation, Upstream
from shoal.backoff import Backoff
from shoal.engine import supervisor
from shoal.engine.supervisor import HEALTH_MISSES_BEFORE_KILL, EngineBackend
from shoal.errors import BackendUnavailable, UpstreamFailed
from shoal.events import BackendReported, EngineExited, EngineStarted, Event, EventBus
from shoal.settings import EngineSettings, LimitSettings

FAKE_ENGINE = Path(__file__).parents[1] / "fake_engine.py"
DEADLINE_S = 10.0  # for anything to happen; a pass takes a fraction of it
E = TypeVar("E", bound=Event)
T = TypeVar("T")


@dataclass(frozen=True)
class _RecordingBackoff(Backoff):
    """The supervisor's backoff, keeping every delay it was asked for."""

    asked: list[float] = field(default_factory=list)

    def delay(self, failures: int) -> float:
        delay = super().delay(failures)
        self.asked.append(delay)
        return delay


class FakeEngineBackend(EngineBackend):
    """The real supervisor, running the fake engine with the real worker's arguments."""

    def __init__(self, control: Path, settings: EngineSettings, bus: EventBus) -> None:
        super().__init__(settings, LimitSettings(), bus)
        self.control = control
        self.backoff = self._backoff = _RecordingBackoff(
            settings.restart_backoff_s, settings.restart_backoff_max_s
        )

    def _child_argv(self) -> list[str]:
        argv = super()._child_argv()
        assert argv[:3] == [sys.executable, "-m", "shoal.engine.worker"]
        return [sys.executable, str(FAKE_ENGINE), "--control", str(self.control), *argv[3:]]


async def wait_until(condition: Callable[[], T], what: str, within_s: float = DEADLINE_S) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `within_s`."""
    try:
        async with asyncio.timeout(within_s):
            # Polled, not awaited on an Event: much of what tests wait for is another
            # process's doing (a file the child writes, its death).
            while not (value := condition()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within_s} s waiting for {what}") from None
    return value


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Engine:
    """A supervisor at work: its backend, its run task, and what it published when."""

    backend: FakeEngineBackend
    bus: EventBus
    control: Path
    task: asyncio.Task[None]
    stamped: list[tuple[float, Event]]
    closed: bool = False

    @property
    def events(self) -> list[Event]:
        return [event for _, event in self.stamped]

    def of(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]

    async def count(self, kind: type[E], n: int) -> list[E]:
        """The first `n` events of `kind`, once there are that many."""
        await wait_until(lambda: len(self.of(kind)) >= n, f"{n} × {kind.__name__}")
        return self.of(kind)[:n]

    async def started(self, n: int) -> EngineStarted:
        return (await self.count(EngineStarted, n))[-1]

    async def reported(self, health: Health, n: int = 1) -> None:
        await wait_until(
            lambda: sum(1 for h in self.healths() if h is health) >= n, f"{n} × {health}"
        )

    def healths(self) -> list[Health]:
        return [event.status.health for event in self.of(BackendReported)]

    def trace(self) -> list[str]:
        """The published events in order, in short: "starting", "started", "exited: ..."."""
        lines = []
        for event in self.events:
            match event:
                case BackendReported(status=status):
                    lines.append(str(status.health))
                case EngineStarted():
                    lines.append("started")
                case EngineExited(reason=reason):
                    lines.append(f"exited: {reason}")
        return lines

    def starts(self) -> list[dict[str, Any]]:
        """What the fake child wrote at each start: pid and argv."""
        path = self.control / "starts"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run_dir(self) -> Path:
        """Where the supervisor put the child's socket (from the first child's argv)."""
        argv = self.starts()[0]["argv"]
        return Path(argv[argv.index("--socket") + 1]).parent

    def sends_when_down(self) -> list[asyncio.Task[Upstream]]:
        """A send() begun the moment each DOWN is published, before the backoff ends."""
        tasks: list[asyncio.Task[Upstream]] = []

        def on_report(event: BackendReported) -> None:
            if event.status.health is Health.DOWN:
                tasks.append(asyncio.create_task(self.backend.send(Operation.CHAT, b"{}")))

        self.bus.subscribe(BackendReported, on_report)
        return tasks

    async def close(self) -> None:
        """Shut down as the node does (cancel run, then aclose); no child may outlive it."""
        if self.closed:
            return
        self.closed = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.backend.aclose()
        pids = [start["pid"] for start in self.starts()]
        try:
            await wait_until(lambda: not any(map(alive, pids)), "every child to be gone", 5.0)
        finally:
            for pid in filter(alive, pids):
                os.kill(pid, signal.SIGKILL)  # a leak: fail, but leave nothing behind


class StartEngine(Protocol):
    def __call__(self, *plan: dict[str, Any], **settings: Any) -> Engine: ...


@pytest.fixture
async def start_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartEngine]:
    """Starts a supervisor whose n-th child behaves as `plan[n]` (the last repeats)."""
    # A health check gets 0.3 s, not 1 s: a hang is noticed in 1.2 s.
    monkeypatch.setattr(supervisor, "HEALTH_TIMEOUT_MIN_S", 0.3)
    model = tmp_path / "Fake-1M.Q4_0.gguf"  # its name gives the model id and quantization
    model.write_bytes(b"GGUF" + bytes(60))
    embedding = tmp_path / "embedding"
    embedding.mkdir()
    (embedding / "model.safetensors").write_bytes(bytes(100))
    engines: list[Engine] = []

    def start(*plan: dict[str, Any], **settings: Any) -> Engine:
        control = tmp_path / f"control-{len(engines)}"
        control.mkdir()
        (control / "plan.json").write_text(json.dumps(plan))
        engine_settings = EngineSettings(
            model_path=model,
            embedding_path=embedding,
            restart_backoff_s=0.05,
            restart_backoff_max_s=0.4,
            health_interval_s=0.1,
            # A limit only: a child is watched as soon as it answers.
            start_timeout_s=settings.pop("start_timeout_s", DEADLINE_S),
            **settings,
        )
        bus = EventBus()
        stamped: list[tuple[float, Event]] = []
        bus.subscribe(Event, lambda event: stamped.append((time.monotonic(), event)))
        backend = FakeEngineBackend(control, engine_settings, bus)
        engine = Engine(backend, bus, control, asyncio.create_task(backend.run()), stamped)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        await engine.close()


async def test_start_reports_starting_started_healthy_and_serves(start_engine: StartEngine) -> None:
    engine = start_engine({})
    await engine.reported(Health.HEALTHY)

    assert engine.trace() == ["starting", "started", "healthy"]
    [started] = engine.of(EngineStarted)
    [child] = engine.starts()
    assert started.pid == child["pid"]
    assert started.backend == "embedded"
    argv = child["argv"]
    assert argv[argv.index("--model-id") + 1] == "Fake-1M"
    assert [m.id for m in engine.backend.models] == ["Fake-1M", "all-MiniLM-L6-v2"]

    status = await engine.backend.probe()
    assert status.health is Health.HEALTHY
    assert status.detail["pid"] == started.pid
    assert status.detail["answered"] >= 2  # the probe reached the child: ready check + this

    upstream = await engine.backend.send(Operation.CHAT, b"{}")
    assert upstream.status == 200
    assert json.loads(await upstream.read()) == {"pid": started.pid}
    assert engine.backend.restarts == 0


async def test_a_killed_child_is_reported_refused_meanwhile_and_restarted(
    start_engine: StartEngine,
) -> None:
    engine = start_engine({})
    first = await engine.started(1)
    refused = engine.sends_when_down()

    os.kill(first.pid, signal.SIGKILL)
    second = await engine.started(2)
    await engine.reported(Health.HEALTHY, 2)

    assert engine.trace() == [
        "starting", "started", "healthy",
        "exited: was killed by SIGKILL", "down",
        "starting", "started", "healthy",
    ]  # fmt: skip
    [exited] = engine.of(EngineExited)
    assert exited.restarts == 0  # this restart not counted yet
    down = engine.of(BackendReported)[2].status
    assert down.reason == "restarting after it was killed by SIGKILL"
    assert engine.backend.restarts == 1
    assert second.pid != first.pid
    assert not alive(first.pid)

    with pytest.raises(BackendUnavailable, match="killed by SIGKILL") as caught:
        await refused[0]
    assert caught.value.status == 503
    assert caught.value.retry_after >= 1

    status = await engine.backend.probe()
    assert status.health is Health.HEALTHY
    assert status.detail["restarts"] == 1
    assert status.detail["last_exit"] == "was killed by SIGKILL"
    upstream = await engine.backend.send(Operation.CHAT, b"{}")
    assert json.loads(await upstream.read()) == {"pid": second.pid}


async def test_repeated_crashes_back_off_doubling_up_to_the_ceiling(
    start_engine: StartEngine,
) -> None:
    engine = start_engine({"exit": 1})  # every start crashes at once
    exits = await engine.count(EngineExited, 5)

    assert [e.reason for e in exits] == ["exited with status 1"] * 5
    assert [e.restarts for e in exits] == [0, 1, 2, 3, 4]
    assert engine.backend.backoff.asked[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4])
    assert not engine.of(EngineStarted)  # never ready, never announced
    # ...and it waits that long between an exit and the next start.
    times = [
        at
        for at, event in engine.stamped
        if isinstance(event, EngineExited)
        or (isinstance(event, BackendReported) and event.status.health is Health.STARTING)
    ]
    exit_times, start_times = times[1::2], times[2::2]  # times[0]: the first start
    for exited_at, restarted_at, delay in zip(
        exit_times, start_times, engine.backend.backoff.asked, strict=False
    ):
        assert restarted_at - exited_at >= delay - 0.005


async def test_a_stable_run_resets_the_backoff(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child crashing at start lives ~0.1-0.2 s; the third one serves for 0.8 s.
    monkeypatch.setattr(supervisor, "STABLE_AFTER_S", 0.8)
    engine = start_engine({"exit": 1}, {"exit": 1}, {"exit": 2, "after_s": 0.8}, {"ready": False})
    exits = await engine.count(EngineExited, 3)

    assert [e.reason for e in exits] == [
        "exited with status 1",
        "exited with status 1",
        "exited with status 2",  # after a stable run
    ]
    assert len(engine.of(EngineStarted)) == 1  # the third child served before it exited
    assert engine.backend.backoff.asked[:3] == pytest.approx([0.05, 0.1, 0.05])


async def test_a_hung_child_is_killed_after_its_missed_health_checks(
    start_engine: StartEngine,
) -> None:
    # Answers the ready check and two health checks, then never again.
    engine = start_engine({"hang_after": 3}, {"ready": False})
    first = await engine.started(1)
    await engine.reported(Health.STARTING, 2)

    [exited] = engine.of(EngineExited)
    assert exited.reason == "stopped answering its health check (killed)"
    misses = (engine.control / f"hung-{first.pid}").read_text().splitlines()
    assert len(misses) == HEALTH_MISSES_BEFORE_KILL
    assert not alive(first.pid)
    assert engine.backend.restarts == 1


async def test_a_child_that_ignores_its_stdin_is_killed(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "STOP_GRACE_S", 0.3)
    engine = start_engine({"stuck": True}, {"ready": False}, start_timeout_s=0.3)
    await engine.reported(Health.STARTING, 2)

    [exited] = engine.of(EngineExited)
    assert exited.reason == "did not become ready in time"
    first = engine.starts()[0]["pid"]
    assert (engine.control / f"stdin-closed-{first}").exists()  # asked to go first
    assert not alive(first)  # then killed


async def test_shutdown_while_a_stuck_child_is_being_stopped_leaves_no_child(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "STOP_GRACE_S", 0.5)
    engine = start_engine({"stuck": True}, start_timeout_s=0.3)
    await wait_until(engine.starts, "the child to start")
    first = engine.starts()[0]["pid"]
    await wait_until(
        lambda: (engine.control / f"stdin-closed-{first}").exists(),
        "the supervisor to begin stopping the stuck child",
    )

    await engine.close()  # within the child's grace: the stop is cut short

    assert not alive(first)


async def test_a_shutdown_as_the_child_exits_is_not_lost(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C reaches the node and its child at once: the node cancels run() just as
    # the child's exit comes in. Here the cancel lands at that instant, every time.
    engine = start_engine({})
    started = await engine.started(1)
    wait = asyncio.subprocess.Process.wait
    watching = asyncio.Event()

    async def wait_then_shut_down(process: asyncio.subprocess.Process) -> int:
        watching.set()
        returncode = await wait(process)
        engine.task.cancel()
        return returncode

    monkeypatch.setattr(asyncio.subprocess.Process, "wait", wait_then_shut_down)
    await wait_until(watching.is_set, "the supervisor to wait on the child again")
    os.kill(started.pid, signal.SIGKILL)

    await wait_until(engine.task.done, "run() to end", within_s=3.0)
    assert engine.task.cancelled()
    assert len(engine.of(EngineStarted)) == 1  # and no restart


async def test_a_child_never_ready_in_time_is_stopped_and_retried(
    start_engine: StartEngine,
) -> None:
    engine = start_engine({"ready": False}, start_timeout_s=0.4)
    exits = await engine.count(EngineExited, 2)

    assert [e.reason for e in exits] == ["did not become ready in time"] * 2
    assert engine.trace()[:6] == [
        "starting", "exited: did not become ready in time", "down",
        "starting", "exited: did not become ready in time", "down",
    ]  # fmt: skip
    assert engine.backend.restarts >= 1
    first = engine.starts()[0]["pid"]
    assert not alive(first)


async def test_a_slow_answer_is_not_a_hang(start_engine: StartEngine) -> None:
    engine = start_engine({"chat_delay_s": 0.6})  # six health intervals
    started = await engine.started(1)
    before = (await engine.backend.probe()).detail["answered"]

    upstream = await engine.backend.send(Operation.CHAT, b"{}")
    assert json.loads(await upstream.read()) == {"pid": started.pid}

    # Health checks went on beside the answer, and were answered.
    after = (await engine.backend.probe()).detail["answered"]
    assert after - before > HEALTH_MISSES_BEFORE_KILL
    assert engine.trace() == ["starting", "started", "healthy"]


async def test_a_child_killed_mid_answer_fails_it_as_the_engines_fault(
    start_engine: StartEngine,
) -> None:
    engine = start_engine({"chat_delay_s": 60}, {"ready": False})
    started = await engine.started(1)
    upstream = await engine.backend.send(Operation.CHAT, b"{}")  # headers in, body late

    os.kill(started.pid, signal.SIGKILL)
    try:
        with pytest.raises(UpstreamFailed, match="embedded engine stopped before answering"):
            await upstream.read()
    finally:
        upstream.close()


async def test_aclose_ends_the_child_and_removes_the_run_dir(start_engine: StartEngine) -> None:
    engine = start_engine({})
    started = await engine.started(1)
    await engine.reported(Health.HEALTHY)
    run_dir = engine.run_dir()
    assert (run_dir / "engine.sock").is_socket()

    await engine.close()

    assert not alive(started.pid)
    assert not run_dir.exists()
    gc.collect()  # an unclosed session or pipe would warn now, an error in this suite


async def test_aclose_before_run_removes_the_run_dir(tmp_path: Path) -> None:
    model = tmp_path / "Fake-1M.gguf"
    model.write_bytes(b"GGUF")
    settings = EngineSettings(model_path=model, embedding_path=tmp_path)
    backend = EngineBackend(settings, LimitSettings(), EventBus())
    run_dir = backend._run_dir
    assert run_dir.is_dir()

    await backend.aclose()

    assert not run_dir.exists()
