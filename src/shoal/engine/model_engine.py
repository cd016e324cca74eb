"""One managed model's engine: which engine loads GGUFs here, its command line, its child.

llama.cpp's `llama-server` when one is configured (`models.llama_server`) or on PATH,
else the embedded llama-cpp-python worker (`shoal.engine.worker`), else none. Each
loaded model runs in a `ModelEngine`: a `SupervisedChild` (restarted with backoff,
killed when it hangs) that is given up after `GIVE_UP_AFTER` starts that never became
ready. llama-server listens on a free loopback port, logs to a file (its last line is
shown when it fails) and is stopped by SIGTERM; it dies with the node (Linux's
PR_SET_PDEATHSIG), since it reads no stdin to notice the node gone as the worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shoal.backends.base import GENERATION, Health, Operation
from shoal.backends.http import HttpTransport
from shoal.engine.residency import MemoryNeed, slot_context
from shoal.engine.supervisor import SupervisedChild
from shoal.errors import ConfigError
from shoal.events import EventBus
from shoal.models.catalog import LocalModel
from shoal.settings import EngineSettings, LimitSettings, ModelSettings

EngineKind = Literal["llama-server", "worker"]
# A model whose engine never becomes ready this many starts in a row is given up (a
# corrupt file, an architecture the engine does not know); a crash after a good start
# is restarted for ever, as the embedded engine is.
GIVE_UP_AFTER = 3
# Architectures whose GGUFs embed rather than generate (llama.cpp's names).
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "modern-bert", "t5encoder"}
)


@dataclass(frozen=True, slots=True)
class Engine:
    """What loads the models on this node."""

    kind: EngineKind
    binary: Path | None  # llama-server's; None for the worker


def choose_engine(settings: ModelSettings) -> Engine | None:
    """llama-server (configured, else on PATH), else the worker, else nothing."""
    if settings.llama_server is not None:
        if not os.access(settings.llama_server, os.X_OK):
            raise ConfigError(
                f"models.llama_server {settings.llama_server} is not an executable file"
            )
        return Engine("llama-server", settings.llama_server)
    found = shutil.which("llama-server")
    if found is not None:
        return Engine("llama-server", Path(found))
    if importlib.util.find_spec("llama_cpp") is not None:
        return Engine("worker", None)
    return None


def operations_of(model: LocalModel) -> frozenset[Operation]:
    if model.architecture in EMBEDDING_ARCHITECTURES:
        return frozenset({Operation.EMBEDDING})
    return GENERATION


class ModelEngine(SupervisedChild):
    """One loaded model: llama-server or the worker in a supervised child."""

    def __init__(
        self,
        model: LocalModel,
        need: MemoryNeed,
        engine: Engine,
        *,
        backend: str,
        settings: ModelSettings,
        engine_settings: EngineSettings,
        limits: LimitSettings,
        bus: EventBus,
        run_dir: Path,
        number: int,
        on_change: Callable[[ModelEngine], None],
    ) -> None:
        self.local = model
        self.need = need
        self.engine = engine
        self._models = settings
        self._on_change = on_change
        self._log_path = run_dir / f"model-{number}.log"
        self._socket = run_dir / f"model-{number}.sock"  # Unix socket paths are short
        self._port = 0
        if engine.kind == "llama-server":
            self._port = _free_port()
            base, unix_socket = f"http://127.0.0.1:{self._port}", None
        else:
            base, unix_socket = "http://engine", str(self._socket)
        transport = HttpTransport(
            base,
            unix_socket=unix_socket,
            connect_timeout_s=limits.connect_timeout_s,
            read_timeout_s=limits.read_timeout_s,
            stall_timeout_s=limits.stall_timeout_s,
        )
        super().__init__(
            backend,
            engine_settings,
            bus,
            transport,
            label=f"model {model.name} ({engine.kind})",
            model=model.name,
            start_timeout_s=settings.load_timeout_s,
            give_up_after=GIVE_UP_AFTER,
        )
        self.task: asyncio.Task[None] | None = None
        self.created = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.health is Health.HEALTHY

    @property
    def transport(self) -> HttpTransport:
        return self._transport

    def _child_argv(self) -> list[str]:
        model, settings = self.local, self._models
        context = slot_context(model, settings.context)
        threads = str(settings.threads)
        if self.engine.kind == "worker":
            return [
                sys.executable, "-m", "shoal.engine.worker",
                "--socket", str(self._socket), "--model", str(model.path),
                "--model-id", model.name, "--threads", threads, "--context", str(context),
            ]  # fmt: skip
        assert self.engine.binary is not None
        argv = [
            str(self.engine.binary), "-m", str(model.path),
            "--host", "127.0.0.1", "--port", str(self._port),
            "-c", str(context * settings.parallel), "-np", str(settings.parallel),
            "--alias", model.name, "-t", threads, "-tb", threads,
        ]  # fmt: skip
        if Operation.EMBEDDING in operations_of(model):
            argv.append("--embeddings")
        return argv

    async def _spawn(self, argv: list[str]) -> asyncio.subprocess.Process:
        if self.engine.kind == "worker":
            return await super()._spawn(argv)
        # llama-server reads no stdin: it is stopped by SIGTERM, and dies with the node
        # (PR_SET_PDEATHSIG) rather than outlive a node that was killed.
        with self._log_path.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )

    def _ask_to_stop(self, process: asyncio.subprocess.Process) -> None:
        if self.engine.kind == "worker":
            super()._ask_to_stop(process)
        else:
            process.terminate()

    def _changed(self) -> None:
        self._on_change(self)

    def log_tail(self) -> str:
        """llama-server's last words, for an error message."""
        try:
            lines = self._log_path.read_bytes()[-4096:].decode(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    async def close(self) -> None:
        await self._stop_child()
        await self._transport.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# prctl(PR_SET_PDEATHSIG, SIGTERM) in the child between fork and exec: Linux only. Looked
# up here, not in the child, which must do as little as it can before exec.
_PR_SET_PDEATHSIG = 1
_PRCTL: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
