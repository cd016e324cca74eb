"""The engine worker's pure parts: OpenAI fields -> llama-cpp-python arguments, and the
logits processor that counts tokens and cancels a generation."""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
import pytest

from shoal.engine.worker import (
    RequestError,
    _b64,
    _finish_reason,
    _usage_chunk,
    _Watch,
    sampling_kwargs,
)

MESSAGES = [{"role": "user", "content": "hi"}]

# The keyword parameters of llama-cpp-python 0.3.36 (the pinned engine version), copied
# from inspect.signature so that the native library is not loaded into the test process.
CREATE_CHAT_COMPLETION = frozenset(
    {
        *("messages", "functions", "function_call", "tools", "tool_choice", "temperature"),
        *("top_p", "top_k", "min_p", "typical_p", "stream", "stop", "seed"),
        *("response_format", "max_tokens", "presence_penalty", "frequency_penalty"),
        *("repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta"),
        *("model", "logits_processor", "grammar", "logit_bias", "logprobs", "top_logprobs"),
    }
)
CREATE_COMPLETION = frozenset(
    {
        *("prompt", "suffix", "max_tokens", "temperature", "top_p", "min_p", "typical_p"),
        *("logprobs", "echo", "stop", "frequency_penalty", "presence_penalty"),
        *("repeat_penalty", "top_k", "stream", "seed", "tfs_z", "mirostat_mode"),
        *("mirostat_tau", "mirostat_eta", "model", "stopping_criteria", "logits_processor"),
        *("grammar", "logit_bias"),
    }
)

EVERYTHING = {
    "temperature": 0.3,
    "top_p": 0.9,
    "stop": ["\n"],
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
    "logit_bias": {"50256": -100},
    "max_tokens": 20,
    "stream": True,
}


def chat(**fields: Any) -> dict[str, Any]:
    return sampling_kwargs({"model": "m", "messages": MESSAGES, **fields}, chat=True)


def completion(**fields: Any) -> dict[str, Any]:
    return sampling_kwargs({"model": "m", "prompt": "Once", **fields}, chat=False)


# -- sampling_kwargs -----------------------------------------------------------------------


def test_minimal_chat() -> None:
    assert chat() == {"max_tokens": None, "stream": False, "messages": MESSAGES}


def test_minimal_completion() -> None:
    assert completion() == {"max_tokens": 256, "stream": False, "prompt": "Once"}


@pytest.mark.parametrize("n", [2, 3, 128])
@pytest.mark.parametrize("build", [chat, completion])
def test_more_than_one_choice_is_refused(build: Any, n: int) -> None:
    with pytest.raises(RequestError) as caught:
        build(n=n)
    assert caught.value.param == "n"


@pytest.mark.parametrize("n", [1, None])
def test_one_choice_is_fine(n: int | None) -> None:
    assert "n" not in chat(n=n)


def test_sampling_fields_are_copied_and_nulls_dropped() -> None:
    kwargs = chat(
        temperature=0.0,
        top_p=None,
        stop="END",
        seed=0,
        presence_penalty=None,
        logprobs=False,
        user="u-1",
        tools=None,
    )
    # Falsy values that are not None are real settings and must be kept.
    assert kwargs["temperature"] == 0.0
    assert kwargs["seed"] == 0
    assert kwargs["logprobs"] is False
    assert kwargs["stop"] == "END"
    assert "top_p" not in kwargs
    assert "presence_penalty" not in kwargs
    assert "user" not in kwargs
    assert "tools" not in kwargs


@pytest.mark.parametrize(
    ("fields", "chat_tokens", "completion_tokens"),
    [
        ({}, None, 256),
        ({"max_tokens": 5}, 5, 5),
        ({"max_completion_tokens": 7}, 7, 7),
        ({"max_tokens": 5, "max_completion_tokens": 7}, 7, 7),
        ({"max_tokens": None}, None, 256),
        ({"max_tokens": 0}, None, 256),
    ],
)
def test_max_tokens(
    fields: dict[str, Any], chat_tokens: int | None, completion_tokens: int
) -> None:
    assert chat(**fields)["max_tokens"] == chat_tokens
    assert completion(**fields)["max_tokens"] == completion_tokens


def test_logit_bias_keys_become_ints_and_values_floats() -> None:
    kwargs = chat(logit_bias={"50256": -100, "7": 2.5})
    assert kwargs["logit_bias"] == {50256: -100.0, 7: 2.5}
    assert all(type(k) is int for k in kwargs["logit_bias"])
    assert all(type(v) is float for v in kwargs["logit_bias"].values())


@pytest.mark.parametrize("bias", [{}, None])
def test_empty_logit_bias_is_not_passed(bias: Any) -> None:
    assert "logit_bias" not in chat(logit_bias=bias)


@pytest.mark.parametrize(("stream", "expected"), [(True, True), (False, False), (None, False)])
def test_stream_flag(stream: Any, expected: bool) -> None:
    assert chat(stream=stream)["stream"] is expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Once", "Once"),
        (["Once"], "Once"),
        ([1, 2, 3], [1, 2, 3]),
        ([[1, 2, 3]], [1, 2, 3]),
        ([], []),
    ],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt)["prompt"] == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]]])
def test_several_prompts_are_refused(prompt: Any) -> None:
    with pytest.raises(RequestError) as caught:
        completion(prompt=prompt)
    assert caught.value.param == "prompt"


def test_echo_and_suffix_for_completions() -> None:
    kwargs = completion(echo=True, suffix="")
    assert kwargs["echo"] is True
    assert kwargs["suffix"] == ""
    plain = completion(echo=False, suffix=None)
    assert "echo" not in plain
    assert "suffix" not in plain


def test_chat_ignores_completion_only_fields() -> None:
    kwargs = chat(echo=True, suffix="x", prompt="p")
    assert not {"echo", "suffix", "prompt"} & set(kwargs)


def test_every_chat_argument_is_one_create_chat_completion_takes() -> None:
    assert set(chat(**EVERYTHING)) <= CREATE_CHAT_COMPLETION


def test_every_plain_completion_argument_is_one_create_completion_takes() -> None:
    chat_only = {"top_logprobs", "response_format", "logprobs"}
    fields = {k: v for k, v in EVERYTHING.items() if k not in chat_only}
    kwargs = completion(**fields, logprobs=2, echo=True, suffix="end")
    assert {"logprobs", "echo", "suffix", "logit_bias", "seed", "stop"} <= set(kwargs)
    assert set(kwargs) <= CREATE_COMPLETION


@pytest.mark.parametrize("field", ["response_format", "top_logprobs"])
def test_chat_only_fields_are_not_passed_to_create_completion(field: str) -> None:
    assert set(completion(**{field: EVERYTHING[field]})) <= CREATE_COMPLETION


# -- _Watch -------------------------------------------------------------------------------

EOS = 2


def scores(n: int = 8) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n, dtype=np.float32)


def test_first_call_counts_the_prompt() -> None:
    watch = _Watch(threading.Event(), EOS)
    assert watch.prompt_tokens is None
    watch(np.arange(5), scores())
    assert (watch.prompt_tokens, watch.sampled) == (5, 1)
    watch(np.arange(6), scores())
    watch(np.arange(7), scores())
    assert (watch.prompt_tokens, watch.sampled) == (5, 3)


def test_uncancelled_scores_are_untouched() -> None:
    watch = _Watch(threading.Event(), EOS)
    original = scores()
    result = watch(np.arange(3), original.copy())
    np.testing.assert_array_equal(result, original)


def test_cancelled_masks_all_but_end_of_generation() -> None:
    cancel = threading.Event()
    watch = _Watch(cancel, EOS)
    watch(np.arange(3), scores())
    cancel.set()
    logits = scores()
    result = watch(np.arange(4), logits)
    assert result is logits  # masked in place, as llama.cpp reads it back
    assert result[EOS] == 0.0
    assert np.isneginf(np.delete(result, EOS)).all()
    assert int(np.argmax(result)) == EOS
    assert watch.sampled == 2


def test_cancelled_before_the_first_token_still_counts_the_prompt() -> None:
    cancel = threading.Event()
    cancel.set()
    watch = _Watch(cancel, 0)
    result = watch(np.arange(9), scores())
    assert watch.prompt_tokens == 9
    assert int(np.argmax(result)) == 0
    assert np.isneginf(result[1:]).all()


# -- small helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "reason"),
    [
        ({"choices": [{"finish_reason": "stop"}]}, "stop"),
        ({"choices": [{"finish_reason": None, "delta": {}}]}, None),
        ({"choices": []}, None),
        ({}, None),
    ],
)
def test_finish_reason(chunk: dict[str, Any], reason: str | None) -> None:
    assert _finish_reason(chunk) == reason


def test_usage_chunk() -> None:
    last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    chunk = _usage_chunk(last, {"prompt_tokens": 4, "completion_tokens": 6})
    assert chunk == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }
    assert _usage_chunk({}, {})["id"].startswith("chatcmpl-")
    assert _usage_chunk({}, {})["usage"]["total_tokens"] == 0


def test_b64_is_little_endian_float32() -> None:
    vector = np.array([1.0, -2.5, 0.0], dtype=np.float64)
    decoded = np.frombuffer(base64.b64decode(_b64(vector)), dtype="<f4")
    np.testing.assert_array_equal(decoded, vector.astype(np.float32))


def test_watch_applies_logit_bias_before_cancelling() -> None:
    import threading

    import numpy as np

    from shoal.engine.worker import _Watch

    watch = _Watch(threading.Event(), eos=0, bias={3: -100.0, 1: 5.0})
    scores = watch(np.arange(7), np.zeros(5, dtype=np.float32))
    assert scores.tolist() == [0.0, 5.0, 0.0, -100.0, 0.0]
    assert (watch.prompt_tokens, watch.sampled) == (7, 1)
