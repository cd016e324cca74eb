"""The files this node is pulling from its peers right now, with the chunks of each it
holds verified, so that it serves them while it pulls (a swarm, not a star).

Theory of operation. The peer pull (`shoal.models.peer_pull`) registers a file once its
`Partial` is open (`begin`), adds every chunk it has verified and written (`add`), and
takes the file out before it renames it to its real name (`end`; from then on the
catalog lists it as a model). Two readers:

- the node's snapshot lists each file as a `FileAdvert` (SHA-256, size and have-bitmap),
  so peers pulling the same file add this node as a source of those chunks; every
  change asks for a push (`on_change`, rate-limited by `Peers`);
- `shoal.api.share` serves the manifest and the held chunks of a file still being
  pulled, read from its `.incomplete` file: only chunks in `have`, which were checked
  against the manifest before they were written.

Everything here runs on the event loop (the pull reports a chunk after the worker thread
wrote it), so `have` is never read half-updated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shoal.mesh.state import MAX_FILE_BYTES, MAX_FILES, FileAdvert
from shoal.models.manifest import Manifest


@dataclass(frozen=True, slots=True)
class Downloading:
    manifest: Manifest
    path: Path  # the `.incomplete` file the chunks are in
    have: frozenset[int]


class Downloads:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.on_change = on_change
        self._files: dict[str, Downloading] = {}

    def begin(self, manifest: Manifest, path: Path, have: Iterable[int]) -> None:
        self._files[manifest.sha256] = Downloading(manifest, path, frozenset(have))
        self.on_change()

    def add(self, sha256: str, chunks: Iterable[int]) -> None:
        """`chunks` of the file are verified and written."""
        file = self._files.get(sha256)
        added = frozenset(chunks)
        if file is None or added <= file.have:
            return
        self._files[sha256] = Downloading(file.manifest, file.path, file.have | added)
        self.on_change()

    def end(self, sha256: str) -> None:
        if self._files.pop(sha256, None) is not None:
            self.on_change()

    def get(self, sha256: str) -> Downloading | None:
        return self._files.get(sha256)

    def adverts(self) -> tuple[FileAdvert, ...]:
        """What the snapshot says: the first MAX_FILES files with a chunk to give (a file
        over MAX_FILE_BYTES is pulled, not advertised)."""
        adverts = (
            FileAdvert.of(sha, f.manifest.size, f.manifest.chunk_bytes, f.have)
            for sha, f in self._files.items()
            if f.have and f.manifest.size <= MAX_FILE_BYTES
        )
        return tuple(advert for advert, _ in zip(adverts, range(MAX_FILES), strict=False))
