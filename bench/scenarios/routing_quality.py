"""Routing quality under uneven nodes: local_spillover and least_loaded vs round_robin.

Three fake backends of speeds 1, 0.5 and 0.25 (each serves 4 requests at once, the rest
queue), each behind its own node; the three nodes know each other as static peers.
One such trio per strategy runs from the start (nine nodes, idle but for the trio
under load), so strategies alternate within every round without restarts. Every
strategy gets the same arrival trace: Poisson arrivals at 60% of the three backends'
combined capacity, each entering at a node drawn at random (clients are spread over the
machines), seeded so the trace is identical. Requests are non-streamed completions
whose generation takes 185 ms at speed 1.

Figures: p50 and p99 of the time to the complete answer, and goodput: requests
answered within the SLO (1 s) per second of trace. Requests still unanswered when the
run is cut off count as over the SLO, with the time they had waited.
"""

from __future__ import annotations

import asyncio
import collections
import random

from bench.client import Answer, Arrival, Pool, chat_body, open_loop, poisson
from bench.harness import Bound, Curve, Result, Row, cdf, percentile
from bench.processes import Processes, Service, free_port
from bench.scenarios._common import MODEL, command, pinned_self, wait_peers

NAME = "routing_quality"
TITLE = "Routing under uneven nodes (speeds 1, 0.5, 0.25): p50/p99 and goodput per strategy"
STRATEGIES = ("local_spillover", "least_loaded", "round_robin")
SPEEDS = (1.0, 0.5, 0.25)
CAPACITY = 4
TTFT_MS, GAP_MS, CHUNKS = 50.0, 15.0, 10
SERVICE_S = (TTFT_MS + GAP_MS * (CHUNKS - 1)) / 1000
LOAD = 0.6
SLO_S = 1.0


def _trio(procs: Processes, strategy: str, backends: list[Service]) -> list[Service]:
    ports = [free_port() for _ in backends]
    short = "".join(word[0] for word in strategy.split("_"))  # ls, ll, rr
    nodes = []
    for i, backend in enumerate(backends):
        peers = [f"http://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
        nodes.append(
            procs.node(
                f"{short}{i}",
                backend=backend.url,
                peers=peers,
                port=ports[i],
                cpus="1",
                env={"SHOAL_ROUTING__STRATEGY": strategy},
                wait=False,
            )
        )
    return nodes


def run(quick: bool) -> Result:
    seconds, rounds, drain = (3.0, 1, 1.5) if quick else (25.0, 3, 15.0)
    capacity = sum(CAPACITY * speed / SERVICE_S for speed in SPEEDS)
    rate = LOAD * capacity
    results: dict[str, list[list[Answer]]] = {s: [] for s in STRATEGIES}
    served: dict[str, collections.Counter[str]] = {s: collections.Counter() for s in STRATEGIES}
    with Processes(NAME) as procs:
        backends = [
            procs.fake_backend(
                f"backend-{speed:g}",
                ttft_ms=TTFT_MS,
                chunk_gap_ms=GAP_MS,
                chunks=CHUNKS,
                speed=speed,
                capacity=CAPACITY,
                cpus="0",
            )
            for speed in SPEEDS
        ]
        trios = {strategy: _trio(procs, strategy, backends) for strategy in STRATEGIES}
        for nodes in trios.values():
            for node in nodes:
                procs.wait_ready(node, 120)
        for nodes in trios.values():
            for node in nodes:
                wait_peers(node.url, {n.name for n in nodes} - {node.name}, 60, MODEL)
        body = chat_body(MODEL)
        with pinned_self({0}):
            for r in range(rounds):
                times = poisson(rate, seconds, seed=r)
                rng = random.Random(r)
                entries = [rng.randrange(3) for _ in times]
                order = STRATEGIES[r % 3 :] + STRATEGIES[: r % 3]
                for strategy in order:
                    nodes = trios[strategy]
                    arrivals = [
                        Arrival(t, nodes[e].url) for t, e in zip(times, entries, strict=True)
                    ]
                    pool = Pool(timeout_s=seconds + drain + 5)

                    async def replay(
                        pool: Pool = pool, arrivals: list[Arrival] = arrivals
                    ) -> list[Answer]:
                        try:
                            return await open_loop(
                                pool, arrivals, "/v1/chat/completions", body, seconds + drain
                            )
                        finally:
                            await pool.close()

                    answers = asyncio.run(replay())
                    results[strategy].append(answers)
                    for answer in answers:
                        served[strategy][answer.headers.get("x-shoal-served-by", "none")] += 1
                    _settle(backends, 30)

    def latencies(answers: list[Answer]) -> list[float]:
        return [a.latency for a in answers]

    def stat(strategy: str, q: float) -> list[float]:
        return [percentile(latencies(answers), q) * 1000 for answers in results[strategy]]

    def goodput(strategy: str) -> list[float]:
        return [
            sum(1 for a in answers if a.ok and a.latency <= SLO_S) / seconds
            for answers in results[strategy]
        ]

    rows: list[Row] = []
    for strategy in ("local_spillover", "least_loaded"):
        rows += [
            Row(
                f"p99 latency, {strategy}",
                "ms",
                "round_robin",
                stat("round_robin", 99),
                stat(strategy, 99),
                higher_is_better=False,
                bound=Bound("ratio", "<=", 0.5),
                shoal_name=strategy,
            ),
            Row(
                f"p50 latency, {strategy}",
                "ms",
                "round_robin",
                stat("round_robin", 50),
                stat(strategy, 50),
                higher_is_better=False,
                shoal_name=strategy,
            ),
            Row(
                f"goodput (≤ {SLO_S:g} s), {strategy}",
                "req/s",
                "round_robin",
                goodput("round_robin"),
                goodput(strategy),
                shoal_name=strategy,
            ),
        ]
    names = {
        f"{''.join(w[0] for w in s.split('_'))}{i}": f"speed {speed:g}"
        for s in STRATEGIES
        for i, speed in enumerate(SPEEDS)
    }
    notes = [
        f"{rate:.1f} requests/s ({LOAD:.0%} of capacity {capacity:.1f}/s) for {seconds:g} s, "
        f"{rounds} round(s), cut off {drain:g} s after the last arrival; "
        f"requests per round ≈ {rate * seconds:.0f}",
    ]
    for strategy in STRATEGIES:
        share = ", ".join(f"{names.get(k, k)}: {v}" for k, v in sorted(served[strategy].items()))
        failed = sum(1 for answers in results[strategy] for a in answers if not a.ok)
        notes.append(f"{strategy}: served by {share}; failed or cut off: {failed}")
    curve = Curve(
        "latency CDF, all rounds",
        "latency (s)",
        "fraction of requests",
        {s: cdf([x for answers in results[s] for x in latencies(answers)]) for s in STRATEGIES},
        log_x=True,
    )
    return Result(NAME, TITLE, command(NAME, quick), rows, notes, [curve])


def _settle(backends: list[Service], timeout_s: float) -> None:
    """Until no backend runs or queues anything (a cut-off run leaves work behind)."""
    from bench.processes import wait_json

    for backend in backends:
        wait_json(
            backend.url + "/fake/stats",
            lambda stats: stats["running"] == 0 and stats["waiting"] == 0,
            timeout_s,
            f"{backend.name} to be idle",
        )
