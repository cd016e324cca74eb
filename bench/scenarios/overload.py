"""Overload: a flood at many times capacity, through Shoal vs straight at the backend.

One fake backend serves 2 generations at once (`--capacity 2`; more wait in its own
FIFO queue, without bound) and takes about 100 ms for each (first chunk after 50 ms,
then 5 more 10 ms apart, streamed). The nodes in front of it are told its capacity
(`SHOAL_ROUTING__DEFAULT_CAPACITY=2`) and queue at most 16 (`SHOAL_ROUTING__QUEUE_MAX`;
the default 64 would hold all 50 clients and refuse none). 50 clients, two classes of
25, send streamed chats in a closed loop for a fixed time: about 25 times what the
backend can run. A client answered 429 pauses 100 ms and sends again, whatever
`Retry-After` says (a flood, not a polite client). Beside them a probe GETs `/healthz`
every 100 ms. The two classes, two ways, each its own flood:

- local vs peer (the default weights, 70/30): node `a` fronts the backend; node `b`
  holds nothing and has `a` as a static peer. One class sends to `a` (class `local`),
  the other to `b`, which forwards to `a` (class `peer` there; pinned, `X-Shoal-Node`).
- two API keys, weights 75 and 25: node `c` fronts the backend in LAN mode (no mDNS),
  and each class sends to this machine's LAN address with its own key (a LAN client's
  key is its class; loopback clients are all `local`). Not run without a LAN address.

The baseline is the same flood, the same two groups of 25, straight at the backend:
what clients see without Shoal (everything waits in the backend's queue; nothing is
refused, nothing is shared by weight). The three floods rotate, round by round.

Measured from outside, per flood: offered, completed, rejected (429 with a
`Retry-After`), and anything else (a 5xx, a 429 without `Retry-After`, a connection
error, a timeout, a stream without `[DONE]`), which must be none; the most
generations the backend ran at once and the most that waited inside it (its own
counters, `GET /fake/stats`); the queue wait of served requests (time to first chunk
minus the same path's unloaded time to first chunk, the p50 of 10 requests one at a
time before the flood); `/healthz` latency p50/p99/max; and each class's share of the
requests whose first chunk came in the steady part of the flood (after its first
second, before its end), against its weight.

Pinning: backend and load generator on core 0, nodes `a`, `b` and `c` on core 1.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from bench.client import Answer, Pool, chat_body, sse_error
from bench.harness import Bound, Curve, Result, Row, cdf, percentile
from bench.processes import Processes, Service
from bench.scenarios._common import MODEL, command, pinned_self, wait_peers
from shoal.mesh import interfaces

NAME = "overload"
TITLE = "Overload: 50 clients at a capacity-2 backend — shed with 429, shared by weight"
CAPACITY = 2
TTFT_MS, GAP_MS, CHUNKS = 50.0, 10.0, 6  # about 100 ms per generation
CLIENTS_PER_CLASS = 25
QUEUE_MAX = 16  # 2 running + 16 queued: most of the 50 clients are refused at any time
WEIGHTS = {"local": 70.0, "peer": 30.0}  # the node's defaults (routing.class_weights)
KEY_WEIGHTS = {"key 75": 75.0, "key 25": 25.0}  # 3:1, as tests/inprocess/test_load_shedding
RETRY_PAUSE_S = 0.1  # after a 429, whatever Retry-After says
PROBE_EVERY_S = 0.1
WARMUP_S = 1.0  # shares count from here: the queue has formed
CLIENT_TIMEOUT_S = 40.0  # beyond the node's queue_wait_s (30 s): a hang shows as a loss

Origins = dict[str, tuple[str, dict[str, str]]]  # class: (where its clients send, headers)
Window = tuple[float, float]  # perf_counter times: the steady part of a flood


@dataclass
class Flood:
    """What one flood of one side saw."""

    seconds: float
    offered: int = 0
    completed: int = 0
    rejected: int = 0  # 429 with Retry-After
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    served: collections.Counter[str] = field(default_factory=collections.Counter)  # steady
    waits_ms: dict[str, list[float]] = field(  # of served requests, by class
        default_factory=lambda: collections.defaultdict(list)
    )
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)  # why
    health_ms: list[float] = field(default_factory=list)
    most_running: int = 0
    most_waiting: int = 0

    @property
    def waits(self) -> list[float]:
        return [x for values in self.waits_ms.values() for x in values]

    @property
    def lost(self) -> int:
        return sum(self.other.values())

    def share(self, cls: str) -> float:
        total = sum(self.served.values())
        return 100.0 * self.served[cls] / total if total else 0.0


def _sort(flood: Flood, cls: str, answer: Answer, unloaded_s: float, window: Window) -> bool:
    """Count one answer; whether the client should pause before its next request."""
    if answer.error is not None:
        flood.other[answer.error.split(":")[0]] += 1
    elif answer.status == 200 and b"[DONE]" in answer.body and not sse_error(answer):
        flood.completed += 1
        first = answer.events[0] if answer.events else answer.ended
        if window[0] <= first < window[1]:
            flood.served[cls] += 1
        flood.waits_ms[cls].append(max(0.0, first - answer.started - unloaded_s) * 1000)
    elif answer.status == 429 and answer.headers.get("retry-after", "").isdigit():
        flood.rejected += 1
        flood.refusals[f"{cls} {_code(answer.body)}"] += 1
        return True
    else:
        flood.other[f"HTTP {answer.status}"] += 1
    return False


def _code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"


async def _flood(
    origins: Origins, health_url: str, unloaded_s: dict[str, float], seconds: float
) -> Flood:
    """`CLIENTS_PER_CLASS` closed-loop clients per class for `seconds`, and the probe."""
    flood = Flood(seconds)
    pool, probe_pool = Pool(CLIENT_TIMEOUT_S), Pool(5.0)
    body = chat_body(MODEL, stream=True)
    start = time.perf_counter()
    end = start + seconds
    window = (start + WARMUP_S, end)

    async def client(cls: str) -> None:
        origin, headers = origins[cls]
        while time.perf_counter() < end:
            flood.offered += 1
            answer = await pool.request(origin, "POST", "/v1/chat/completions", body, headers)
            if _sort(flood, cls, answer, unloaded_s[cls], window):
                await asyncio.sleep(RETRY_PAUSE_S)

    async def probe() -> None:
        while time.perf_counter() < end:
            answer = await probe_pool.request(health_url, "GET", "/healthz")
            if answer.ok:
                flood.health_ms.append(answer.latency * 1000)
            else:
                flood.other[f"/healthz: {answer.error or answer.status}"] += 1
            await asyncio.sleep(PROBE_EVERY_S)

    try:
        await asyncio.gather(
            probe(), *(client(cls) for cls in origins for _ in range(CLIENTS_PER_CLASS))
        )
    finally:
        await pool.close()
        await probe_pool.close()
    return flood


async def _unloaded_ttft(origin: str, headers: dict[str, str], count: int = 10) -> float:
    """The p50 time to first chunk, one request at a time: the path's own, no queue."""
    pool = Pool(10.0)
    body = chat_body(MODEL, stream=True)
    times = []
    try:
        for _ in range(count):
            answer = await pool.request(origin, "POST", "/v1/chat/completions", body, headers)
            if not answer.ok or answer.ttft is None:
                raise RuntimeError(f"{origin}: {answer.status} {answer.error} {answer.body!r}")
            times.append(answer.ttft)
    finally:
        await pool.close()
    return statistics.median(times)


async def _backend_stats(backend: Service, reset: bool) -> dict[str, int]:
    pool = Pool(5.0)
    try:
        if reset:
            await pool.request(backend.url, "POST", "/fake/stats/reset")
        answer = await pool.request(backend.url, "GET", "/fake/stats")
        stats: dict[str, int] = orjson.loads(answer.body)
        return stats
    finally:
        await pool.close()


async def _side(backend: Service, origins: Origins, health_url: str, seconds: float) -> Flood:
    unloaded = {cls: await _unloaded_ttft(*origin) for cls, origin in origins.items()}
    await _backend_stats(backend, reset=True)
    flood = await _flood(origins, health_url, unloaded, seconds)
    stats = await _backend_stats(backend, reset=False)
    flood.most_running, flood.most_waiting = stats["max_running"], stats["max_waiting"]
    return flood


def _logs(procs: Processes) -> str:
    return "".join(f"\n--- {s.name}'s log:\n{s.log()[-3000:]}" for s in procs.services)


def _key(procs: Processes, node: str, weight: float) -> dict[str, str]:
    """An API key of `weight` in `node`'s key store (before it starts): its header."""
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "keys", "create", f"w{weight:g}", "--weight",
         str(weight), "--data-dir", str(procs.home / node / "data"), "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return {"Authorization": f"Bearer {orjson.loads(done.stdout)['key']}"}


def _floods(quick: bool) -> tuple[dict[str, list[Flood]], float, str]:
    """Per side, its floods (one a round), the seconds of each, and why keys were not run."""
    rounds, seconds = (1, 4.0) if quick else (3, 12.0)
    env = {
        "SHOAL_ROUTING__DEFAULT_CAPACITY": str(CAPACITY),
        "SHOAL_ROUTING__QUEUE_MAX": str(QUEUE_MAX),
    }
    floods: dict[str, list[Flood]] = {"direct": [], "hop": [], "keys": []}
    lan = interfaces.lan_ipv4()
    with Processes(NAME) as procs:
        backend = procs.fake_backend(
            ttft_ms=TTFT_MS, chunk_gap_ms=GAP_MS, chunks=CHUNKS, capacity=CAPACITY, cpus="0"
        )
        a = procs.node("a", backend=backend.url, env=env, cpus="1")
        b = procs.node("b", peers=[a.url], env=env, cpus="1")
        origins: dict[str, Origins] = {
            "direct": {"local": (backend.url, {}), "peer": (backend.url, {})},
            "hop": {"local": (a.url, {}), "peer": (b.url, {"X-Shoal-Node": "a"})},
        }
        health = {"direct": backend.url, "hop": a.url}
        if lan:  # a LAN client's key is its class; loopback clients would all be "local"
            keys = {cls: _key(procs, "c", w) for cls, w in KEY_WEIGHTS.items()}
            lan_env = {**env, "SHOAL_LAN": "true", "SHOAL_MESH__MDNS": "false"}
            c = procs.node("c", backend=backend.url, env=lan_env, cpus="1")
            lan_url = f"http://{lan[0]}:{c.port}"
            origins["keys"] = {cls: (lan_url, header) for cls, header in keys.items()}
            health["keys"] = c.url
        wait_peers(b.url, {"a"}, model=MODEL)
        sides = list(origins)
        with pinned_self({0}):
            for r in range(rounds):
                for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                    try:
                        flood = asyncio.run(_side(backend, origins[side], health[side], seconds))
                    except RuntimeError as exc:  # the nodes' logs die with the processes
                        raise RuntimeError(f"{side}: {exc}{_logs(procs)}") from exc
                    floods[side].append(flood)
    return floods, seconds, "" if lan else "no non-loopback IPv4 address for LAN clients"


def run(quick: bool) -> Result:
    floods, seconds, keys_missing = _floods(quick)
    base, hop, keys = floods["direct"], floods["hop"], floods["keys"]
    rows = _rows(base, hop, "Shoal: local vs peer", WEIGHTS, ("local", "peer"))
    rows += _rows(base, keys, "Shoal: two API keys", KEY_WEIGHTS, ("local", "peer"), keys_missing)
    curves = [
        Curve("queue wait of served requests, all rounds", "wait (ms)", "fraction of requests",
              {name: cdf(_pooled(f, "waits")) for name, f in
               (("direct to backend", base), ("Shoal: local vs peer", hop),
                ("Shoal: two API keys", keys)) if f}),
        Curve("/healthz latency during the flood, all rounds", "latency (ms)",
              "fraction of probes",
              {name: cdf(_pooled(f, "health_ms")) for name, f in
               (("backend", base), ("node a (local vs peer)", hop), ("node c (keys)", keys))
               if f}, log_x=True),
    ]  # fmt: skip
    notes = _notes(floods, seconds, keys_missing)
    return Result(NAME, TITLE, command(NAME, quick), rows, notes, curves)


def _rows(
    base: list[Flood],
    shoal: list[Flood],
    name: str,
    weights: dict[str, float],
    base_classes: tuple[str, str],
    missing: str = "",
) -> list[Row]:
    """The rows of one way of splitting the clients in two classes of 25.

    `base_classes`: the baseline's two groups of 25 clients, in the order of `weights`."""

    def each(floods: list[Flood], value: Callable[[Flood], float]) -> list[float]:
        return [float(value(f)) for f in floods]

    def rate(f: Flood) -> float:
        return sum(f.served.values()) / (f.seconds - WARMUP_S)

    def wait(q: float) -> Callable[[Flood], float]:
        return lambda f: percentile(f.waits, q) if f.waits else 0.0

    def health(q: float) -> Callable[[Flood], float]:
        return lambda f: percentile(f.health_ms, q) if f.health_ms else 0.0

    def rejected(f: Flood) -> float:
        return 100 * f.rejected / max(1, f.offered)

    def share(cls: str) -> Callable[[Flood], float]:
        return lambda f: f.share(cls)

    total = sum(weights.values())
    fair = {cls: 100 * w / total for cls, w in weights.items()}

    def distance(f: Flood) -> float:
        return max(abs(f.share(cls) - fair[cls]) for cls in weights)

    def base_distance(f: Flood) -> float:
        return max(abs(f.share(b) - fair[c]) for b, c in zip(base_classes, weights, strict=True))

    direct, fifo = "direct to backend", "FIFO in the backend"
    rows = [
        Row(f"served per second, steady; {name}", "req/s", direct, each(base, rate),
            each(shoal, rate), target="work-conserving: the backend kept busy",
            bound=Bound("ratio", ">=", 0.9)),
        Row(f"lost: 5xx, errors, timeouts, 429 without Retry-After; {name}", "requests",
            direct, each(base, lambda f: f.lost), each(shoal, lambda f: f.lost),
            higher_is_better=False, compare="added", bound=Bound("value", "<=", 0)),
        Row(f"rejected, 429 with Retry-After, of offered; {name}", "%", direct,
            each(base, rejected), each(shoal, rejected), higher_is_better=False,
            compare="added"),
        Row(f"most generations at once in the backend (capacity {CAPACITY}); {name}",
            "requests", direct, each(base, lambda f: f.most_running),
            each(shoal, lambda f: f.most_running), higher_is_better=False, compare="added",
            bound=Bound("value", "<=", CAPACITY)),
        Row(f"most requests waiting inside the backend; {name}", "requests", direct,
            each(base, lambda f: f.most_waiting), each(shoal, lambda f: f.most_waiting),
            higher_is_better=False, compare="added", target="back-pressure: queued at Shoal"),
        Row(f"queue wait p50, served requests; {name}", "ms", direct, each(base, wait(50)),
            each(shoal, wait(50)), higher_is_better=False),
        Row(f"queue wait p99, served requests; {name}", "ms", direct, each(base, wait(99)),
            each(shoal, wait(99)), higher_is_better=False),
        Row(f"/healthz latency p50 during the flood; {name}", "ms", "the backend's /healthz",
            each(base, health(50)), each(shoal, health(50)), higher_is_better=False,
            compare="added"),
        Row(f"/healthz latency p99 during the flood; {name}", "ms", "the backend's /healthz",
            each(base, health(99)), each(shoal, health(99)), higher_is_better=False,
            compare="added", bound=Bound("value", "<=", 50), target="at once"),
        Row(f"/healthz latency max during the flood; {name}", "ms", "the backend's /healthz",
            each(base, health(100)), each(shoal, health(100)), higher_is_better=False,
            compare="added", bound=Bound("value", "<=", 1000),
            target="inside a probe's timeout (Kubernetes: 1 s)"),
    ]  # fmt: skip
    for b, cls in zip(base_classes, weights, strict=True):
        rows.append(
            Row(f"share of served, class {cls} (weight {fair[cls]:.0f} %); {name}", "%", fifo,
                each(base, share(b)), each(shoal, share(cls)), compare="added")
        )  # fmt: skip
    rows.append(
        Row(f"largest distance of a class's share from its weight; {name}", "points", fifo,
            each(base, base_distance), each(shoal, distance), higher_is_better=False,
            compare="added", bound=Bound("value", "<=", 5), target="within a few percent")
    )  # fmt: skip
    for row in rows:
        row.shoal_name, row.missing = name, missing
    return rows


def _pooled(floods: list[Flood], name: str) -> list[float]:
    values = [x for f in floods for x in getattr(f, name)]
    return values or [0.0]


def _notes(floods: dict[str, list[Flood]], seconds: float, keys_missing: str) -> list[str]:
    notes = [
        f"{len(floods['direct'])} round(s) of {seconds:g} s per side, sides in rotating "
        f"order; {2 * CLIENTS_PER_CLASS} closed-loop clients ({CLIENTS_PER_CLASS} per class), "
        f"streamed chats of ~{TTFT_MS + GAP_MS * (CHUNKS - 1):.0f} ms at a backend of "
        f"capacity {CAPACITY}; node queue_max {QUEUE_MAX}, queue_wait_s 30 (default); "
        f"after a 429 a client pauses {RETRY_PAUSE_S * 1000:.0f} ms",
        "local vs peer: 'local' = clients of node a (weight 70), 'peer' = clients of node b, "
        "which forwards to a (weight 30). Two API keys: node c (LAN mode, no mDNS) on this "
        "machine's LAN address, 25 clients per key, keys of weight "
        f"{' and '.join(f'{w:g}' for w in KEY_WEIGHTS.values())}. Shares count requests "
        f"whose first chunk came after the first {WARMUP_S:g} s and before the end",
        "pinned: backend and load generator on core 0, nodes a, b, c on core 1",
    ]
    if keys_missing:
        notes.append(f"two API keys: not measured: {keys_missing}")
    for side, rounds in floods.items():
        for i, f in enumerate(rounds):
            waits = {cls: round(percentile(w, 99)) for cls, w in f.waits_ms.items() if w}
            notes.append(
                f"{side} round {i + 1}: offered {f.offered}, completed {f.completed}, "
                f"rejected {f.rejected} {dict(f.refusals)}, other {dict(f.other) or 0}; "
                "served in the steady "
                f"part {dict(f.served)}; queue wait p99 by class (ms) {waits}"
            )
    return notes
