"""Throughput at a latency bound, and CPU per request: direct vs aiohttp vs Shoal vs LiteLLM.

Each system under test runs alone on core 1; wrk (one thread) and the fake backend it
fronts share core 0. "Direct" is a second fake backend, itself on core 1. For each
system, wrk runs at a few connection counts; the figure is the highest requests/s whose
p99 stays within the bound with no errors, and the CPU the system's process tree used
per request at that level (from /proc, via psutil). Systems run in rotating order in
every round. The request is a non-streamed chat completion answered at once.

Baselines: the bare aiohttp pass-through proxy (bench/baselines/aiohttp_proxy.py),
LiteLLM's proxy (installed into bench/.venv-litellm; skipped in quick mode), and nginx
as a reverse proxy when it can be had (bench/baselines/nginx.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from bench import wrk
from bench.baselines import litellm, nginx
from bench.client import chat_body
from bench.harness import Bound, Result, Row
from bench.processes import Processes, Service, free_port
from bench.scenarios._common import MODEL, command
from tests.support import http, wait_for

NAME = "throughput"
TITLE = "Throughput at a latency bound and CPU per request, one core each"
P99_BOUND_MS = 50.0
PATH = "/v1/chat/completions"


@dataclass
class Level:
    connections: int
    requests_per_s: float
    p99_ms: float
    cpu_ms_per_request: float
    errors: int


def _best(levels: list[Level]) -> Level:
    """The highest rate within the bound, else (nothing qualifies) the lowest latency."""
    good = [lv for lv in levels if lv.p99_ms <= P99_BOUND_MS and lv.errors == 0]
    if good:
        return max(good, key=lambda lv: lv.requests_per_s)
    return min(levels, key=lambda lv: lv.p99_ms)


def _peak(levels: list[Level]) -> Level:
    """The highest rate without errors (any latency): what one core can do."""
    clean = [lv for lv in levels if lv.errors == 0] or levels
    return max(clean, key=lambda lv: lv.requests_per_s)


def _warm(service: Service, headers: dict[str, str]) -> None:
    """Until it answers (a proxy may listen before it serves), then 20 more requests."""

    def answers() -> bool:
        sent = {"Content-Type": "application/json", **headers}
        status, _, raw = http("POST", service.url + PATH, chat_body(MODEL), sent)
        if status != 200:
            raise ValueError(f"{service.name} answered {status}: {raw[:300]!r}")
        return True

    wait_for(answers, 60, f"{service.name} to answer a chat completion", interval=0.2)
    for _ in range(20):
        answers()


def run(quick: bool) -> Result:
    if not wrk.available():
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    levels = (16,) if quick else (1, 4, 16, 64)
    seconds, rounds = (2, 1) if quick else (5, 3)
    notes: list[str] = []
    litellm_missing = (
        "skipped in quick mode: its install takes about a minute and its start 15–30 s"
        if quick
        else litellm.ensure(allow_install=True)
    )
    with Processes(NAME) as procs:
        systems: dict[str, Service] = {}
        headers: dict[str, dict[str, str]] = {}
        systems["direct"] = procs.fake_backend("direct-backend", cpus="1")
        backend = procs.fake_backend("backend", cpus="0")
        port = free_port()
        systems["aiohttp"] = procs.spawn(
            "aiohttp-proxy",
            [
                sys.executable,
                "-m",
                "bench.baselines.aiohttp_proxy",
                "--port",
                str(port),
                "--backend",
                backend.url,
            ],
            port=port,
            cpus="1",
        )
        systems["shoal"] = procs.node("a", backend=backend.url, cpus="1")
        found, nginx_missing = nginx.binary(allow_fetch=not quick)
        if found is not None:
            systems["nginx"] = nginx.start(procs, found, backend, cpus="1")
            notes.append(f"nginx {nginx.version(found)}, one worker, access log off")
        if litellm_missing is None:
            try:
                systems["litellm"] = litellm.start(procs, backend, MODEL, cpus="1")
                headers["litellm"] = litellm.HEADERS
                notes.append(f"LiteLLM {litellm.version()}, one worker, master key set")
            except (RuntimeError, AssertionError, OSError) as exc:
                litellm_missing = f"failed to start: {str(exc)[:300]}"
        for name, service in systems.items():
            _warm(service, headers.get(name, {}))
        results: dict[str, list[list[Level]]] = {name: [] for name in systems}
        names = list(systems)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                service = systems[name]
                measured = []
                for connections in levels:
                    cpu_before = procs.cpu_seconds(service)
                    load = wrk.run(
                        service.url + PATH,
                        chat_body(MODEL),
                        connections=connections,
                        seconds=seconds,
                        cpus="0",
                        headers=headers.get(name),
                    )
                    used = procs.cpu_seconds(service) - cpu_before
                    measured.append(
                        Level(
                            connections,
                            load.requests_per_s,
                            load.p99_ms,
                            used * 1000 / max(1, load.requests),
                            load.errors,
                        )
                    )
                results[name].append(measured)
    at_bound = {name: [_best(m) for m in rounds_] for name, rounds_ in results.items()}
    peak = {name: [_peak(m) for m in rounds_] for name, rounds_ in results.items()}

    def rate(chosen: dict[str, list[Level]], name: str) -> list[float]:
        return [lv.requests_per_s for lv in chosen.get(name, [])]

    def cpu(name: str) -> list[float]:
        return [lv.cpu_ms_per_request for lv in peak.get(name, [])]

    for name, chosen in at_bound.items():
        over = [lv for lv in chosen if lv.p99_ms > P99_BOUND_MS or lv.errors]
        notes.append(
            f"{name}: within the bound at {', '.join(str(lv.connections) for lv in chosen)} "
            f"connections (p99 {', '.join(f'{lv.p99_ms:.1f}' for lv in chosen)} ms); peak at "
            f"{', '.join(str(lv.connections) for lv in peak[name])}"
            + (
                f" — {len(over)} round(s) never within the bound without errors: "
                "the level with the lowest p99 is shown"
                if over
                else ""
            )
        )
    missing = litellm_missing or ""
    bound_name = f"requests/s at p99 ≤ {P99_BOUND_MS:g} ms"
    rows = [
        Row(bound_name, "req/s", "aiohttp pass-through", rate(at_bound, "aiohttp"),
            rate(at_bound, "shoal")),
        Row(bound_name, "req/s", "LiteLLM proxy", rate(at_bound, "litellm"),
            rate(at_bound, "shoal"), missing=missing),
        Row(bound_name, "req/s", "direct to backend", rate(at_bound, "direct"),
            rate(at_bound, "shoal")),
        Row("peak requests/s on one core", "req/s", "aiohttp pass-through", rate(peak, "aiohttp"),
            rate(peak, "shoal")),
        Row("peak requests/s on one core", "req/s", "LiteLLM proxy", rate(peak, "litellm"),
            rate(peak, "shoal"), bound=Bound("ratio", ">=", 60), missing=missing),
        Row("peak requests/s on one core", "req/s", "nginx reverse proxy", rate(peak, "nginx"),
            rate(peak, "shoal"), missing=nginx_missing),
        Row("CPU per proxied request, at peak", "ms", "nginx reverse proxy", cpu("nginx"),
            cpu("shoal"), higher_is_better=False, missing=nginx_missing),
        Row("CPU per proxied request, at peak", "ms", "aiohttp pass-through", cpu("aiohttp"),
            cpu("shoal"), higher_is_better=False, bound=Bound("ratio", "<=", 1.2)),
        Row("CPU per proxied request, at peak", "ms", "LiteLLM proxy", cpu("litellm"),
            cpu("shoal"), higher_is_better=False, bound=Bound("value", "<=", 0.11),
            missing=missing),
    ]  # fmt: skip
    notes.insert(
        0,
        f"wrk -t1 at {', '.join(map(str, levels))} connections, {seconds} s each, "
        f"{rounds} round(s); system under test on core 1, wrk and the fake backend on core 0",
    )
    return Result(NAME, TITLE, command(NAME, quick), rows, notes)
