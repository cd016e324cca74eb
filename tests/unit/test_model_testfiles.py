"""The test models themselves: the re-quantized SmolLM2 is a model llama.cpp runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.models import packaged_gguf, requantized_gguf, sha256_of

# In a child process, as the engine runs it: native code stays out of the test process.
_GENERATE = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
print(json.dumps({"text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"]}))
"""


def test_the_two_test_models_differ() -> None:
    assert sha256_of(requantized_gguf()) != sha256_of(packaged_gguf())
    assert requantized_gguf() == requantized_gguf()  # made once, then found in the cache


@pytest.mark.engine
def test_llama_cpp_loads_the_requantized_model() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(requantized_gguf())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["tokens"] >= 1 and answer["text"].strip()
