"""The embedded engine's decode speed alone vs through Shoal (DESIGN §11: ≥ 0.95×).

Baseline: llama-cpp-python in a process of its own, with the node's settings (same
model, 2 threads, 2048 context), streaming a chat completion. Shoal: the same request
through `shoal serve`, read by a minimal SSE client (http.client, one line at a time):
the engine's threads fill both cores, so every cycle a client spends per token comes
out of decode. A second row reads the same stream with the official openai SDK, whose
per-chunk parsing costs the decode a few percent more on such a machine. Both generate
exactly N tokens (end-of-generation is masked with logit_bias) from the same prompt at
temperature 0, in alternating rounds; tokens/s counts decode only (first token to last).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from bench.harness import Bound, Result, Row
from bench.processes import free_port
from tests.support import start_node

NAME = "engine_tokens"
TITLE = "Embedded engine: decode tokens/s, alone vs through Shoal"
PROMPT = "Write a long story about a lighthouse keeper."

_ALONE = r"""
import json, sys, time
from llama_cpp import Llama
from shoal.engine import assets
path = assets.default_chat_model()
llm = Llama(model_path=str(path), n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
print(json.dumps({"eos": llm.token_eos()}), flush=True)
for line in sys.stdin:
    tokens = int(line)
    stamps = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": sys.argv[1]}], max_tokens=tokens,
        temperature=0, seed=1, stream=True, logit_bias={llm.token_eos(): -100.0},
    ):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    print(json.dumps({"chunks": len(stamps), "decode_s": stamps[-1] - stamps[0]}), flush=True)
"""


def _tokens_per_s(chunks: int, seconds: float) -> float:
    return (chunks - 1) / seconds


def run(quick: bool) -> Result:
    rounds, tokens = (1, 32) if quick else (7, 256)
    alone = subprocess.Popen(
        [sys.executable, "-c", _ALONE, PROMPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert alone.stdin is not None and alone.stdout is not None
    eos = json.loads(alone.stdout.readline())["eos"]
    with tempfile.TemporaryDirectory() as home:
        node = start_node(Path(home), port=free_port())
        try:
            host, port = node.url.removeprefix("http://").split(":")
            body = json.dumps(
                {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "seed": 1,
                    "stream": True,
                    "logit_bias": {str(eos): -100},
                }
            )

            def through_shoal() -> float:
                connection = http.client.HTTPConnection(host, int(port), timeout=120)
                connection.request(
                    "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                stamps = []
                for line in response:
                    if line.startswith(b"data: {") and b'"content"' in line:
                        stamps.append(time.perf_counter())
                connection.close()
                return _tokens_per_s(len(stamps), stamps[-1] - stamps[0])

            def engine_alone() -> float:
                alone.stdin.write(f"{tokens}\n")  # type: ignore[union-attr]
                alone.stdin.flush()  # type: ignore[union-attr]
                report = json.loads(alone.stdout.readline())  # type: ignore[union-attr]
                return _tokens_per_s(report["chunks"], report["decode_s"])

            client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)

            def through_shoal_sdk() -> float:
                stamps = []
                for chunk in client.chat.completions.create(**json.loads(body)):
                    if chunk.choices and chunk.choices[0].delta.content:
                        stamps.append(time.perf_counter())
                return _tokens_per_s(len(stamps), stamps[-1] - stamps[0])

            through_shoal(), engine_alone()  # warm both up: first runs load caches
            base, shoal, shoal_sdk = [], [], []
            for _ in range(rounds):
                base.append(engine_alone())
                shoal.append(through_shoal())
                shoal_sdk.append(through_shoal_sdk())
        finally:
            node.stop()
            alone.stdin.close()
            alone.wait(10)
    return Result(
        scenario=NAME,
        title=TITLE,
        command=f"python -m bench {NAME}{' --quick' if quick else ''}",
        rows=[
            Row(
                metric=f"decode speed, {tokens} tokens",
                unit="tokens/s",
                baseline_name="llama-cpp-python alone",
                baseline=base,
                shoal=shoal,
                bound=Bound("ratio", ">=", 0.95),
            ),
            Row(
                metric=f"decode speed, {tokens} tokens, openai SDK client",
                unit="tokens/s",
                baseline_name="llama-cpp-python alone",
                baseline=base,
                shoal=shoal_sdk,
            ),
        ],
    )
