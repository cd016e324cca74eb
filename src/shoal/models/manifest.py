"""Manifests of model files: size, whole-file SHA-256 and the SHA-256 of every 1 MiB
chunk, what a peer needs to fetch a file in verified pieces (DESIGN §6).

The pure part (chunk arithmetic, `Range` validation, the cache key, the manifest's
JSON form) takes values and returns values. The I/O part is two things: `compute`,
which reads a file once and hashes it (blocking: call it in a thread), and
`ManifestCache`, a small JSON file in the node's data dir that remembers each file's
manifest under (path, size, mtime_ns, inode), so a file is hashed again only when one
of those changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bytes per chunk: the unit a peer requests and verifies (the reference's 1 MB).
CHUNK_BYTES = 1 << 20
#: Chunks one range request may ask for: 16 MiB is long enough for sendfile to reach
#: the link's speed and short enough that a slow source holds little of a download.
MAX_CHUNKS_PER_REQUEST = 16
#: The cache file, in the node's data dir.
CACHE_FILE = "manifests.json"
_CACHE_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")

#: What a manifest is cached under: real path, size, mtime in ns, inode.
CacheKey = tuple[str, int, int, int]


class ManifestError(ValueError):
    """A manifest (from the cache or a peer) that does not describe a file."""


class RangeError(ValueError):
    """A `Range` this node does not serve: not whole chunks, too many, or past the end."""


def is_sha256(text: object) -> bool:
    """64 lowercase hex digits: how every file ID is spelt, on the wire and on disk."""
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


def chunk_count(size: int) -> int:
    """Chunks of a file of `size` bytes (the last one shorter, an empty file none)."""
    if size < 0:
        raise ValueError("a size is never negative")
    return -(-size // CHUNK_BYTES)


def chunk_span(index: int, size: int) -> tuple[int, int]:
    """The bytes [start, end) of chunk `index` of a file of `size` bytes."""
    if not 0 <= index < chunk_count(size):
        raise IndexError(f"chunk {index} of a {size}-byte file")
    start = index * CHUNK_BYTES
    return start, min(start + CHUNK_BYTES, size)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes [start, end) of a file: whole chunks `first_chunk` .. `first_chunk + chunks`."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def first_chunk(self) -> int:
        return self.start // CHUNK_BYTES

    @property
    def chunks(self) -> int:
        return chunk_count(self.length)


def parse_range(header: str | None, size: int) -> ByteRange:
    """The one `Range: bytes=a-b` (inclusive, RFC 9110) this node serves of a file of
    `size` bytes: starting on a chunk boundary, ending at a chunk's end or the file's,
    at most MAX_CHUNKS_PER_REQUEST chunks. Anything else raises RangeError: suffix and
    open ranges, several ranges, a range past the end."""
    if header is None:
        raise RangeError("a Range of whole chunks is required")
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        raise RangeError("the Range must be one 'bytes=first-last' of whole chunks")
    first, last = int(match[1]), int(match[2])
    if first > last:
        raise RangeError("the Range ends before it starts")
    if last >= size:
        raise RangeError(f"the Range goes past the end of the file ({size} bytes)")
    end = last + 1
    if first % CHUNK_BYTES or (end % CHUNK_BYTES and end != size):
        raise RangeError(f"the Range must start and end on {CHUNK_BYTES}-byte chunk boundaries")
    byte_range = ByteRange(first, end)
    if byte_range.chunks > MAX_CHUNKS_PER_REQUEST:
        raise RangeError(f"at most {MAX_CHUNKS_PER_REQUEST} chunks per request")
    return byte_range


@dataclass(frozen=True, slots=True)
class Manifest:
    sha256: str  # the whole file's
    size: int
    chunks: tuple[str, ...]  # SHA-256 of each CHUNK_BYTES chunk, in order
    chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self) -> None:
        if not is_sha256(self.sha256):
            raise ManifestError("sha256 must be 64 lowercase hex digits")
        if self.chunk_bytes != CHUNK_BYTES:
            raise ManifestError(f"chunk_bytes must be {CHUNK_BYTES}")
        if len(self.chunks) != chunk_count(self.size):
            raise ManifestError(f"a {self.size}-byte file has {chunk_count(self.size)} chunks")
        if not all(is_sha256(chunk) for chunk in self.chunks):
            raise ManifestError("every chunk hash must be 64 lowercase hex digits")

    def wire(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "chunk_bytes": self.chunk_bytes,
            "chunks": list(self.chunks),
        }

    @classmethod
    def from_wire(cls, document: object, *, max_size: int = 1 << 50) -> Manifest:
        """A manifest from its JSON form, every field checked (a peer's or the cache's)."""
        if not isinstance(document, dict) or document.keys() != _WIRE_KEYS:
            raise ManifestError(f"a manifest is an object of exactly {sorted(_WIRE_KEYS)}")
        size, chunk_bytes, chunks = document["size"], document["chunk_bytes"], document["chunks"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= max_size:
            raise ManifestError(f"size must be an integer in [0, {max_size}]")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
            raise ManifestError("chunk_bytes must be an integer")
        if not isinstance(chunks, list):
            raise ManifestError("chunks must be a list")
        return cls(document["sha256"], size, tuple(chunks), chunk_bytes)


_WIRE_KEYS = frozenset({"sha256", "size", "chunk_bytes", "chunks"})


def cache_key(path: Path, status: os.stat_result) -> CacheKey:
    return (str(path), status.st_size, status.st_mtime_ns, status.st_ino)


# -- I/O ---------------------------------------------------------------------------------


def compute(path: Path) -> tuple[Manifest, CacheKey]:
    """Hash the file at `path` (blocking: a thread's call) and the key it was read under.

    The whole-file hash runs here and the chunks' hashes in a second thread, at once
    (hashlib lets go of the GIL for buffers this large): on two cores a manifest costs
    about what the whole-file hash alone does. Raises OSError if the file cannot be
    read, or changes while it is read (its key before and after differ)."""
    whole = hashlib.sha256()
    pending: deque[Future[str]] = deque()
    chunks: list[str] = []
    with ThreadPoolExecutor(1, "shoal-chunk-hash") as hasher, path.open("rb", buffering=0) as file:
        before = cache_key(path, os.fstat(file.fileno()))
        while True:
            buffer = bytearray(CHUNK_BYTES)  # its own: the other thread still reads the last
            read = _fill(file, memoryview(buffer))
            if not read:
                break
            data = memoryview(buffer)[:read]
            pending.append(hasher.submit(_hex_sha256, data))
            whole.update(data)
            while len(pending) > _CHUNKS_AHEAD or (pending and pending[0].done()):
                chunks.append(pending.popleft().result())
            if read < CHUNK_BYTES:
                break
        chunks.extend(future.result() for future in pending)
        after = cache_key(path, os.stat(path))
    if after != before:
        raise OSError(f"{path} changed while it was hashed")
    return Manifest(whole.hexdigest(), before[1], tuple(chunks)), before


# Chunks read ahead of the chunk hasher at most: memory stays a few MiB.
_CHUNKS_AHEAD = 4


def _hex_sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> tuple[str, CacheKey]:
    """Only the whole file's SHA-256 (half the work of `compute`), and its key."""
    whole = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        before = cache_key(path, os.fstat(file.fileno()))
        while read := _fill(file, view):
            whole.update(view[:read])
            if read < CHUNK_BYTES:
                break
        after = cache_key(path, os.stat(path))
    if after != before:
        raise OSError(f"{path} changed while it was hashed")
    return whole.hexdigest(), before


def _fill(file: Any, view: memoryview) -> int:
    """Read until `view` is full or the file ends (a raw read may return less)."""
    total = 0
    while total < len(view):
        read = file.readinto(view[total:])
        if not read:
            break
        total += read
    return total


class ManifestCache:
    """Manifests by real path, each valid while its file's key is unchanged.

    Thread-safe; every call is blocking (file I/O): call it from a thread. The file is
    written whole (a temporary file, fsync, rename) at mode 0600, so a crash leaves the
    old cache or the new one; a cache that cannot be read is started afresh.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[CacheKey, Manifest]] | None = None
        self.computed = 0  # manifests hashed by `manifest` (for tests and statistics)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> ManifestCache:
        return cls(data_dir / CACHE_FILE)

    def cached(self, path: Path) -> Manifest | None:
        """The manifest of the file at `path` if the cache has it under its current key."""
        try:
            key = cache_key(path, os.stat(path))
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(str(path))
        return entry[1] if entry is not None and entry[0] == key else None

    def manifest(self, path: Path) -> Manifest:
        """The file's manifest: the cached one if its key is current, else computed now
        (and cached). Raises OSError if the file cannot be read."""
        found = self.cached(path)
        if found is not None:
            return found
        manifest, key = compute(path)
        self.computed += 1
        self.put(key, manifest)
        return manifest

    def put(self, key: CacheKey, manifest: Manifest) -> None:
        with self._lock:
            entries = self._load()
            entries[key[0]] = (key, manifest)
            self._save(entries)

    def forget_missing(self, keep: set[str]) -> None:
        """Drop the entries of paths not in `keep` (files no longer catalogued)."""
        with self._lock:
            entries = self._load()
            gone = [path for path in entries if path not in keep]
            for path in gone:
                del entries[path]
            if gone:
                self._save(entries)

    def _load(self) -> dict[str, tuple[CacheKey, Manifest]]:
        if self._entries is None:
            try:
                self._entries = _decode(json.loads(self.path.read_bytes()))
            except FileNotFoundError:
                self._entries = {}
            except (OSError, ValueError) as exc:  # JSONDecodeError, ManifestError
                log.warning("starting a new manifest cache: %s is unreadable (%s)", self.path, exc)
                self._entries = {}
        return self._entries

    def _save(self, entries: Mapping[str, tuple[CacheKey, Manifest]]) -> None:
        document = {
            "v": _CACHE_VERSION,
            "files": {
                path: {"size": k[1], "mtime_ns": k[2], "inode": k[3], "manifest": m.wire()}
                for path, (k, m) in entries.items()
            },
        }
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        descriptor = os.open(temporary, flags, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(json.dumps(document, separators=(",", ":")).encode())
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)  # O_CREAT's mode does not apply to an old file
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def _decode(document: object) -> dict[str, tuple[CacheKey, Manifest]]:
    if not isinstance(document, dict) or document.get("v") != _CACHE_VERSION:
        raise ManifestError(f"not a version {_CACHE_VERSION} manifest cache")
    files = document.get("files")
    if not isinstance(files, dict):
        raise ManifestError("files must be an object")
    entries: dict[str, tuple[CacheKey, Manifest]] = {}
    for path, entry in files.items():
        if not isinstance(entry, dict):
            raise ManifestError("an entry is an object")
        size, mtime_ns, inode = (_integer(entry, name) for name in ("size", "mtime_ns", "inode"))
        manifest = Manifest.from_wire(entry.get("manifest"))
        if manifest.size != size:
            raise ManifestError("an entry's size is not its manifest's")
        entries[path] = ((path, size, mtime_ns, inode), manifest)
    return entries


def _integer(entry: dict[str, Any], name: str) -> int:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{name} must be an integer")
    return value
