"""Looking for inference servers on this machine's standard ports, and making backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from shoal.backends.base import Backend, Health
from shoal.backends.http import PROBE_ERRORS, HttpTransport
from shoal.backends.ollama import OllamaBackend
from shoal.backends.openai_compat import OpenAICompatBackend
from shoal.backends.registry import BackendRegistry
from shoal.protocol import STATUS_PATH
from shoal.settings import BackendKind, BackendSettings, DetectSettings, LimitSettings

log = logging.getLogger(__name__)


def make_backend(config: BackendSettings, limits: LimitSettings) -> Backend:
    transport = HttpTransport(
        config.url,
        api_key=config.api_key.get_secret_value() if config.api_key else None,
        connect_timeout_s=limits.connect_timeout_s,
        read_timeout_s=limits.read_timeout_s,
        stall_timeout_s=limits.stall_timeout_s,
    )
    name = config.name or default_name(config.kind, config.url)
    if config.kind == "ollama":
        return OllamaBackend(name, transport, capacity=config.capacity)
    return OpenAICompatBackend(name, transport, capacity=config.capacity)


def default_name(kind: BackendKind, url: str) -> str:
    parts = urlsplit(url)
    return f"{kind}@{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


class Detector:
    """Finds servers on the standard loopback ports and adds them to the registry."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: DetectSettings,
        limits: LimitSettings,
        own_port: int,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._limits = limits
        self._own_port = own_port

    async def run(self) -> None:
        while True:
            await self.detect_once()
            await asyncio.sleep(self._settings.interval_s)

    async def detect_once(self) -> None:
        await asyncio.gather(
            *(
                self._try(BackendSettings(url=f"http://127.0.0.1:{p.port}", kind=p.kind))
                for p in self._settings.ports
                if p.port != self._own_port
            )
        )

    async def _try(self, config: BackendSettings) -> None:
        if self._registry.has_location(config.url):
            return
        backend = make_backend(config, self._limits)
        status = await backend.probe()
        if status.health is not Health.HEALTHY or await self._is_shoal(config.url):
            await backend.aclose()
            return
        if self._registry.has_location(config.url):  # found meanwhile by another pass
            await backend.aclose()
            return
        log.info("detected %s server at %s", config.kind, config.url)
        entry = self._registry.add(backend, detected=True)
        self._registry.record(entry, status)

    async def _is_shoal(self, url: str) -> bool:
        """Another Shoal node on this machine is a peer, never a backend."""
        transport = HttpTransport(url, connect_timeout_s=1.0, read_timeout_s=2.0)
        try:
            with contextlib.suppress(*PROBE_ERRORS):
                status = await transport.get_json(STATUS_PATH)
                return isinstance(status, dict) and "node_id" in status
            return False
        finally:
            await transport.aclose()
