"""Managed engines: every GGUF in the catalog, loaded on demand, as one Backend (DESIGN §2).

Theory of operation: `ManagedBackend` lists every catalogued model, loaded or not. A
request for a model that is not loaded starts loading it and is answered at once with
503 + Retry-After, the load's progress in the message; requests that come back once it
is ready are forwarded to its engine. Each loaded model runs in its own supervised child
(`shoal.engine.model_engine`, a `SupervisedChild` as the embedded engine is: restarted
with backoff, killed when it hangs): llama.cpp's `llama-server` when one is configured
or on PATH, else the embedded llama-cpp-python worker. What may load, what must be
unloaded first (the least recently used idle models, up to `models.max_loaded` and
within memory) and when an idle model goes are `shoal.engine.residency`'s decisions;
this module carries them out. A model that cannot fit is refused (400, naming the
memory it needs and the memory there is); one whose engine fails every start is given
up and its error shown for a while.

Every change is reported at once (`BackendReported`, from which the registry publishes
`ModelLoaded` / `ModelUnloaded` and the node tells its peers), and the reasons are
published too: `ModelLoading`, `ModelUnloading`, `ModelRefused`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
import psutil

from shoal.backends.base import (
    GENERATION,
    BackendStatus,
    Health,
    ModelInfo,
    Operation,
    Upstream,
)
from shoal.engine.model_engine import (
    GIVE_UP_AFTER,
    Engine,
    ModelEngine,
    choose_engine,
    operations_of,
)
from shoal.engine.residency import (
    Load,
    Phase,
    Refuse,
    Residency,
    Resident,
    Wait,
    expected_load_s,
    gib,
    memory_needed,
    progress,
    retry_after_s,
    slot_context,
)
from shoal.engine.supervisor import ChildUpstream
from shoal.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    ModelTooLarge,
    UpstreamFailed,
    UpstreamTimeout,
)
from shoal.events import (
    BackendReported,
    EventBus,
    ModelLoading,
    ModelRefused,
    ModelUnloading,
    UnloadReason,
)
from shoal.mesh.state import MAX_ALIASES
from shoal.models.catalog import Catalog, LocalModel
from shoal.settings import EngineSettings, LimitSettings, ModelSettings

log = logging.getLogger(__name__)

# A failed model's error is the answer for this long; then a request tries again.
FAILED_HOLD_S = 30.0


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


class ManagedBackend:
    """Every catalogued GGUF as one Backend, each loaded on demand. See the module doc."""

    kind = "managed"

    def __init__(
        self,
        catalog: Catalog,
        settings: ModelSettings,
        engine_settings: EngineSettings,
        limits: LimitSettings,
        bus: EventBus,
        *,
        name: str = "managed",
        engine: Engine | Literal["auto"] | None = "auto",
        memory: Callable[[], int] = available_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._catalog = catalog
        self._settings = settings
        self._engine_settings = engine_settings
        self._limits = limits
        self._bus = bus
        self._engine = choose_engine(settings) if engine == "auto" else engine
        self.location = f"managed ({self._engine.kind if self._engine else 'no engine'})"
        self._memory = memory
        self._clock = clock
        self._residency = Residency(settings.max_loaded)
        self._engines: dict[str, ModelEngine] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # model: (why, when)
        self._load_s: dict[str, float] = {}  # measured load time per model
        self._numbers = iter(range(1, 1 << 62))
        self._run_dir: Path | None = None  # made at the first load: sockets and logs
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()  # the residency changed: re-plan the idle timer
        self._settled = asyncio.Event()  # an engine became ready or went: waiters look
        self._closed = False

    @property
    def slots(self) -> int:
        """Requests a loaded model serves at once: llama-server's slots, the worker's one."""
        if self._engine is None or self._engine.kind == "worker":
            return 1
        return self._settings.parallel

    # -- Backend ------------------------------------------------------------------

    async def probe(self) -> BackendStatus:
        return self.status()

    def status(self) -> BackendStatus:
        if self._engine is None:
            reason = "no engine to load models: install llama-server or llama-cpp-python"
            return BackendStatus(Health.DOWN, reason=reason)
        models = tuple(self._info(m) for m in self._servable())
        detail = {
            "engine": self._engine.kind,
            "binary": str(self._engine.binary) if self._engine.binary else None,
            "capacity": self.slots,
            "loaded": sorted(n for n, e in self._engines.items() if e.ready),
            "loading": sorted(n for n, e in self._engines.items() if not e.ready),
        }
        return BackendStatus(Health.HEALTHY, models, detail=detail)

    async def send(self, op: Operation, body: bytes) -> Upstream:
        name = orjson.loads(body)["model"]
        model = self._catalog.find(name)
        if model is None:
            raise ModelNotFound(f"the model {name!r} is no longer on this node", param="model")
        engine = self._engines.get(model.name)
        if engine is None:
            self._check_failed(model.name)
            engine = self._start(model)
        if not engine.ready:
            raise self._not_ready(engine)
        self._residency.begin(model.name, self._clock())
        try:
            upstream = await engine.transport.send(op, body)
        except BackendUnavailable:
            # It died since its last health check: its supervisor restarts it.
            self._release(model.name)
            raise ModelNotReady(
                f"the engine of model {model.name!r} stopped; it is restarting", retry_after=2
            ) from None
        except BaseException:
            self._release(model.name)
            raise
        who = f"the engine of model {model.name!r}"
        return ChildUpstream(upstream, who, lambda: self._release(model.name))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            if engine.task is not None:
                engine.task.cancel()
        await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- the operator's API ---------------------------------------------------------

    def local_models(self) -> list[dict[str, Any]]:
        """Every catalogued model with where it is and its state, for `shoal models --local`."""
        return [self._row(m) for m in sorted(self._catalog.models(), key=lambda m: m.name)]

    async def load(self, name: str) -> dict[str, Any]:
        """Load `name` now and wait until it answers (or fails)."""
        model = self._find(name)
        engine = self._engines.get(model.name) or self._start(model)
        deadline = self._settings.load_timeout_s * GIVE_UP_AFTER + 60
        try:
            async with asyncio.timeout(deadline):
                while self._engines.get(model.name) is engine and not engine.ready:
                    settled = self._settled
                    await settled.wait()
        except TimeoutError:
            message = f"model {model.name!r} did not load in {deadline:.0f} s"
            raise UpstreamTimeout(message) from None
        if self._engines.get(model.name) is not engine:
            why = self._failed.get(model.name, ("it was unloaded",))[0]
            raise UpstreamFailed(f"model {model.name!r} did not load: {why}")
        return self._row(model)

    async def unload(self, name: str) -> dict[str, Any]:
        """Unload `name` now, even mid-request (those requests end with an error)."""
        model = self._find(name)
        task = self._unload(model.name, "operator")
        if task is not None:
            await asyncio.wait({task})
        return self._row(model)

    async def refresh(self) -> None:
        """Scan the stores again; a model whose file is gone is unloaded."""
        await self._catalog.refresh()
        present = {m.name for m in self._catalog.models()}
        for name in [n for n in self._engines if n not in present]:
            self._unload(name, "removed")
        self._report()

    # -- lifetime -----------------------------------------------------------------

    async def run(self) -> None:
        """Own the engines' tasks and unload idle models on time, until cancelled."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                for name in list(self._engines):  # from a run that ended: its tasks are gone
                    self._unload(name, "failed")
                while True:
                    now = self._clock()
                    for name in self._residency.expired(now):
                        self._unload(name, "idle")
                    due = self._residency.next_due()
                    self._wake.clear()
                    delay = None if due is None else max(0.01, due - self._clock())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
            finally:
                self._group = None

    # -- loading and unloading --------------------------------------------------------

    def _start(self, model: LocalModel) -> ModelEngine:
        """Admit `model` and start its engine (after unloading what must go); raises
        ModelTooLarge, or ModelNotReady when it must wait. Never awaits: two requests
        cannot both start one model."""
        if self._group is None or self._engine is None:
            raise ModelNotReady("the managed engines are starting", retry_after=1)
        need = memory_needed(model, self._settings.context, self.slots)
        limit = self._settings.memory_limit_bytes
        available = self._memory() if limit is None else 0
        decision = self._residency.admit(model.name, need.total, limit=limit, available=available)
        if isinstance(decision, Refuse):
            message = (
                f"model {model.name!r} cannot be loaded on this node: it needs "
                f"{need.describe()}, and {_room(decision, limit)}. Use a smaller "
                "quantization or a shorter models.context, or free memory."
            )
            self._bus.publish(ModelRefused(self.name, model.name, message))
            log.warning("%s", message)
            raise ModelTooLarge(message, param="model")
        if isinstance(decision, Wait):
            raise ModelNotReady(
                f"model {model.name!r} cannot load yet: {decision.reason}",
                retry_after=decision.retry_after_s,
                code="model_busy",
            )
        assert isinstance(decision, Load)
        evicting = [t for n in decision.evict if (t := self._unload(n, "evicted")) is not None]
        engine = ModelEngine(
            model,
            need,
            self._engine,
            backend=self.name,
            settings=self._settings,
            engine_settings=self._engine_settings,
            limits=self._limits,
            bus=self._bus,
            run_dir=self._run_dir_made(),
            number=next(self._numbers),
            on_change=self._engine_changed,
        )
        self._engines[model.name] = engine
        self._residency.add(model.name, need.total, self._keep_alive(model), self._clock())
        self._failed.pop(model.name, None)
        log.info(
            "loading model %s with %s (%s)%s",
            model.name, self._engine.kind, need.describe(),
            f", unloading {', '.join(decision.evict)} first" if decision.evict else "",
        )  # fmt: skip
        self._bus.publish(
            ModelLoading(self.name, model.name, self._engine.kind, need.total, decision.evict)
        )
        engine.task = self._group.create_task(self._serve(engine, evicting))
        self._report()
        return engine

    async def _serve(self, engine: ModelEngine, evicting: list[asyncio.Task[None]]) -> None:
        name = engine.local.name
        try:
            if evicting:  # their memory must be free before this one takes it
                await asyncio.wait(evicting)
            try:
                await engine.run()  # returns only when it gives up
                reason = engine.reason
            except Exception as exc:  # it could not even be started (a binary gone)
                log.exception("the engine of model %s could not be started", name)
                reason = f"its engine could not be started ({type(exc).__name__}: {exc})"
            if tail := engine.log_tail():
                reason += f" (llama-server: {tail})"
            self._failed[name] = (reason, self._clock())
            if self._engines.get(name) is engine:
                self._unload(name, "failed")
        finally:
            await engine.close()

    def _unload(self, name: str, reason: UnloadReason) -> asyncio.Task[None] | None:
        """Take `name` out at once; its engine stops in the returned task."""
        engine = self._engines.pop(name, None)
        self._residency.remove(name)
        if engine is None:
            return None
        log.info("unloading model %s (%s)", name, reason)
        self._bus.publish(ModelUnloading(self.name, name, reason))
        task = engine.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._report()
        self._wake.set()
        self._settle()
        return task if task is not asyncio.current_task() else None

    def _engine_changed(self, engine: ModelEngine) -> None:
        name = engine.local.name
        if self._engines.get(name) is not engine:
            return  # an unloaded engine, stopping
        if engine.health is Health.HEALTHY:
            self._residency.ready(name, self._clock())
            if engine.ready_after_s is not None and engine.restarts == 0:
                self._load_s[name] = engine.ready_after_s
        else:
            self._residency.loading(name)
        self._report()
        self._wake.set()
        self._settle()

    def _release(self, name: str) -> None:
        self._residency.end(name, self._clock())
        self._wake.set()

    def _settle(self) -> None:
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()

    def _report(self) -> None:
        if not self._closed:
            self._bus.publish(BackendReported(self.name, self.status()))

    # -- what the others see ------------------------------------------------------------

    def _servable(self) -> list[LocalModel]:
        models = self._catalog.models()
        if self._engine is not None and self._engine.kind == "worker":
            return [m for m in models if operations_of(m) == GENERATION]
        return models

    def _info(self, model: LocalModel) -> ModelInfo:
        engine = self._engines.get(model.name)
        return ModelInfo(
            id=model.name,
            loaded=engine is not None and engine.ready,
            size_bytes=model.size_bytes,
            quantization=model.quantization,
            context_length=slot_context(model, self._settings.context),
            operations=operations_of(model),
            aliases=tuple(n for n in model.names if n != model.name)[:MAX_ALIASES],
            sha256=model.sha256,
        )

    def _not_ready(self, engine: ModelEngine) -> ModelNotReady:
        name = engine.local.name
        now = time.monotonic()
        if engine.restarts or engine.last_exit:
            return ModelNotReady(
                f"the engine of model {name!r} is {engine.reason or 'restarting'}; retry shortly",
                retry_after=max(1.0, self._engine_settings.restart_backoff_s),
            )
        started = engine.started_at or engine.created
        expected = expected_load_s(engine.local.size_bytes, self._load_s.get(name))
        elapsed = now - started
        retry = retry_after_s(elapsed, expected)
        return ModelNotReady(
            f"model {name!r} is loading ({engine.engine.kind}): about "
            f"{progress(elapsed, expected):.0%} done after {elapsed:.1f} s of an expected "
            f"{expected:.1f} s; retry after {retry:.0f} s",
            retry_after=retry,
        )

    def _check_failed(self, name: str) -> None:
        failed = self._failed.get(name)
        if failed is None:
            return
        why, when = failed
        if self._clock() - when < FAILED_HOLD_S:
            raise UpstreamFailed(f"model {name!r} failed to load: {why}")
        del self._failed[name]

    def _row(self, model: LocalModel) -> dict[str, Any]:
        engine = self._engines.get(model.name)
        resident = self._residency.residents.get(model.name)
        need = memory_needed(model, self._settings.context, self.slots)
        row: dict[str, Any] = {
            "name": model.name,
            "full_name": model.full_name,
            "store": model.store,
            "path": str(model.path),
            "size_bytes": model.size_bytes,
            "quantization": model.quantization,
            "context_length": model.context_length,
            "architecture": model.architecture,
            "loaded": engine is not None and engine.ready,
            "state": _state(engine, resident),
            "engine": self._engine.kind if self._engine else None,
            "memory_bytes": _rss(engine.pid) if engine is not None else None,
            "memory_needed_bytes": need.total,
            "keep_alive_s": self._keep_alive(model),
            "load_s": self._load_s.get(model.name),
            "error": self._failed.get(model.name, (None,))[0],
        }
        if engine is not None and resident is not None:
            row.update(
                pid=engine.pid,
                in_flight=resident.in_flight,
                idle_s=round(self._clock() - resident.last_used, 1) if resident.idle else None,
                restarts=engine.restarts,
                last_exit=engine.last_exit,
            )
        return row

    def _run_dir_made(self) -> Path:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="shoal-models-"))
        return self._run_dir

    def _find(self, name: str) -> LocalModel:
        if self._engine is None:
            raise InvalidRequest(f"{self.status().reason}", code="no_engine")
        model = self._catalog.find(name)
        if model is None or model not in self._servable():
            raise ModelNotFound(f"no model {name!r} on this node's disk", param="model")
        return model

    def _keep_alive(self, model: LocalModel) -> float:
        per_model = self._settings.keep_alive_per_model
        for name in model.names:
            if name in per_model:
                return per_model[name]
        return self._settings.keep_alive_s


def _state(engine: ModelEngine | None, resident: Resident | None) -> str:
    if engine is None:
        return "unloaded"
    if engine.health is Health.HEALTHY:
        return "ready"
    if engine.restarts or engine.last_exit:
        return "restarting"
    return "loading" if resident is None or resident.phase is Phase.LOADING else "ready"


def _room(refusal: Refuse, limit: int | None) -> str:
    if limit is not None:
        return f"models.memory_limit_bytes allows {gib(limit)} for all models"
    return f"{gib(refusal.room)} is available even with every other model unloaded"


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
