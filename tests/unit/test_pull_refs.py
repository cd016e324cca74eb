"""`shoal models pull` REFs: the grammar, the hostile ones, and which files a REF means."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import InvalidRequest, ModelNotFound
from shoal.models.pull import Hub
from shoal.models.pull_refs import (
    HubFile,
    HubRef,
    check_revision,
    choose_files,
    parse_ref,
    quant_of,
    valid_filename,
)

SHA = "a" * 64


def files(*names: str) -> list[HubFile]:
    return [HubFile(name, 1000, SHA) for name in names]


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("org/repo:q4_k_m", HubRef("org/repo", quant="q4_k_m")),
        ("Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0", HubRef("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Q8_0")),
        ("org/repo/model-Q4_K_M.gguf", HubRef("org/repo", filename="model-Q4_K_M.gguf")),
        ("org/repo/Q4/m-00001-of-00002.gguf", HubRef("org/repo", None, "Q4/m-00001-of-00002.gguf")),
        ("org/repo", HubRef("org/repo")),
        ("bartowski/Llama-3.2-1B-Instruct-GGUF", HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF")),
    ],
)  # fmt: skip
def test_refs_people_type(text: str, ref: HubRef) -> None:
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "org",  # no repo name
        "/org/repo:q4",  # absolute
        "org/../etc/passwd.gguf",
        "org/repo/../../x.gguf",
        "../org/repo:q4",
        "org/repo/sub/../x.gguf",
        "org\\repo:q4",
        "org/repo\\x.gguf",
        "org/repo:q4\x00",
        "org/re\x00po/x.gguf",
        "org/repo/x.gguf\n",
        "org/repo x.gguf",
        "org/repo/\u2024\u2024/x.gguf",  # one-dot leaders, a look-alike of ".."
        "org/rеpo:q4",  # a Cyrillic "е"
        "org/repo/ｘ.gguf",  # a fullwidth letter
        "org/repo:q4\u200b",  # a zero-width space
        "org/repo/x.gguf\u202e",  # a right-to-left override
        "org/repo/.hidden.gguf",
        "org/repo/./x.gguf",
        "org//repo:q4",
        "org/repo/x.bin",  # not a GGUF
        "org/repo/x.gguf/",
        "org/repo:",  # an empty quantization
        "org/repo:q4:k",
        "org/repo:q4/x",
        "org--evil/repo:q4",  # "--" would make the store's folder name ambiguous
        "-org/repo:q4",
        "org./repo:q4",
        "o" * 97 + "/r:q4",
        "org/repo/" + "a/" * 20 + "x.gguf",  # too deep
        "org/repo/" + "x" * 300 + ".gguf",
    ],
)
def test_hostile_or_malformed_refs_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_ref(text)
    assert caught.value.param == "model"


def test_non_strings_are_refused() -> None:
    for value in (None, 3, ["org/repo"], b"org/repo:q4"):
        with pytest.raises(InvalidRequest):
            parse_ref(value)


@given(st.text(max_size=80))
def test_anything_accepted_stays_inside_the_store(text: str) -> None:
    try:
        ref = parse_ref(text)
    except InvalidRequest:
        return
    for part in (*ref.repo_id.split("/"), *(ref.filename or "x").split("/")):
        assert part and part not in (".", "..") and not part.startswith(".")
        assert part.isascii() and part.isprintable() and "\\" not in part


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/3", "a" * 40])
def test_revisions(revision: str) -> None:
    assert check_revision(revision) == revision
    assert check_revision(None) == "main"


@pytest.mark.parametrize(
    "revision", ["", "..", "../../etc", "main/../x", "/main", "ma in", "mäin", "a\x00", "a//b", 3]
)
def test_hostile_revisions_are_refused(revision: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_revision(revision)
    assert caught.value.param == "revision"


def test_filenames_from_the_hub_are_checked_too() -> None:
    assert valid_filename("Q4_K_M/model-Q4_K_M.gguf")
    for name in ("../x.gguf", "/x.gguf", "a//b.gguf", ".x.gguf", "a\\b.gguf", "x\x00.gguf", ""):
        assert not valid_filename(name)


REPO = files(
    "Model-Q4_K_M.gguf",
    "Model-Q8_0.gguf",
    "model.IQ2_XXS.gguf",
    "Model-F16-00001-of-00002.gguf",
    "Model-F16-00002-of-00002.gguf",
    "mmproj-Model-F16.gguf",
    "README.md",
)


def test_a_quant_picks_its_file_whatever_the_case() -> None:
    assert choose_files(HubRef("o/r", "q4_k_m"), REPO)[0].filename == "Model-Q4_K_M.gguf"
    assert choose_files(HubRef("o/r", "Q8_0"), REPO)[0].filename == "Model-Q8_0.gguf"
    assert choose_files(HubRef("o/r", "iq2_xxs"), REPO)[0].filename == "model.IQ2_XXS.gguf"


def test_a_split_gguf_comes_whole_and_in_order_and_mmproj_is_not_a_model() -> None:
    parts = choose_files(HubRef("o/r", "f16"), list(reversed(REPO)))
    assert [p.filename for p in parts] == [
        "Model-F16-00001-of-00002.gguf",
        "Model-F16-00002-of-00002.gguf",
    ]


def test_a_split_gguf_with_a_part_missing_is_refused() -> None:
    with pytest.raises(ModelNotFound, match="missing parts"):
        choose_files(HubRef("o/r", "f16"), REPO[:3] + REPO[4:])


def test_no_match_lists_what_there_is() -> None:
    with pytest.raises(ModelNotFound) as caught:
        choose_files(HubRef("o/r", "q5_k_m"), REPO)
    assert caught.value.message == (
        "o/r:q5_k_m matches no GGUF; it has: o/r:f16, o/r:iq2_xxs, o/r:q4_k_m, o/r:q8_0"
    )
    with pytest.raises(ModelNotFound, match="no GGUF at all"):
        choose_files(HubRef("o/r", "q4"), files("README.md"))
    with pytest.raises(ModelNotFound, match=re.escape("has no file x.gguf; it has: o/r:f16")):
        choose_files(HubRef("o/r", filename="x.gguf"), REPO)


def test_several_matches_name_each_so_one_can_be_typed() -> None:
    with pytest.raises(InvalidRequest) as caught:
        choose_files(HubRef("o/r"), REPO)
    assert caught.value.code == "ambiguous_model_ref"
    assert "o/r:q4_k_m" in caught.value.message
    two = files("a/M-Q4_K_M.gguf", "b/M-Q4_K_M.gguf")
    with pytest.raises(InvalidRequest, match=re.escape("o/r/a/M-Q4_K_M.gguf, o/r/b/M-Q4_K_M.gguf")):
        choose_files(HubRef("o/r", "q4_k_m"), two)


def test_a_bare_repo_with_one_gguf_is_that_gguf() -> None:
    only = files("README.md", "tiny-Q4_0.gguf", "mmproj-tiny-f16.gguf")
    assert choose_files(HubRef("o/r"), only)[0].filename == "tiny-Q4_0.gguf"


def test_a_file_ref_is_exact() -> None:
    assert choose_files(HubRef("o/r", filename="Model-Q8_0.gguf"), REPO)[0].size == 1000
    with pytest.raises(ModelNotFound):
        choose_files(HubRef("o/r", filename="model-q8_0.gguf"), REPO)


def test_quant_labels_are_the_catalogs() -> None:
    assert quant_of("dir/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_of("Model-UD-Q4_K_XL-00001-of-00003.gguf") == "Q4_K_XL"
    assert quant_of("model.gguf") is None


def test_the_hub_is_read_from_the_environment_at_call_time() -> None:
    assert Hub.from_environ({}) == Hub("https://huggingface.co", offline=False)
    hub = Hub.from_environ({"HF_ENDPOINT": "http://127.0.0.1:9/", "HF_HUB_OFFLINE": "1"})
    assert hub == Hub("http://127.0.0.1:9", offline=True)
    assert Hub.from_environ({"TRANSFORMERS_OFFLINE": "yes"}).offline
    assert not Hub.from_environ({"HF_HUB_OFFLINE": "0"}).offline
    with pytest.raises(InvalidRequest):
        Hub.from_environ({"HF_ENDPOINT": "file:///etc"})
