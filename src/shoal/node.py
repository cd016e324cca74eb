"""The composition root: a node built from its settings, its reactions, and its lifetime.

Everything is built here and nowhere else; the parts get what they need and tell the
rest of the node what happened through the event bus (`shoal.events`). The reactions
subscribed here:

    event                                     reaction
    ───────────────────────────────────────   ─────────────────────────────────────────
    BackendUp, BackendDown,                   push our state to the peers (models)
      BackendModelsChanged
    LoadChanged crossing the spillover        push our state to the peers (load)
      threshold
    TrustChanged from paired to not           restart the peer TLS listener with a
                                              context that no longer trusts the node
    PeerJoined                                wake LAN mode's "anyone there?" wait
    PeerStateChanged                          meet the nodes the peer introduces
                                              (`shoal.mesh.introductions`)
    peers, trust, backends (all of them)      one log line each
    RequestFinished (info logging)            one line per request (`shoal.requests`)
    RequestRouted (debug logging)             one line per routing decision
    (many: `shoal.api.metrics`)               the counters of GET /metrics

The model catalog is scanned at start and every `models.rescan_interval_s`; the managed
engines join the backends once it holds a model, so a node without GGUFs lists none.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal import dashboard
from shoal.api import metrics, pull, services, share
from shoal.api.access import HEADER_LIMITS, MachineHosts, is_loopback_address, peer_port_caller
from shoal.api.app import build_app
from shoal.api.connections import ConnectionBook, connection_caps
from shoal.api.listener import GuardedSite, Listeners
from shoal.api.views import Views
from shoal.backends.detect import Detector, make_backend
from shoal.backends.registry import BackendRegistry
from shoal.engine.managed import ManagedBackend
from shoal.engine.supervisor import EngineBackend
from shoal.events import (
    BackendDown,
    BackendModelsChanged,
    BackendUp,
    Event,
    EventBus,
    LoadChanged,
    PeerAddressChanged,
    PeerEvent,
    PeerJoined,
    PeerRecovered,
    PeerRemoved,
    PeerStateChanged,
    PeerSuspect,
    RequestFinished,
    RequestRouted,
    TrustChanged,
)
from shoal.mesh import identity, scan
from shoal.mesh.advert import OwnState
from shoal.mesh.identity import short_id
from shoal.mesh.introductions import Introducer
from shoal.mesh.mdns import MdnsDiscovery, advertised_addresses
from shoal.mesh.peers import Peers
from shoal.mesh.state import local_hardware
from shoal.models.catalog import Catalog, ModelCatalog
from shoal.models.downloads import Downloads
from shoal.models.manifest import ManifestCache
from shoal.models.stores import store_dir
from shoal.process import install_accept_error_handler, open_file_limit, raise_fd_limit
from shoal.routing.admission import AdmissionQueue
from shoal.routing.dispatch import Dispatcher
from shoal.routing.ledger import LoadLedger
from shoal.routing.rank import UNBOUNDED
from shoal.routing.router import Router, capacity_of
from shoal.settings import DEFAULT_PORT, Settings
from shoal.supervise import RESTART_BACKOFF, supervise
from shoal.trust.admission import Admission
from shoal.trust.keys import KeyStore
from shoal.trust.secret import is_token, protect_data_dir
from shoal.trust.service import Trust
from shoal.trust.store import TrustState

log = logging.getLogger(__name__)
request_log = logging.getLogger("shoal.requests")  # one line per request, at info


class Node:
    def __init__(
        self, settings: Settings, bus: EventBus | None = None, *, catalog: Catalog | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.bus = bus or EventBus()
        protect_data_dir(settings.data_dir)  # before anything in it is read or written
        self.identity = identity.load_or_create(settings.data_dir)
        self.node_id = self.identity.node_id
        self.port = settings.port
        self.url = ""
        hardware = local_hardware()

        # Backends and load.
        self.registry = BackendRegistry(self.bus, interval_s=settings.detect.interval_s)
        self.ledger = LoadLedger(self.bus)
        self.engine: EngineBackend | None = None
        if settings.engine.enabled:
            self.engine = EngineBackend(settings.engine, settings.limits, self.bus)
            self.registry.add(self.engine)
        for config in settings.backends:
            self.registry.add(make_backend(config, settings.limits))
        # Every GGUF on this disk, loaded on demand (registered once there is one).
        self.catalog = catalog if catalog is not None else ModelCatalog(settings.models)
        self.managed = ManagedBackend(
            self.catalog, settings.models, settings.engine, settings.limits, self.bus
        )
        self.detector = Detector(
            self.registry, settings.detect, settings.limits, own_port=settings.port
        )

        # The mesh and trust.
        self.own_state = OwnState(
            self.node_id,
            self.name,
            self.registry,
            self.ledger,
            hardware,
            capacity=settings.routing.spillover_max_local_in_flight,
            slots=self._slots,
        )
        peer_port = settings.mesh.peer_port
        if peer_port is None:  # the well-known pair of ports, or let the system choose
            peer_port = DEFAULT_PORT + 1 if settings.port == DEFAULT_PORT else 0
        self.trust = Trust(self.identity, settings, peer_port)
        self.peers = Peers(
            self.node_id,
            self.own_state.snapshot,
            self.trust,
            self.bus,
            settings.mesh,
            settings.limits,
        )
        self.admission = Admission(
            self.trust,
            self.peers,
            self.bus,
            static=settings.peers,
            timeout_s=settings.mesh.heartbeat_timeout_s,
        )
        # Our snapshot introduces our peers; theirs introduce theirs, met through admission.
        self.own_state.introductions = self.peers.introductions
        # Files being pulled from peers: advertised, and served chunk by chunk meanwhile.
        self.downloads = Downloads(self.peers.changed)
        self.own_state.files = self.downloads.adverts
        self.introducer = Introducer(self.peers, self.admission.sighted)
        self.scanner = scan.Scanner(
            lambda url: self.admission.meet(url, "scan", timeout_s=1.5),
            self_id=self.node_id,
            port=settings.port,
            own_addresses=lambda: advertised_addresses(settings.bind_host),
            concurrency=settings.mesh.scan_concurrency,
        )

        # Requests.
        self.router = Router(
            self.node_id, self.name, self.registry, self.peers, self.ledger, settings.routing
        )
        routing = settings.routing
        self.queue = AdmissionQueue(
            self.bus,
            max_queue=routing.queue_max,
            max_wait_s=routing.queue_wait_s,
            weights=routing.class_weights,
        )
        self.own_state.wait = self.queue.estimated_wait_s  # advertised with our load
        self.dispatcher = Dispatcher(
            self.router,
            self.ledger,
            self.bus,
            deadline_s=routing.retry_deadline_s,
            admission=self.queue,
        )
        self.views = Views(
            node_id=self.node_id,
            name=self.name,
            hardware=hardware,
            registry=self.registry,
            peers=self.peers,
            ledger=self.ledger,
            admission=self.admission,
        )
        self.app = self._build_app()

        self._runner: web.AppRunner | None = None
        self.listeners: Listeners | None = None  # made in run(): it needs the loop
        # Addresses the connection caps never count nor refuse (tests narrow it).
        self.uncapped: Callable[[str], bool] = is_loopback_address
        self._peer_site: GuardedSite | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._first_peer = asyncio.Event()
        self.restart_backoff = RESTART_BACKOFF  # for a failed background task
        self._subscribe()

    def _build_app(self) -> web.Application:
        settings = self.settings
        app = build_app(
            settings,
            keys=KeyStore.in_data_dir(settings.data_dir),
            own_hosts=MachineHosts(settings, extra=[f"shoal-{self.node_id[:12]}.local"]),
            caller_of=peer_port_caller(self.trust.peer_of_connection),
            cluster_mode=lambda: self.trust.mode,
            served_by=self.name,
        )
        app[services.DISPATCHER] = self.dispatcher
        app[services.VIEWS] = self.views
        app[services.ADMISSION] = self.admission
        app[services.PEERS] = self.peers
        app[services.OWN_STATE] = self.own_state
        app[services.SCANNER] = self.scanner
        app[services.MANAGED] = self.managed
        app[pull.PULLS] = pull.Pulls(
            store_dir(settings.models),
            self.bus,
            self.refresh_models,
            peers=self.peers,
            downloads=self.downloads,
            accept_from_peers=settings.models.remote_pulls == "paired",
        )
        self.shares = app[share.SHARES] = share.Shares(
            self.catalog,
            ManifestCache.in_data_dir(settings.data_dir),
            settings.models.share,
            self.downloads,
            # While requests are served here, sharing gives way to them.
            share.Pacer(
                settings.models.share_rate_limit * 1e6, lambda: self.ledger.local_in_flight > 0
            ),
            self.bus,
        )
        app[services.LIMITS] = settings.limits
        self.metrics = app[metrics.METRICS] = metrics.Metrics(self.bus, self.views)
        dashboard.install(app, self.bus, self.views, lambda: self.trust.mode)
        return app

    # -- reactions ------------------------------------------------------------------------

    def _subscribe(self) -> None:
        bus = self.bus
        for changed in (BackendUp, BackendDown, BackendModelsChanged):
            bus.subscribe(changed, lambda event: self.peers.changed())
        bus.subscribe(LoadChanged, self._load_changed)
        bus.subscribe(TrustChanged, self._trust_changed)
        bus.subscribe(PeerJoined, lambda event: self._first_peer.set())
        bus.subscribe(PeerStateChanged, self.introducer.heard)
        # The log hears membership, trust and backend changes; requests only when their
        # level is on (the subscriber is the cost on the request path, not the filter).
        for logged in (PeerEvent, TrustChanged, BackendUp, BackendDown):
            bus.subscribe(logged, _log_event)
        if request_log.isEnabledFor(logging.INFO):
            bus.subscribe(RequestFinished, lambda e: _log_request(e, self.node_id, self.name))
        if request_log.isEnabledFor(logging.DEBUG):
            bus.subscribe(RequestRouted, _log_routed)

    def _slots(self) -> int | None:
        """What our advert says we can run at once: the sum of our healthy backends'
        slots, or None when one of them queues by itself (no limit peers should wait
        for)."""
        default = self.settings.routing.default_capacity
        total = 0
        for entry in self.registry.entries():
            if entry.healthy and entry.status.models:
                slots = capacity_of(entry.status.detail, default)
                if slots >= UNBOUNDED:
                    return None
                total += slots
        return total

    def _load_changed(self, event: LoadChanged) -> None:
        # Peers rank us by load: tell them when we cross the spillover threshold (the
        # figure our advert carries being the same ledger count), and when we are idle
        # again (else they rank us by a stale count until our next heartbeat); and when
        # our slots fill up or one frees (a peer's queued request may take it).
        threshold = self.settings.routing.spillover_max_local_in_flight
        crossed = event.in_flight in (0, threshold - 1, threshold)
        if not crossed and (slots := self._slots()) is not None:
            crossed = event.in_flight in (slots, slots - 1)
        if crossed:
            self.peers.changed()

    def _trust_changed(self, event: TrustChanged) -> None:
        if event.previous is TrustState.PAIRED and event.state is not TrustState.PAIRED:
            # Python's ssl cannot forget a trusted certificate: a fresh context, a new
            # listener (the node's live connections were cut by the trust service).
            task = asyncio.ensure_future(self._start_peer_site())
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; every background task ends with the node, not before."""
        limits = self.settings.limits
        # The runner's Server only dispatches: each connection's handler is made by the
        # listeners (`shoal.api.listener`), with these options, once it is admitted.
        runner = self._runner = web.AppRunner(self.app, handler_cancellation=True)
        await runner.setup()
        caps = connection_caps(
            limits.max_connections_per_source, limits.max_connections, open_file_limit()
        )
        self.listeners = Listeners(
            ConnectionBook(caps, exempt=self.uncapped),  # loopback: always served
            header_timeout_s=limits.header_timeout_s,
            handler_options={
                "auto_decompress": False,  # shoal.api.bodies inflates, bounded by the body cap
                "keepalive_timeout": limits.idle_timeout_s,
                **HEADER_LIMITS,
            },
        )
        log.debug("LAN connections: at most %d per address, %d in all", caps.per_source, caps.total)
        host = self.settings.bind_host
        site = self.listeners.site(runner, host, self.settings.port)
        try:
            await site.start()
            self.port = runner.addresses[0][1]
            self.trust.api_port = self.own_state.api_port = self.port
            await self._start_peer_site()
            # Last: `url` says the node is ready (tests and callers wait for it), and a
            # hello needs the peer port, which the system may only now have chosen.
            self.url = self.views.url = f"http://{host}:{self.port}"
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
            secret = self.trust.secret()
            if self.trust.mode == "secret" and secret and not is_token(secret):
                log.warning(
                    "the cluster secret in %s is not one `shoal token create` makes: a short "
                    "or guessable secret can be found from one handshake by trying "
                    "candidates offline. Replace it: `shoal token rotate`.",
                    self.settings.data_dir,
                )
            background: dict[str, Callable[[], Awaitable[None]]] = {
                "backend registry": self.registry.run,
                "peers": self.peers.run,
                "admission": self.admission.run,
                "managed engines": self.managed.run,
                "model catalog": self._scan_models,
            }
            if self.engine is not None:
                background["embedded engine"] = self.engine.run
            if self.settings.detect.enabled:
                background["backend detection"] = self.detector.run
            if self.settings.lan:
                background["LAN discovery"] = self._lan
            async with asyncio.TaskGroup() as group:
                # Supervised: a failure in one is logged and retried, never the node's end.
                tasks = {
                    name: group.create_task(supervise(name, run, backoff=self.restart_backoff))
                    for name, run in background.items()
                }
                await stop.wait()
                await self.peers.leave()
                for task in tasks.values():
                    task.cancel()
        finally:
            await runner.cleanup()
            await asyncio.gather(*self._restarts, return_exceptions=True)
            await self.registry.aclose()
            await self.managed.aclose()  # if never registered (closing twice is nothing)
            await self.peers.aclose()
            log.info("shoal node %r stopped", self.name)

    async def _start_peer_site(self) -> None:
        """The mTLS listener for peers; rebuilt when a node loses trust."""
        assert self._runner is not None and self.listeners is not None
        if self._peer_site is not None:
            await self._peer_site.stop()
        self._peer_site = self.listeners.site(
            self._runner,
            self.settings.bind_host,
            self.trust.peer_port,
            ssl_context=self.trust.server_context,
        )
        await self._peer_site.start()
        if self.trust.peer_port == 0:  # learn the port the system chose
            self.trust.peer_port = self._runner.addresses[-1][1]

    async def _scan_models(self) -> None:
        """The stores, scanned now and every models.rescan_interval_s."""
        while True:
            await self.refresh_models()
            await asyncio.sleep(self.settings.models.rescan_interval_s)

    async def refresh_models(self) -> None:
        """Scan the stores now (after a pull, too): what is on disk is listed at once."""
        await self.managed.refresh()
        if self.catalog.models() and self.registry.get(self.managed.name) is None:
            self.registry.add(self.managed)
        await self.shares.forget_removed()

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
                    self.admission,
                )
                group.create_task(mdns.run())
            try:
                async with asyncio.timeout(self.settings.mesh.scan_after_s):
                    await self._first_peer.wait()
            except TimeoutError:
                log.info(
                    "no peer found by mDNS in %.0f s: scanning the local /24",
                    self.settings.mesh.scan_after_s,
                )
                found = await self.scanner.run()
                log.info("subnet scan found %d node(s)", len(found))


# -- the log ---------------------------------------------------------------------------


def _log_event(event: Event) -> None:
    match event:
        case PeerStateChanged():
            return
        case PeerJoined(peer_id=peer_id, name=name, address=address):
            log.info("peer %s (%s) joined at %s", name, peer_id[:12], address)
        case PeerRemoved(peer_id=peer_id, name=name, reason=reason):
            what = {"missed": "removed (missed heartbeats)", "left": "left"}.get(reason, reason)
            log.info("peer %s (%s): %s", name, peer_id[:12], what)
        case PeerAddressChanged(peer_id=peer_id, name=name, address=address):
            log.info("peer %s (%s) moved to %s", name, peer_id[:12], address)
        case PeerSuspect() | PeerRecovered():
            kind = "suspect" if isinstance(event, PeerSuspect) else "recovered"
            log.info("peer %s (%s): %s", event.name, event.peer_id[:12], kind)
        case PeerEvent():
            pass
        case TrustChanged():
            _log_trust(event)
        case BackendUp(backend=name, location=location):
            log.info("backend %s (%s) is healthy", name, location)
        case BackendDown(backend=name, health=health, reason=reason):
            log.info("backend %s is %s%s", name, health, f": {reason}" if reason else "")


def _log_trust(event: TrustChanged) -> None:
    who = f"{event.name or '?'} ({short_id(event.node_id)})"
    match event.state:
        case TrustState.PAIRED:
            log.info("paired with %s", who)
        case TrustState.PENDING:
            log.warning(
                "pairing request from %s at %s: `shoal pair list` shows its confirmation "
                "code; if it matches the one shown there, `shoal pair accept %s`",
                who, event.address, short_id(event.node_id),
            )  # fmt: skip
        case TrustState.UNPAIRED:
            log.info("unpaired %s", who)
        case None:
            log.info("forgot %s", who)


def _log_request(event: RequestFinished, own_id: str, own_name: str) -> None:
    """One line per request; its fields as `extra` too, for `--log-format json`."""
    node = own_name if event.node_id == own_id else event.target  # a peer's target: its name
    first_ms = None if event.first_byte_s is None else round(event.first_byte_s * 1000, 1)
    total_ms = round(event.total_s * 1000, 1)
    model = event.model if event.model.isprintable() else repr(event.model)  # client input
    served_by = node if event.target == node else f"{node} ({event.target})"  # (backend)
    request_log.info(
        "request %d %s %s: %d %s, route %s, served by %s, first byte %s ms, total %s ms",
        event.request_id, event.op.value, model, event.status, event.outcome,
        event.route or "-", served_by if node else "-",
        "-" if first_ms is None else first_ms, total_ms,
        extra={"request": {
            "id": event.request_id, "op": event.op.value, "model": event.model,
            "route": event.route, "node": node, "target": event.target,
            "status": event.status, "outcome": event.outcome,
            "first_byte_ms": first_ms, "total_ms": total_ms,
            "tokens_in": event.tokens_in, "tokens_out": event.tokens_out,
        }},
    )  # fmt: skip


def _log_routed(event: RequestRouted) -> None:
    model = event.model if event.model.isprintable() else repr(event.model)
    request_log.debug(
        "request %d %s %s routed %s to %s (node %s) after %d failed attempt(s)",
        event.request_id, event.op.value, model, event.route, event.target,
        short_id(event.node_id), event.attempt,
        extra={"routed": {
            "id": event.request_id, "op": event.op.value, "model": event.model,
            "route": event.route, "target": event.target, "node_id": event.node_id,
            "attempt": event.attempt,
        }},
    )  # fmt: skip


def serve(settings: Settings) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""
    raise_fd_limit()  # each connection is a descriptor: the usual 1024 is few

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        install_accept_error_handler(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = Node(settings)
        await node.run(stop)

    asyncio.run(main())
