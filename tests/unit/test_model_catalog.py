"""The catalog: each store's layout adopted, names, duplicates merged, refresh, skips.

Every store lies under a tmp HOME (`store_environment`): the real ~ is never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from shoal.models import stores
from shoal.models.catalog import Catalog, LocalModel, ModelCatalog
from shoal.settings import ModelSettings
from tests.models import (
    PACKAGED_NAME,
    REQUANTIZED_FILE,
    REQUANTIZED_NAME,
    REVISION,
    hf_store,
    link,
    lmstudio_folder,
    ollama_store,
    packaged_gguf,
    requantized_gguf,
    sha256_of,
    store_environment,
    tiny_gguf,
)

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def catalog(
    home: Path, settings: ModelSettings | None = None, env: dict[str, str] | None = None
) -> ModelCatalog:
    environ = store_environment(home, **(env or {}))
    result = ModelCatalog(settings or ModelSettings(), environ=environ)
    result.scan()
    return result


def hf_root(home: Path) -> Path:
    return home / ".cache" / "huggingface" / "hub"


def only(models: list[LocalModel]) -> LocalModel:
    assert len(models) == 1, models
    return models[0]


def test_empty_until_the_first_scan() -> None:
    empty: Catalog = ModelCatalog(ModelSettings())
    assert empty.models() == [] and empty.find(PACKAGED_NAME) is None


def test_the_hf_cache_is_the_store(home: Path) -> None:
    snapshot = hf_store(hf_root(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    found = catalog(home)
    model = only(found.models())
    assert model.name == REQUANTIZED_NAME
    assert model.full_name == f"{REPO}/{REQUANTIZED_FILE}"
    assert model.store == "hf" and model.writable
    assert model.sha256 == sha256_of(requantized_gguf())
    assert model.path == (snapshot / REQUANTIZED_FILE).resolve()
    assert model.size_bytes == requantized_gguf().stat().st_size
    assert (model.quantization, model.context_length, model.architecture) == ("Q8_0", 8192, "llama")
    assert (model.layers, model.embedding_length, model.head_count, model.head_count_kv) == (
        30,
        576,
        9,
        3,
    )
    # Both names find it, whatever their case.
    assert found.find(REQUANTIZED_NAME) == model == found.find(REQUANTIZED_NAME.upper())
    assert found.find(f"{REPO}/{REQUANTIZED_FILE}".lower()) == model
    assert found.find("nothing:q4_0") is None
    assert found.store_dir() == hf_root(home)


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({"HF_HUB_CACHE": "{tmp}/hub-cache"}, "{tmp}/hub-cache"),
        ({"HUGGINGFACE_HUB_CACHE": "{tmp}/legacy"}, "{tmp}/legacy"),
        ({"HF_HOME": "{tmp}/hf-home"}, "{tmp}/hf-home/hub"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/huggingface/hub"),
        ({}, "{home}/.cache/huggingface/hub"),
    ],
)
def test_the_store_is_where_huggingface_hub_puts_it(
    tmp_path: Path, home: Path, env: dict[str, str], where: str
) -> None:
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    expected = Path(where.format(tmp=tmp_path, home=home))
    assert stores.hf_cache_dir(store_environment(home, **env)) == expected
    hf_store(expected, REPO, {REQUANTIZED_FILE: requantized_gguf()})
    assert only(catalog(home, env=env).models()).writable


def test_a_configured_store_is_written_and_the_hf_cache_adopted(tmp_path: Path, home: Path) -> None:
    store = tmp_path / "shoal-store"
    hf_store(store, REPO, {REQUANTIZED_FILE: requantized_gguf()})
    hf_store(hf_root(home), "someone/smol", {"SmolLM2-135M-Instruct.Q4_1.gguf": packaged_gguf()})
    found = catalog(home, ModelSettings(store=store))
    assert found.store_dir() == store
    by_name = {m.name: m for m in found.models()}
    assert by_name[REQUANTIZED_NAME].writable
    assert by_name[PACKAGED_NAME].store == "hf" and not by_name[PACKAGED_NAME].writable


def test_the_revision_main_points_at_wins(home: Path) -> None:
    old, new = "a" * 40, "b" * 40
    hf_store(hf_root(home), "org/smol", {"smol.Q4_1.gguf": packaged_gguf()}, revision=old)
    hf_store(hf_root(home), "org/smol", {"smol.Q4_1.gguf": requantized_gguf()}, revision=new)
    assert only(catalog(home).models()).sha256 == sha256_of(requantized_gguf())
    (hf_root(home) / "models--org--smol" / "refs" / "main").write_text(old)
    assert only(catalog(home).models()).sha256 == sha256_of(packaged_gguf())


def test_ollamas_store_is_adopted_under_ollamas_names(home: Path) -> None:
    ollama = home / ".ollama" / "models"
    ollama_store(ollama, {"smollm2:135m": packaged_gguf(), "me/smol:q8": requantized_gguf()})
    found = catalog(home)
    by_name = {m.name: m for m in found.models()}
    assert set(by_name) == {"smollm2:135m", "me/smol:q8"}
    model = by_name["smollm2:135m"]
    assert model.store == "ollama" and not model.writable and model.full_name is None
    assert model.sha256 == sha256_of(packaged_gguf())
    assert model.path == ollama / "blobs" / f"sha256-{model.sha256}"
    assert model.quantization == "Q4_1"


def test_ollama_models_setting_and_switch(tmp_path: Path, home: Path) -> None:
    elsewhere = tmp_path / "ollama-elsewhere"
    ollama_store(elsewhere, {"smollm2:135m": packaged_gguf()})
    assert catalog(home, env={"OLLAMA_MODELS": str(elsewhere)}).find("smollm2:135m") is not None
    off = ModelSettings(adopt_ollama=False)
    assert catalog(home, off, {"OLLAMA_MODELS": str(elsewhere)}).models() == []


def test_hostile_ollama_manifests_are_ignored(home: Path) -> None:
    ollama = home / ".ollama" / "models"
    ollama_store(ollama, {"good:1": packaged_gguf()})
    manifests = ollama / "manifests" / "registry.ollama.ai" / "library"
    document = json.loads((manifests / "good" / "1").read_text())
    document["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    (manifests / "evil").mkdir()
    (manifests / "evil" / "1").write_text(json.dumps(document))
    (manifests / "broken").mkdir()
    (manifests / "broken" / "1").write_text("{not json")
    (manifests / "huge").mkdir()
    (manifests / "huge" / "1").write_bytes(b" " * (2 << 20))
    assert [m.name for m in catalog(home).models()] == ["good:1"]


def test_lm_studios_folders_are_adopted(home: Path) -> None:
    lmstudio_folder(
        home,
        {"lmstudio-community/SmolLM2-GGUF/SmolLM2-135M-Instruct-Q8_0.gguf": requantized_gguf()},
    )
    link(packaged_gguf(), home / ".cache/lm-studio/models/pub/repo/SmolLM2-135M-Instruct.Q4_1.gguf")
    found = catalog(home)
    assert {(m.name, m.store, m.writable) for m in found.models()} == {
        (REQUANTIZED_NAME, "lmstudio", False),
        (PACKAGED_NAME, "lmstudio", False),
    }
    assert catalog(home, ModelSettings(adopt_lmstudio=False)).models() == []


async def test_configured_folders_are_adopted_and_a_dropped_file_appears_on_refresh(
    tmp_path: Path, home: Path
) -> None:
    folder = tmp_path / "my models"
    folder.mkdir()
    found = catalog(home, ModelSettings(folders=(folder,)))
    assert found.models() == []
    link(requantized_gguf(), folder / "deep" / "er" / REQUANTIZED_FILE)
    await found.refresh()
    model = only(found.models())
    assert (model.name, model.store, model.writable) == (REQUANTIZED_NAME, "folder", False)
    assert model.sha256 is None  # not known without hashing: never hashed here


async def test_refresh_runs_off_the_event_loop(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "f"
    tiny_gguf(folder / "a-Q4_0.gguf")
    found = ModelCatalog(ModelSettings(folders=(folder,)), environ=store_environment(home))
    await found.refresh()
    assert [m.name for m in found.models()] == ["a:q4_0"]


def test_a_file_that_is_not_a_gguf_is_skipped_with_one_log_line(
    tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "notes.gguf").write_text("not a model")
    (folder / "empty.gguf").touch()
    tiny_gguf(folder / "fine-Q4_0.gguf")
    (folder / "unrelated.txt").write_text("ignored")
    with caplog.at_level(logging.INFO, logger="shoal.models"):
        found = catalog(home, ModelSettings(folders=(folder,)))
        assert [m.name for m in found.models()] == ["fine:q4_0"]
        skipped = [r.getMessage() for r in caplog.records]
        assert len(skipped) == 2 and all("not a GGUF model" in line for line in skipped)
        found.scan()
        found.scan()
    assert len(caplog.records) == 2  # not at every scan


def test_projectors_and_adapters_are_not_models(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "f"
    tiny_gguf(folder / "mmproj-model-f16.gguf", architecture="clip")
    _write_adapter(folder / "lora-Q8_0.gguf")
    tiny_gguf(folder / "real-Q4_0.gguf")
    assert [m.name for m in catalog(home, ModelSettings(folders=(folder,))).models()] == [
        "real:q4_0"
    ]


def _write_adapter(path: Path) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_a_split_model_is_one_model_when_all_its_parts_are_there(
    tmp_path: Path, home: Path
) -> None:
    folder = tmp_path / "f"
    for number in range(3):
        extra = {"split.count": 3, "split.no": number}
        tiny_gguf(folder / f"big-Q4_0-0000{number + 1}-of-00003.gguf", extra=extra)
    sizes = sum(p.stat().st_size for p in folder.iterdir())
    model = only(catalog(home, ModelSettings(folders=(folder,))).models())
    assert model.name == "big:q4_0" and model.size_bytes == sizes
    assert model.path.name == "big-Q4_0-00001-of-00003.gguf"
    (folder / "big-Q4_0-00002-of-00003.gguf").unlink()
    assert catalog(home, ModelSettings(folders=(folder,))).models() == []


def test_the_same_file_in_several_stores_is_one_model(tmp_path: Path, home: Path) -> None:
    # By SHA-256: the HF blob and Ollama's digest name the same bytes (separate copies).
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(requantized_gguf(), copy)
    hf_store(hf_root(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    ollama_store(home / ".ollama" / "models", {"smol:q8": copy})
    # By inode: LM Studio and a folder link the packaged file, its hash never computed.
    lmstudio_folder(home, {"pub/repo/SmolLM2-135M-Instruct.Q4_1.gguf": packaged_gguf()})
    folder = tmp_path / "folder"
    link(packaged_gguf(), folder / "smol-again.Q4_1.gguf")
    found = catalog(home, ModelSettings(folders=(folder,)))
    models = sorted(found.models(), key=lambda m: m.name)
    assert [m.name for m in models] == [PACKAGED_NAME, REQUANTIZED_NAME]
    packaged, requantized = models
    # The store's copy represents the file; the others' names still find it.
    assert requantized.store == "hf" and requantized.aliases == ("smol:q8",)
    assert found.find("smol:q8") == requantized
    assert [f.store for f in found.sources(requantized)] == ["hf", "ollama"]
    assert packaged.store == "lmstudio" and packaged.aliases == ("smol-again:q4_1",)


def test_different_files_with_one_name_are_told_apart(tmp_path: Path, home: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_gguf(a / "twin-Q4_0.gguf", context_length=1024)
    tiny_gguf(b / "twin-Q4_0.gguf", context_length=2048)
    settings = ModelSettings(folders=(b, a))
    names = {m.context_length: m.name for m in catalog(home, settings).models()}
    # The first by path keeps the name, whatever the order of the folders.
    assert names[1024] == "twin:q4_0"
    assert names[2048].startswith("twin-") and names[2048].endswith(":q4_0")
    again = {
        m.context_length: m.name for m in catalog(home, ModelSettings(folders=(a, b))).models()
    }
    assert again == names


def test_a_store_name_outranks_a_folder_for_a_contested_name(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "f"
    tiny_gguf(folder / "SmolLM2-135M-Instruct-Q8_0.gguf")
    hf_store(hf_root(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    by_store = {m.store: m.name for m in catalog(home, ModelSettings(folders=(folder,))).models()}
    assert by_store["hf"] == REQUANTIZED_NAME and by_store["folder"] != REQUANTIZED_NAME


def test_broken_links_and_odd_entries_do_not_stop_a_scan(tmp_path: Path, home: Path) -> None:
    snapshot = hf_store(hf_root(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    (snapshot / "gone-Q4_0.gguf").symlink_to("../../blobs/" + "0" * 64)
    (hf_root(home) / "datasets--x--y").mkdir()
    (hf_root(home) / "models--no-snapshots").mkdir()
    (hf_root(home) / "models--org--bad-ref" / "refs").mkdir(parents=True)
    (hf_root(home) / "models--org--bad-ref" / "refs" / "main").write_text("../../etc")
    folder = tmp_path / "f"
    (folder / "a-dir.gguf").mkdir(parents=True)
    assert [m.name for m in catalog(home, ModelSettings(folders=(folder,))).models()] == [
        REQUANTIZED_NAME
    ]


def test_a_repeated_scan_reads_no_header(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "f"
    for i in range(40):
        tiny_gguf(folder / f"m{i}-Q4_0.gguf")
    found = catalog(home, ModelSettings(folders=(folder,)))
    first = found.statistics()
    assert first is not None and (first.files, first.headers_read, first.models) == (40, 40, 40)
    found.scan()
    again = found.statistics()
    assert again is not None and (again.headers_read, again.models) == (0, 40)
    # A changed file is read again (size and mtime are in the cache's key).
    tiny_gguf(folder / "m0-Q4_0.gguf", context_length=999)
    os.utime(folder / "m0-Q4_0.gguf", ns=(1, 1))
    found.scan()
    changed = found.statistics()
    assert changed is not None and changed.headers_read == 1
    model = found.find("m0:q4_0")
    assert model is not None and model.context_length == 999


def test_store_names_follow_the_hub_revision_layout(home: Path) -> None:
    snapshot = hf_store(hf_root(home), REPO, {"sub/dir/" + REQUANTIZED_FILE: requantized_gguf()})
    model = only(catalog(home).models())
    assert model.full_name == f"{REPO}/sub/dir/{REQUANTIZED_FILE}"
    assert snapshot.name == REVISION
