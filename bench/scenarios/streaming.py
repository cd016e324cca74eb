"""Streaming: time to first chunk and chunk gaps, direct vs through Shoal, 1 to 500 streams.

The fake backend streams like a slow model: first chunk after 50 ms, then a chunk every
50 ms, 20 chunks (about 1 s a stream). N clients each stream one completion after
another for a fixed time (their first starts are spread over one stream's length, so
N streams are open at any moment, not N arriving at once). Direct and through-Shoal
runs alternate, round by round. From every stream: time to first chunk (TTFT) and each
gap between chunks, as seen by the lean client; a stream with an error or a gap over
500 ms (10× the backend's) counts as stalled.

Relay cost per chunk: the CPU a proxy spends per extra chunk, measured as the
difference in its CPU between streams of 5 and of 50 chunks (2 ms apart, so each chunk
is read and written on its own), divided by the 45 extra chunks. Baseline: the bare
aiohttp pass-through proxy. Pinning: proxy on core 1, backend and client on core 0.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from bench.client import Answer, Pool, chat_body, sse_error
from bench.harness import Bound, Curve, Result, Row, cdf, percentile
from bench.processes import Processes, Service, free_port
from bench.scenarios._common import MODEL, command, pinned_self

NAME = "streaming"
TITLE = "Streaming: added time to first chunk and chunk gap, 1 to 500 concurrent streams"
TTFT_MS, GAP_MS, CHUNKS = 50.0, 50.0, 20
STALL_S = 0.5
STREAM_S = (TTFT_MS + GAP_MS * (CHUNKS - 1)) / 1000


async def _streams(url: str, concurrency: int, seconds: float, count: int | None) -> list[Answer]:
    """`concurrency` clients streaming back to back for `seconds` (or `count` streams)."""
    pool = Pool(timeout_s=30)
    body = chat_body(MODEL, stream=True)
    answers: list[Answer] = []
    deadline = time.perf_counter() + seconds
    rng = random.Random(7)

    async def client(stagger: float) -> None:
        await asyncio.sleep(stagger)
        while time.perf_counter() < deadline and (count is None or len(answers) < count):
            answers.append(await pool.request(url, "POST", "/v1/chat/completions", body))

    try:
        staggers = [rng.uniform(0, STREAM_S) if concurrency > 1 else 0 for _ in range(concurrency)]
        await asyncio.gather(*(client(s) for s in staggers))
    finally:
        await pool.close()
    return answers


def _stalled(answer: Answer) -> bool:
    return not answer.ok or sse_error(answer) or any(g > STALL_S for g in answer.gaps)


async def _relay_cost(procs: Processes, service: Service, url: str, streams: int) -> float:
    """Microseconds of the proxy's CPU per extra chunk relayed."""
    pool = Pool(timeout_s=30)
    cost: dict[int, float] = {}
    try:
        for chunks in (5, 50):
            body = chat_body(MODEL, stream=True, max_tokens=chunks)
            queue = list(range(streams))

            async def client(body: bytes = body, queue: list[int] = queue) -> None:
                while queue:
                    queue.pop()
                    await pool.request(url, "POST", "/v1/chat/completions", body)

            before = procs.cpu_seconds(service)
            await asyncio.gather(*(client() for _ in range(16)))
            cost[chunks] = (procs.cpu_seconds(service) - before) / streams
    finally:
        await pool.close()
    return (cost[50] - cost[5]) / 45 * 1e6


def run(quick: bool) -> Result:
    levels = (1, 500) if quick else (1, 100, 500)
    rounds = 1 if quick else 3
    seconds = 2.0 if quick else 8.0
    sequential = 2 if quick else 15  # streams at concurrency 1
    relay_streams = 40 if quick else 300
    samples: dict[tuple[str, int], list[list[Answer]]] = {}
    relay: dict[str, list[float]] = {"aiohttp": [], "shoal": []}
    with Processes(NAME) as procs:
        backend = procs.fake_backend(ttft_ms=TTFT_MS, chunk_gap_ms=GAP_MS, chunks=CHUNKS, cpus="0")
        relay_backend = procs.fake_backend("relay-backend", chunk_gap_ms=2, cpus="0")
        node = procs.node("a", backend=backend.url, cpus="1")
        relay_node = procs.node("r", backend=relay_backend.url, cpus="1")
        port = free_port()
        bare = procs.spawn(
            "aiohttp-proxy",
            [
                sys.executable,
                "-m",
                "bench.baselines.aiohttp_proxy",
                "--port",
                str(port),
                "--backend",
                relay_backend.url,
            ],
            port=port,
            cpus="1",
        )
        urls = {"direct": backend.url, "shoal": node.url}
        with pinned_self({0}):
            for r in range(rounds):
                for level in levels:
                    ways = ("direct", "shoal") if r % 2 == 0 else ("shoal", "direct")
                    for way in ways:
                        count = sequential if level == 1 else None
                        span = seconds if level > 1 else 120.0
                        answers = asyncio.run(_streams(urls[way], level, span, count))
                        samples.setdefault((way, level), []).append(answers)
                for name, service in (("aiohttp", bare), ("shoal", relay_node)):
                    relay[name].append(
                        asyncio.run(_relay_cost(procs, service, service.url, relay_streams))
                    )

    def stat(way: str, level: int, metric: str, q: float) -> list[float]:
        values = []
        for answers in samples[(way, level)]:
            good = [a for a in answers if a.ok]
            if metric == "ttft":
                points = [a.ttft * 1000 for a in good if a.ttft is not None]
            else:
                points = [g * 1000 for a in good for g in a.gaps[1:]]  # after role+first
            if points:
                values.append(percentile(points, q))
        return values

    rows: list[Row] = []
    notes = [
        f"backend: first chunk at {TTFT_MS:g} ms, {CHUNKS} chunks {GAP_MS:g} ms apart; "
        f"{rounds} round(s); concurrency 1: {sequential} streams in a row; others: "
        f"{seconds:g} s of back-to-back streams per client",
    ]
    for level in levels:
        # DESIGN §11: at 100 streams, ≤ 0.5 ms p50 and ≤ 5 ms p99.
        p50_target = Bound("added", "<=", 0.5) if level == 100 else None
        p99_target = Bound("added", "<=", 5.0) if level == 100 else None
        rows += [
            Row(
                f"added TTFT p50, {level} stream(s)",
                "ms",
                "direct to backend",
                stat("direct", level, "ttft", 50),
                stat("shoal", level, "ttft", 50),
                higher_is_better=False,
                compare="added",
                bound=p50_target,
            ),
            Row(
                f"added TTFT p99, {level} stream(s)",
                "ms",
                "direct to backend",
                stat("direct", level, "ttft", 99),
                stat("shoal", level, "ttft", 99),
                higher_is_better=False,
                compare="added",
                bound=p99_target,
            ),
            Row(
                f"added chunk gap p99, {level} stream(s)",
                "ms",
                "direct to backend",
                stat("direct", level, "gap", 99),
                stat("shoal", level, "gap", 99),
                higher_is_better=False,
                compare="added",
            ),
        ]
        stalls = {
            way: [sum(map(_stalled, answers)) for answers in samples[(way, level)]]
            for way in ("direct", "shoal")
        }
        streams = [len(answers) for answers in samples[("shoal", level)]]
        rows.append(
            Row(
                f"stalled or failed streams, {level} stream(s)",
                "streams",
                "direct to backend",
                [float(x) for x in stalls["direct"]],
                [float(x) for x in stalls["shoal"]],
                higher_is_better=False,
                compare="added",
                bound=Bound("value", "<=", 0) if level == 500 else None,
                target=f"of {sum(streams)} streams",
            )
        )
    rows.append(
        Row(
            "relay CPU per chunk",
            "µs",
            "aiohttp pass-through",
            relay["aiohttp"],
            relay["shoal"],
            higher_is_better=False,
            bound=Bound("value", "<=", 25),
        )
    )
    notes.append(
        f"relay cost: {relay_streams} streams of 5 and of 50 chunks (2 ms apart), 16 at a time"
    )
    lines = {}
    for way in ("direct", "shoal"):
        points = [
            a.ttft * 1000
            for answers in samples[(way, levels[-1])]
            for a in answers
            if a.ok and a.ttft is not None
        ]
        if points:
            lines[f"{way}, {levels[-1]} streams"] = cdf(points)
    curve = Curve("time to first chunk CDF", "TTFT (ms)", "fraction of streams", lines)
    return Result(NAME, TITLE, command(NAME, quick), rows, notes, [curve])
