"""Where GGUFs lie on this machine, and walking each kind of store for them.

- The store Shoal writes: the Hugging Face cache layout
  (`models--org--repo/{blobs,snapshots/<rev>,refs}`), at `models.store`, else where
  `huggingface_hub` puts it (HF_HUB_CACHE, else HF_HOME/hub, else
  ~/.cache/huggingface/hub), so that llama.cpp's `-hf` and vLLM share its files.
- Adopted read-only: the Hugging Face cache when the store is elsewhere; Ollama's store
  (OLLAMA_MODELS, else ~/.ollama/models, and the Linux service's
  /usr/share/ollama/.ollama/models), whose manifests point at blobs that are plain GGUF
  files; LM Studio's folders (~/.lmstudio/models, ~/.cache/lm-studio/models:
  `<publisher>/<repo>/<file>.gguf`); the folders in `models.folders`.

Nothing here opens a GGUF or decides a name: each walker yields what it found, with what
its store says about the file (a SHA-256 known without hashing, a name). The locations
are read from the environment at every scan, not at import as `huggingface_hub.constants`
does, so a changed HF_HUB_CACHE is seen.

`huggingface_hub.scan_cache_dir` is not used for the walk: it drops a whole repo when one
of its files is a broken link or one ref points at a missing revision, and it stats every
file of every repo and dataset in the cache, where only `*.gguf` matters here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.models import names

if TYPE_CHECKING:
    from shoal.models.catalog import StoreKind
    from shoal.settings import ModelSettings

log = logging.getLogger(__name__)

HF_REPO_PREFIX = "models--"  # huggingface_hub's repo_folder_name for repo_type "model"
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_DEFAULT_REGISTRY = "registry.ollama.ai"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OLLAMA_DIGEST = re.compile(r"sha256:(?P<hex>[0-9a-f]{64})")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A manifest is a few hundred bytes; anything much larger is not one.
_MAX_MANIFEST_BYTES = 1 << 20
# Folders are walked this deep: deep enough for `publisher/repo/file`, shallow enough
# that a folder pointed at a home directory by mistake does not take minutes.
_MAX_FOLDER_DEPTH = 6
_LMSTUDIO_DEPTH = 3  # <publisher>/<repo>/<file>.gguf, as LM Studio lays it out


@dataclass(frozen=True, slots=True)
class Found:
    """A GGUF a store holds, before its header is read."""

    path: Path  # as found: for the HF layout the snapshot entry (a link to its blob)
    store: StoreKind
    writable: bool  # in the store Shoal writes, where `shoal models rm` may delete it
    filename: str  # what the file is called, to name it from
    folder: str | None = None  # its repo or folder, to name a generic file name from
    sha256: str | None = None  # when the store names the file by it (HF blob, Ollama)
    full_name: str | None = None  # "org/repo/file.gguf" in the HF layout
    store_name: str | None = None  # the store's own name for it (Ollama's)
    repo_dir: Path | None = None  # HF layout: models--org--repo
    relative: str | None = None  # HF layout: the file's path inside a snapshot


@dataclass(frozen=True, slots=True)
class StoreDirs:
    store: Path  # the store Shoal writes (HF layout)
    hf_adopted: tuple[Path, ...]  # the HF cache, when the store is elsewhere
    ollama: tuple[Path, ...]
    lmstudio: tuple[Path, ...]
    folders: tuple[Path, ...]


def hf_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where `huggingface_hub` keeps its cache, by its own rules (`constants.py`)."""
    explicit = environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return _expand(explicit, environ)
    hf_home = environ.get("HF_HOME")
    if hf_home:
        return _expand(hf_home, environ) / "hub"
    cache = environ.get("XDG_CACHE_HOME")
    base = _expand(cache, environ) if cache else _home(environ) / ".cache"
    return base / "huggingface" / "hub"


def store_dir(settings: ModelSettings, environ: Mapping[str, str] | None = None) -> Path:
    """The store Shoal writes downloads into (the `cache_dir` for `huggingface_hub`)."""
    environ = os.environ if environ is None else environ
    if settings.store is not None:
        return _expand(str(settings.store), environ)
    return hf_cache_dir(environ)


def locate(settings: ModelSettings, environ: Mapping[str, str]) -> StoreDirs:
    store = store_dir(settings, environ)
    hf = hf_cache_dir(environ)
    home = _home(environ)
    ollama: tuple[Path, ...] = ()
    if settings.adopt_ollama:
        explicit = environ.get("OLLAMA_MODELS")
        ollama = (
            (_expand(explicit, environ),)
            if explicit
            else (home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models"))
        )
    lmstudio: tuple[Path, ...] = ()
    if settings.adopt_lmstudio:
        lmstudio = (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models")
    return StoreDirs(
        store=store,
        hf_adopted=() if _same_dir(hf, store) else (hf,),
        ollama=ollama,
        lmstudio=lmstudio,
        folders=tuple(_expand(str(folder), environ) for folder in settings.folders),
    )


def find_all(dirs: StoreDirs) -> list[Found]:
    """Every GGUF in every store, in the order: store, adopted HF, Ollama, LM Studio, folders."""
    found = list(scan_hf(dirs.store, writable=True))
    for root in dirs.hf_adopted:
        found.extend(scan_hf(root, writable=False))
    for root in dirs.ollama:
        found.extend(scan_ollama(root))
    for root in dirs.lmstudio:
        found.extend(scan_folder(root, store="lmstudio", max_depth=_LMSTUDIO_DEPTH))
    for root in dirs.folders:
        found.extend(scan_folder(root, store="folder", max_depth=_MAX_FOLDER_DEPTH))
    return found


# --- the Hugging Face cache layout -------------------------------------------------------


def scan_hf(root: Path, *, writable: bool) -> Iterator[Found]:
    for repo_dir in _subdirs(root):
        if not repo_dir.name.startswith(HF_REPO_PREFIX):
            continue  # datasets--, spaces--, .locks, blobs (the shared Xet store)
        repo_id = repo_dir.name.removeprefix(HF_REPO_PREFIX).replace("--", "/")
        seen: set[str] = set()
        # One file per path in the repo: the revision `main` points at wins, then any
        # other ref's, then the newest snapshot.
        for revision in hf_revisions(repo_dir):
            for path in _ggufs(revision, max_depth=_MAX_FOLDER_DEPTH):
                relative = path.relative_to(revision).as_posix()
                if relative in seen:
                    continue
                seen.add(relative)
                blob = hf_blob_of(path)
                yield Found(
                    path=path,
                    store="hf",
                    writable=writable,
                    filename=path.name,
                    folder=repo_id.rpartition("/")[2],
                    sha256=blob.name if blob is not None and _SHA256.fullmatch(blob.name) else None,
                    full_name=names.full_name(repo_id, relative),
                    repo_dir=repo_dir,
                    relative=relative,
                )


def hf_revisions(repo_dir: Path) -> list[Path]:
    """The repo's snapshot folders, preferred first (see `scan_hf`)."""
    snapshots = {path.name: path for path in _subdirs(repo_dir / "snapshots")}
    by_ref: list[str] = []
    refs = repo_dir / "refs"
    ref_files = sorted(refs.rglob("*"), key=lambda p: (p.name != "main", str(p)))
    for ref in ref_files:
        try:
            commit = ref.read_text(encoding="ascii", errors="replace").strip()
        except OSError:  # a folder (refs/pr), or unreadable
            continue
        if _COMMIT.fullmatch(commit) and commit in snapshots and commit not in by_ref:
            by_ref.append(commit)
    rest = sorted(
        (name for name in snapshots if name not in by_ref),
        key=lambda name: (-_mtime(snapshots[name]), name),
    )
    return [snapshots[name] for name in (*by_ref, *rest)]


def hf_blob_of(entry: Path) -> Path | None:
    """The repo blob a snapshot entry links to (the first hop only), if it is one."""
    try:
        target = os.readlink(entry)
    except OSError:
        return None  # not a link: a cache written without symlinks
    blob = Path(os.path.normpath(entry.parent / target))
    return blob if blob.parent.name == "blobs" else None


# --- Ollama ------------------------------------------------------------------------------


def scan_ollama(root: Path) -> Iterator[Found]:
    """manifests/<registry>/<namespace>/<model>/<tag> -> the model layer's blob."""
    manifests = root / "manifests"
    for host in _subdirs(manifests):
        for namespace in _subdirs(host):
            for model in _subdirs(namespace):
                for tag in _files(model):
                    found = _ollama_model(root, host.name, namespace.name, model.name, tag)
                    if found is not None:
                        yield found


def _ollama_model(root: Path, host: str, namespace: str, model: str, tag: Path) -> Found | None:
    name = names.ollama_name(host, namespace, model, tag.name)
    if name is None:
        log.info("skipped the Ollama manifest %s: its path is not a model name", tag)
        return None
    digest = _ollama_model_digest(tag)
    if digest is None:
        return None
    return Found(
        path=root / "blobs" / f"sha256-{digest}",
        store="ollama",
        writable=False,
        filename=f"{model}.gguf",
        folder=model,
        sha256=digest,
        store_name=name,
    )


def _ollama_model_digest(manifest: Path) -> str | None:
    try:
        with manifest.open("rb") as file:
            document = json.loads(file.read(_MAX_MANIFEST_BYTES + 1)[:_MAX_MANIFEST_BYTES])
    except (OSError, ValueError):
        log.info("skipped %s: not a readable Ollama manifest", manifest)
        return None
    layers = document.get("layers") if isinstance(document, dict) else None
    for layer in layers if isinstance(layers, list) else ():
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE:
            match = _OLLAMA_DIGEST.fullmatch(str(layer.get("digest")))
            if match is not None:
                return match.group("hex")
    return None  # an embedding-only or adapter manifest, or a hostile digest


# --- LM Studio and plain folders ---------------------------------------------------------


def scan_folder(root: Path, *, store: StoreKind, max_depth: int) -> Iterator[Found]:
    for path in _ggufs(root, max_depth=max_depth):
        yield Found(
            path=path,
            store=store,
            writable=False,
            filename=path.name,
            folder=path.parent.name,
        )


# --- walking -----------------------------------------------------------------------------


def _ggufs(root: Path, *, max_depth: int) -> Iterator[Path]:
    """`*.gguf` under `root` (case aside), hidden folders and folder links not followed."""
    for folder, subdirs, files in os.walk(root, onerror=_walk_error):
        depth = len(Path(folder).relative_to(root).parts)
        subdirs[:] = (
            sorted(d for d in subdirs if not d.startswith(".")) if depth + 1 < max_depth else []
        )
        for name in sorted(files):
            if name.lower().endswith(".gguf") and not name.startswith("."):
                yield Path(folder, name)


def _walk_error(error: OSError) -> None:
    if error.filename and Path(error.filename).exists():
        log.debug("cannot read %s: %s", error.filename, error.strerror)


def _subdirs(path: Path) -> list[Path]:
    return sorted(entry for entry in _entries(path) if entry.is_dir())


def _files(path: Path) -> list[Path]:
    return sorted(entry for entry in _entries(path) if entry.is_file())


def _entries(path: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(path) if not entry.name.startswith(".")]
    except FileNotFoundError:
        return []  # a store that is not on this machine
    except OSError as exc:  # at debug: the node rescans every 30 s
        log.debug("cannot read %s: %s", path, exc.strerror)
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or os.path.expanduser("~"))


def _expand(path: str, environ: Mapping[str, str]) -> Path:
    if path == "~" or path.startswith("~/"):
        return _home(environ) / path[2:]
    return Path(path)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b
