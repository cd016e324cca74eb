"""Failover: a peer killed hard (SIGKILL) during steady streaming load.

Node `a` holds no model; nodes `b` and `c` each front a fake backend with the same
model; all three know each other as static peers. Clients stream completions into `a`
(open loop, Poisson arrivals), so `a` sends about half of them to `b`. A third of the
way into the load, `b`'s process is killed with SIGKILL (its backend lives on; only the
node dies). Every answer is sorted into: complete; broken after it had begun streaming
(those streaming from `b` at the kill: no gateway can save them); or failed before any
chunk (DESIGN §11: there must be none).

"Stops routing to it": for `a`, the kill to the start of the last request that `a`
still tried on `b` first (its answer says `X-Shoal-Route: retried`), and the kill to the
moment `a`'s peer list no longer shows `b` healthy; for `c`, which sends `b` nothing and
learns only from heartbeats, the kill to the moment its peer list stops showing `b`
healthy (polled every 50 ms). There is no baseline: these are Shoal's figures alone,
held against the targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time

import orjson

from bench.client import Answer, Arrival, Pool, chat_body, open_loop, poisson, sse_error
from bench.harness import Bound, Result, Row
from bench.processes import Processes, Service, free_port
from bench.scenarios._common import MODEL, command, pinned_self, wait_peers

NAME = "failover"
TITLE = "Failover: a peer SIGKILLed under streaming load — requests lost, time to stop routing"
RATE = 20.0  # requests/s into node a
TTFT_MS, GAP_MS, CHUNKS = 20.0, 20.0, 15


def _complete(answer: Answer) -> bool:
    return answer.ok and not sse_error(answer) and b"[DONE]" in answer.body


async def _unhealthy_at(url: str, peer: str, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until the node at `url` stops listing `peer` as healthy."""
    pool = Pool(timeout_s=2)
    try:
        deadline = since + timeout_s
        while time.perf_counter() < deadline:
            answer = await pool.request(url, "GET", "/shoal/v1/peers")
            if answer.ok:
                peers = {p["name"]: p for p in orjson.loads(answer.body)["peers"]}
                if peers.get(peer, {}).get("health") != "healthy":
                    return answer.started - since  # it was already so when asked
            await asyncio.sleep(0.05)
        return None
    finally:
        await pool.close()


async def _round(
    procs: Processes, a: Service, b: Service, c: Service, seconds: float, watch_s: float, seed: int
) -> dict[str, float | None]:
    pool = Pool(timeout_s=seconds + 30)
    arrivals = [Arrival(t, a.url) for t in poisson(RATE, seconds, seed)]
    kill_after = seconds / 3
    killed: list[float] = []

    async def kill() -> tuple[float | None, float | None]:
        await asyncio.sleep(kill_after)
        killed.append(time.perf_counter())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(b.process.pid, signal.SIGKILL)
        at_a, at_c = await asyncio.gather(
            _unhealthy_at(a.url, "b", killed[0], watch_s),
            _unhealthy_at(c.url, "b", killed[0], watch_s),
        )
        return at_a, at_c

    try:
        body = chat_body(MODEL, stream=True)
        answers, (a_marks, c_marks) = await asyncio.gather(
            open_loop(pool, arrivals, "/v1/chat/completions", body, seconds + 30), kill()
        )
    finally:
        await pool.close()
    b.process.wait(5)
    kill_at = killed[0]
    after = [x for x in answers if x.started >= kill_at]
    retried = [x.started - kill_at for x in after if x.headers.get("x-shoal-route") == "retried"]
    broken = [x for x in answers if not _complete(x)]
    return {
        "requests": len(answers),
        "served_by_b": sum(1 for x in answers if x.headers.get("x-shoal-served-by") == "b"),
        "lost_before_streaming": sum(1 for x in broken if not x.events),
        "broken_mid_stream": sum(1 for x in broken if x.events),
        "a_last_retry": max(retried) if retried else 0.0,
        "a_marks": a_marks,
        "c_marks": c_marks,
    }


def run(quick: bool) -> Result:
    seconds, rounds, watch_s = (6.0, 1, 12.0) if quick else (12.0, 5, 40.0)
    figures: list[dict[str, float | None]] = []
    with Processes(NAME) as procs:
        backends = [
            procs.fake_backend(
                f"backend-{n}", ttft_ms=TTFT_MS, chunk_gap_ms=GAP_MS, chunks=CHUNKS, cpus="0"
            )
            for n in "bc"
        ]
        for r in range(rounds):
            ports = {n: free_port() for n in "abc"}
            urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
            nodes = {
                n: procs.node(
                    f"{n}",
                    backend=None if n == "a" else backends["bc".index(n)].url,
                    peers=[u for m, u in urls.items() if m != n],
                    port=ports[n],
                    cpus="1",
                    wait=False,
                )
                for n in "abc"
            }
            for node in nodes.values():
                procs.wait_ready(node, 90)
            for n, node in nodes.items():
                wait_peers(node.url, set("abc") - {n}, 60)
            wait_peers(nodes["a"].url, {"b", "c"}, 60, MODEL)
            with pinned_self({0}):
                figures.append(
                    asyncio.run(
                        _round(procs, nodes["a"], nodes["b"], nodes["c"], seconds, watch_s, seed=r)
                    )
                )
            for node in nodes.values():
                procs.stop(node)

    def values(key: str) -> list[float]:
        return [float(value) for f in figures if (value := f[key]) is not None]

    def never(key: str) -> int:
        return sum(1 for f in figures if f[key] is None)

    rows = [
        Row(
            "requests failed before their first chunk",
            "requests",
            "",
            [],
            values("lost_before_streaming"),
            higher_is_better=False,
            bound=Bound("value", "<=", 0),
        ),
        Row(
            "streams broken mid-way (were streaming from b)",
            "requests",
            "",
            [],
            values("broken_mid_stream"),
            higher_is_better=False,
        ),
        Row(
            "kill → a's last request tried on b first (0: none)",
            "s",
            "",
            [],
            values("a_last_retry"),
            higher_is_better=False,
            bound=Bound("value", "<=", 2),
        ),
        Row(
            "kill → a no longer lists b healthy",
            "s",
            "",
            [],
            values("a_marks"),
            higher_is_better=False,
            bound=Bound("value", "<=", 2),
            missing=f"not within {watch_s:g} s in {never('a_marks')} round(s)"
            if never("a_marks")
            else "",
        ),
        Row(
            "kill → c (heartbeats only) no longer lists b healthy",
            "s",
            "",
            [],
            values("c_marks"),
            higher_is_better=False,
            bound=Bound("value", "<=", 2),
            missing=f"not within {watch_s:g} s in {never('c_marks')} round(s)"
            if never("c_marks")
            else "",
        ),
    ]
    total = sum(int(f["requests"] or 0) for f in figures)
    to_b = sum(int(f["served_by_b"] or 0) for f in figures)
    notes = [
        f"{rounds} round(s), each with a fresh trio: {RATE:g} streams/s into a for "
        f"{seconds:g} s, b SIGKILLed at {seconds / 3:g} s; streams of {CHUNKS} chunks "
        f"{GAP_MS:g} ms apart; {total} requests in all, {to_b} served by b",
        "no baseline: a client without a gateway loses every request sent to b after the "
        "kill; the targets (DESIGN §11) are the reference",
    ]
    if figures:
        notes.append(
            "per round: "
            + "; ".join(
                f"lost {f['lost_before_streaming']:.0f}, broken {f['broken_mid_stream']:.0f}, "
                f"a {_s(f['a_marks'])}, c {_s(f['c_marks'])}"
                for f in figures
            )
        )
    if values("c_marks"):
        notes.append(f"c's detection median {statistics.median(values('c_marks')):.2f} s")
    return Result(NAME, TITLE, command(NAME, quick), rows, notes)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"
