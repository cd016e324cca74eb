"""GET /metrics: the node in Prometheus's text format, fed by its events and its views.

Theory of operation: each node owns a `Metrics`, with a `CollectorRegistry` of its own
(several nodes share a process in the tests; the global registry would mix them).
Counters and histograms move as events are published (`shoal.events`). On the request
path, one `RequestFinished` per request, prometheus-client's own counters would cost a
lock per increment (about 1 µs each, five per request, measured): there the event's
label set is looked up in a dict of plain cells that a collector turns into metric
families when a scrape asks, so a request costs a lookup and a few integer additions.
Gauges (load, peers, trust) are read from the views (`shoal.api.views`) at a scrape,
never kept up to date in between. Nothing here reaches into the node's parts.

Labels are bounded, whatever clients send: a model label is a name a backend of this
node or a peer advertises (the first MAX_MODELS of them), else "other"; a node label is
this node or a peer it has heard from (the first MAX_NODES), else "other"; a status is
an HTTP status. No key, secret or address is a label.

    metric                                     labels                            from
    ─────────────────────────────────────────  ────────────────────────────────  ──────────────────
    shoal_requests_total                       route model node status outcome   RequestFinished
    shoal_request_first_byte_seconds           route model                       RequestFinished
    shoal_request_duration_seconds             route model                       RequestFinished
    shoal_tokens_total                         direction(in|out) route model     RequestFinished
    shoal_requests_in_flight                   where(node|local)                 views
    shoal_requests_queued                                                        views
    shoal_peers                                health                            views
    shoal_trusted_nodes                        state(pending|paired|unpaired)    views
    shoal_heartbeat_round_trip_seconds                                           HeartbeatAnswered
    shoal_model_bytes_total                    direction(served|received)        ModelBytesServed,
                                                                                 ModelPulled
    shoal_model_pulls_total                    result(pulled|failed)             ModelPulled, ...
    shoal_engine_exits_total                   backend model                     EngineExited
    shoal_engine_starts_total                  backend model                     EngineStarted
    shoal_model_loads_total                    model                             ModelLoaded
    shoal_model_unloads_total                  reason                            ModelUnloading
    shoal_model_refusals_total                                                   ModelRefused
    shoal_node_info                            name node_id version              -
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from shoal import __version__
from shoal.backends.base import ModelInfo
from shoal.events import (
    BackendModelsChanged,
    BackendUp,
    EngineExited,
    EngineStarted,
    EventBus,
    HeartbeatAnswered,
    ModelBytesServed,
    ModelLoaded,
    ModelPulled,
    ModelPullFailed,
    ModelRefused,
    ModelUnloading,
    PeerJoined,
    PeerStateChanged,
    RequestFinished,
)
from shoal.mesh.identity import short_id
from shoal.mesh.membership import Health
from shoal.mesh.state import NodeState
from shoal.trust.store import TrustState

if TYPE_CHECKING:
    from shoal.api.views import Views

OTHER = "other"  # any model or node beyond the known ones
NONE = "none"  # no route, no serving node: no target answered
MAX_MODELS = 256  # distinct model labels; beyond, "other" (a catalog is tens, not hundreds)
MAX_NODES = 128  # distinct node labels: this node and the peers it has heard from
_MAX_CELL_CACHE = 4096  # raw request fields remembered; cleared when full (bounded memory)

# Seconds. A first token takes from milliseconds (a loaded small model) to minutes (a
# model loading on demand); a whole answer up to the read timeout (300 s).
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds. A heartbeat on a LAN is a TLS exchange: about a millisecond, up to its timeout.
ROUND_TRIP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Labels:
    """The bounded label values: models and nodes this node knows, else OTHER."""

    def __init__(self, node_id: str, name: str) -> None:
        self._backends: dict[str, frozenset[str]] = {}  # model names by local backend
        self._peers: dict[str, frozenset[str]] = {}  # model names by peer ID
        self.models: frozenset[str] = frozenset()
        self.nodes: dict[str, str] = {node_id: name}  # node ID -> its name
        self.generation = 0  # moves when a label could map differently

    def model(self, name: str) -> str:
        return name if name in self.models else OTHER

    def node(self, node_id: str | None) -> str:
        if node_id is None:
            return NONE
        return self.nodes.get(node_id, OTHER)

    def backend_models(self, backend: str, models: Iterable[ModelInfo]) -> None:
        names = frozenset(n for m in models for n in (m.id, *m.aliases))
        if self._backends.get(backend) != names:
            self._backends[backend] = names
            self._rebuild()

    def peer(self, peer_id: str, name: str, state: NodeState | None = None) -> None:
        if peer_id not in self.nodes and len(self.nodes) < MAX_NODES:
            self.nodes[peer_id] = name
            self.generation += 1
        if state is not None:
            names = frozenset(m.id for m in state.models)
            if self._peers.get(peer_id) != names:
                self._peers[peer_id] = names
                self._rebuild()

    def _rebuild(self) -> None:
        # Once a label, always one: a model that leaves keeps its series, and a new one
        # is admitted while there is room. Sorted, so which ones fit does not depend on
        # the order of a set.
        known = set(self.models)
        for names in (*self._backends.values(), *self._peers.values()):
            for name in sorted(names):
                if len(known) >= MAX_MODELS:
                    break
                known.add(name)
        if len(known) != len(self.models):
            self.models = frozenset(known)
            self.generation += 1


class _Count:
    """A request counter's cell, for one label set."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _Latency:
    """Histograms and token counts of one (route, model): plain numbers, read at a scrape.
    Bucket `i` counts the values at most `BUCKETS[i]` and above the one before; the last
    one, those above them all (+Inf)."""

    __slots__ = ("duration", "duration_sum", "first_byte", "first_byte_sum", "tokens_in",
                 "tokens_out")  # fmt: skip

    def __init__(self) -> None:
        self.first_byte = [0] * (len(FIRST_BYTE_BUCKETS) + 1)
        self.first_byte_sum = 0.0
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.tokens_in = 0
        self.tokens_out = 0


class Metrics:
    def __init__(self, bus: EventBus, views: Views) -> None:
        self.views = views
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = Labels(views.node_id, views.name)
        # The cells, by their labels (bounded); and by the raw fields of a request, a
        # cache of the same, remade when a label may map differently and when full.
        self.counts: dict[tuple[str, str, str, str, str], _Count] = {}
        self.latencies: dict[tuple[str, str], _Latency] = {}
        self._cells: dict[tuple[object, ...], tuple[_Count, _Latency]] = {}
        self._generation = 0
        r = self.registry
        self.round_trip = Histogram(
            "shoal_heartbeat_round_trip_seconds",
            "Round trip of a state exchange with a peer (heartbeat or push), over mutual TLS.",
            buckets=ROUND_TRIP_BUCKETS,
            registry=r,
        )
        self.model_bytes = Counter(
            "shoal_model_bytes",
            "Bytes of model files served to peers, and received by finished pulls.",
            ("direction",),
            registry=r,
        )
        self.pulls = Counter(
            "shoal_model_pulls", "Model pulls ended, by result.", ("result",), registry=r
        )
        self.engine_exits = Counter(
            "shoal_engine_exits",
            "Engine children that exited unplanned (crash, hang, never ready); the "
            "supervisor restarts them.",
            ("backend", "model"),
            registry=r,
        )
        self.engine_starts = Counter(
            "shoal_engine_starts",
            "Engine children that became ready (the first start and every restart).",
            ("backend", "model"),
            registry=r,
        )
        self.loads = Counter(
            "shoal_model_loads", "Models that became loaded on this node.", ("model",), registry=r
        )
        self.unloads = Counter(
            "shoal_model_unloads",
            "Models unloaded on this node, by reason.",
            ("reason",),
            registry=r,
        )
        self.refusals = Counter(
            "shoal_model_refusals",
            "Model loads refused because the model cannot fit in memory.",
            registry=r,
        )
        r.register(_RequestCollector(self))
        r.register(_ViewsCollector(views))
        for direction in ("served", "received"):
            self.model_bytes.labels(direction)
        for result in ("pulled", "failed"):
            self.pulls.labels(result)
        self._subscribe(bus)

    def _subscribe(self, bus: EventBus) -> None:
        bus.subscribe(RequestFinished, self._finished)
        bus.subscribe(HeartbeatAnswered, lambda e: self.round_trip.observe(e.round_trip_s))
        bus.subscribe(BackendUp, lambda e: self.labels.backend_models(e.backend, e.models))
        bus.subscribe(
            BackendModelsChanged, lambda e: self.labels.backend_models(e.backend, e.models)
        )
        bus.subscribe(PeerJoined, lambda e: self.labels.peer(e.peer_id, e.name))
        bus.subscribe(PeerStateChanged, self._peer_state)
        bus.subscribe(ModelBytesServed, lambda e: self._bytes("served", e.nbytes))
        bus.subscribe(ModelPulled, self._pulled)
        bus.subscribe(ModelPullFailed, lambda e: self.pulls.labels("failed").inc())
        bus.subscribe(EngineExited, lambda e: self._engine(self.engine_exits, e.backend, e.model))
        bus.subscribe(EngineStarted, lambda e: self._engine(self.engine_starts, e.backend, e.model))
        bus.subscribe(ModelLoaded, lambda e: self.loads.labels(self.labels.model(e.model)).inc())
        bus.subscribe(ModelUnloading, lambda e: self.unloads.labels(e.reason).inc())
        bus.subscribe(ModelRefused, lambda e: self.refusals.inc())

    # -- the request path ----------------------------------------------------------------

    def _finished(self, event: RequestFinished) -> None:
        key = (event.route, event.model, event.node_id, event.status, event.outcome)
        if self._generation != self.labels.generation:  # a label may map differently now
            self._cells.clear()
            self._generation = self.labels.generation
        cells = self._cells.get(key)
        if cells is None:
            cells = self._new_cells(event)
            if len(self._cells) >= _MAX_CELL_CACHE:
                self._cells.clear()
            self._cells[key] = cells
        count, latency = cells
        count.n += 1
        first_byte = event.first_byte_s
        if first_byte is not None:
            latency.first_byte[bisect_left(FIRST_BYTE_BUCKETS, first_byte)] += 1
            latency.first_byte_sum += first_byte
        latency.duration[bisect_left(DURATION_BUCKETS, event.total_s)] += 1
        latency.duration_sum += event.total_s
        if event.tokens_in:
            latency.tokens_in += event.tokens_in
        if event.tokens_out:
            latency.tokens_out += event.tokens_out

    def _new_cells(self, event: RequestFinished) -> tuple[_Count, _Latency]:
        route = event.route or NONE
        model = self.labels.model(event.model)
        node = self.labels.node(event.node_id)
        count_key = (route, model, node, str(event.status), event.outcome)
        count = self.counts.get(count_key) or self.counts.setdefault(count_key, _Count())
        latency = self.latencies.get((route, model))
        if latency is None:
            latency = self.latencies[(route, model)] = _Latency()
        return count, latency

    # -- the rest ------------------------------------------------------------------------

    def _peer_state(self, event: PeerStateChanged) -> None:
        state = event.state if isinstance(event.state, NodeState) else None
        self.labels.peer(event.peer_id, event.name, state)

    def _bytes(self, direction: str, nbytes: int) -> None:
        if nbytes > 0:
            self.model_bytes.labels(direction).inc(nbytes)

    def _pulled(self, event: ModelPulled) -> None:
        self.pulls.labels("pulled").inc()
        self._bytes("received", event.downloaded_bytes)

    def _engine(self, counter: Counter, backend: str, model: str | None) -> None:
        # Backend names are this node's own (configured or detected): bounded.
        counter.labels(backend, NONE if model is None else self.labels.model(model)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The request path's cells, as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        requests = CounterMetricFamily(
            "shoal_requests",
            "Requests answered, by route (local, peer, retried; none: no target answered), "
            "model, serving node, HTTP status and outcome.",
            labels=("route", "model", "node", "status", "outcome"),
        )
        for count_labels, count in metrics.counts.items():
            requests.add_metric(count_labels, count.n)
        yield requests
        first_byte = HistogramMetricFamily(
            "shoal_request_first_byte_seconds",
            "Time from a request's arrival to the first byte (first token) sent to the client.",
            labels=("route", "model"),
        )
        duration = HistogramMetricFamily(
            "shoal_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            labels=("route", "model"),
        )
        tokens = CounterMetricFamily(
            "shoal_tokens",
            "Tokens in (prompt) and out (completion), from the usage the answers carry.",
            labels=("direction", "route", "model"),
        )
        for labels, latency in metrics.latencies.items():
            first_byte.add_metric(
                labels,
                _cumulative(FIRST_BYTE_BUCKETS, latency.first_byte),
                latency.first_byte_sum,
            )
            duration.add_metric(
                labels, _cumulative(DURATION_BUCKETS, latency.duration), latency.duration_sum
            )
            tokens.add_metric(("in", *labels), latency.tokens_in)
            tokens.add_metric(("out", *labels), latency.tokens_out)
        yield first_byte
        yield duration
        yield tokens


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus's buckets: each counts the values at most its bound, +Inf all of them."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
    return buckets


class _ViewsCollector(Collector):
    """The gauges, read from the views at each scrape."""

    def __init__(self, views: Views) -> None:
        self._views = views

    def describe(self) -> Iterable[Metric]:
        return ()  # no fixed description: the registry must not collect to describe

    def collect(self) -> Iterator[Metric]:
        views = self._views
        info = GaugeMetricFamily(
            "shoal_node_info", "This node.", labels=("name", "node_id", "version")
        )
        info.add_metric((views.name, short_id(views.node_id), __version__), 1)
        yield info

        load = views.load()
        in_flight = GaugeMetricFamily(
            "shoal_requests_in_flight",
            "Requests in flight: all this node handles (node), or those on its own "
            "backends (local).",
            labels=("where",),
        )
        in_flight.add_metric(("node",), load["requests"])
        in_flight.add_metric(("local",), load["local_in_flight"])
        yield in_flight
        yield GaugeMetricFamily(
            "shoal_requests_queued", "Requests waiting for a slot.", value=load["queued"]
        )

        health = dict.fromkeys((h.value for h in Health), 0)
        for peer in views.peers()["peers"]:
            health[peer["health"]] = health.get(peer["health"], 0) + 1
        peers = GaugeMetricFamily(
            "shoal_peers", "Peers in the table, by health.", labels=("health",)
        )
        for value, count in health.items():
            peers.add_metric((value,), count)
        yield peers

        trust = dict.fromkeys((s.value for s in TrustState), 0)
        for node in views.pairs()["nodes"]:
            trust[node["state"]] = trust.get(node["state"], 0) + 1
        nodes = GaugeMetricFamily(
            "shoal_trusted_nodes", "Nodes met, by trust state.", labels=("state",)
        )
        for value, count in trust.items():
            nodes.add_metric((value,), count)
        yield nodes


METRICS: web.AppKey[Metrics] = web.AppKey("metrics")


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus's text format, as prometheus-client writes it."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
