"""Cache-affine routing: time to first token on turn N of conversations, affinity on vs off.

Two llama-server engines (the packaged SmolLM2-135M Q4_1, llama.cpp's defaults for the
prompt cache: `cache_prompt` on, slots, the host-RAM prompt cache; 2 slots, 1 thread
each), each behind its own node; two such pairs of nodes run at once on the same two
engines, one pair with `routing.affinity` on and one with it off, both `least_loaded`
(equal nodes: ties broken at random, so without affinity a conversation's turns land
on either engine). Every round runs, for each side in turn, a few conversations at once
through the side's first node: each opens with its own long document as the system
prompt (~1500 tokens; each conversation's differs from its first token, so no engine
holds it before that conversation's first turn), then N turns of a short question and a
streamed answer of up to 16 tokens at temperature 0. Conversations are new every round
and side, so what one leaves in an engine's cache helps no other.

Figures: the time to the first content token of turn N (and of turn 1, where no cache
can help either side), and how often a turn ran on the engine of the turn before.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import statistics
import threading
import time

from bench.harness import Result, Row
from bench.processes import Processes, Service, free_port
from bench.scenarios._common import command, wait_peers
from tests.conftest import llama_server_command, packaged_gguf

NAME = "affinity"
TITLE = "Cache-affine routing: time to first token on turn N, affinity on vs off (llama-server)"
MODEL = "smollm2"
WORDS = """harbour lamp keeper tide storm ledger rope lantern gull reef beacon shift night
fog signal vessel cargo anchor chart compass watch bell oil wick glass stair""".split()  # noqa: SIM905
MAX_TOKENS = 16


def _document(seed: str, words: int) -> str:
    rng = random.Random(seed)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Logbook {seed}. Answer questions from this logbook only.\n{body}"


def _engine(procs: Processes, name: str) -> Service:
    binary, env = llama_server_command()
    port = free_port()
    argv = [
        str(binary), "-m", str(packaged_gguf()), "--alias", MODEL, "--host", "127.0.0.1",
        "--port", str(port), "-c", "8192", "-np", "2", "-t", "1", "--no-webui",
    ]  # fmt: skip

    def ready(service: Service) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=2)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        finally:
            connection.close()

    return procs.spawn(name, argv, port=port, env=env, ready=ready, timeout_s=120)


def _pair(procs: Processes, side: str, engines: list[Service]) -> list[Service]:
    ports = [free_port() for _ in engines]
    env = {
        "SHOAL_ROUTING__STRATEGY": "least_loaded",
        "SHOAL_ROUTING__AFFINITY": "true" if side == "on" else "false",
        # llama-server streams its first chunk before it reads the prompt; on this shared
        # machine a long prompt read from scratch can outlast the 20 s stall timeout.
        "SHOAL_LIMITS__STALL_TIMEOUT_S": "300",
    }
    return [
        procs.node(
            f"{side}{i}",
            backend=engine.url,
            peers=[f"http://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i],
            port=ports[i],
            env=env,
        )
        for i, engine in enumerate(engines)
    ]


def _tokens(engine: Service, text: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=30)
    connection.request("POST", "/tokenize", json.dumps({"content": text}))
    count = len(json.loads(connection.getresponse().read())["tokens"])
    connection.close()
    return count


def _turn(node: Service, messages: list[dict[str, str]]) -> tuple[float, str, str]:
    """One streamed chat: (seconds to the first content token, answer, node that served)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=300)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()[:500]
    served = response.getheader("X-Shoal-Served-By") or node.name
    first: float | None = None
    answer = []
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        assert "choices" in event, f"the stream ended with an error: {event}"
        for choice in event["choices"]:
            text = choice.get("delta", {}).get("content")
            if text:
                first = first or time.perf_counter() - started
                answer.append(text)
    connection.close()
    return first or time.perf_counter() - started, "".join(answer), served


def _conversation(
    node: Service, seed: str, words: int, turns: int, out: list[tuple[float, str]]
) -> None:
    messages = [{"role": "system", "content": _document(seed, words)}]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Question {turn}: what is on line {turn}?"})
        ttft, answer, served = _turn(node, messages)
        messages.append({"role": "assistant", "content": answer})
        out.append((ttft, served))


# Why --quick skips: an engine here reads ~70 prompt tokens/s (one thread, SmolLM2 on a
# shared 2-core machine), so one long prompt read from scratch alone takes ~15 s.
QUICK_SKIP = "skipped in --quick: reading a long prompt from scratch takes llama-server here "
QUICK_SKIP += "~15 s, and a meaningful run takes minutes; run `python -m bench affinity`"


def run(quick: bool) -> Result:
    if quick:
        print(f"  {QUICK_SKIP}")
        rows = [
            Row(
                "time to first token, turn N",
                "s",
                "affinity off",
                [],
                [],
                False,
                missing=QUICK_SKIP,
            )
        ]
        return Result(NAME, TITLE, command(NAME, quick), rows, [QUICK_SKIP])
    rounds, conversations, turns, words = 2, 2, 4, 750
    ttft: dict[str, dict[int, list[float]]] = {"on": {}, "off": {}}
    stayed: dict[str, list[bool]] = {"on": [], "off": []}
    paths: dict[str, list[str]] = {"on": [], "off": []}  # each conversation's nodes, in order
    with Processes(NAME) as procs:
        engines = [_engine(procs, f"engine{i}") for i in range(2)]
        tokens = _tokens(engines[0], _document("sample", words))
        pairs = {side: _pair(procs, side, engines) for side in ("on", "off")}
        for nodes in pairs.values():
            for node in nodes:
                wait_peers(node.url, {n.name for n in nodes} - {node.name}, 60, MODEL)
        for r in range(rounds):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                entry = pairs[side][0]
                results: list[list[tuple[float, str]]] = [[] for _ in range(conversations)]
                threads = [
                    threading.Thread(
                        target=_conversation,
                        args=(entry, f"{side}-{r}-{c}", words, turns, results[c]),
                    )
                    for c in range(conversations)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                for result in results:
                    assert len(result) == turns, f"a conversation failed: {result}"
                    for turn, (seconds, _) in enumerate(result, start=1):
                        ttft[side].setdefault(turn, []).append(seconds)
                    served = [node for _, node in result]
                    paths[side].append("-".join(n[-1] for n in served))
                    stayed[side] += [a == b for a, b in itertools.pairwise(served)]

    def row(turn: int) -> Row:
        return Row(
            metric=f"time to first token, turn {turn}",
            unit="s",
            baseline_name="affinity off",
            baseline=ttft["off"][turn],
            shoal=ttft["on"][turn],
            shoal_name="affinity on",
            higher_is_better=False,
        )

    def share(side: str) -> str:
        return f"{sum(stayed[side])}/{len(stayed[side])}"

    later = {
        side: statistics.median(v for t, vs in ttft[side].items() if t > 1 for v in vs)
        for side in ttft
    }
    return Result(
        scenario=NAME,
        title=TITLE,
        command=command(NAME, quick),
        rows=[row(turns), row(1)],
        notes=[
            f"{conversations} conversations at a time x {rounds} round(s) per side, {turns} "
            f"turns each, a system prompt of {tokens} tokens (its own per "
            f"conversation), answers of up to {MAX_TOKENS} tokens",
            f"turns served on the engine of the turn before: affinity on {share('on')}, "
            f"off {share('off')}",
            f"nodes per turn (entry 0, peer 1): on {' '.join(paths['on'])}; "
            f"off {' '.join(paths['off'])}",
            f"median time to first token over turns 2..{turns}: on {later['on']:.3f} s, "
            f"off {later['off']:.3f} s",
        ],
    )
