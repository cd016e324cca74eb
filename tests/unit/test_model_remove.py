"""Removing a model from the store: the HF layout stays sound, adopted stores untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from shoal.models.catalog import ModelCatalog
from shoal.models.remove import NotRemovable, remove_model
from shoal.settings import ModelSettings
from tests.models import (
    PACKAGED_NAME,
    REQUANTIZED_FILE,
    REQUANTIZED_NAME,
    hf_store,
    lmstudio_folder,
    ollama_store,
    packaged_gguf,
    requantized_gguf,
    sha256_of,
    store_environment,
)

REPO = "org/smol"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def scanned(home: Path) -> ModelCatalog:
    catalog = ModelCatalog(ModelSettings(), environ=store_environment(home))
    catalog.scan()
    return catalog


def remove(catalog: ModelCatalog, name: str) -> None:
    model = catalog.find(name)
    assert model is not None
    remove_model(catalog.sources(model))


def hub(home: Path) -> Path:
    return home / ".cache" / "huggingface" / "hub"


def test_the_last_file_of_a_repo_takes_the_repo_with_it(home: Path) -> None:
    hf_store(hub(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    catalog = scanned(home)
    model = catalog.find(REQUANTIZED_NAME)
    assert model is not None
    removed = remove_model(catalog.sources(model))
    assert removed.freed_bytes == requantized_gguf().stat().st_size
    assert len(removed.entries) == 1 and len(removed.blobs) == 1 and removed.kept == ()
    assert not (hub(home) / "models--org--smol").exists()
    assert requantized_gguf().exists()  # a link to it went, never the file it links to
    assert scanned(home).models() == []


def test_a_blob_another_revision_uses_stays(home: Path) -> None:
    old, new = "a" * 40, "b" * 40
    hf_store(hub(home), REPO, {"smol.Q4_1.gguf": packaged_gguf()}, revision=old, ref=None)
    hf_store(
        hub(home),
        REPO,
        {"smol.Q4_1.gguf": packaged_gguf(), REQUANTIZED_FILE: requantized_gguf()},
        revision=new,
    )
    repo = hub(home) / "models--org--smol"
    remove(scanned(home), REQUANTIZED_NAME)
    assert (repo / "blobs" / sha256_of(packaged_gguf())).exists()
    assert not (repo / "blobs" / sha256_of(requantized_gguf())).exists()
    assert {m.name for m in scanned(home).models()} == {"smol:q4_1"}
    # The cache is still one huggingface_hub reads without complaint.
    info = scan_cache_dir(hub(home))
    assert info.warnings == [] and [r.repo_id for r in info.repos] == [REPO]


def test_a_file_in_every_revision_goes_from_every_revision(home: Path) -> None:
    old, new = "a" * 40, "b" * 40
    hf_store(hub(home), REPO, {"sub/smol.Q4_1.gguf": packaged_gguf()}, revision=old, ref="v1")
    hf_store(
        hub(home),
        REPO,
        {"sub/smol.Q4_1.gguf": requantized_gguf(), "README.md": _readme(home)},
        revision=new,
    )
    repo = hub(home) / "models--org--smol"
    remove(scanned(home), "smol:q4_1")
    assert scanned(home).models() == []  # the old revision's copy does not resurface
    assert not (repo / "snapshots" / old).exists() and not (repo / "refs" / "v1").exists()
    assert (repo / "snapshots" / new / "README.md").exists()
    assert not (repo / "snapshots" / new / "sub").exists()  # emptied folders go
    assert scan_cache_dir(hub(home)).warnings == []


def _readme(home: Path) -> Path:
    path = home / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# smol\n")
    return path


def test_a_pulls_partial_file_keeps_its_folder(home: Path) -> None:
    hf_store(hub(home), REPO, {REQUANTIZED_FILE: requantized_gguf()})
    partial = hub(home) / "models--org--smol" / "blobs" / f"{'e' * 64}.incomplete"
    partial.write_bytes(b"half")
    remove(scanned(home), REQUANTIZED_NAME)
    assert partial.exists()


@pytest.mark.parametrize("store", ["ollama", "lmstudio"])
def test_adopted_stores_are_refused(home: Path, store: str) -> None:
    if store == "ollama":
        ollama_store(home / ".ollama" / "models", {"smollm2:135m": packaged_gguf()})
        name, hint = "smollm2:135m", "ollama rm smollm2:135m"
    else:
        lmstudio_folder(home, {"pub/repo/SmolLM2-135M-Instruct.Q4_1.gguf": packaged_gguf()})
        name, hint = PACKAGED_NAME, "LM Studio"
    catalog = scanned(home)
    model = catalog.find(name)
    assert model is not None and not model.writable
    with pytest.raises(NotRemovable) as caught:
        remove_model(catalog.sources(model))
    assert "read-only" in str(caught.value) and hint in str(caught.value)
    assert scanned(home).find(name) is not None


def test_a_duplicate_in_an_adopted_store_is_kept(home: Path) -> None:
    hf_store(hub(home), REPO, {"SmolLM2-135M-Instruct.Q4_1.gguf": packaged_gguf()})
    ollama_store(home / ".ollama" / "models", {"smollm2:135m": packaged_gguf()})
    catalog = scanned(home)
    model = catalog.find("smollm2:135m")
    assert model is not None and model.store == "hf"
    removed = remove_model(catalog.sources(model))
    assert [found.store for found in removed.kept] == ["ollama"]
    after = scanned(home).find("smollm2:135m")
    assert after is not None and after.store == "ollama"
