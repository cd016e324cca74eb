"""`shoal models pull REF`: a GGUF (or one split set) from the Hugging Face Hub into the store.

Theory of operation. A REF (`org/repo:q4_k_m`, `org/repo/file.gguf`, or `org/repo` when
the repo holds one GGUF) is checked before anything is asked of anyone (`parse_ref`).
Then, through `huggingface_hub`'s own calls, honouring HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE as read when the pull starts:

1. resolve: the repo's files at the revision, with sizes and LFS SHA-256s, and the
   commit the revision names (`HfApi.model_info(files_metadata=True)`); the REF picks
   its files from that list (`choose_files`, pure);
2. room: the bytes still missing must fit in the free space of the store's disk;
3. fetch, per file, under huggingface_hub's lock for that blob: the `/resolve` HEAD
   (`get_hf_file_metadata`: the commit, the ETag that is the LFS SHA-256, the size, the
   CDN location), then the bytes with its `http_get` into `blobs/<sha256>.incomplete`,
   resuming with an HTTP Range from whatever an interrupted pull left there, hashing as
   the bytes arrive;
4. verify, then publish: a SHA-256 that is not the Hub's removes the partial file and
   fails; else fsync, rename to `blobs/<sha256>`, fsync the directory, link
   `snapshots/<commit>/<file>` to the blob and record `refs/<revision>`: the layout that
   huggingface_hub, llama.cpp's `-hf` and vLLM read. Nothing is ever under a real name
   before it is whole and checked.

In offline mode no request is made: the REF is looked up in the store, and is an error
unless complete there.

Why not `hf_hub_download` itself: in huggingface_hub 2.4 it writes each download to a
file named for the process (`<sha256>.<random>.incomplete`) and deletes it on failure,
so an interrupted pull starts again from zero (and a killed one leaves its file behind
for good); it checks the size of what it received but not its SHA-256; and it renames
the blob into place before anyone could check it. Its orphans are adopted here (under
its lock, no huggingface_hub download can be writing them).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, cast

from shoal import __version__
from shoal.errors import (  # the pull's own errors are in the one tree, re-exported
    ChecksumMismatch,
    HubOffline,
    InvalidRequest,
    ModelNotFound,
    NotEnoughSpace,
    ShoalError,
    UpstreamFailed,
    UpstreamTimeout,
)
from shoal.models.pull_refs import (
    COMMIT,
    SHA256,
    HubFile,
    HubRef,
    check_revision,
    choose_files,
    valid_filename,
)

# Seconds for the file list; huggingface_hub's own default is no limit at all. Its HEAD
# (HF_HUB_ETAG_TIMEOUT, 10 s) and its reads (HF_HUB_DOWNLOAD_TIMEOUT, 10 s) have theirs.
INFO_TIMEOUT_S = 30.0
# Bytes left free beyond the files: the snapshot link, the refs and lock files need a
# few blocks once the blob is in.
SPACE_MARGIN_BYTES = 1 << 20
_LOCK_POLL_S = 0.5  # how often a pull waiting for another one's lock looks at `cancel`
_READ_BYTES = 1 << 20


class PullCancelled(Exception):
    """The pull's `cancel` event was set; what was downloaded is kept for a resume."""


# -- where: the Hub and the store --------------------------------------------------------


def _is_true(value: str | None) -> bool:  # huggingface_hub.constants._is_true
    return value is not None and value.upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True, slots=True)
class Hub:
    """Where the Hub is and whether to reach it, read from the environment when a pull
    starts (huggingface_hub reads its own copies once, at import). HF_TOKEN is read by
    huggingface_hub itself, at each request."""

    endpoint: str
    offline: bool

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Hub:
        env = os.environ if environ is None else environ
        endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidRequest(f"HF_ENDPOINT must be an http(s) URL, not {endpoint!r}")
        offline = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
        return cls(endpoint, offline)


def repo_folder(store: Path, repo_id: str) -> Path:
    return store / ("models--" + repo_id.replace("/", "--"))


# -- results and progress ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullProgress:
    filename: str
    done: int  # bytes of the file on disk
    total: int
    resumed: int  # bytes it had when this pull started on it
    rate_bps: float  # bytes per second received by this pull
    file_index: int  # 1-based, of file_count (the parts of a split GGUF)
    file_count: int
    stage: Literal["downloading", "verifying"] = "downloading"
    sources: int | None = None  # peers it comes from (a pull from peers); None: the Hub

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate_bps if self.rate_bps > 0 else None


@dataclass(frozen=True, slots=True)
class PulledFile:
    filename: str
    path: Path  # the snapshot path (a link to the blob)
    size_bytes: int
    sha256: str | None
    downloaded_bytes: int  # 0: it was already in the store


@dataclass(frozen=True, slots=True)
class Pulled:
    ref: str
    repo_id: str
    revision: str
    commit: str
    files: tuple[PulledFile, ...]
    seconds: float

    @property
    def downloaded_bytes(self) -> int:
        return sum(f.downloaded_bytes for f in self.files)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.ref,
            "repo": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.files[0].path),  # a split GGUF loads from its first part
            "size_bytes": self.size_bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
            "files": [
                {
                    "name": f"{self.repo_id}/{f.filename}",
                    "path": str(f.path),
                    "size_bytes": f.size_bytes,
                    "sha256": f.sha256,
                    "downloaded_bytes": f.downloaded_bytes,
                }
                for f in self.files
            ],
        }


Progress = Callable[[PullProgress], None]


# -- the pull ----------------------------------------------------------------------------


def pull(
    ref: HubRef,
    *,
    store: Path,
    revision: str | None = None,
    hub: Hub | None = None,
    on_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Pulled:
    """Pull `ref` into `store` (blocking: run it in a thread from async code)."""
    hub = hub or Hub.from_environ()
    revision = check_revision(revision)
    started = time.monotonic()
    job = _Job(ref, store, revision, hub, on_progress or (lambda p: None), cancel)
    with _translated(hub, ref, revision):
        if hub.offline:
            commit, pulled = job.from_store()
        else:
            commit, files = job.resolve()
            pulled = job.fetch(commit, choose_files(ref, files))
            job.record_ref(commit)
    return Pulled(str(ref), ref.repo_id, revision, commit, pulled, time.monotonic() - started)


class _Job:
    def __init__(
        self,
        ref: HubRef,
        store: Path,
        revision: str,
        hub: Hub,
        on_progress: Progress,
        cancel: threading.Event | None,
    ) -> None:
        self.ref = ref
        self.revision = revision
        self.hub = hub
        self.on_progress = on_progress
        self.cancel = cancel or threading.Event()
        self.folder = repo_folder(store, ref.repo_id)
        self.blobs = self.folder / "blobs"
        self.locks = store / ".locks" / self.folder.name  # huggingface_hub's lock files

    def resolve(self) -> tuple[str, list[HubFile]]:
        """The commit the revision names, and the repo's files there."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.hub.endpoint, library_name="shoal", library_version=__version__)
        info = api.model_info(
            self.ref.repo_id, revision=self.revision, files_metadata=True, timeout=INFO_TIMEOUT_S
        )
        commit = info.sha or ""
        if not COMMIT.fullmatch(commit):
            raise UpstreamFailed(f"the Hub gave no commit for {self.ref.repo_id}@{self.revision}")
        files = []
        for s in info.siblings or ():
            sha256 = s.lfs.sha256 if s.lfs is not None else None
            size = s.lfs.size if s.lfs is not None else s.size
            # A name or hash from the Hub becomes a path here: only well-formed ones.
            if not valid_filename(s.rfilename) or not isinstance(size, int) or size < 0:
                continue
            if sha256 is not None and not SHA256.fullmatch(sha256):
                continue
            if sha256 is None and not (s.blob_id and COMMIT.fullmatch(s.blob_id)):
                continue
            files.append(HubFile(s.rfilename, size, sha256, s.blob_id))
        return commit, files

    def fetch(self, commit: str, files: tuple[HubFile, ...]) -> tuple[PulledFile, ...]:
        snapshot = self.folder / "snapshots" / commit
        for f in files:  # every folder first: a full disk fails here, not after a download
            (snapshot / f.filename).parent.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self._check_space(files)
        pulled = []
        for index, f in enumerate(files, 1):
            with self._locked(f):
                downloaded = self._fetch_one(commit, f, index, len(files))
                _link(snapshot / f.filename, self.blobs / f.etag)
            pulled.append(
                PulledFile(f.filename, snapshot / f.filename, f.size, f.sha256, downloaded)
            )
        return tuple(pulled)

    def _partial(self, f: HubFile) -> Path:
        return self.blobs / f"{f.etag}.incomplete"

    def _check_space(self, files: Sequence[HubFile]) -> None:
        missing = 0
        for f in files:
            if not (self.blobs / f.etag).exists():
                partial = self._partial(f)
                missing += max(0, f.size - (partial.stat().st_size if partial.exists() else 0))
        free = shutil.disk_usage(self.blobs).free
        if missing and free < missing + SPACE_MARGIN_BYTES:
            raise NotEnoughSpace(
                f"{self.ref} needs {_mb(missing)} more on the store's disk ({self.blobs}), "
                f"which has {_mb(free)} free"
            )

    @contextmanager
    def _locked(self, f: HubFile) -> Iterator[None]:
        """huggingface_hub's lock on this blob, as `hf_hub_download` takes it: no two
        pulls (ours or its) write one blob at once."""
        from filelock import Timeout
        from huggingface_hub.utils import WeakFileLock  # type: ignore[attr-defined]

        with ExitStack() as stack:
            while True:
                try:
                    stack.enter_context(
                        WeakFileLock(self.locks / f"{f.etag}.lock", timeout=_LOCK_POLL_S)
                    )
                    break
                except Timeout:
                    if self.cancel.is_set():
                        raise PullCancelled(str(self.ref)) from None
            yield

    def _fetch_one(self, commit: str, f: HubFile, index: int, count: int) -> int:
        """Download `f` into its blob unless it is there; the bytes downloaded."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        blob, partial = self.blobs / f.etag, self._partial(f)
        if blob.exists():
            return 0
        url = hf_hub_url(self.ref.repo_id, f.filename, revision=commit, endpoint=self.hub.endpoint)
        meta = get_hf_file_metadata(
            url, endpoint=self.hub.endpoint, library_name="shoal", library_version=__version__
        )
        etag = (meta.etag or "").lower()
        if meta.commit_hash != commit or etag != f.etag or meta.size != f.size:
            raise UpstreamFailed(
                f"the Hub's file list and its {f.filename} disagree (commit {meta.commit_hash}, "
                f"ETag {meta.etag}, size {meta.size}); try again later"
            )
        have = self._adopt_partial(f)
        headers = build_hf_headers(library_name="shoal", library_version=__version__)
        headers["Accept-Encoding"] = "identity"  # a Range into an encoded body means nothing
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
        meter = _Meter(f, index, count, self.on_progress, self.cancel)
        meter.report(have, have)
        try:
            with partial.open("ab") as raw:
                sink = _HashingFile(raw, _digest_of(f, partial, have))
                http_get(
                    meta.location,
                    cast(BinaryIO, sink),
                    resume_size=have,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=f.filename,
                    tqdm_class=cast(Any, meter.bar),
                )
                raw.flush()
                os.fsync(raw.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.unlink(missing_ok=True)  # leave the disk as it was, not full
            elif partial.exists() and partial.stat().st_size > f.size:
                partial.unlink()  # longer than the file: nothing in it to resume from
            raise
        self.on_progress(meter.progress(f.size, "verifying"))
        got = sink.hexdigest() if not sink.rewound else _hash_file(f, partial)
        if got != f.etag:
            partial.unlink(missing_ok=True)
            kind = "SHA-256" if f.sha256 is not None else "git object ID"
            raise ChecksumMismatch(
                f"{self.ref.repo_id}/{f.filename} arrived with {kind} {got}, not the Hub's "
                f"{f.etag}; nothing was kept, pull again"
            )
        os.replace(partial, blob)
        _fsync_dir(self.blobs)
        return f.size - have

    def _adopt_partial(self, f: HubFile) -> int:
        """The bytes of `f` already on disk: our partial file, or the biggest one a killed
        `hf_hub_download` left (`<etag>.<random>.incomplete`, only ever written under the
        lock we hold), which becomes ours; the others are removed."""
        partial = self._partial(f)
        orphans = sorted(
            (p for p in self.blobs.glob(f"{f.etag}.*.incomplete") if p != partial),
            key=lambda p: p.stat().st_size,
        )
        if orphans and (
            not partial.exists() or partial.stat().st_size < orphans[-1].stat().st_size
        ):
            os.replace(orphans.pop(), partial)
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if have > f.size:
            partial.unlink()
            return 0
        return have

    def record_ref(self, commit: str) -> None:
        if self.revision == commit:
            return
        ref = self.folder / "refs" / self.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        if ref.exists() and ref.read_text() == commit:
            return
        temporary = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        temporary.write_text(commit)  # no newline, as huggingface_hub writes it
        os.replace(temporary, ref)

    def from_store(self) -> tuple[str, tuple[PulledFile, ...]]:
        """Offline: the REF as the store already holds it, complete, or HubOffline."""
        if COMMIT.fullmatch(self.revision):
            commit = self.revision
        else:
            ref = self.folder / "refs" / self.revision
            commit = ref.read_text().strip() if ref.is_file() else ""
        snapshot = self.folder / "snapshots" / commit
        files = []
        if COMMIT.fullmatch(commit) and snapshot.is_dir():
            for path in sorted(snapshot.rglob("*")):
                name = path.relative_to(snapshot).as_posix()
                if path.is_file() and valid_filename(name):  # is_file: the blob is there
                    blob = path.resolve().name
                    sha256 = blob if SHA256.fullmatch(blob) else None
                    files.append(HubFile(name, path.stat().st_size, sha256, blob))
        try:
            chosen = choose_files(self.ref, files)
        except ModelNotFound as exc:
            raise HubOffline(
                f"HF_HUB_OFFLINE is set and the store ({self.folder.parent}) does not hold "
                f"{self.ref} at {self.revision}"
                + (f" ({exc.message})" if files else "")
                + "; unset HF_HUB_OFFLINE to download it"
            ) from None
        pulled = tuple(
            PulledFile(f.filename, snapshot / f.filename, f.size, f.sha256, 0) for f in chosen
        )
        return commit, pulled


# -- pieces ------------------------------------------------------------------------------


class _Meter:
    """The progress bar huggingface_hub's `http_get` drives (its `tqdm_class`, which may be
    any callable), as `PullProgress` values; also where a cancelled pull stops."""

    def __init__(
        self,
        f: HubFile,
        index: int,
        count: int,
        on_progress: Progress,
        cancel: threading.Event,
    ) -> None:
        self.f, self.index, self.count = f, index, count
        self.on_progress, self.cancel = on_progress, cancel
        self.done = self.resumed = 0
        self.started = time.monotonic()

    def bar(self, *, initial: int = 0, **_: object) -> _Meter:
        self.done = self.resumed = initial  # a rewind (Range ignored) comes as update(-n)
        self.started = time.monotonic()
        return self

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        self.done += n
        if self.cancel.is_set():
            raise PullCancelled(self.f.filename)
        self.report(self.done, self.resumed)

    def report(self, done: int, resumed: int) -> None:
        self.done, self.resumed = done, resumed
        self.on_progress(self.progress(done, "downloading"))

    def progress(self, done: int, stage: Literal["downloading", "verifying"]) -> PullProgress:
        elapsed = time.monotonic() - self.started
        rate = (done - self.resumed) / elapsed if elapsed > 0 else 0.0
        return PullProgress(
            self.f.filename, done, self.f.size, self.resumed, max(rate, 0.0),
            self.index, self.count, stage,
        )  # fmt: skip


class _HashingFile:
    """The partial file as `http_get` writes it, hashed as the bytes go in. A rewind (a
    server that ignored the Range and sent the file from its start) means hashing the
    file again at the end instead."""

    def __init__(self, raw: IO[bytes], digest: Any) -> None:
        self._raw = raw
        self._digest = digest
        self.rewound = False

    def write(self, data: bytes) -> int:
        written = self._raw.write(data)
        self._digest.update(data)
        return written

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.rewound = True
        return self._raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self.rewound = True
        return self._raw.truncate(size)

    def hexdigest(self) -> str:
        return str(self._digest.hexdigest())


def _new_digest(f: HubFile) -> Any:
    if f.sha256 is not None:
        return hashlib.sha256()
    digest = hashlib.sha1(usedforsecurity=False)  # git's object ID, for a file not in LFS
    digest.update(b"blob %d\0" % f.size)
    return digest


def _digest_of(f: HubFile, partial: Path, have: int) -> Any:
    """A digest fed with the `have` bytes an earlier pull left in `partial`."""
    digest = _new_digest(f)
    if have:
        with partial.open("rb") as kept:
            while piece := kept.read(min(_READ_BYTES, have)):
                digest.update(piece)
                have -= len(piece)
    return digest


def _hash_file(f: HubFile, path: Path) -> str:
    return str(_digest_of(f, path, path.stat().st_size).hexdigest())


def _link(pointer: Path, blob: Path) -> None:
    """`snapshots/<commit>/<file>` -> `../../blobs/<etag>`, relative as huggingface_hub makes it."""
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    temporary = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, pointer)
    _fsync_dir(pointer.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


@contextmanager
def _translated(hub: Hub, ref: HubRef, revision: str) -> Iterator[None]:
    """huggingface_hub's and the disk's errors in Shoal's terms, in this one place."""
    import httpx2
    from huggingface_hub import errors as hf

    where = f"the Hub at {hub.endpoint}"
    try:
        yield
    except (ShoalError, PullCancelled):
        raise
    except hf.GatedRepoError:
        raise ModelNotFound(
            f"{ref.repo_id} is gated on {where}: accept its terms there and set HF_TOKEN"
        ) from None
    except hf.RepositoryNotFoundError:
        raise ModelNotFound(
            f"{where} has no repo {ref.repo_id} (or it is private: set HF_TOKEN)"
        ) from None
    except hf.RevisionNotFoundError:
        raise ModelNotFound(f"{ref.repo_id} has no revision {revision!r}") from None
    except hf.RemoteEntryNotFoundError:
        raise ModelNotFound(f"{ref} is not on {where} (any more)") from None
    except hf.OfflineModeIsEnabled:
        raise HubOffline("huggingface_hub is in offline mode (HF_HUB_OFFLINE)") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise UpstreamFailed(f"{where} answered {status} for {ref}") from None
    except hf.FileMetadataError as exc:
        raise UpstreamFailed(f"{where} does not answer as a Hub does: {exc}") from None
    except httpx2.TimeoutException:
        raise UpstreamTimeout(f"{where} stopped answering while pulling {ref}") from None
    except httpx2.TransportError as exc:
        raise UpstreamFailed(f"cannot reach {where}: {exc}", code="hub_unreachable") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NotEnoughSpace(
                f"the store's disk filled up while pulling {ref}; nothing partial was kept"
            ) from None
        if "Consistency check failed" in str(exc):  # http_get: fewer bytes than the size
            raise UpstreamFailed(
                f"the download of {ref} ended early; pull again to resume", code="incomplete"
            ) from None
        raise
