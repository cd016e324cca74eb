"""Capacity from where it is known: the operator's `capacity` on a backend's entry, else
the server's own word (llama-server's /props `total_slots`), else
`routing.default_capacity`, else unbounded (`shoal.backends.openai_compat`,
`shoal.routing.router.capacity_of`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shoal.backends.detect import make_backend
from shoal.backends.ollama import OllamaBackend
from shoal.backends.openai_compat import capacity_detail, parse_llama_props
from shoal.errors import ConfigError
from shoal.routing.rank import UNBOUNDED
from shoal.routing.router import capacity_of
from shoal.settings import BackendSettings, LimitSettings, load

# The top of what llama.cpp's llama-server (this repository's pinned build, run with
# `--parallel 2`) answers at GET /props.
LLAMA_SERVER_PROPS: dict[str, Any] = {
    "default_generation_settings": {"n_ctx": 512, "params": {"temperature": 0.8}},
    "total_slots": 2,
    "model_alias": "smollm2",
    "model_path": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "modalities": {"vision": False, "audio": False},
    "endpoint_slots": True,
    "build_info": "b1-0c1e570",
    "is_sleeping": False,
}


# -- parsing /props ----------------------------------------------------------------------


def test_llama_server_props_give_its_slots() -> None:
    assert parse_llama_props(LLAMA_SERVER_PROPS) == 2


@pytest.mark.parametrize(
    "document",
    [
        {},  # another server's /props, or an older one without the field
        {"total_slots": 0},
        {"total_slots": -1},  # llama.cpp's "auto", unresolved
        {"total_slots": True},  # a bool is an int to Python, not a count
        {"total_slots": "4"},
        {"total_slots": 2.5},
        {"total_slots": None},
        [],
        "ok",
        None,
    ],
)
def test_a_props_document_that_does_not_say_gives_none(document: Any) -> None:
    assert parse_llama_props(document) is None


# -- which word wins ---------------------------------------------------------------------


def test_the_configured_capacity_wins_over_the_servers() -> None:
    assert capacity_detail(1, 4) == {"capacity": 1, "capacity_from": "configured"}
    assert capacity_detail(6, None) == {"capacity": 6, "capacity_from": "configured"}


def test_the_servers_word_when_nothing_is_configured() -> None:
    assert capacity_detail(None, 3) == {"capacity": 3, "capacity_from": "backend"}


def test_nothing_said_leaves_routing_to_its_default() -> None:
    assert capacity_detail(None, None) == {}


@pytest.mark.parametrize(
    ("detail", "default", "expected"),
    [
        ({"capacity": 3, "capacity_from": "backend"}, None, 3),
        ({"capacity": 1, "capacity_from": "configured"}, 8, 1),
        ({}, 2, 2),
        ({}, None, UNBOUNDED),
        ({"capacity": 0}, 2, 2),  # nonsense in a status is not a capacity
        ({"capacity": True}, None, UNBOUNDED),
    ],
)
def test_routing_reads_the_status_detail_then_its_default(
    detail: dict[str, Any], default: int | None, expected: int
) -> None:
    assert capacity_of(detail, default) == expected


# -- settings ----------------------------------------------------------------------------


def test_a_backend_entry_has_no_capacity_by_default() -> None:
    assert BackendSettings(url="http://127.0.0.1:8080").capacity is None


@pytest.mark.parametrize("capacity", [1, 4, 100_000])
def test_a_backend_entry_takes_a_capacity(capacity: int) -> None:
    assert BackendSettings(url="http://127.0.0.1:8080", capacity=capacity).capacity == capacity


@pytest.mark.parametrize("capacity", [0, -1, 100_001, "many", 1.5])
def test_a_backend_capacity_must_be_a_whole_number_from_1(capacity: Any) -> None:
    with pytest.raises(ValidationError):
        BackendSettings(url="http://127.0.0.1:8080", capacity=capacity)


def test_capacity_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[backends]]\nurl = "http://127.0.0.1:11434"\nkind = "ollama"\ncapacity = 4\n\n'
        '[[backends]]\nurl = "http://127.0.0.1:8000"\n\n'
        "[routing]\ndefault_capacity = 2\n"
    )
    settings = load(path, environ=False)
    assert [b.capacity for b in settings.backends] == [4, None]
    assert settings.routing.default_capacity == 2


def test_a_bad_capacity_in_the_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[backends]]\nurl = "http://127.0.0.1:8080"\ncapacity = 0\n')
    with pytest.raises(ConfigError, match=r"backends\.0\.capacity"):
        load(path, environ=False)


# -- the backends built from an entry ----------------------------------------------------


async def test_ollama_does_not_say_its_capacity() -> None:
    # OLLAMA_NUM_PARALLEL is on no route of its API: nothing is asked, nothing is said.
    backend = make_backend(
        BackendSettings(url="http://127.0.0.1:9", kind="ollama"), LimitSettings()
    )
    try:
        assert isinstance(backend, OllamaBackend)
        assert await backend.said_capacity() is None
    finally:
        await backend.aclose()
