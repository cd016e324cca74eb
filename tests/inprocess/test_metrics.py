"""GET /metrics and the request log (issue 12, items 1 and 7), through real nodes.

Two nodes over real mutual TLS: a holds m0 and a backend of `shared` that fails, b holds
m1 and `shared`. A request to a for m0 is served locally, for m1 by b (a peer hop), for
`shared` by b after a's own backend failed (retried). The metrics are scraped over HTTP
and read with prometheus-client's own parser, so what is checked is what Prometheus
would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from shoal import __version__
from shoal.api.metrics import MAX_MODELS, OTHER
from shoal.backends.base import Operation
from shoal.errors import UpstreamFailed
from shoal.events import HeartbeatAnswered
from shoal.logs import JsonFormatter
from shoal.mesh.identity import short_id
from shoal.protocol import METRICS_PATH, ROUTE_HEADER
from tests.cluster import FakeBackend, FakeUpstream, RunningNode, chat, cluster, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class StreamUpstream(FakeUpstream):
    """An event stream, one SSE event per chunk, its usage event last before [DONE]."""

    def __init__(self, model: str) -> None:
        super().__init__(b"")
        self.content_type = "text/event-stream"
        delta = {"object": "chat.completion.chunk", "model": model}
        self._events = [
            {**delta, "choices": [{"index": 0, "delta": {"content": word}}]}
            for word in ("hel", "lo")
        ] + [{**delta, "choices": [], "usage": USAGE}]

    async def chunks(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield b"data: " + orjson.dumps(event) + b"\n\n"
        yield b"data: [DONE]\n\n"


class UsageBackend(FakeBackend):
    """Answers with the usage OpenAI's servers send, streamed when asked."""

    async def send(self, op: Operation, body: bytes) -> FakeUpstream:
        self.sent.append((op, body))
        if self.gate is not None:
            await self.gate.wait()
        request = orjson.loads(body)
        if request.get("stream"):
            return StreamUpstream(request["model"])
        message = {"role": "assistant", "content": "hi"}
        answer = {"object": "chat.completion", "model": request["model"], "served": self.name,
                  "choices": [{"index": 0, "message": message}], "usage": USAGE}  # fmt: skip
        return FakeUpstream(orjson.dumps(answer))


class FailingBackend(FakeBackend):
    """Healthy to probes, every request fails before its first byte."""

    async def send(self, op: Operation, body: bytes) -> FakeUpstream:
        self.sent.append((op, body))
        raise UpstreamFailed("the backend broke off its answer (test)")


async def scrape(url: str) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + METRICS_PATH) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, label: str) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == label}


@pytest.fixture
def usage_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's nodes start with a `UsageBackend` each: b advertises its models in
    its first snapshot, so no later snapshot of b is needed before a routes to it."""
    monkeypatch.setattr("tests.cluster.FakeBackend", UsageBackend)


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[RunningNode, RunningNode]]:
    models = {0: ("m0",), 1: ("m1", "shared")}
    async with cluster(tmp_path, 2, models=models.__getitem__) as (a, b):
        assert isinstance(a.backend, UsageBackend), "use the usage_backends fixture"
        a.node.registry.add(FailingBackend("failing-a", ("shared",)))
        await a.node.admission.meet(b.url, "join")
        await a.wait_for_model("m1")
        await a.wait_for_model("shared", holders=2)
        await wait_until(lambda: b.node_id in a.alive_peers(), 10, "b alive in a's table")
        yield a, b


CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}


async def test_metrics_parse_and_move_on_every_route(tmp_path: Path, usage_backends: None) -> None:
    async with two_nodes(tmp_path) as (a, b):
        before = await scrape(a.url)
        assert value(before, "shoal_requests_in_flight", where="node") == 0
        info = {"name": "n0", "node_id": short_id(a.node_id), "version": __version__}
        assert value(before, "shoal_node_info", **info) == 1

        for model, route in (("m0", "local"), ("m1", "peer"), ("shared", "retried")):
            status, headers, answer = await chat(a.url, {**CHAT, "model": model})
            assert status == 200, answer
            assert headers[ROUTE_HEADER] == route
        # Streamed, through the OpenAI SDK, with the usage event asked for.
        client = AsyncOpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="m0", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        usage = [chunk.usage async for chunk in stream if chunk.usage]
        assert usage and usage[0].completion_tokens == 3
        await client.close()
        status, _, _ = await chat(a.url, {**CHAT, "model": "never-held"})
        assert status == 404

        after = await scrape(a.url)
        n = "shoal_requests_total"
        assert (
            value(after, n, route="local", model="m0", node="n0", status="200", outcome="ok") == 2
        )
        assert value(after, n, route="peer", model="m1", node="n1", status="200", outcome="ok") == 1
        assert (
            value(after, n, route="retried", model="shared", node="n1", status="200", outcome="ok")
            == 1
        )
        assert (
            value(after, n, route="none", model=OTHER, node="none", status="404", outcome="failed")
            == 1
        )
        for route, model, count in (
            ("local", "m0", 2),
            ("peer", "m1", 1),
            ("retried", "shared", 1),
        ):
            labels = {"route": route, "model": model}
            assert value(after, "shoal_request_first_byte_seconds_count", **labels) == count
            assert value(after, "shoal_request_duration_seconds_count", **labels) == count
            assert value(after, "shoal_request_duration_seconds_sum", **labels) > 0
            # Every answer carried its usage, streamed (a's two m0s: one each) or not.
            assert value(after, "shoal_tokens_total", direction="in", **labels) == 7 * count
            assert value(after, "shoal_tokens_total", direction="out", **labels) == 3 * count

        # b served the hops as local requests of its own.
        on_b = await scrape(b.url)
        assert value(on_b, n, route="local", model="m1", node="n1", status="200", outcome="ok") == 1
        assert (
            value(on_b, n, route="local", model="shared", node="n1", status="200", outcome="ok")
            == 1
        )

        assert value(after, "shoal_peers", health="healthy") == 1
        assert value(after, "shoal_peers", health="unreachable") == 0
        assert value(after, "shoal_trusted_nodes", state="pending") == 0
        await a.wait_for(HeartbeatAnswered, peer_id=b.node_id)
        beats = await scrape(a.url)
        assert value(beats, "shoal_heartbeat_round_trip_seconds_count") >= 1
        assert value(beats, "shoal_heartbeat_round_trip_seconds_sum") > 0


async def test_in_flight_shows_a_request_while_it_runs(
    tmp_path: Path, usage_backends: None
) -> None:
    async with two_nodes(tmp_path) as (a, _):
        backend = a.backend
        backend.gate = asyncio.Event()
        request = asyncio.create_task(chat(a.url, {**CHAT, "model": "m0"}))
        await wait_until(lambda: backend.sent, 5, "the request to reach the backend")
        during = await scrape(a.url)
        assert value(during, "shoal_requests_in_flight", where="node") == 1
        assert value(during, "shoal_requests_in_flight", where="local") == 1
        assert value(during, "shoal_requests_queued") == 0
        backend.gate.set()
        assert (await request)[0] == 200
        after = await scrape(a.url)
        assert value(after, "shoal_requests_in_flight", where="node") == 0


HOSTILE_NAMES = [
    'm0"} 1\nshoal_requests_total{route="x"',  # an exposition injection
    "m0\n",
    "x" * 255,
    "../../etc/passwd",
    "Ünïcødé-模型",
    "m0 ",
    "M0",
    "\u202em0",
    *(f"fuzz-{i}" for i in range(40)),
]


async def test_model_labels_stay_bounded_whatever_clients_ask_for(
    tmp_path: Path, usage_backends: None
) -> None:
    async with two_nodes(tmp_path) as (a, _):
        for name in HOSTILE_NAMES:
            status, _, _ = await chat(a.url, {**CHAT, "model": name})
            assert status in (400, 404), name
        samples = await scrape(a.url)
        models = label_values(samples, "model")
        assert models <= {"m0", "m1", "shared", OTHER, "none"}
        assert label_values(samples, "node") <= {"n0", "n1", OTHER, "none"}
        assert len(models) <= MAX_MODELS + 2


async def test_a_request_logs_one_line_at_info_and_its_route_at_debug(
    tmp_path: Path, usage_backends: None
) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("shoal.requests")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)  # before the nodes subscribe their log
    try:
        async with two_nodes(tmp_path) as (a, _):
            status, _, _ = await chat(a.url, {**CHAT, "model": "shared"})
            assert status == 200
            await wait_until(
                lambda: any(r.levelno == logging.INFO for r in records), 5, "the request's line"
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in records]
    # Both nodes log to this process's logger: b's line says local, a's retried.
    finished_lines = [line for line in lines if line["level"] == "info" and "request" in line]
    assert sorted(line["request"]["route"] for line in finished_lines) == ["local", "retried"]
    (finished,) = [line for line in finished_lines if line["request"]["route"] == "retried"]
    fields = finished["request"]
    assert fields["route"] == "retried"
    assert (fields["model"], fields["node"], fields["status"]) == ("shared", "n1", 200)
    assert fields["outcome"] == "ok"
    assert fields["first_byte_ms"] is not None and fields["total_ms"] >= fields["first_byte_ms"]
    assert (fields["tokens_in"], fields["tokens_out"]) == (7, 3)
    assert "route retried, served by n1" in finished["message"]
    routed = [line["routed"] for line in lines if line["level"] == "debug" and "routed" in line]
    assert any(r["route"] == "retried" and r["attempt"] == 1 for r in routed)
