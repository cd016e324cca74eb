"""The composition root: a node built from its settings, and its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from typing import Any

from aiohttp import web

from shoal import __version__
from shoal.api.access import HEADER_LIMITS
from shoal.api.app import build_app
from shoal.backends.detect import Detector, make_backend
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.engine.supervisor import EngineBackend
from shoal.mesh import identity, scan
from shoal.mesh.mdns import MdnsDiscovery, advertised_addresses
from shoal.mesh.peers import Peer, Peers
from shoal.mesh.state import Hardware, Load, ModelAdvert, NodeState, local_hardware
from shoal.routing.dispatch import Dispatcher
from shoal.routing.router import Router
from shoal.settings import DEFAULT_PORT, Settings
from shoal.trust.service import Trust

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.name
        self.identity = identity.load_or_create(settings.data_dir)
        self.node_id = self.identity.node_id
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._state_seq = 0
        self.hardware = local_hardware()
        self.port = settings.port
        self.registry = BackendRegistry(interval_s=settings.detect.interval_s)
        self.registry.on_change = self._models_changed
        peer_port = settings.mesh.peer_port
        if peer_port is None:  # the well-known pair of ports, or let the system choose
            peer_port = DEFAULT_PORT + 1 if settings.port == DEFAULT_PORT else 0
        self.trust = Trust(self.identity, settings, peer_port)
        self.trust.on_revoked = self._revoked
        self.peers = Peers(
            self.node_id,
            self.snapshot,
            self.trust,
            settings.mesh,
            settings.limits,
            static=settings.peers,
        )
        self._peer_site: web.TCPSite | None = None
        self._restarts: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self.router = Router(self.node_id, self.name, self.registry, self.peers, settings.routing)
        self.dispatcher = Dispatcher(
            self.router,
            deadline_s=settings.routing.retry_deadline_s,
            on_load_change=self._load_changed,
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

    # -- what this node tells its peers ----------------------------------------------

    def snapshot(self) -> NodeState:
        self._state_seq += 1
        models: dict[str, ModelAdvert] = {}
        for info, _ in self.registry.models():
            known = models.get(info.id)
            models[info.id] = ModelAdvert(
                id=info.id,
                loaded=info.loaded or (known is not None and known.loaded),
                operations=tuple(sorted(info.operations)),
                size_bytes=info.size_bytes,
                quantization=info.quantization,
                context_length=info.context_length,
            )
        return NodeState(
            node_id=self.node_id,
            name=self.name,
            version=__version__,
            api_port=self.port,
            seq=self._state_seq,
            uptime_s=round(time.monotonic() - self._started_monotonic, 3),
            models=tuple(models.values()),
            load=Load(
                in_flight=self.local_in_flight(),
                capacity=self.settings.routing.spillover_max_local_in_flight,
            ),
            hardware=self.hardware,
        )

    def local_in_flight(self) -> int:
        return sum(entry.in_flight for entry in self.registry.entries())

    def _models_changed(self) -> None:
        self.peers.changed()

    def _load_changed(self, in_flight: int) -> None:
        # Peers rank us by load: tell them when we cross the spillover threshold.
        threshold = self.settings.routing.spillover_max_local_in_flight
        if in_flight in (threshold, threshold - 1):
            self.peers.changed()

    # -- views ------------------------------------------------------------------------

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
            "short_id": self.identity.short_id,
            "version": __version__,
            "url": self.url,
            "uptime_s": round(time.time() - self.started_at, 1),
            "in_flight": self.dispatcher.in_flight,
            "local_in_flight": self.local_in_flight(),
            "hardware": _hardware_dict(self.hardware),
            "backends": [_backend_status(entry) for entry in self.registry.entries()],
            "models": sorted({info.id for info, _ in self.registry.models()}),
            "peers": len(self.peers.routable()),
            "duplicate_id_seen_from": self.trust.duplicate_seen_at,
        }

    def peer_list(self) -> list[dict[str, Any]]:
        return [_peer_dict(peer) for peer in self.peers.peers()]

    async def scan(self) -> list[dict[str, Any]]:
        """Probe the local /24s for Shoal nodes; the ones found join the peer table."""
        own = set(advertised_addresses(self.settings.bind_host))
        targets = scan.scan_targets(scan.local_networks(), self.settings.port, exclude=own)
        found = await scan.scan(
            targets,
            lambda url: self.peers.probe(url, "scan", timeout_s=1.5),
            self.settings.mesh.scan_concurrency,
        )
        return [
            {"url": url, "node_id": node.node_id, "name": node.name, "trust": node.state.value}
            for url, node in found
            if node.node_id != self.node_id
        ]

    # -- lifetime ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; every background task ends with the node."""
        runner = self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, **HEADER_LIMITS
        )
        await runner.setup()
        host = self.settings.bind_host
        site = web.TCPSite(runner, host, self.settings.port, reuse_address=True)
        try:
            await site.start()
            self.port = runner.addresses[0][1]
            self.url = f"http://{host}:{self.port}"
            self.trust.api_port = self.port
            await self._start_peer_site()
            log.info(
                "shoal node %r (%s) listening on %s, peers on TLS port %d, cluster mode %s",
                self.name, self.identity.short_id, self.url, self.trust.peer_port,
                self.trust.mode,
            )  # fmt: skip
            if self.trust.mode == "open" and self.settings.lan:
                log.warning(
                    "OPEN cluster on the LAN: any Shoal node on this network may join and "
                    "use this node. Set a secret (shoal token create) or use pairing."
                )
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.registry.run()),
                    group.create_task(self.peers.run()),
                ]
                if self.engine is not None:
                    tasks.append(group.create_task(self.engine.run()))
                if self.settings.detect.enabled:
                    tasks.append(group.create_task(self.detector.run()))
                if self.settings.lan:
                    tasks.append(group.create_task(self._lan()))
                await stop.wait()
                await self.peers.say_goodbye()
                for task in tasks:
                    task.cancel()
        finally:
            await runner.cleanup()
            await asyncio.gather(*self._restarts, return_exceptions=True)
            await self.registry.aclose()
            await self.peers.aclose()
            log.info("shoal node %r stopped", self.name)

    async def _start_peer_site(self) -> None:
        """The mTLS listener for peers; rebuilt when a node loses trust."""
        assert self._runner is not None
        if self._peer_site is not None:
            await self._peer_site.stop()
        self._peer_site = web.TCPSite(
            self._runner,
            self.settings.bind_host,
            self.trust.peer_port,
            ssl_context=self.trust.server_context,
            reuse_address=True,
        )
        await self._peer_site.start()
        if self.trust.peer_port == 0:  # learn the port the system chose
            self.trust.peer_port = self._runner.addresses[-1][1]

    def _revoked(self, node_id: str) -> None:
        self.peers.forget(node_id)
        self._restarts = [t for t in self._restarts if not t.done()]
        self._restarts.append(asyncio.ensure_future(self._start_peer_site()))

    async def _lan(self) -> None:
        """LAN mode: mDNS, and one subnet scan if mDNS finds nobody soon enough."""
        async with asyncio.TaskGroup() as group:
            if self.settings.mesh.mdns:
                mdns = MdnsDiscovery(
                    self.node_id,
                    self.name,
                    self.port,
                    self.trust.advert(),
                    advertised_addresses(self.settings.bind_host),
                    on_sighted=lambda peer_id, url: self.peers.sighted(peer_id, url, "mdns"),
                    on_gone=self.peers.goodbye,
                )
                group.create_task(mdns.run())
            try:
                await asyncio.wait_for(
                    self.peers.first_peer.wait(), self.settings.mesh.scan_after_s
                )
            except TimeoutError:
                log.info(
                    "no peer found by mDNS in %.0f s: scanning the local /24",
                    self.settings.mesh.scan_after_s,
                )
                found = await self.scan()
                log.info("subnet scan found %d node(s)", len(found))


def _hardware_dict(hardware: Hardware) -> dict[str, Any]:
    return {
        "cpu": hardware.cpu,
        "cores": hardware.cores,
        "ram_bytes": hardware.ram_bytes,
        "gpu": hardware.gpu,
        "vram_bytes": hardware.vram_bytes,
        "score": round(hardware.score, 2),
    }


def _peer_dict(peer: Peer) -> dict[str, Any]:
    view, state = peer.view, peer.state
    now = time.monotonic()
    return {
        "node_id": view.peer_id,
        "name": state.name if state else None,
        "address": view.address,
        "state": view.state.value,
        "health": view.health.value,
        "sources": sorted(view.sources),
        "last_seen_s_ago": None if view.last_seen is None else round(now - view.last_seen, 1),
        "heartbeat_interval_s": view.interval_s,
        "version": state.version if state else None,
        "uptime_s": state.uptime_s if state else None,
        "models": [
            {"id": m.id, "loaded": m.loaded, "operations": list(m.operations)}
            for m in (state.models if state else ())
        ],
        "load": (
            {
                "in_flight": state.load.in_flight,
                "queued": state.load.queued,
                "capacity": state.load.capacity,
            }
            if state
            else None
        ),
        "hardware": _hardware_dict(state.hardware) if state else None,
    }


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
