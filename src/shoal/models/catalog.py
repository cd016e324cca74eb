"""The catalog: every GGUF this node can serve from its disk, under names people type.

`ModelCatalog` walks the stores (`stores`), reads each new file's header (`gguf_header`,
cached by path, size, mtime and inode, so a repeated scan only stats), merges the copies
of one file found in several stores, and names the models (`names`). A scan runs in a
thread (`refresh`); `models()` and `find()` read the last scan's result and never block.

Theory of the merge: two entries are one model when their SHA-256 is known and equal
(an HF blob's name, an Ollama digest: no hashing) or when they are the same file
(device and inode: a link). The entry from the first store in the order store, adopted
HF cache, Ollama, LM Studio, folders (then by path) represents the model: its name and
path; the others' names become aliases. The same order decides which of two different
files keeps a contested name, so names are stable from scan to scan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from shoal.models import names, stores
from shoal.models.gguf_header import GGUFHeader, NotGGUF, read_header

if TYPE_CHECKING:
    from shoal.settings import ModelSettings

log = logging.getLogger(__name__)

#: Where a GGUF was found. "hf": the store (the Hugging Face cache layout, which Shoal
#: writes); the others are adopted read-only.
StoreKind = Literal["hf", "ollama", "lmstudio", "folder"]


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One GGUF on this machine's disk, served from where it lies (never copied)."""

    name: str  # what people type, e.g. "qwen2.5-0.5b-instruct:q4_k_m"; unique in the catalog
    path: Path  # the GGUF file (for the HF layout, the snapshot path, resolved)
    size_bytes: int
    store: StoreKind
    full_name: str | None = None  # "org/repo/file.gguf" for Hub files; also accepted
    sha256: str | None = None  # when known without hashing (HF blob, Ollama digest)
    quantization: str | None = None  # "Q4_K_M", from the GGUF header
    context_length: int | None = None  # the model's trained context, from the header
    architecture: str | None = None  # "llama", "qwen2", ... from the header
    # For the KV cache's size (the memory check before a load), from the header too.
    layers: int | None = None  # <arch>.block_count
    embedding_length: int | None = None  # <arch>.embedding_length
    head_count: int | None = None  # <arch>.attention.head_count
    head_count_kv: int | None = None  # <arch>.attention.head_count_kv
    # Per head, when the architecture sets it apart from embedding_length / head_count
    # (Gemma, Qwen3): <arch>.attention.key_length and value_length.
    key_length: int | None = None
    value_length: int | None = None
    # In the store Shoal writes: `shoal models rm` may delete it. Adopted stores never.
    writable: bool = False
    # The names the same file has in other stores (an Ollama name for a blob that is also
    # in the HF cache), where no other model has them.
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the model answers to."""
        full = () if self.full_name is None else (self.full_name,)
        return (self.name, *full, *self.aliases)


class Catalog(Protocol):
    """What the node asks of the catalog."""

    def models(self) -> list[LocalModel]:
        """Every catalogued model, one per distinct file (duplicates merged by SHA-256)."""
        ...

    def find(self, name: str) -> LocalModel | None:
        """The model a (validated) name means, by any of its `names`, case aside."""
        ...

    async def refresh(self) -> None:
        """Scan the stores again (off the event loop); a pull or a dropped file shows up."""
        ...


# Which store's copy represents a model, and which file keeps a contested name.
_STORE_ORDER = {"hf": 1, "ollama": 2, "lmstudio": 3, "folder": 4}
# Files that are GGUFs but not models a server loads on their own.
_NOT_MODELS = frozenset({"mmproj", "adapter"})
_NOT_MODEL_ARCHITECTURES = frozenset({"clip"})

_FileKey = tuple[str, int, int, int, int]  # real path, size, mtime_ns, device, inode


@dataclass(frozen=True, slots=True)
class _File:
    found: stores.Found
    key: _FileKey
    size: int
    header: GGUFHeader

    @property
    def rank(self) -> tuple[int, str]:
        order = 0 if self.found.writable else _STORE_ORDER[self.found.store]
        return order, str(self.found.path)

    @property
    def wanted_name(self) -> str:
        found = self.found
        return found.store_name or names.short_name(
            found.filename, quantization=self.header.quantization, folder=found.folder
        )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    models: tuple[LocalModel, ...] = ()
    index: Mapping[str, LocalModel] = field(default_factory=dict)
    sources: Mapping[str, tuple[stores.Found, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScanStatistics:
    files: int  # GGUFs found in the stores
    headers_read: int  # of which read this time (new or changed files)
    skipped: int  # not GGUF models, unreadable, or an incomplete split
    models: int
    seconds: float


class ModelCatalog:
    """The `Catalog` of this machine's stores (see the module's docstring).

    Empty until the first `refresh()` (or `scan()`). `environ` replaces `os.environ` for
    the stores' locations (HOME, HF_HUB_CACHE, OLLAMA_MODELS, ...), read at every scan.
    """

    def __init__(
        self, settings: ModelSettings, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._settings = settings
        self._environ = environ
        self._snapshot = _Snapshot()
        self._headers: dict[_FileKey, GGUFHeader | None] = {}
        self._scan_lock = threading.Lock()
        self._statistics: ScanStatistics | None = None

    def models(self) -> list[LocalModel]:
        return list(self._snapshot.models)

    def find(self, name: str) -> LocalModel | None:
        return self._snapshot.index.get(names.lookup_key(name))

    async def refresh(self) -> None:
        await asyncio.to_thread(self.scan)

    def store_dir(self) -> Path:
        """The store Shoal writes into (`cache_dir` for `huggingface_hub`)."""
        return stores.store_dir(self._settings, self._environ)

    def sources(self, model: LocalModel) -> tuple[stores.Found, ...]:
        """Where the model's file was found: its representative first, then duplicates."""
        return self._snapshot.sources.get(names.lookup_key(model.name), ())

    def statistics(self) -> ScanStatistics | None:
        """The last scan's counts and duration; None before the first."""
        return self._statistics

    def scan(self) -> list[LocalModel]:
        """Walk the stores now, blocking (a thread's or the CLI's call); the new models."""
        with self._scan_lock:
            started = time.perf_counter()
            environ = os.environ if self._environ is None else self._environ
            found = stores.find_all(stores.locate(self._settings, environ))
            headers: dict[_FileKey, GGUFHeader | None] = {}
            files = [file for file in (self._file(f, headers) for f in found) if file]
            read = sum(1 for key in headers if key not in self._headers)
            self._headers = headers  # forget files that went away
            self._snapshot = _assemble(files)
            self._statistics = ScanStatistics(
                files=len(found),
                headers_read=read,
                skipped=len(found) - len(files),
                models=len(self._snapshot.models),
                seconds=time.perf_counter() - started,
            )
            return list(self._snapshot.models)

    def _file(
        self, found: stores.Found, headers: dict[_FileKey, GGUFHeader | None]
    ) -> _File | None:
        try:
            status = os.stat(found.path)
        except OSError as exc:  # a broken link, a store changing under the scan
            log.debug("skipped %s: %s", found.path, exc.strerror)
            return None
        if not stat.S_ISREG(status.st_mode):
            return None
        real = os.path.realpath(found.path)
        key = (real, status.st_size, status.st_mtime_ns, status.st_dev, status.st_ino)
        if key in headers:
            header = headers[key]
        elif key in self._headers:
            header = headers[key] = self._headers[key]
        else:
            header = headers[key] = _read(found.path, Path(real))
        if header is None:
            return None
        if header.model_type in _NOT_MODELS or header.architecture in _NOT_MODEL_ARCHITECTURES:
            log.debug("skipped %s: a %s, not a model", found.path, header.model_type)
            return None
        size = status.st_size
        if header.split_count > 1:
            if header.split_no != 0:
                return None  # a later part of a split model: the first part stands for it
            total = _split_size(found.path, header.split_count)
            if total is None:
                log.debug("skipped %s: a part of its split model is missing", found.path)
                return None
            size = total
        return _File(found=found, key=key, size=size, header=header)


if TYPE_CHECKING:

    def _implements_the_protocol(settings: ModelSettings) -> Catalog:
        return ModelCatalog(settings)  # mypy checks ModelCatalog against Catalog here


def _read(path: Path, real: Path) -> GGUFHeader | None:
    """The header, or None after one log line (the negative result is cached too)."""
    try:
        return read_header(real)
    except NotGGUF as exc:
        log.warning("skipped %s: not a GGUF model (%s)", path, exc)
    except OSError as exc:
        log.warning("skipped %s: %s", path, exc.strerror or exc)
    return None


def _split_size(first: Path, count: int) -> int | None:
    match = names.SHARD_SUFFIX.search(first.name.removesuffix(".gguf"))
    if match is None:
        return None
    prefix = first.name[: match.start()]
    total = 0
    for number in range(1, count + 1):
        try:
            total += (first.parent / f"{prefix}-{number:05d}-of-{count:05d}.gguf").stat().st_size
        except OSError:
            return None
    return total


def _assemble(files: list[_File]) -> _Snapshot:
    """Merge the copies of each file and name the models (pure but for the logging)."""
    files = sorted(files, key=lambda file: file.rank)
    groups = _duplicates(files)
    taken: set[str] = set()
    full: list[str | None] = []
    for group in groups:  # Hub names first: they are the ones scripts spell out
        name = next((f.found.full_name for f in group if f.found.full_name), None)
        if name is not None and names.lookup_key(name) in taken:
            name = None
        if name is not None:
            taken.add(names.lookup_key(name))
        full.append(name)
    short: list[str] = []
    for group in groups:
        first = group[0]
        tiebreak = first.found.sha256 or first.key[0]
        name = names.disambiguate(first.wanted_name, taken, tiebreak)
        taken.add(names.lookup_key(name))
        short.append(name)
    models: list[LocalModel] = []
    index: dict[str, LocalModel] = {}
    sources: dict[str, tuple[stores.Found, ...]] = {}
    for group, name, full_name in zip(groups, short, full, strict=True):
        aliases: list[str] = []
        for other in group[1:]:
            for alias in (other.wanted_name, other.found.full_name):
                if alias is not None and names.lookup_key(alias) not in taken:
                    taken.add(names.lookup_key(alias))
                    aliases.append(alias)
        model = _model(group, name, full_name, tuple(aliases))
        models.append(model)
        for each in model.names:
            index[names.lookup_key(each)] = model
        sources[names.lookup_key(name)] = tuple(f.found for f in group)
    return _Snapshot(models=tuple(models), index=index, sources=sources)


def _duplicates(files: list[_File]) -> list[list[_File]]:
    """Files grouped by identity (same SHA-256, or same device and inode), in rank order."""
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[object, ...], int] = {}
    for i, file in enumerate(files):
        identities: list[tuple[object, ...]] = [("inode", file.key[3], file.key[4])]
        if file.found.sha256 is not None:
            identities.append(("sha256", file.found.sha256))
        for identity in identities:
            j = first_with.setdefault(identity, i)
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)  # the earliest-ranked file stays the root
    groups: dict[int, list[_File]] = {}
    for i, file in enumerate(files):
        groups.setdefault(root(i), []).append(file)
    return list(groups.values())


def _model(
    group: list[_File], name: str, full_name: str | None, aliases: tuple[str, ...]
) -> LocalModel:
    first = group[0]
    header = first.header
    return LocalModel(
        name=name,
        path=Path(first.key[0]),
        size_bytes=first.size,
        store=first.found.store,
        full_name=full_name,
        sha256=next((f.found.sha256 for f in group if f.found.sha256), None),
        quantization=header.quantization or names.split_stem(first.found.filename)[1],
        context_length=header.context_length,
        architecture=header.architecture,
        layers=header.block_count,
        embedding_length=header.embedding_length,
        head_count=header.head_count,
        head_count_kv=header.head_count_kv,
        key_length=header.key_length,
        value_length=header.value_length,
        writable=first.found.writable,
        aliases=aliases,
    )
