"""Proxy overhead at one request at a time: direct vs through a node vs node + a peer hop.

The fake backend answers at once (no generation time), so every millisecond above a
direct call is the proxy's. Three ways to the same backend, in rotating order within
each round: direct; through node `a`, which holds the backend; through node `b`, which
holds nothing and forwards to `a` (pinned with `X-Shoal-Node: a`). One request at a time
on a keep-alive connection, from the lean client. nginx (one worker, keep-alive to
the backend, unbuffered) is a fourth way when it can be had (bench/baselines/nginx.py):
the floor any reverse proxy pays. Per round: p50 and p99 of each; the
rows are the added latency, paired round by round, with its spread.

Pinning: backend and client on core 0, both nodes on core 1. "One round trip" for the
hop target is measured, not assumed: the p50 of GET /health to the backend, an HTTP
exchange on the same loopback link with next to no server work.
"""

from __future__ import annotations

import asyncio

from bench.baselines import nginx
from bench.client import Pool, chat_body
from bench.harness import Bound, Curve, Result, Row, cdf, percentile
from bench.processes import Processes
from bench.scenarios._common import MODEL, command, pinned_self, wait_peers

NAME = "proxy_overhead"
TITLE = "Proxy overhead, one request at a time: direct vs node vs node + peer hop"
WAYS = ("direct", "node", "hop", "nginx")


async def _measure(
    urls: dict[str, str], rounds: int, per_round: int
) -> tuple[dict[str, list[list[float]]], list[float], list[str]]:
    pool = Pool(timeout_s=10)
    body = chat_body(MODEL)
    headers = {"node": {}, "direct": {}, "hop": {"X-Shoal-Node": "a"}, "nginx": {}}
    served = {"node": "a", "hop": "a"}
    ways = tuple(way for way in WAYS if way in urls)
    samples: dict[str, list[list[float]]] = {way: [] for way in ways}
    problems: list[str] = []
    rtt: list[float] = []
    try:
        for way in ways:  # warm up: connections, caches, the peer link
            for _ in range(50):
                await pool.request(urls[way], "POST", "/v1/chat/completions", body, headers[way])
        for r in range(rounds):
            order = ways[r % len(ways) :] + ways[: r % len(ways)]
            for way in order:
                latencies = []
                for _ in range(per_round):
                    answer = await pool.request(
                        urls[way], "POST", "/v1/chat/completions", body, headers[way]
                    )
                    if not answer.ok:
                        problems.append(f"{way}: {answer.status} {answer.error or ''}")
                        continue
                    if way in served and answer.headers.get("x-shoal-served-by") != served[way]:
                        problems.append(
                            f"{way}: served by {answer.headers.get('x-shoal-served-by')}"
                        )
                    latencies.append(answer.latency * 1000)
                samples[way].append(latencies)
            for _ in range(per_round // 5):
                answer = await pool.request(urls["direct"], "GET", "/health")
                rtt.append(answer.latency * 1000)
    finally:
        await pool.close()
    return samples, rtt, problems


def run(quick: bool) -> Result:
    rounds, per_round = (3, 150) if quick else (9, 1000)
    with Processes(NAME) as procs:
        backend = procs.fake_backend(cpus="0")
        a = procs.node("a", backend=backend.url, cpus="1")
        b = procs.node("b", peers=[a.url], cpus="1")
        wait_peers(b.url, {"a"}, model=MODEL)
        urls = {"direct": backend.url, "node": a.url, "hop": b.url}
        found, nginx_missing = nginx.binary(allow_fetch=not quick)
        if found is not None:
            urls["nginx"] = nginx.start(procs, found, backend, cpus="1").url
        with pinned_self({0}):
            samples, rtt, problems = asyncio.run(_measure(urls, rounds, per_round))

    def per_round_stat(way: str, q: float) -> list[float]:
        return [percentile(values, q) for values in samples[way] if values]

    rtt_ms = percentile(rtt, 50)
    rows = [
        Row(
            "added latency p50, through a node",
            "ms",
            "direct to backend",
            per_round_stat("direct", 50),
            per_round_stat("node", 50),
            higher_is_better=False,
            compare="added",
            bound=Bound("added", "<=", 0.25),  # DESIGN §11
        ),
        Row(
            "added latency p99, through a node",
            "ms",
            "direct to backend",
            per_round_stat("direct", 99),
            per_round_stat("node", 99),
            higher_is_better=False,
            compare="added",
            bound=Bound("added", "<=", 0.5),
        ),
        Row(
            "added latency p50, node + peer hop",
            "ms",
            "direct to backend",
            per_round_stat("direct", 50),
            per_round_stat("hop", 50),
            higher_is_better=False,
            compare="added",
        ),
        Row(
            "added latency p99, node + peer hop",
            "ms",
            "direct to backend",
            per_round_stat("direct", 99),
            per_round_stat("hop", 99),
            higher_is_better=False,
            compare="added",
        ),
        Row(
            "cost of the peer hop p50",
            "ms",
            "through one node",
            per_round_stat("node", 50),
            per_round_stat("hop", 50),
            higher_is_better=False,
            compare="added",
            bound=Bound("added", "<=", round(0.3 + rtt_ms, 3)),
            target=f"0.3 ms + one round trip ({rtt_ms:.3f} ms)",
        ),
    ]
    for q in (50, 99):
        rows.append(
            Row(
                f"latency p{q}, through a node vs through nginx",
                "ms",
                "nginx reverse proxy",
                per_round_stat("nginx", q) if "nginx" in samples else [],
                per_round_stat("node", q),
                higher_is_better=False,
                compare="added",
                missing=nginx_missing,
            )
        )
    notes = [
        f"{rounds} rounds × {per_round} sequential requests per way, ways in rotating order; "
        f"loopback HTTP round trip (GET /health, p50): {rtt_ms:.3f} ms",
        "pinned: backend and client on core 0, nodes a and b (and nginx) on core 1",
    ]
    if problems:
        notes.append(f"{len(problems)} failed or misrouted requests, e.g. {problems[:3]}")
    pooled = {way: [x for values in ways_ for x in values] for way, ways_ in samples.items()}
    curve = Curve(
        "latency CDF, all rounds",
        "latency (ms)",
        "fraction of requests",
        {way: cdf(values) for way, values in pooled.items() if values},
        log_x=True,
    )
    return Result(NAME, TITLE, command(NAME, quick), rows, notes, [curve])
