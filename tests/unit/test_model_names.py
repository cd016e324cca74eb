"""Model names: the check at every boundary, and the names the catalog gives files."""

from __future__ import annotations

import posixpath
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shoal.errors import InvalidRequest
from shoal.models.names import (
    MAX_NAME_CHARS,
    InvalidModelName,
    check_name,
    disambiguate,
    full_name,
    is_valid_name,
    name_problem,
    ollama_name,
    short_name,
    split_stem,
)
from shoal.settings import ModelSettings

FUZZ = settings(max_examples=400, deadline=None)


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-instruct:q4_1",
        "qwen2.5:0.5b",
        "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q8_0.gguf",
        "SmolLM2-135M-Instruct",
        "qwen2.5-0.5b-instruct@q4_k_m",
        "a",
        "x" * MAX_NAME_CHARS,
    ],
)
def test_names_people_use_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("x" * (MAX_NAME_CHARS + 1), "257 characters long"),
        ("../../etc/passwd", "'..'"),
        ("models/../secret", "'..'"),
        ("a..b", "'..'"),
        ("/etc/passwd", "starts with '/'"),
        ("..\\..\\windows", "backslash"),
        ("C:\\models\\x.gguf", "backslash"),
        ("qwen\x00.gguf", "NUL"),
        ("qwen\n", "control character U+000A"),
        ("qwen\x1b[31m", "control character U+001B"),
        ("qw\u200ben", "control character U+200B"),  # zero-width space (Cf)
        ("cafe\u0301", "normal form NFC"),  # e + combining acute: not NFC
        ("qwen\u0430", "U+0430 (CYRILLIC SMALL LETTER A)"),
        ("ｑwen", "U+FF51"),  # fullwidth q
        ("two words", "whitespace"),
        ("a;rm -rf", "';'"),
        ("a//b", "empty part"),
        ("a/", "empty part"),
        ("a/.hidden", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("-rf", "starts with '-'"),
    ],
)
def test_hostile_names_are_refused_with_the_problem_named(name: str, problem: str) -> None:
    with pytest.raises(InvalidModelName) as caught:
        check_name(name)
    assert problem in caught.value.message
    # One error, two audiences: a 400 naming the field at the API, a ValueError elsewhere.
    assert isinstance(caught.value, InvalidRequest) and isinstance(caught.value, ValueError)
    assert caught.value.status == 400 and caught.value.param == "model"
    assert caught.value.code == "invalid_value"


def test_the_error_shows_the_name_escaped() -> None:
    with pytest.raises(InvalidModelName) as caught:
        check_name("evil\x1b]0;pwned\x07")
    assert "\x1b" not in caught.value.message and "\\x1b" in caught.value.message
    with pytest.raises(InvalidModelName) as caught:
        check_name("x" * 1000 + "/")
    assert len(caught.value.message) < 200


def test_a_name_that_is_not_a_string_is_refused() -> None:
    assert name_problem(42) == "a model name is a string, not int"
    with pytest.raises(InvalidModelName):
        check_name(None)


def _refused_or_safe(name: str) -> None:
    if not is_valid_name(name):
        with pytest.raises(InvalidModelName):
            check_name(name)
        return
    assert check_name(name) == name
    joined = posixpath.normpath(posixpath.join("/store", name))
    assert joined.startswith("/store/") and joined == "/store/" + name
    assert name.isascii() and unicodedata.normalize("NFC", name) == name
    assert "\\" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith("/") and all(part for part in name.split("/"))


@given(st.text(max_size=300))
@FUZZ
def test_no_accepted_name_escapes_a_folder(name: str) -> None:
    _refused_or_safe(name)


# Mostly the characters that matter, so that many accepted names are tried too.
_EDGY = st.text(st.sampled_from("abcXYZ019._-:/@+\\\x00\n é"), max_size=40)


@given(_EDGY)
@FUZZ
def test_no_accepted_name_escapes_a_folder_near_the_edges(name: str) -> None:
    _refused_or_safe(name)


@given(st.text(max_size=120), st.none() | st.sampled_from(["Q4_K_M", "F16", "Q8_0"]))
@FUZZ
def test_a_name_given_to_any_file_is_acceptable_and_stable(
    filename: str, quantization: str | None
) -> None:
    name = short_name(filename + ".gguf", quantization=quantization, folder=filename)
    assert check_name(name) == name
    assert name == name.lower() and name.count(":") <= 1 and "/" not in name
    assert short_name(filename + ".gguf", quantization=quantization, folder=filename) == name


@given(
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789.-"), min_size=1, max_size=30),
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._"), min_size=1, max_size=10),
)
@FUZZ
def test_ollama_names_round_trip(model: str, tag: str) -> None:
    name = ollama_name("registry.ollama.ai", "library", model, tag)
    if name is None:  # a part that is not acceptable (`..`, a leading `.` or `-`)
        assert not is_valid_name(f"{model}:{tag}")
        return
    assert name == f"{model}:{tag}"
    assert name.rpartition(":") == (model, ":", tag)
    assert ollama_name("registry.ollama.ai", "ns", model, tag) == f"ns/{model}:{tag}"


@pytest.mark.parametrize(
    ("filename", "quantization", "folder", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", None, None, "smollm2-135m-instruct:q4_1"),
        ("SmolLM2-135M-Instruct-Q4_K_M.gguf", None, None, "smollm2-135m-instruct:q4_k_m"),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", None, None, "qwen2.5-0.5b-instruct:q4_k_m"),
        ("Llama-3.2-1B-Instruct-IQ2_XXS.gguf", None, None, "llama-3.2-1b-instruct:iq2_xxs"),
        ("phi-2_Q8_0.GGUF", None, None, "phi-2:q8_0"),
        ("Meta-Llama-3-8B.BF16.gguf", None, None, "meta-llama-3-8b:bf16"),
        ("Qwen3-8B-UD-Q4_K_XL.gguf", None, None, "qwen3-8b-ud:q4_k_xl"),
        ("mystery.gguf", "Q5_K_M", None, "mystery:q5_k_m"),  # from the header
        ("mystery.gguf", None, None, "mystery"),
        ("Big-Model-Q4_K_M-00001-of-00003.gguf", None, None, "big-model:q4_k_m"),
        ("model.gguf", "Q4_0", "TinyLlama-1.1B-GGUF", "tinyllama-1.1b:q4_0"),
        ("ggml-model-q4_0.gguf", None, "my-llama", "my-llama:q4_0"),
        ("模型 v2.gguf", None, None, "v2"),
        ("../../evil.gguf", None, None, "evil"),
        ("Q4_K_M.gguf", None, None, "q4_k_m"),
    ],
)
def test_short_names(
    filename: str, quantization: str | None, folder: str | None, expected: str
) -> None:
    assert short_name(filename, quantization=quantization, folder=folder) == expected


def test_split_stem_keeps_the_quantization_upper_case() -> None:
    assert split_stem("SmolLM2-135M-Instruct.Q4_1.gguf") == ("SmolLM2-135M-Instruct", "Q4_1")
    assert split_stem("plain.gguf") == ("plain", None)


def test_ollama_names() -> None:
    assert ollama_name("registry.ollama.ai", "library", "qwen2.5", "0.5b") == "qwen2.5:0.5b"
    assert (
        ollama_name("registry.ollama.ai", "jmorgan", "Mistral", "Latest")
        == "jmorgan/mistral:latest"
    )
    assert (
        ollama_name("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")
        == "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m"
    )
    assert ollama_name("registry.ollama.ai", "library", "..", "x") is None
    assert ollama_name("registry.ollama.ai", "library", "a:b", "x") is None


def test_full_names_keep_case_and_refuse_odd_paths() -> None:
    assert full_name("Org/Repo", "sub/File-Q4_0.gguf") == "Org/Repo/sub/File-Q4_0.gguf"
    assert full_name("Org/Repo", "mod\u00e8le.gguf") is None


def test_a_taken_name_is_told_apart_the_same_way_every_time() -> None:
    sha = "1a2b3c4d" + "0" * 56
    assert disambiguate("smol:q4_1", {"other"}, sha) == "smol:q4_1"
    assert disambiguate("SMOL:Q4_1", {"smol:q4_1"}, sha) == "SMOL-1a2b3c4d:Q4_1"
    taken = {"smol:q4_1", "smol-1a2b3c4d:q4_1"}
    assert disambiguate("smol:q4_1", taken, sha) == "smol-1a2b3c4d-2:q4_1"
    by_path = disambiguate("smol", {"smol"}, "/models/a/smol.gguf")
    assert by_path == disambiguate("smol", {"smol"}, "/models/a/smol.gguf") != "smol"
    assert check_name(by_path) == by_path
    long = "ns/" + "x" * (MAX_NAME_CHARS - 10) + ":tag"
    assert check_name(disambiguate(long, {long}, sha)).endswith("-1a2b3c4d:tag")


def test_names_in_the_config_file_are_checked_too() -> None:
    assert ModelSettings(keep_alive_per_model={"qwen2.5:0.5b": 60}).keep_alive_per_model
    with pytest.raises(ValidationError) as caught:
        ModelSettings(keep_alive_per_model={"../x": 60})
    assert "invalid model name '../x': it contains '..'" in str(caught.value)


@given(st.lists(st.text(max_size=60), min_size=1, max_size=30))
@FUZZ
def test_names_given_to_many_files_are_distinct_and_acceptable(stems: list[str]) -> None:
    taken: set[str] = set()
    for i, stem in enumerate(stems):
        name = disambiguate(short_name(stem + ".gguf"), taken, f"/models/{i}")
        assert check_name(name) == name and name not in taken
        taken.add(name)
