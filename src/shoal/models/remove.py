"""Removing a model from the store Shoal writes (`shoal models rm`), never elsewhere.

In the Hugging Face layout a file is a snapshot entry (a link) per revision and a blob
the entries share. Removing a model removes its entry from every snapshot of its repo,
each blob no other entry still links to, the revisions left empty (and the refs that
named them) and the folders left empty, so that `huggingface_hub` still reads the cache
as sound. A blob is unlinked, never followed: when it links into the cache-wide shared
store, the payload there is `huggingface_hub`'s to collect.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from shoal.models.stores import Found, hf_blob_of

_STORE_NAMES = {
    "hf": "the Hugging Face cache",
    "ollama": "Ollama's store",
    "lmstudio": "LM Studio's folder",
    "folder": "a configured folder",
}


class NotRemovable(Exception):
    """The model is not in the store Shoal writes; the message says where it is."""


@dataclass(frozen=True, slots=True)
class Removed:
    entries: tuple[Path, ...]  # snapshot entries removed
    blobs: tuple[Path, ...]  # blobs removed (no entry linked to them any more)
    freed_bytes: int  # the blobs' sizes (less is freed when another hard link remains)
    kept: tuple[Found, ...]  # copies in adopted stores, untouched: the model stays listed


def remove_model(sources: Sequence[Found]) -> Removed:
    """Remove every copy of a model that lies in the writable store (see the docstring)."""
    targets = {
        (found.repo_dir, found.relative)
        for found in sources
        if found.writable and found.repo_dir is not None and found.relative is not None
    }
    if not targets:
        raise NotRemovable(adopted_message(sources))
    entries: list[Path] = []
    blobs: list[Path] = []
    freed = 0
    for repo_dir, relative in sorted(targets, key=str):
        assert repo_dir is not None and relative is not None
        removed_entries, removed_blobs, size = _remove_file(repo_dir, relative)
        entries += removed_entries
        blobs += removed_blobs
        freed += size
        _prune_repo(repo_dir)
    kept = tuple(found for found in sources if not found.writable)
    return Removed(tuple(entries), tuple(blobs), freed, kept)


def _remove_file(repo_dir: Path, relative: str) -> tuple[list[Path], list[Path], int]:
    snapshots = repo_dir / "snapshots"
    entries: list[Path] = []
    linked: set[Path] = set()
    freed = 0
    for revision in _subdirs(snapshots):
        entry = revision / relative
        if not os.path.lexists(entry) or entry.is_dir():
            continue
        if entry.is_symlink():
            blob = hf_blob_of(entry)
            if blob is not None and blob.parent == repo_dir / "blobs":
                linked.add(blob)
        else:  # a cache written without symlinks: the entry is the file
            freed += entry.stat().st_size
        entry.unlink()
        entries.append(entry)
        _prune_up(entry.parent, stop=revision)
    blobs: list[Path] = []
    for blob in sorted(linked - _linked_blobs(snapshots)):
        lock = repo_dir.parent / ".locks" / repo_dir.name / f"{blob.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        # huggingface_hub holds this lock while it downloads the blob (file_download.py);
        # the lock file stays, as huggingface_hub leaves it.
        with FileLock(str(lock), timeout=30):
            if blob in _linked_blobs(snapshots) or not os.path.lexists(blob):
                continue
            freed += 0 if blob.is_symlink() else blob.lstat().st_size
            blob.unlink()
            blobs.append(blob)
    return entries, blobs, freed


def _linked_blobs(snapshots: Path) -> set[Path]:
    linked: set[Path] = set()
    for folder, _subfolders, files in os.walk(snapshots):
        for name in files:
            blob = hf_blob_of(Path(folder, name))
            if blob is not None:
                linked.add(blob)
    return linked


def _prune_repo(repo_dir: Path) -> None:
    """Drop revisions left empty, the refs naming them, and the repo when nothing is left."""
    snapshots = repo_dir / "snapshots"
    for revision in _subdirs(snapshots):
        if not any(revision.iterdir()):
            revision.rmdir()
            _drop_refs_to(repo_dir / "refs", revision.name)
            shutil.rmtree(repo_dir / ".no_exist" / revision.name, ignore_errors=True)
    if _subdirs(snapshots):
        return
    shutil.rmtree(repo_dir / "refs", ignore_errors=True)
    shutil.rmtree(repo_dir / ".no_exist", ignore_errors=True)
    for folder in (snapshots, repo_dir / "blobs", repo_dir):
        _rmdir_if_empty(folder)  # blobs may hold a pull's .incomplete file: then it stays


def _drop_refs_to(refs: Path, commit: str) -> None:
    for ref in sorted(refs.rglob("*"), reverse=True):
        if ref.is_file():
            try:
                if ref.read_text(encoding="ascii", errors="replace").strip() == commit:
                    ref.unlink()
            except OSError:
                continue
        elif ref.is_dir():
            _rmdir_if_empty(ref)


def _prune_up(folder: Path, *, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        if not _rmdir_if_empty(folder):
            return
        folder = folder.parent


def _rmdir_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:  # not empty, or gone
        return False
    return True


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def adopted_message(sources: Sequence[Found]) -> str:
    """Why a model cannot be removed, and how to remove it where it is."""
    if not sources:
        return "the model is not on this machine's disk"
    where = sources[0]
    store = _STORE_NAMES.get(where.store, where.store)
    if where.store == "hf":
        store = "a Hugging Face cache other than Shoal's store"
    how = {
        "ollama": f"remove it with `ollama rm {where.store_name}`",
        "lmstudio": "remove it in LM Studio",
    }.get(where.store, "delete the file yourself if you mean to")
    return f"it is in {store} ({where.path}), which Shoal adopts read-only and never changes; {how}"
