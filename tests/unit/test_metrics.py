"""`shoal.api.metrics` on its own bus, and who may read GET /metrics.

Labels are fuzzed with Hypothesis: whatever model names clients ask for and backends or
peers advertise, every label value is a known name or a fixed word, and their number is
capped. Access runs the real route table and access middleware, with callers "on the
LAN" injected as in `test_access.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from shoal.api.app import build_app
from shoal.api.audience import Caller
from shoal.api.metrics import MAX_MODELS, METRICS, NONE, OTHER, Metrics
from shoal.api.views import Views
from shoal.backends.base import ModelInfo, Operation
from shoal.events import (
    BackendUp,
    EngineExited,
    EventBus,
    HeartbeatAnswered,
    ModelBytesServed,
    ModelLoaded,
    ModelPulled,
    PeerJoined,
    RequestFinished,
    Route,
)
from shoal.protocol import METRICS_PATH, usage_counts
from shoal.settings import ClusterMode, Settings
from shoal.trust.keys import KeyStore

OWN_ID = "ab" * 32


class StubViews:
    """What `Metrics` reads of the views, nothing more."""

    node_id = OWN_ID
    name = "own"

    def load(self) -> dict[str, Any]:
        return {"requests": 2, "local_in_flight": 1, "queued": 0}

    def peers(self) -> dict[str, Any]:
        return {"peers": [{"health": "healthy"}, {"health": "unreachable"}]}

    def pairs(self) -> dict[str, Any]:
        return {"mode": "pairing", "nodes": [{"state": "paired"}, {"state": "pending"}]}


def new_metrics() -> tuple[EventBus, Metrics]:
    bus = EventBus()
    return bus, Metrics(bus, cast(Views, StubViews()))


def families(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def finished(model: str, route: Route | None, node_id: str | None, status: int) -> RequestFinished:
    return RequestFinished(
        1, Operation.CHAT, model, route, "t", status, "ok", 0.01, 0.02, node_id, 5, 2
    )


names = st.text(min_size=1, max_size=80)
ROUTES: list[Route | None] = ["local", "peer", "retried", None]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    advertised=st.lists(names, max_size=MAX_MODELS + 40),
    asked=st.lists(names, min_size=1, max_size=60),
    peers=st.lists(st.tuples(st.text(min_size=64, max_size=64), names), max_size=20),
    statuses=st.lists(st.integers(100, 599), min_size=1, max_size=5),
    node_ids=st.lists(st.one_of(st.none(), st.text(max_size=70)), min_size=1, max_size=10),
    data=st.data(),
)
def test_no_label_takes_an_unbounded_value(
    advertised: list[str],
    asked: list[str],
    peers: list[tuple[str, str]],
    statuses: list[int],
    node_ids: list[str | None],
    data: st.DataObject,
) -> None:
    bus, metrics = new_metrics()
    bus.publish(BackendUp("b", "fake", "fake://b", tuple(ModelInfo(n) for n in advertised)))
    for peer_id, name in peers:
        bus.publish(PeerJoined(peer_id, name, "10.0.0.2"))
    for model in [*asked, *advertised[:5]]:
        route = data.draw(st.sampled_from(ROUTES))
        status = data.draw(st.sampled_from(statuses))
        node_id = data.draw(st.sampled_from([*node_ids, OWN_ID]))
        bus.publish(finished(model, route, node_id, status))
        bus.publish(ModelLoaded("b", model))
        bus.publish(EngineExited("managed", "crashed", 0, model))

    known_models = set(sorted(set(advertised))[:MAX_MODELS]) | {OTHER, NONE}
    known_nodes = {"own", OTHER, NONE, *(name for _, name in peers)}
    seen_models: set[str] = set()
    for samples in families(metrics).values():
        for labels, _ in samples:
            if "model" in labels:
                seen_models.add(labels["model"])
            assert labels.get("model", OTHER) in known_models
            assert labels.get("node", OTHER) in known_nodes
            assert labels.get("route", "local") in {"local", "peer", "retried", NONE}
            assert labels.get("status", "200").isdigit()
    assert len(seen_models) <= MAX_MODELS + 2
    assert len(metrics._cells) <= 4096


def test_a_model_asked_by_a_client_only_is_other_and_a_known_one_keeps_its_name() -> None:
    bus, metrics = new_metrics()
    bus.publish(finished("m", "local", OWN_ID, 200))  # before m is known: other
    bus.publish(BackendUp("b", "fake", "fake://b", (ModelInfo("m", aliases=("org/m.gguf",)),)))
    bus.publish(finished("m", "local", OWN_ID, 200))
    bus.publish(finished("org/m.gguf", "local", OWN_ID, 200))
    bus.publish(finished("not-m", "peer", "cd" * 32, 404))
    requests = {
        (labels["model"], labels["node"], labels["route"]): value
        for labels, value in families(metrics)["shoal_requests_total"]
    }
    assert requests == {
        (OTHER, "own", "local"): 1,
        ("m", "own", "local"): 1,
        ("org/m.gguf", "own", "local"): 1,
        (OTHER, OTHER, "peer"): 1,
    }
    tokens = families(metrics)["shoal_tokens_total"]
    assert ({"direction": "in", "route": "local", "model": "m"}, 5.0) in tokens
    assert ({"direction": "out", "route": "local", "model": "m"}, 2.0) in tokens


def test_the_gauges_come_from_the_views_and_the_rest_from_events() -> None:
    bus, metrics = new_metrics()
    bus.publish(HeartbeatAnswered("cd" * 32, 0.002))
    bus.publish(ModelBytesServed("cd" * 32, 1000))
    bus.publish(ModelPulled(1, "m", ("o/r/f.gguf",), "/x", 500, 400, 1.0))
    found = families(metrics)
    assert found["shoal_requests_in_flight"] == [({"where": "node"}, 2), ({"where": "local"}, 1)]
    assert ({"health": "healthy"}, 1) in found["shoal_peers"]
    assert ({"health": "degraded"}, 0) in found["shoal_peers"]
    assert ({"state": "pending"}, 1) in found["shoal_trusted_nodes"]
    assert found["shoal_heartbeat_round_trip_seconds_count"] == [({}, 1)]
    assert ({"direction": "served"}, 1000) in found["shoal_model_bytes_total"]
    assert ({"direction": "received"}, 400) in found["shoal_model_bytes_total"]
    assert ({"result": "pulled"}, 1) in found["shoal_model_pulls_total"]


def test_two_nodes_in_one_process_keep_their_own_counts() -> None:
    bus_a, a = new_metrics()
    _, b = new_metrics()
    bus_a.publish(finished("m", "local", OWN_ID, 200))
    assert families(a)["shoal_requests_total"]
    assert "shoal_requests_total" not in families(b)


@pytest.mark.parametrize(
    ("tail", "counts"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}',
         (7, 3)),
        (b'data: {"usage": {"prompt_tokens": 7, "total_tokens": 7}}\n\ndata: [DONE]\n\n', (7, 0)),
        (b'"usage":{"completion_tokens":3,"prompt_tokens":7,"total_tokens":10}}', (7, 3)),
        (b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\ndata: [DONE]', None),
        (b'{"content":"say \\"usage\\": {\\"prompt_tokens\\": 9}"}', None),
        (b"", None),
    ],
)  # fmt: skip
def test_usage_counts(tail: bytes, counts: tuple[int, int] | None) -> None:
    assert usage_counts(tail) == counts


# -- access --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path, caller: Caller, mode: ClusterMode, keys: KeyStore
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = build_app(
        Settings(lan=True, data_dir=tmp_path),
        keys=keys,
        own_hosts=lambda: {"mybox"},
        caller_of=lambda request: caller,
        cluster_mode=lambda: mode,
        served_by="own",
    )
    app[METRICS] = Metrics(EventBus(), cast(Views, StubViews()))
    async with TestClient(TestServer(app)) as client:
        yield client


LAN = Caller(loopback=False, peer_port=False, peer=None)
LOOPBACK = Caller(loopback=True, peer_port=False, peer=None)
PAIRED = Caller(loopback=False, peer_port=True, peer="cd" * 32)
STRANGER_ON_PEER_PORT = Caller(loopback=False, peer_port=True, peer=None)


@pytest.mark.parametrize(
    ("caller", "mode", "status"),
    [
        (LOOPBACK, "pairing", 200),  # Prometheus on this machine needs nothing
        (PAIRED, "pairing", 200),  # a paired node, over mutual TLS
        (LAN, "open", 200),  # an open cluster is open to its LAN
        (LAN, "pairing", 401),  # else the LAN needs an API key, as for /shoal/v1/status
        (LAN, "secret", 401),
        (STRANGER_ON_PEER_PORT, "open", 403),  # the peer port is for paired nodes only
    ],
)
async def test_metrics_follow_the_operator_api_rules(
    tmp_path: Path, caller: Caller, mode: ClusterMode, status: int
) -> None:
    async with (
        serve(tmp_path, caller, mode, KeyStore.in_data_dir(tmp_path)) as client,
        client.get(METRICS_PATH, headers={"Host": "mybox"}) as response,
    ):
        assert response.status == status
        if status != 200:
            assert (await response.json())["error"]["message"]


async def test_a_lan_client_with_an_api_key_reads_them_and_the_key_is_not_in_them(
    tmp_path: Path,
) -> None:
    keys = KeyStore.in_data_dir(tmp_path)
    _, secret = keys.create("prometheus")
    headers = {"Host": "mybox", "Authorization": f"Bearer {secret}"}
    async with (
        serve(tmp_path, LAN, "pairing", keys) as client,
        client.get(METRICS_PATH, headers=headers) as response,
    ):
        assert response.status == 200
        text = await response.text()
    assert "shoal_requests_in_flight" in text
    assert secret not in text and "shoal-sk-" not in text
