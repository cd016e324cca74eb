"""The composition root: a node built from its settings, and its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from shoal import __version__
from shoal.api.app import build_app
from shoal.backends.detect import Detector, make_backend
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.engine.supervisor import EngineBackend
from shoal.routing.dispatch import Dispatcher
from shoal.settings import Settings

log = logging.getLogger(__name__)


def load_or_create_node_id(data_dir: Path) -> str:
    """A stable random ID, kept in the data dir (becomes the key fingerprint later)."""
    path = data_dir / "node_id"
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    node_id = secrets.token_hex(32)
    path.write_text(node_id + "\n")
    return node_id


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self.node_id = load_or_create_node_id(settings.data_dir)
        self.started_at = time.time()
        self.registry = BackendRegistry(interval_s=settings.detect.interval_s)
        # Trying candidates in turn must end while a client is still waiting.
        self.dispatcher = Dispatcher(
            self.registry, deadline_s=settings.limits.connect_timeout_s * 4
        )
        self.engine: EngineBackend | None = None
        if settings.engine.enabled:
            self.engine = EngineBackend(settings.engine, settings.limits)
            entry = self.registry.add(self.engine)
            self.engine.on_status = functools.partial(self.registry.record, entry)
        for config in settings.backends:
            self.registry.add(make_backend(config, settings.limits))
        self.detector = Detector(
            self.registry, settings.detect, settings.limits, own_port=settings.port
        )
        self.app = build_app(self)
        self.url = ""

    async def refresh(self, timeout_s: float = 1.5) -> None:
        """Probe every backend now, so a status shows the present, not the last probe.

        A backend that does not answer in time keeps its last known status.
        """
        probes = asyncio.gather(*(self.registry.probe(e) for e in list(self.registry.entries())))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probes, timeout_s)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "version": __version__,
            "url": self.url,
            "uptime_s": round(time.time() - self.started_at, 1),
            "in_flight": self.dispatcher.in_flight,
            "backends": [_backend_status(entry) for entry in self.registry.entries()],
            "models": sorted({info.id for info, _ in self.registry.models()}),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; every background task ends with the node."""
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        host = self.settings.bind_host
        site = web.TCPSite(runner, host, self.settings.port, reuse_address=True)
        try:
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://{host}:{port}"
            log.info("shoal node %r listening on %s", self.name, self.url)
            tasks: list[asyncio.Task[None]] = []
            async with asyncio.TaskGroup() as group:
                tasks.append(group.create_task(self.registry.run()))
                if self.engine is not None:
                    tasks.append(group.create_task(self.engine.run()))
                if self.settings.detect.enabled:
                    tasks.append(group.create_task(self.detector.run()))
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await runner.cleanup()
            await self.registry.aclose()
            log.info("shoal node %r stopped", self.name)


def _backend_status(entry: BackendEntry) -> dict[str, Any]:
    status = entry.status
    return {
        "name": entry.backend.name,
        "kind": entry.backend.kind,
        "location": entry.backend.location,
        "detected": entry.detected,
        "health": status.health.value,
        "reason": status.reason,
        "in_flight": entry.in_flight,
        "models": [m.as_dict() for m in status.models],
        "detail": status.detail,
    }


def serve(settings: Settings) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = Node(settings)
        await node.run(stop)

    asyncio.run(main())
