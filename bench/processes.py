"""Starting the processes a scenario measures, and making sure none outlives it.

    with Processes("proxy_overhead") as procs:
        backend = procs.fake_backend(ttft_ms=0, cpus="0")
        node = procs.node("a", backend=backend.url, cpus="1")
        procs.cpu_seconds(node)       # user + system CPU of its whole process tree
    # every process started here is stopped (SIGTERM, then SIGKILL), whatever happened

Processes are pinned to cores with `taskset` when `cpus` is given (and taskset exists),
so that the thing measured has a core to itself and the load generator another.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from tests.support import clean_env, get_json, wait_for

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 5.0


@dataclass
class Service:
    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    home: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpus: str | None = None
    ready: Callable[[Service], bool] | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range.

    `tests.support.free_port` asks the kernel for port 0, which hands out a port from the
    ephemeral range, the same range every outgoing connection takes its local port from:
    under load (thousands of client connections) or beside a test suite doing the same,
    the port is often taken again before the server binds it. Ports below the range are
    never taken by outgoing connections.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the harness dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    if cpus is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cpus, *argv]


class Processes:
    """Owns every process a scenario starts; the context's exit stops them all."""

    def __init__(self, scenario: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"shoal-bench-{scenario}-")
        self.home = Path(self._tmp.name)
        self.services: list[Service] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for service in reversed(self.services):
            self.stop(service)
        self.services.clear()
        self._tmp.cleanup()

    # -- starting ---------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        ready: Callable[[Service], bool] | None = None,
        timeout_s: float = 60.0,
        cwd: Path | None = None,
        wait: bool = True,
    ) -> Service:
        """Start argv, wait until `ready` (default: the port accepts connections).

        With wait=False, return at once; `wait_ready` waits later (to start many at once).
        """
        home = self.home / name
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / "log"
        full_env = {**clean_env(home), "PYTHONPATH": str(ROOT), **(env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                pinned(argv, cpus),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd or ROOT,
                start_new_session=True,  # a Ctrl-C at the terminal reaches us, not them
                preexec_fn=_die_with_parent,
            )
        service = Service(
            name,
            f"http://127.0.0.1:{port}",
            port,
            process,
            log_path,
            home,
            argv,
            env or {},
            cpus,
            ready,
        )
        self.services.append(service)
        if wait:
            self.wait_ready(service, timeout_s)
        return service

    def wait_ready(self, service: Service, timeout_s: float = 60.0) -> None:
        def up() -> bool:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}:\n"
                    f"{service.log()[-3000:]}"
                )
            if service.ready is not None:
                return service.ready(service)
            socket.create_connection(("127.0.0.1", service.port), timeout=1).close()
            return True

        wait_for(up, timeout_s, f"{service.name} to be ready", interval=0.05)

    def fake_backend(
        self,
        name: str = "backend",
        *,
        models: tuple[str, ...] = ("bench-model",),
        ttft_ms: float = 0.0,
        chunk_gap_ms: float = 0.0,
        chunks: int = 16,
        speed: float = 1.0,
        capacity: int = 0,
        fault: str = "none",
        cpus: str | None = None,
    ) -> Service:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.fake_backend",
            "--port",
            str(port),
            "--models",
            ",".join(models),
            "--ttft-ms",
            str(ttft_ms),
            "--chunk-gap-ms",
            str(chunk_gap_ms),
            "--chunks",
            str(chunks),
            "--speed",
            str(speed),
            "--capacity",
            str(capacity),
            "--fault",
            fault,
        ]
        return self.spawn(name, argv, port=port, cpus=cpus, timeout_s=20)

    def node(
        self,
        name: str,
        *,
        backend: str | None = None,
        peers: list[str] | None = None,
        env: dict[str, str] | None = None,
        cpus: str | None = None,
        port: int | None = None,
        wait_models: bool = True,
        wait: bool = True,
    ) -> Service:
        """`shoal serve` on loopback, no detection, no engine; waits for its backend."""
        port = port or free_port()
        argv = [
            sys.executable,
            "-m",
            "shoal",
            "serve",
            "--port",
            str(port),
            "--name",
            name,
            "--data-dir",
            str(self.home / name / "data"),
            "--no-detect",
            "--no-embedded",
        ]
        if backend is not None:
            argv += ["--backend", backend]
        full_env = {"SHOAL_LOG_LEVEL": "warning", **(env or {})}
        if peers:
            full_env["SHOAL_PEERS"] = json.dumps(peers)

        def ready(service: Service) -> bool:
            status = get_json(service.url + "/shoal/v1/status", timeout=2)
            if backend is None or not wait_models:
                return True
            return any(b["health"] == "healthy" for b in status["backends"])

        return self.spawn(
            name, argv, port=port, cpus=cpus, env=full_env, ready=ready, wait=wait, timeout_s=90
        )

    def restart(self, service: Service, *, hard: bool = False) -> Service:
        """Stop a service and start it again with the same command, port and environment."""
        self.stop(service, hard=hard)
        self.services.remove(service)
        return self.spawn(
            service.name,
            service.argv,
            port=service.port,
            cpus=service.cpus,
            env=service.env,
            ready=service.ready,
            timeout_s=60,
        )

    # -- stopping and measuring -------------------------------------------------------

    def stop(self, service: Service, *, hard: bool = False) -> None:
        process = service.process
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    @staticmethod
    def cpu_seconds(service: Service) -> float:
        """User + system CPU used so far by the service and every process under it."""
        try:
            root = psutil.Process(service.process.pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
            return total
        except psutil.Error:
            return 0.0


def wait_json(url: str, check: Callable[[Any], bool], timeout_s: float, what: str) -> Any:
    """Poll a JSON document until `check` holds; return it."""

    def probe() -> Any:
        document = get_json(url, timeout=2)
        return document if check(document) else None

    return wait_for(probe, timeout_s, what, interval=0.05)
