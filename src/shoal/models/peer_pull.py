"""Pulling one model file from the paired peers that hold it: the I/O around `Swarm`.

Theory of operation. `find_offer` (pure) picks, from the peers' snapshots, the file a
name means: a model advertised under that name or alias with a SHA-256, and every
peer advertising that SHA-256. `pull_from_peers` then, under huggingface_hub's lock for
the blob (so a Hub pull and this one never write one blob at once):

1. asks the sources in turn for the file's manifest and keeps the first that names the
   SHA-256 asked for and fits (`Manifest.from_wire`: chunk count, hash syntax);
2. opens a `Partial` (`blobs/<sha256>.incomplete` and its have-bitmap: a resume keeps
   what an earlier pull verified) and a `Swarm` told what it already has, and registers
   the file in `Downloads`: this node serves the chunks it has to peers pulling the
   same file, and its snapshot says which (`FileAdvert`);
3. loops: `next_requests` → one task per request, a Range GET over the peer's mTLS
   link with its own timeout; each answer goes to the writer thread, which checks every
   chunk against the manifest as it writes it (`Partial.write`: a bad one writes
   nothing), and the verdicts go back to the swarm (`delivered` / `failed`), whose
   `Delivery.cancel` aborts duplicates answered elsewhere and a dropped source's rest.
   Every REFRESH_S the `directory` (the peers' latest snapshots) is read again: peers
   that began holding the file are added as sources, those still pulling it report
   the chunks they gained (`Swarm.have`), and those gone are removed;
4. when every chunk is in, `finish()` (fsync, whole-file SHA-256, rename, fsync the
   folder), then the snapshot link the catalog finds (`layout`).

A swarm with nothing left to ask fails with `PeerPullFailed` (the caller falls back to
the Hub) when no live source is left, or when the only ones left are peers still
pulling the file themselves and none gained a chunk this pull lacks for
STALL_TIMEOUT_S. Everything blocking (the lock, hashing, writes) runs in one worker
thread, in order: `Partial` is not thread-safe.

Layout. A file a peer names `org/repo/path/file.gguf` (a Hub file: its alias) goes where
the Hub pull would put it: `models--org--repo/blobs/<sha256>`, linked from
`snapshots/shoal-peer/<path/file.gguf>` (the commit is not known; a later Hub pull of
the same file finds the blob and only adds its own snapshot link). Any other file goes
to `models--shoal--peers/blobs/<sha256>`, linked from `snapshots/<sha256>/<name>.gguf`,
named after the peer's model name, so the catalog names it as the peer does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from filelock import BaseFileLock, FileLock, Timeout

from shoal.backends.http import PROBE_ERRORS
from shoal.errors import ChecksumMismatch, ShoalError, UpstreamFailed
from shoal.mesh.state import ModelAdvert, NodeState
from shoal.models.downloads import Downloads
from shoal.models.manifest import Manifest, ManifestError
from shoal.models.partial import Partial
from shoal.models.pull import Pulled, PulledFile, PullProgress, _link, repo_folder
from shoal.models.pull_refs import quant_of, valid_filename
from shoal.models.swarm import Delivery, Request, Swarm, Tuning

log = logging.getLogger(__name__)

#: Seconds for one manifest: a peer hashes a file it has not served yet before it
#: answers (about a second per 2 GB).
MANIFEST_TIMEOUT_S: Final = 120.0
#: Seconds for one request of up to 16 MiB: 16 MiB at 10 Mbit/s is 13 s; a source
#: slower than that is better dropped.
REQUEST_TIMEOUT_S: Final = 30.0
PROGRESS_INTERVAL_S: Final = 0.25
#: Seconds between two readings of the peers' snapshots for new sources and chunks
#: (a peer pushes its snapshot at most every `mesh.push_min_interval_s`).
REFRESH_S: Final = 0.5
#: Seconds a pull waits, with nothing to ask, for peers still pulling to gain a chunk.
STALL_TIMEOUT_S: Final = 30.0
PEER_SNAPSHOT: Final = "shoal-peer"  # snapshots/<this>/ for a Hub file from a peer
PEERS_REPO: Final = "shoal/peers"  # the repo of files with no known Hub repo
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # one part of a split GGUF: the Hub's
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_LOCK_POLL_S: Final = 0.5
_T = TypeVar("_T")
_FETCH_ERRORS: tuple[type[BaseException], ...] = (*PROBE_ERRORS, ShoalError, OSError)
_MANIFEST_ERRORS: tuple[type[BaseException], ...] = (*PROBE_ERRORS, ManifestError, ShoalError)


class PeerPullFailed(UpstreamFailed):
    """No peer could give the whole file: the caller may try the Hub."""

    code = "peers_failed"


class FileSource(Protocol):
    """What the pull asks of one peer (implemented by `PeerLink`)."""

    async def file_manifest(self, sha256: str, timeout_s: float) -> object: ...

    async def file_range(
        self, sha256: str, first: int, last: int, timeout_s: float
    ) -> bytes | bytearray: ...


@dataclass(frozen=True, slots=True)
class Holding:
    """A peer with a file: all of it (`chunks` None) or, still pulling it, those chunks."""

    source: FileSource
    chunks: frozenset[int] | None = None


Directory = Callable[[], Mapping[str, Holding]]


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """A file the paired peers hold, for a name asked for."""

    name: str  # as asked
    sha256: str
    model: ModelAdvert  # one peer's advert of it
    peers: tuple[str, ...]  # ids of every peer advertising the SHA-256


def find_offer(states: Iterable[NodeState], name: str) -> PeerOffer | None:
    """The file peers advertise under `name` (any of its names, case aside; or, for an
    `org/repo:quant` REF, a Hub file of that repo and quantization), with every peer
    holding the same SHA-256; None if no peer has it with a known hash."""
    states = list(states)
    for state in states:
        for model in state.models:
            if model.sha256 and _means(model, name):
                sha = model.sha256
                holders = tuple(s.node_id for s in states if any(m.sha256 == sha for m in s.models))
                return PeerOffer(name, sha, model, holders)
    return None


def holders(
    states: Iterable[NodeState], sha256: str, link: Callable[[str], FileSource]
) -> dict[str, Holding]:
    """The peers holding the file `sha256`: those advertising it as a model (all of it),
    and those pulling it, with the chunks their snapshot says they hold."""
    found: dict[str, Holding] = {}
    for state in states:
        chunks: frozenset[int] | None = None
        if not any(m.sha256 == sha256 for m in state.models):
            file = next((f for f in state.files if f.sha256 == sha256), None)
            if file is None:
                continue
            chunks = file.chunks()
        try:
            found[state.node_id] = Holding(link(state.node_id), chunks)
        except KeyError:
            continue  # no longer in the table
    return found


def _means(model: ModelAdvert, name: str) -> bool:
    wanted = name.lower()
    names = (model.id, *model.aliases)
    if any(n.lower() == wanted for n in names):
        return True
    repo, colon, quant = wanted.partition(":")
    if not colon or repo.count("/") != 1:
        return False
    for alias in names:
        folder, _, filename = alias.lower().partition(repo + "/")
        if folder or not filename.endswith(".gguf") or _SPLIT_PART.search(filename):
            continue
        if (quant_of(filename) or "").lower() == quant:
            return True
    return False


def layout(store: Path, offer: PeerOffer) -> tuple[str, Path, Path]:
    """(repo_id, blobs folder, snapshot path) for the file: see the module's docstring."""
    for alias in (offer.model.id, *offer.model.aliases):
        parts = alias.split("/")
        relative = "/".join(parts[2:])
        if (
            len(parts) >= 3
            and all(_REPO_PART.fullmatch(p) for p in parts[:2])
            and relative.lower().endswith(".gguf")
            and valid_filename(relative)
        ):
            repo_id = "/".join(parts[:2])
            folder = repo_folder(store, repo_id)
            return repo_id, folder / "blobs", folder / "snapshots" / PEER_SNAPSHOT / relative
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", offer.model.id.replace(":", "-")).strip("-.")
    folder = repo_folder(store, PEERS_REPO)
    filename = f"{stem or 'model'}.gguf"
    return PEERS_REPO, folder / "blobs", folder / "snapshots" / offer.sha256 / filename


@dataclass(frozen=True, slots=True)
class PeerPullStatistics:
    fetched_bytes: int  # received and accepted by this pull
    resumed_chunks: int  # verified from an earlier pull's partial file
    seconds: float
    by_source: Mapping[str, int]  # chunks accepted from each source
    dropped: tuple[str, ...]
    bad_chunks: int


Progress = Callable[[PullProgress], None]


async def pull_from_peers(
    offer: PeerOffer,
    store: Path,
    sources: Mapping[str, FileSource],
    *,
    directory: Directory | None = None,
    downloads: Downloads | None = None,
    on_progress: Progress | None = None,
    tuning: Tuning | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    statistics: Callable[[PeerPullStatistics], None] | None = None,
) -> Pulled:
    """Pull `offer` from `sources` (peers holding all of it) and whatever `directory`
    names as it changes, into `store`, and link it where the catalog looks. The chunks
    verified meanwhile are served to peers through `downloads`."""
    started = time.monotonic()
    repo_id, blobs, pointer = layout(store, offer)
    locks = store / ".locks" / repo_folder(store, repo_id).name
    worker = ThreadPoolExecutor(1, "shoal-peer-pull")
    try:
        run = _Worker(worker)
        await run(_prepare, blobs, locks, pointer)
        lock = FileLock(locks / f"{offer.sha256}.lock", thread_local=False)
        while not await run(_acquired, lock):
            pass  # another pull of this file (ours or huggingface_hub's): wait for it
        try:
            blob = blobs / offer.sha256
            fetched = 0
            if not await run(blob.exists):
                everyone = _Everyone(sources, directory)
                stats = await _fetch(
                    offer, blobs, everyone, downloads or Downloads(), run, on_progress,
                    tuning or Tuning(), request_timeout_s,
                )  # fmt: skip
                fetched = stats.fetched_bytes
                if statistics is not None:
                    statistics(stats)
            size = (await run(blob.stat)).st_size
            await run(_link, pointer, blob)
        finally:
            await run(lock.release)
    finally:
        # Not waited for: a cancelled pull must not block the loop on a write in progress.
        worker.shutdown(wait=False)
    snapshot = pointer.parent
    while snapshot.parent.name != "snapshots":
        snapshot = snapshot.parent
    filename = pointer.relative_to(snapshot).as_posix()
    return Pulled(
        offer.name,
        repo_id,
        "peers",
        snapshot.name,
        (PulledFile(filename, pointer, size, offer.sha256, fetched),),
        time.monotonic() - started,
    )


def _prepare(blobs: Path, locks: Path, pointer: Path) -> None:
    for folder in (blobs, locks, pointer.parent):
        folder.mkdir(parents=True, exist_ok=True)


def _acquired(lock: BaseFileLock) -> bool:
    """huggingface_hub's lock on the blob (see `pull._Job._locked`), held by the worker
    thread for the whole pull; False after a short wait, so a cancelled pull is free."""
    try:
        lock.acquire(timeout=_LOCK_POLL_S)
    except Timeout:
        return False
    return True


class _Worker:
    """The one thread every blocking step of a pull runs on, in order."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()

    async def __call__(self, function: Callable[..., _T], *args: Any) -> _T:
        return await self._loop.run_in_executor(self._pool, function, *args)


class _Everyone:
    """The sources of one pull: those given at the start, and the directory's."""

    def __init__(self, sources: Mapping[str, FileSource], directory: Directory | None) -> None:
        self._sources = {peer_id: Holding(source) for peer_id, source in sources.items()}
        self._directory = directory
        self.changing = directory is not None

    def now(self) -> dict[str, Holding]:
        if self._directory is None:
            return dict(self._sources)
        return {**self._sources, **self._directory()}


async def _manifest(sha256: str, holding: Mapping[str, Holding], size_hint: int | None) -> Manifest:
    reasons = []
    # Those holding all of the file first: they verified it before serving it.
    ordered = sorted(holding.items(), key=lambda item: item[1].chunks is not None)
    for peer_id, held in ordered:
        source = held.source
        try:
            manifest = Manifest.from_wire(await source.file_manifest(sha256, MANIFEST_TIMEOUT_S))
        except _MANIFEST_ERRORS as exc:
            reasons.append(f"{peer_id[:12]}: {type(exc).__name__}")
            continue
        if manifest.sha256 != sha256 or (size_hint is not None and manifest.size != size_hint):
            reasons.append(f"{peer_id[:12]}: a manifest for another file")
            continue
        return manifest
    raise PeerPullFailed(f"no peer gave a manifest of {sha256} ({', '.join(reasons)})")


async def _fetch(
    offer: PeerOffer,
    blobs: Path,
    everyone: _Everyone,
    downloads: Downloads,
    run: _Worker,
    on_progress: Progress | None,
    tuning: Tuning,
    request_timeout_s: float,
) -> PeerPullStatistics:
    manifest = await _manifest(offer.sha256, everyone.now(), offer.model.size_bytes)
    partial = await run(Partial.open, blobs, manifest.sha256, manifest.size, manifest.chunks)
    started = time.monotonic()
    downloads.begin(manifest, partial.path, partial.have)
    try:
        resumed = len(partial.have)
        swarm = Swarm(
            manifest.size, manifest.chunk_bytes, verified=partial.have, tuning=tuning,
            salt=random.getrandbits(64),  # pullers that start together ask in other orders
        )  # fmt: skip
        meter = _Meter(offer, partial, resumed, on_progress, swarm)
        fetched = await _Transfer(
            manifest, swarm, partial, everyone, downloads, run, request_timeout_s, meter
        ).run()
        meter.report(force=True, stage="verifying")
        downloads.end(manifest.sha256)  # served no more from the partial file
        try:
            await run(partial.finish)
        except ChecksumMismatch as exc:  # every chunk matched a manifest that lied
            raise PeerPullFailed(exc.message) from None
    finally:
        downloads.end(manifest.sha256)
        await run(partial.close)
    stats = swarm.statistics()
    return PeerPullStatistics(
        fetched_bytes=fetched,
        resumed_chunks=resumed,
        seconds=time.monotonic() - started,
        by_source={s.source: s.delivered for s in stats.sources},
        dropped=tuple(s.source for s in stats.sources if s.dropped),
        bad_chunks=stats.bad_chunks,
    )


class _Transfer:
    """Ask, verify and write until every chunk is in (`run`: the bytes accepted)."""

    def __init__(
        self,
        manifest: Manifest,
        swarm: Swarm,
        partial: Partial,
        everyone: _Everyone,
        downloads: Downloads,
        run: _Worker,
        timeout_s: float,
        meter: _Meter,
    ) -> None:
        self.manifest, self.swarm, self.partial = manifest, swarm, partial
        self.everyone, self.downloads, self.worker = everyone, downloads, run
        self.timeout_s, self.meter = timeout_s, meter
        self.sources: dict[str, FileSource] = {}
        self.tasks: dict[asyncio.Task[bytes | bytearray], Request] = {}
        self.by_request: dict[int, asyncio.Task[bytes | bytearray]] = {}
        self.refreshed = -math.inf
        self.progressed = time.monotonic()  # the last chunk accepted, or a chunk to ask

    async def run(self) -> int:
        swarm, fetched = self.swarm, 0
        try:
            while not swarm.done():
                now = time.monotonic()
                if now - self.refreshed >= REFRESH_S:
                    self.refresh(now)
                self.send(swarm.next_requests(now))
                if not self.tasks:
                    self.stalled(now)
                finished, _ = await asyncio.wait(
                    self.tasks,
                    timeout=REFRESH_S if self.everyone.changing else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in finished:
                    if task in self.tasks:  # else cancelled by an earlier answer of this round
                        fetched += await self.answered(task)
                self.meter.report()
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        return fetched

    def refresh(self, now: float) -> None:
        """Sources as the peers' snapshots now say: new ones, chunks gained, gone ones."""
        self.refreshed = now
        holding = self.everyone.now()
        every = range(self.swarm.chunk_count)
        for peer_id, held in holding.items():
            chunks = every if held.chunks is None else held.chunks
            if peer_id not in self.sources:
                if self.swarm.add_source(peer_id, chunks, now):
                    self.sources[peer_id] = held.source
            else:
                self.swarm.have(peer_id, chunks, now)
        for peer_id in [p for p in self.sources if p not in holding]:
            del self.sources[peer_id]
            self.cancel(Delivery((), tuple(self.swarm.remove_source(peer_id, now))))

    def send(self, requests: list[Request]) -> None:
        sha256 = self.manifest.sha256
        for request in requests:
            first, last = request.byte_range(self.swarm.chunk_bytes, self.swarm.size)
            source = self.sources[request.source]
            task = asyncio.create_task(source.file_range(sha256, first, last, self.timeout_s))
            self.tasks[task] = request
            self.by_request[request.serial] = task
            self.progressed = time.monotonic()

    def stalled(self, now: float) -> None:
        """Nothing to ask: wait for a peer still pulling to gain a chunk, or give up."""
        dropped = {s.source for s in self.swarm.statistics().sources if s.dropped}
        live = [peer_id for peer_id in self.sources if peer_id not in dropped]
        waiting = self.everyone.changing and live and now - self.progressed < STALL_TIMEOUT_S
        if not waiting:
            raise PeerPullFailed(
                f"the peers could not give all of {self.manifest.sha256}: "
                f"{len(self.swarm.missing())} chunks missing, no source left that holds them"
            )

    async def answered(self, task: asyncio.Task[bytes | bytearray]) -> int:
        request = self.tasks.pop(task)
        self.by_request.pop(request.serial, None)
        try:
            data = task.result()
        except _FETCH_ERRORS as exc:
            log.info("a request to %s failed: %r", request.source[:12], exc)
            self.cancel(self.swarm.failed(request, time.monotonic()))
            return 0
        verdicts = await self.worker(_write, self.partial, request, data)
        delivery = self.swarm.delivered(request, verdicts, time.monotonic())
        if delivery.accepted:
            self.progressed = time.monotonic()
            self.downloads.add(self.manifest.sha256, delivery.accepted)
        self.cancel(delivery)
        return sum(self.partial.chunk_size(i) for i in delivery.accepted)

    def cancel(self, delivery: Delivery) -> None:
        for request in delivery.cancel:
            task = self.by_request.pop(request.serial, None)
            if task is not None:
                task.cancel()
                self.tasks.pop(task, None)
        for source in delivery.dropped:
            log.warning(
                "dropped the peer %s from the pull of %s", source[:12], self.manifest.sha256
            )


def _write(partial: Partial, request: Request, data: bytes | bytearray) -> dict[int, bool]:
    """Each chunk of an answer checked and, if good, written (worker thread): the verdicts."""
    verdicts: dict[int, bool] = {}
    view = memoryview(data)
    offset = 0
    for index in request.chunks:
        size = partial.chunk_size(index)
        try:
            partial.write(index, view[offset : offset + size])
            verdicts[index] = True
        except ChecksumMismatch:
            verdicts[index] = False
        offset += size
    return verdicts


class _Meter:
    """Progress as `PullProgress` values, at most every PROGRESS_INTERVAL_S."""

    def __init__(
        self,
        offer: PeerOffer,
        partial: Partial,
        resumed: int,
        on_progress: Progress | None,
        swarm: Swarm,
    ) -> None:
        self.offer, self.partial, self.swarm = offer, partial, swarm
        self.resumed = sum(partial.chunk_size(i) for i in partial.have) if resumed else 0
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.last = 0.0

    def report(self, *, force: bool = False, stage: str = "downloading") -> None:
        now = time.monotonic()
        if self.on_progress is None or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        stats = self.swarm.statistics()
        done = min(self.partial.size, stats.verified * self.partial.chunk_bytes)
        elapsed = now - self.started
        rate = (done - self.resumed) / elapsed if elapsed > 0 else 0.0
        live = sum(1 for s in stats.sources if not s.dropped and s.chunks)  # giving now
        self.on_progress(
            PullProgress(
                self.offer.name, done, self.partial.size, self.resumed, max(rate, 0.0), 1, 1,
                "verifying" if stage == "verifying" else "downloading", sources=live,
            )
        )  # fmt: skip


def peer_sources(offer: PeerOffer, link: Callable[[str], FileSource]) -> dict[str, FileSource]:
    """The links to the peers holding the offer's file (those still in the table)."""
    sources: dict[str, FileSource] = {}
    for peer_id in offer.peers:
        try:
            sources[peer_id] = link(peer_id)
        except KeyError:
            continue
    return sources
