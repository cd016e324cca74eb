"""Model lists as backends report them: OpenAI-compatible `/v1/models` (with llama-server's
`meta` and vLLM's `max_model_len`) and Ollama's `/api/tags` + `/api/ps`."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.backends.base import GENERATION, ModelInfo, Operation
from shoal.backends.ollama import parse_ollama_models
from shoal.backends.openai_compat import guess_quantization, parse_openai_models

# -- guess_quantization --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Llama-3-8B-Instruct.Q4_K_M.gguf", "Q4_K_M"),
        ("../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-0.5b-instruct-q8_0.gguf", "Q8_0"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("gemma-2-2b-it-IQ2_XXS.gguf", "IQ2_XXS"),
        ("smollm2-f16", "F16"),
        ("Mistral-7B-Instruct-v0.3-bf16.gguf", "BF16"),
        ("tiny-F32.gguf", "F32"),
        ("mlx-community/Llama-3.2-3B-Instruct-4bit", "4BIT"),
        ("mlx-community/Qwen2.5-7B-Instruct-8bit", "8BIT"),
    ],
)
def test_guess_quantization(name: str, quant: str) -> None:
    assert guess_quantization(name) == quant


@pytest.mark.parametrize(
    "name",
    [
        "gpt-4o",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen3-0.6B",
        "qwen2.5-7b-instruct",
        "meta-llama/Llama-3.1-8B",
        "",
        "SQ4_Kish",  # not a word boundary
    ],
)
def test_no_quantization_in_the_name(name: str) -> None:
    assert guess_quantization(name) is None


# -- parse_openai_models -------------------------------------------------------------------

# llama-server's answer (tools/server/README.md, "GET /v1/models").
LLAMA_SERVER = {
    "object": "list",
    "data": [
        {
            "id": "../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
            "object": "model",
            "created": 1735142223,
            "owned_by": "llamacpp",
            "meta": {
                "vocab_type": 2,
                "n_vocab": 128256,
                "n_ctx_train": 131072,
                "n_embd": 4096,
                "n_params": 8030261312,
                "size": 4912898304,
            },
        }
    ],
}

# vLLM's answer: no meta, but max_model_len.
VLLM = {
    "object": "list",
    "data": [
        {
            "id": "Qwen/Qwen2.5-1.5B-Instruct",
            "object": "model",
            "created": 1735142223,
            "owned_by": "vllm",
            "root": "Qwen/Qwen2.5-1.5B-Instruct",
            "parent": None,
            "max_model_len": 32768,
            "permission": [{"id": "modelperm-1", "object": "model_permission"}],
        }
    ],
}

# LM Studio and most others: the bare OpenAI shape.
PLAIN = {
    "object": "list",
    "data": [
        {"id": "qwen2.5-7b-instruct", "object": "model", "owned_by": "organization_owner"},
        {"id": "text-embedding-nomic-embed-text-v1.5", "object": "model"},
    ],
}


def test_llama_server_meta() -> None:
    (model,) = parse_openai_models(LLAMA_SERVER)
    assert model == ModelInfo(
        id="../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        loaded=True,
        size_bytes=4912898304,
        quantization="Q4_K_M",
        context_length=131072,
        operations=frozenset(Operation),
    )


def test_vllm_max_model_len() -> None:
    (model,) = parse_openai_models(VLLM)
    assert model.id == "Qwen/Qwen2.5-1.5B-Instruct"
    assert model.context_length == 32768
    assert model.size_bytes is None
    assert model.quantization is None
    assert model.loaded is True


def test_plain_openai_list() -> None:
    models = parse_openai_models(PLAIN)
    assert [m.id for m in models] == ["qwen2.5-7b-instruct", "text-embedding-nomic-embed-text-v1.5"]
    for model in models:
        assert model.context_length is None
        assert model.size_bytes is None
        # The list does not say what a model does: every operation is allowed.
        assert model.operations == frozenset(
            {Operation.CHAT, Operation.COMPLETION, Operation.EMBEDDING}
        )


def test_meta_wins_over_max_model_len_and_null_meta_is_ignored() -> None:
    both = {"data": [{"id": "a", "meta": {"n_ctx_train": 4096}, "max_model_len": 1024}]}
    assert parse_openai_models(both)[0].context_length == 4096
    null_meta = {"data": [{"id": "b", "meta": None, "max_model_len": "2048"}]}
    assert parse_openai_models(null_meta)[0].context_length == 2048


def test_numeric_id_becomes_a_string() -> None:
    assert parse_openai_models({"data": [{"id": 7}]})[0].id == "7"


def test_empty_list() -> None:
    assert parse_openai_models({"object": "list", "data": []}) == ()


# -- parse_ollama_models -------------------------------------------------------------------

# GET /api/tags and GET /api/ps, in the shapes of Ollama's docs/api.md.
TAGS: dict[str, Any] = {
    "models": [
        {
            "name": "deepseek-r1:latest",
            "model": "deepseek-r1:latest",
            "modified_at": "2025-05-10T08:06:48.639712648-07:00",
            "size": 4683075271,
            "digest": "0a8c266910232fd3291e71e5ba1e058cc5af9d411192cf88b6d30e92b6e73163",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "qwen2",
                "families": ["qwen2"],
                "parameter_size": "7.6B",
                "quantization_level": "Q4_K_M",
            },
        },
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        },
        {
            "name": "nomic-embed-text:latest",
            "model": "nomic-embed-text:latest",
            "size": 274302450,
            "details": {
                "format": "gguf",
                "family": "nomic-bert",
                "families": ["nomic-bert"],
                "parameter_size": "137M",
                "quantization_level": "F16",
            },
        },
        {
            "name": "all-minilm:l6-v2",
            "model": "all-minilm:l6-v2",
            "size": 45960996,
            "details": {
                "format": "gguf",
                "family": "bert",
                "families": None,
                "parameter_size": "23M",
                "quantization_level": "F16",
            },
        },
    ]
}

PS: dict[str, Any] = {
    "models": [
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "size": 5137025024,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
            "expires_at": "2024-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
            "context_length": 8192,
        }
    ]
}


def by_id(models: tuple[ModelInfo, ...]) -> dict[str, ModelInfo]:
    return {m.id: m for m in models}


def test_every_tagged_model_is_listed_in_order() -> None:
    assert [m.id for m in parse_ollama_models(TAGS, PS)] == [
        "deepseek-r1:latest",
        "llama3.2:latest",
        "nomic-embed-text:latest",
        "all-minilm:l6-v2",
    ]


def test_loaded_flag_and_context_come_from_ps() -> None:
    models = by_id(parse_ollama_models(TAGS, PS))
    assert models["llama3.2:latest"].loaded is True
    assert models["llama3.2:latest"].context_length == 8192
    assert models["deepseek-r1:latest"].loaded is False
    assert models["deepseek-r1:latest"].context_length is None


def test_size_is_the_file_size_from_tags_not_memory_from_ps() -> None:
    models = by_id(parse_ollama_models(TAGS, PS))
    assert models["llama3.2:latest"].size_bytes == 2019393189
    assert models["deepseek-r1:latest"].size_bytes == 4683075271


def test_quantization_level() -> None:
    models = by_id(parse_ollama_models(TAGS, PS))
    assert models["deepseek-r1:latest"].quantization == "Q4_K_M"
    assert models["nomic-embed-text:latest"].quantization == "F16"


def test_embedding_families_only_embed() -> None:
    models = by_id(parse_ollama_models(TAGS, PS))
    assert models["nomic-embed-text:latest"].operations == frozenset({Operation.EMBEDDING})
    assert models["all-minilm:l6-v2"].operations == frozenset({Operation.EMBEDDING})
    assert models["llama3.2:latest"].operations == GENERATION
    assert Operation.EMBEDDING not in models["deepseek-r1:latest"].operations


def test_embedding_family_found_in_families_list() -> None:
    tags = {
        "models": [
            {
                "name": "bge-m3:latest",
                "details": {"family": "something", "families": ["xlm-roberta"]},
            }
        ]
    }
    (model,) = parse_ollama_models(tags, {"models": []})
    assert model.operations == frozenset({Operation.EMBEDDING})


def test_nothing_loaded() -> None:
    for ps in ({"models": []}, {"models": None}, {}):
        assert not any(m.loaded for m in parse_ollama_models(TAGS, ps))


def test_loaded_but_not_tagged_is_not_listed() -> None:
    assert parse_ollama_models({"models": []}, PS) == ()


def test_minimal_entries() -> None:
    (model,) = parse_ollama_models({"models": [{"name": "x:1"}]}, {})
    assert model == ModelInfo(
        id="x:1",
        loaded=False,
        size_bytes=None,
        quantization=None,
        context_length=None,
        operations=GENERATION,
    )


def test_empty_tags() -> None:
    assert parse_ollama_models({"models": []}, PS) == ()
    assert parse_ollama_models({}, {}) == ()
