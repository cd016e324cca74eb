"""Supervised engine children, and the embedded engine as a Backend.

Theory of operation: a `SupervisedChild` keeps one child process running. `run()`
starts it, waits until it answers its health check, then watches it. If the child
exits (a crash in native code, SIGKILL, OOM) or stops answering its health check three
times in a row (a hang), it is killed if need be and started again after a backoff that
doubles from `restart_backoff_s` up to `restart_backoff_max_s`, and resets once a child
has stayed up for a minute. A child that never becomes ready `give_up_after` starts in a
row ends `run()` (the managed engines give up on a model that cannot load; the embedded
engine never does). Every change of the child's state goes to `_changed()` at once, and
`EngineStarted` / `EngineExited` (with the restart count) are published; the node never
goes down with a child. Subclasses say what to run (`_child_argv`) and how to ask it to
stop (`_ask_to_stop`: close its stdin, by default).

`EngineBackend` is the embedded engine: the worker (`shoal.engine.worker`) with the
packaged models on a Unix socket. While its child is not ready, `send` refuses with 503
and Retry-After; each change is published as `BackendReported`, so a crash takes the
models out of the index without waiting for a probe. The managed engines
(`shoal.engine.managed`) run one `SupervisedChild` per loaded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shoal.backends.base import (
    GENERATION,
    BackendStatus,
    Health,
    ModelInfo,
    Operation,
    Upstream,
)
from shoal.backends.http import PROBE_ERRORS, HttpTransport, HttpUpstream
from shoal.backoff import Backoff
from shoal.engine import assets
from shoal.errors import BackendUnavailable, UpstreamFailed
from shoal.events import BackendReported, EngineExited, EngineStarted, EventBus
from shoal.settings import EngineSettings, LimitSettings

log = logging.getLogger(__name__)

HEALTH_MISSES_BEFORE_KILL = 3
# The least time a running child gets to answer a health check: its event loop answers
# within milliseconds even mid-generation (llama.cpp releases the GIL), so silence for
# this long means a hang.
HEALTH_TIMEOUT_MIN_S = 1.0
STOP_GRACE_S = 2.0  # a child's time to exit after it is asked to, before SIGKILL
STABLE_AFTER_S = 60.0  # a child up this long resets the restart backoff
EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2"
EMBEDDING_MAX_TOKENS = 256


class SupervisedChild:
    """One child process kept running (see the module docstring). Subclass it."""

    def __init__(
        self,
        name: str,
        settings: EngineSettings,
        bus: EventBus,
        transport: HttpTransport,
        *,
        label: str,
        model: str | None = None,
        start_timeout_s: float | None = None,
        give_up_after: int | None = None,
    ) -> None:
        self.name = name  # the backend's name, in events
        self.model = model  # the managed model it serves, in events; None: the engine
        self.label = label  # for people, in the log
        self._settings = settings
        self._bus = bus
        self._transport = transport
        self._backoff = Backoff(settings.restart_backoff_s, settings.restart_backoff_max_s)
        self._start_timeout_s = start_timeout_s or settings.start_timeout_s
        self._give_up_after = give_up_after
        self._process: asyncio.subprocess.Process | None = None
        self.health = Health.STARTING
        self.reason = "starting"
        self.health_detail: dict[str, Any] = {}  # the child's last /health answer
        self.started_at: float | None = None  # monotonic, the current start
        self.ready_after_s: float | None = None  # how long its last good start took
        self.restarts = 0
        self.last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- what subclasses say ------------------------------------------------------

    def _child_argv(self) -> list[str]:
        raise NotImplementedError

    async def _spawn(self, argv: list[str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,  # closed by us, or by our death: the child exits
            # One BLAS thread for the embedding model: beside llama.cpp's threads on a
            # small machine, more only contend (10 ms vs 40+ ms per sentence, measured).
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        )

    def _ask_to_stop(self, process: asyncio.subprocess.Process) -> None:
        if process.stdin is not None:
            process.stdin.close()

    def _changed(self) -> None:
        """`health` and `reason` changed."""

    # -- supervision --------------------------------------------------------------

    async def run(self) -> None:
        """Keep a child running until cancelled (or, with `give_up_after`, until that
        many starts in a row never became ready)."""
        failures = 0  # in a row, without a stable run between them
        unready = 0  # starts in a row that never became ready
        while True:
            started = time.monotonic()
            exit_reason, was_ready = await self._run_child_once()
            self.last_exit = exit_reason
            failures = 1 if time.monotonic() - started > STABLE_AFTER_S else failures + 1
            unready = 0 if was_ready else unready + 1
            self._bus.publish(EngineExited(self.name, exit_reason, self.restarts, self.model))
            if self._give_up_after is not None and unready >= self._give_up_after:
                log.error("%s %s; giving up after %d starts", self.label, exit_reason, unready)
                self._set(Health.DOWN, f"failed to start {unready} times: it {exit_reason}")
                return
            backoff = self._backoff.delay(failures)
            log.error("%s %s; restarting in %.1f s", self.label, exit_reason, backoff)
            self._set(Health.DOWN, f"restarting after it {exit_reason}")
            await asyncio.sleep(backoff)
            self.restarts += 1

    async def _run_child_once(self) -> tuple[str, bool]:
        """Start, wait ready, watch: why the child ended, and whether it was ever ready."""
        self._set(Health.STARTING, "starting")
        self.started_at = time.monotonic()
        process = await self._spawn(self._child_argv())
        self._process = process
        try:
            if not await self._wait_ready(process):
                # The reason before the stop: a stopped child has an exit status too.
                reason = _exit_reason(process.returncode, "did not become ready in time")
                await self._stop_child()
                return reason, False
            self.ready_after_s = time.monotonic() - self.started_at
            log.info("%s ready (pid %d) in %.1f s", self.label, process.pid, self.ready_after_s)
            self._bus.publish(EngineStarted(self.name, process.pid, self.model))
            self._set(Health.HEALTHY, "")
            return await self._watch(process), True
        finally:
            if process.returncode is None:
                await self._stop_child()

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(*PROBE_ERRORS):
                self.health_detail = await self._transport.get_json("/health")
                return True
            await asyncio.sleep(0.1)
        return False

    async def _watch(self, process: asyncio.subprocess.Process) -> str:
        misses = 0
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the child exits, and run() would outlive its shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.health_interval_s):
                    await process.wait()
                return _exit_reason(process.returncode, "")
            try:
                timeout = max(HEALTH_TIMEOUT_MIN_S, 2 * self._settings.health_interval_s)
                self.health_detail = await self._transport.get_json("/health", timeout)
                misses = 0
            except PROBE_ERRORS:
                misses += 1
                if misses >= HEALTH_MISSES_BEFORE_KILL:
                    await self._stop_child()
                    return "stopped answering its health check (killed)"

    async def _stop_child(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            self._ask_to_stop(process)
            try:
                async with asyncio.timeout(STOP_GRACE_S):  # not wait_for: see _watch
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        # Forgotten only once gone: a stop cut short by cancellation (a shutdown while a
        # hung child is given its grace) is done again by the next caller, not leaked.
        self._process = None

    def _set(self, health: Health, reason: str) -> None:
        self.health, self.reason = health, reason
        self._changed()


class EngineBackend(SupervisedChild):
    kind = "embedded"
    location = "embedded"

    def __init__(
        self,
        settings: EngineSettings,
        limits: LimitSettings,
        bus: EventBus,
        name: str = "embedded",
    ) -> None:
        self._model_path = settings.model_path or assets.default_chat_model()
        self._embedding_dir = settings.embedding_path or assets.default_embedding_model()
        model_id, quantization = assets.model_id_of(self._model_path)
        self.models = (
            ModelInfo(
                id=model_id,
                size_bytes=self._model_path.stat().st_size,
                quantization=quantization,
                context_length=settings.context,
                operations=GENERATION,
            ),
            ModelInfo(
                id=EMBEDDING_MODEL_ID,
                size_bytes=_size_of(self._embedding_dir),
                context_length=EMBEDDING_MAX_TOKENS,
                operations=frozenset({Operation.EMBEDDING}),
            ),
        )
        self._run_dir = Path(tempfile.mkdtemp(prefix="shoal-engine-"))
        self._socket = self._run_dir / "engine.sock"
        transport = HttpTransport(
            "http://engine",
            unix_socket=str(self._socket),
            connect_timeout_s=limits.connect_timeout_s,
            read_timeout_s=limits.read_timeout_s,
            stall_timeout_s=limits.stall_timeout_s,
        )
        super().__init__(name, settings, bus, transport, label="embedded engine")
        self._status = BackendStatus(Health.STARTING, self.models, reason="starting")

    # -- Backend ------------------------------------------------------------------

    async def probe(self) -> BackendStatus:
        if self._status.health is not Health.HEALTHY:
            return self._status
        try:
            health = await self._transport.get_json("/health")
        except PROBE_ERRORS:
            return BackendStatus(Health.DOWN, self.models, reason="not answering its health check")
        return BackendStatus(Health.HEALTHY, self.models, detail=self._detail(health))

    async def send(self, op: Operation, body: bytes) -> Upstream:
        if self._status.health is not Health.HEALTHY:
            raise BackendUnavailable(
                f"the embedded engine is {self._status.reason}", retry_after=self._retry_after()
            )
        return ChildUpstream(await self._transport.send(op, body), "the embedded engine")

    async def aclose(self) -> None:
        await self._stop_child()
        await self._transport.aclose()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- the child ----------------------------------------------------------------

    def _child_argv(self) -> list[str]:
        """The child's command line (a seam: the unit tests run a fake engine instead)."""
        return [
            sys.executable,
            "-m",
            "shoal.engine.worker",
            "--socket",
            str(self._socket),
            "--model",
            str(self._model_path),
            "--model-id",
            self.models[0].id,
            "--embedding-dir",
            str(self._embedding_dir),
            "--threads",
            str(self._settings.threads),
            "--context",
            str(self._settings.context),
        ]

    # -- reporting ----------------------------------------------------------------

    def _changed(self) -> None:
        self._status = BackendStatus(
            self.health, self.models, reason=self.reason, detail=self._detail({})
        )
        self._bus.publish(BackendReported(self.name, self._status))

    def _detail(self, health: dict[str, Any]) -> dict[str, Any]:
        # One request at a time: the worker has one context (routing queues the rest).
        detail = {
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "capacity": 1,
        }
        detail.update({k: v for k, v in health.items() if k not in ("status", "pid")})
        return detail

    def _retry_after(self) -> float:
        return max(1.0, self._settings.restart_backoff_s)


class ChildUpstream:
    """A child's answer; a broken-off answer is reported as that child's failure.

    `on_close` runs once, when the answer is closed (the managed engines count the
    requests in flight on a model by it)."""

    def __init__(
        self, upstream: HttpUpstream, who: str, on_close: Callable[[], None] | None = None
    ) -> None:
        self._upstream = upstream
        self._who = who
        self._on_close = on_close
        self.status = upstream.status
        self.content_type = upstream.content_type
        self.served_by: str | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.chunks():
                yield chunk
        except UpstreamFailed:
            message = f"{self._who} stopped mid-answer (it restarts by itself)"
            raise UpstreamFailed(message) from None

    async def read(self) -> bytes:
        try:
            return await self._upstream.read()
        except UpstreamFailed:
            raise UpstreamFailed(
                f"{self._who} stopped before answering (it restarts by itself)"
            ) from None

    def close(self) -> None:
        self._upstream.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def _exit_reason(returncode: int | None, otherwise: str) -> str:
    if returncode is None:
        return otherwise
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _size_of(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
