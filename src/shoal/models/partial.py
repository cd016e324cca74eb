"""One file of the store being pulled chunk by chunk: `blobs/<sha256>.incomplete` and its
have-bitmap, until the whole file is checked and renamed to `blobs/<sha256>`.

Theory of operation. `Partial.open` checks the name (64 lowercase hex digits, so the path
cannot leave the blobs folder) and the manifest (one SHA-256 per chunk), checks the disk
has room, preallocates the file at its full size (`posix_fallocate`, else a sparse
`ftruncate`) and loads what an earlier run left: the chunks its bitmap
(`<sha256>.incomplete.have`) names, or, without a bitmap, the whole chunks of a file
written front to back (the Hub pull's). Every kept chunk is hashed again before it is
trusted; one that does not match is simply missing. `write(index, data)` checks the
chunk's hash and size against the manifest and `pwrite`s it in place; every
`sync_every` chunks the file is fsync'd and then the bitmap replaced atomically, so the
bitmap never names a chunk the disk may not hold. `finish()` fsyncs, checks the whole
file's SHA-256, renames it to its real name and fsyncs the folder: nothing partial or
unchecked is ever under a real name.

Every method blocks (hashing, disk writes): the caller runs them in a thread. One
`Partial` per file at a time: the caller holds the blob's lock (as `pull.py` does).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from shoal.errors import ChecksumMismatch, InvalidRequest, NotEnoughSpace, UpstreamFailed
from shoal.models.pull import SPACE_MARGIN_BYTES, _fsync_dir
from shoal.models.pull_refs import SHA256
from shoal.models.swarm import CHUNK_BYTES

SYNC_EVERY_CHUNKS: Final = 64  # 64 MiB: a crash loses at most a second or so of a 1 GbE pull
_MAGIC: Final = b"shoal-have 1"
_READ_BYTES: Final = 1 << 20
_NO_SPACE: Final = (errno.ENOSPC, errno.EDQUOT)


class Partial:
    def __init__(
        self,
        blobs: Path,
        sha256: str,
        size: int,
        chunk_hashes: Sequence[str],
        chunk_bytes: int = CHUNK_BYTES,
        *,
        sync_every: int = SYNC_EVERY_CHUNKS,
    ) -> None:
        """Check the name and the manifest; touches no file (see `open`)."""
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise InvalidRequest(f"not a SHA-256 (64 lowercase hex digits): {sha256!r}")
        if size < 0 or chunk_bytes < 1 or sync_every < 1:
            raise ValueError("need size >= 0, chunk_bytes >= 1 and sync_every >= 1")
        count = -(-size // chunk_bytes)
        if len(chunk_hashes) != count or not all(SHA256.fullmatch(h) for h in chunk_hashes):
            raise UpstreamFailed(
                f"the manifest of {sha256} lists {len(chunk_hashes)} chunk hashes where a "
                f"{size}-byte file has {count} chunks of {chunk_bytes}, or a malformed one",
                code="bad_manifest",
            )
        self.blobs = blobs
        self.sha256 = sha256
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.chunk_hashes = tuple(chunk_hashes)
        self.chunk_count = count
        self.sync_every = sync_every
        self.blob = blobs / sha256
        self.path = blobs / f"{sha256}.incomplete"
        self.have_path = blobs / f"{sha256}.incomplete.have"
        self._have: set[int] = set()
        self._unsynced = 0
        self._fd: int | None = None

    @classmethod
    def open(
        cls,
        blobs: Path,
        sha256: str,
        size: int,
        chunk_hashes: Sequence[str],
        chunk_bytes: int = CHUNK_BYTES,
        *,
        sync_every: int = SYNC_EVERY_CHUNKS,
    ) -> Partial:
        """Create or resume the partial file; kept chunks are re-verified. Blocks."""
        partial = cls(blobs, sha256, size, chunk_hashes, chunk_bytes, sync_every=sync_every)
        partial._open()
        return partial

    # -- the file ----------------------------------------------------------------------

    @property
    def have(self) -> frozenset[int]:
        """Chunks verified and written."""
        return frozenset(self._have)

    def complete(self) -> bool:
        return len(self._have) == self.chunk_count

    def chunk_size(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def write(self, index: int, data: bytes | memoryview, expected: str | None = None) -> bool:
        """Write chunk `index` if its SHA-256 is the manifest's (and `expected`, if given).
        False if it was already written. ChecksumMismatch, writing nothing, if not."""
        fd = self._open_fd()
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"chunk {index} is not in 0..{self.chunk_count - 1}")
        want = self.chunk_hashes[index]
        got = hashlib.sha256(data).hexdigest()
        if len(data) != self.chunk_size(index) or got != want or expected not in (None, want):
            raise ChecksumMismatch(
                f"chunk {index} of {self.sha256} arrived as {len(data)} bytes with SHA-256 "
                f"{got}, not {self.chunk_size(index)} bytes with {want}"
            )
        if index in self._have:
            return False
        offset = index * self.chunk_bytes
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise NotEnoughSpace(f"the store's disk ({self.blobs}) filled up") from None
            raise
        self._have.add(index)
        self._unsynced += 1
        if self._unsynced >= self.sync_every:
            self.sync()
        return True

    def sync(self) -> None:
        """The chunks written so far made durable, then named in the bitmap."""
        os.fsync(self._open_fd())
        self._save_have()
        self._unsynced = 0

    def finish(self) -> Path:
        """Check the whole file, publish it as `blobs/<sha256>` and return that path. On a
        mismatch (the manifest's chunk hashes disagree with its file hash) nothing is kept."""
        fd = self._open_fd()
        if not self.complete():
            raise ValueError(f"{self.sha256}: {self.chunk_count - len(self._have)} chunks missing")
        os.fsync(fd)
        digest = hashlib.sha256()
        for offset in range(0, self.size, _READ_BYTES):
            digest.update(os.pread(fd, min(_READ_BYTES, self.size - offset), offset))
        if digest.hexdigest() != self.sha256:
            self.discard()
            raise ChecksumMismatch(
                f"the chunks of {self.sha256} add up to a file with SHA-256 "
                f"{digest.hexdigest()}: the manifest is wrong; nothing was kept"
            )
        os.replace(self.path, self.blob)
        _fsync_dir(self.blobs)
        self.have_path.unlink(missing_ok=True)
        self.close()
        return self.blob

    def close(self) -> None:
        """Sync what was written (for a resume) and close. Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._unsynced and self.path.exists():
                os.fsync(fd)
                self._save_have()
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the partial file and its bitmap."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
        self.have_path.unlink(missing_ok=True)
        self._have.clear()

    def __enter__(self) -> Partial:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- opening -----------------------------------------------------------------------

    def _open(self) -> None:
        existed = self.path.exists()
        kept: Iterable[int] | None = self._load_have() if existed else None
        self._check_space()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fd = fd
        try:
            old_size = os.fstat(fd).st_size
            if old_size > self.size:
                os.ftruncate(fd, self.size)
                old_size = self.size
            self._preallocate(fd)
            if kept is None and existed:
                # No bitmap: a file written front to back (the Hub pull's); its whole chunks.
                whole = old_size // self.chunk_bytes
                kept = range(self.chunk_count if old_size == self.size else whole)
            self._have = set(self._verified(kept if kept is not None else ()))
            self._save_have()
        except BaseException:
            self.close()
            if not existed:
                self.path.unlink(missing_ok=True)
            raise

    def _check_space(self) -> None:
        allocated = 0
        if self.path.exists():
            allocated = min(self.size, self.path.stat().st_blocks * 512)
        missing = self.size - allocated
        free = shutil.disk_usage(self.blobs).free
        if missing and free < missing + SPACE_MARGIN_BYTES:
            raise NotEnoughSpace(
                f"{self.sha256} needs {missing / 1e6:,.1f} MB more on the store's disk "
                f"({self.blobs}), which has {free / 1e6:,.1f} MB free"
            )

    def _preallocate(self, fd: int) -> None:
        if self.size == 0:
            return
        try:
            os.posix_fallocate(fd, 0, self.size)
            return
        except AttributeError:  # not on this platform
            pass
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise NotEnoughSpace(
                    f"the store's disk ({self.blobs}) cannot hold {self.sha256} "
                    f"({self.size / 1e6:,.1f} MB)"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        os.ftruncate(fd, self.size)  # sparse: space is taken as chunks arrive

    def _verified(self, chunks: Iterable[int]) -> Iterable[int]:
        fd = self._open_fd()
        for index in sorted(set(chunks)):
            if 0 <= index < self.chunk_count:
                data = os.pread(fd, self.chunk_size(index), index * self.chunk_bytes)
                if hashlib.sha256(data).hexdigest() == self.chunk_hashes[index]:
                    yield index

    # -- the bitmap --------------------------------------------------------------------

    def _header(self) -> bytes:
        return b"%s %s %d %d\n" % (_MAGIC, self.sha256.encode(), self.size, self.chunk_bytes)

    def _load_have(self) -> list[int] | None:
        """The chunks the bitmap names; None if there is none or it is for another file."""
        try:
            raw = self.have_path.read_bytes()
        except FileNotFoundError:
            return None
        header = self._header()
        bits = raw[len(header) :]
        if not raw.startswith(header) or len(bits) != -(-self.chunk_count // 8):
            return None
        return [i for i in range(self.chunk_count) if bits[i // 8] >> (i % 8) & 1]

    def _save_have(self) -> None:
        bits = bytearray(-(-self.chunk_count // 8))
        for i in self._have:
            bits[i // 8] |= 1 << (i % 8)
        temporary = self.have_path.with_name(f"{self.have_path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as out:
                out.write(self._header() + bits)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in _NO_SPACE:
                raise NotEnoughSpace(f"the store's disk ({self.blobs}) filled up") from None
            raise
        os.replace(temporary, self.have_path)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"the partial file of {self.sha256} is closed")
        return self._fd
