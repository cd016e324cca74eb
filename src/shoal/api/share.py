"""Model files served to paired peers, by SHA-256, over the mutual-TLS peer port.

    GET /shoal/v1/files/{sha256}/manifest   {"sha256", "size", "chunk_bytes", "chunks"}
    GET /shoal/v1/files/{sha256}            Range: bytes=a-b of whole 1 MiB chunks, at
                                            most 16: 206 with the bytes (sendfile where
                                            the transport allows, a read loop under TLS)

Refusals, in the API's error shape: a malformed SHA-256 400; `models.share = "off"`
403; a file this node does not hold (or holds damaged) 404; a Range that is not whole
chunks, is longer than 16 of them or goes past the end 416 with `Content-Range:
bytes */size`. The audience ("peer") keeps LAN clients and unpaired nodes out before
any of this runs.

`Shares` finds the file a hash names in the catalog (its upstream SHA-256, or one a
manifest has computed) and re-verifies it before it first serves it: the whole file
is hashed again in a thread, against the cached manifest and the upstream hash, so a
file damaged at the same size is never served under its hash. Concurrent first
requests for one file wait for one verification; later ones only stat the file.

While this node serves inference, what it sends is paced by a token bucket
(`models.share_rate_limit` MB/s, a chunk at a time: `Pacer`); while it serves none, at
the link's speed.

A file this node is still pulling (`shoal.models.downloads`) is served too: its manifest,
and ranges made only of the chunks it holds, each checked against the manifest before it
was written; a range with a chunk it lacks is 416. Peers ask only for the chunks this
node's snapshot says it holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from aiohttp import web

from shoal.api.access import CALLER
from shoal.errors import Forbidden, InvalidRequest, NotFound, RangeNotSatisfiable
from shoal.events import EventBus, ModelBytesServed
from shoal.models.catalog import Catalog, LocalModel
from shoal.models.downloads import Downloads
from shoal.models.manifest import (
    CHUNK_BYTES,
    ByteRange,
    CacheKey,
    Manifest,
    ManifestCache,
    RangeError,
    cache_key,
    compute,
    file_sha256,
    is_sha256,
    parse_range,
)
from shoal.pacing import TokenBucket

log = logging.getLogger(__name__)

FILE_PATH = "/shoal/v1/files/{sha256}"
FILE_MANIFEST_PATH = "/shoal/v1/files/{sha256}/manifest"


@dataclass(frozen=True, slots=True)
class Served:
    path: Path
    manifest: Manifest
    key: CacheKey | None  # the file's key when it was verified; None: still downloading


class Pacer:
    """`rate` bytes a second while `busy()` (the node serves inference), else no limit."""

    BURST_BYTES = 4 * CHUNK_BYTES

    def __init__(self, rate: float, busy: Callable[[], bool]) -> None:
        self.rate = rate
        self.busy = busy
        self._bucket: TokenBucket | None = None
        self.waited_s = 0.0  # in all, for tests and metrics

    def active(self) -> bool:
        return self.rate > 0 and self.busy()

    async def wait(self, size: int) -> None:
        if not self.active():
            return
        now = time.monotonic()
        if self._bucket is None:
            self._bucket = TokenBucket(self.rate, self.BURST_BYTES, now)
        delay = self._bucket.reserve(size, now)
        if delay > 0:
            self.waited_s += delay
            await asyncio.sleep(delay)


class Shares:
    """The files this node holds, by SHA-256, verified before they are served."""

    def __init__(
        self,
        catalog: Catalog,
        cache: ManifestCache,
        policy: Literal["off", "paired"],
        downloads: Downloads | None = None,
        pacer: Pacer | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self._catalog = catalog
        self._cache = cache
        self.policy = policy
        self.downloads = downloads or Downloads()
        self.pacer = pacer or Pacer(0, lambda: False)
        self.bus = bus or EventBus()  # ModelBytesServed, for /metrics
        self._verified: dict[str, Served] = {}
        self._damaged: dict[str, CacheKey] = {}  # refused until the file changes
        self._locks: dict[str, asyncio.Lock] = {}
        self.verifications = 0  # files hashed again before being served

    async def served(self, sha256: str) -> Served:
        """The file named `sha256`, verified; Forbidden if sharing is off, NotFound if
        this node does not hold it intact."""
        if self.policy == "off":
            raise Forbidden('this node does not share its model files (models.share = "off")')
        fresh = await asyncio.to_thread(self._still_verified, sha256)
        if fresh is not None:
            return fresh
        model = await asyncio.to_thread(self._holder, sha256)
        if model is None:
            downloading = self.downloads.get(sha256)
            if downloading is not None:  # still pulling it: the chunks it has
                return Served(downloading.path, downloading.manifest, None)
            raise NotFound("this node holds no file with that SHA-256", code="file_not_found")
        lock = self._locks.setdefault(sha256, asyncio.Lock())  # bounded: held files only
        async with lock:  # the first requests wait for one verification
            fresh = await asyncio.to_thread(self._still_verified, sha256)
            if fresh is None:
                fresh = await asyncio.to_thread(self._verify, sha256, model)
        return fresh

    async def forget_removed(self) -> None:
        """Drop the cached manifests of files no longer catalogued (after a rescan)."""
        held = {str(model.path) for model in self._catalog.models()}
        await asyncio.to_thread(self._cache.forget_missing, held)

    # -- blocking, in a thread ----------------------------------------------------------

    def _still_verified(self, sha256: str) -> Served | None:
        served = self._verified.get(sha256)
        if served is None:
            return None
        try:
            if cache_key(served.path, served.path.stat()) == served.key:
                return served
        except OSError:
            pass
        self._verified.pop(sha256, None)  # changed or gone: verified again before it is served
        return None

    def _holder(self, sha256: str) -> LocalModel | None:
        models = self._catalog.models()
        for model in models:
            if model.sha256 == sha256:
                return model
        for model in models:  # no upstream hash: one computed before, still current
            if model.sha256 is None:
                cached = self._cache.cached(model.path)
                if cached is not None and cached.sha256 == sha256:
                    return model
        return None

    def _verify(self, sha256: str, model: LocalModel) -> Served:
        path = model.path
        try:
            key = cache_key(path, path.stat())
            if self._damaged.get(sha256) == key:
                raise _damaged()
            self.verifications += 1
            manifest = self._cache.cached(path)
            if manifest is not None:  # the chunks' hashes stand if the whole file's does
                digest, key = file_sha256(path)
                if digest != manifest.sha256:
                    log.warning("%s changed without its size, mtime or inode changing", path)
                    manifest = None
            if manifest is None:
                manifest, key = compute(path)
                self._cache.put(key, manifest)
        except OSError as exc:
            log.warning("cannot share %s: %s", path, exc)
            raise NotFound("this node cannot read that file now", code="file_not_found") from None
        if model.sha256 is not None and manifest.sha256 != model.sha256:
            log.error(
                "%s is damaged: its SHA-256 is %s, not %s as its store names it; "
                "it is not shared (fetch it again)",
                path, manifest.sha256, model.sha256,
            )  # fmt: skip
            self._damaged[sha256] = key
            raise _damaged()
        if manifest.sha256 != sha256:
            raise NotFound("this node holds no file with that SHA-256", code="file_not_found")
        served = self._verified[sha256] = Served(path, manifest, key)
        return served


def _damaged() -> NotFound:
    return NotFound("this node's copy of that file is damaged", code="file_damaged")


SHARES: web.AppKey[Shares] = web.AppKey("shares", Shares)


# -- handlers ----------------------------------------------------------------------------


def _sha256(request: web.Request) -> str:
    sha256 = request.match_info["sha256"]
    if not is_sha256(sha256):
        raise InvalidRequest("a file is named by its SHA-256: 64 lowercase hex digits")
    return sha256


async def file_manifest(request: web.Request) -> web.Response:
    sha256 = _sha256(request)
    served = await request.app[SHARES].served(sha256)
    return web.json_response(served.manifest.wire())


async def file_range(request: web.Request) -> web.StreamResponse:
    sha256 = _sha256(request)
    served = await request.app[SHARES].served(sha256)
    size = served.manifest.size
    try:
        byte_range = parse_range(request.headers.get("Range"), size)
    except RangeError as exc:
        raise RangeNotSatisfiable(str(exc), size=size) from None
    if served.key is None:
        _check_held(request.app[SHARES].downloads, sha256, byte_range)
    try:
        # Opened here, not in a thread: a puller that hangs up (an endgame duplicate
        # answered elsewhere) cancels this handler, and a file a thread opened for a
        # cancelled await would never be closed. An open is a few µs.
        file = served.path.open("rb")
    except FileNotFoundError:  # a download just finished or was given up
        raise NotFound("that file changed; ask again", code="file_not_found") from None
    try:
        if served.key is not None and cache_key(served.path, os.fstat(file.fileno())) != served.key:
            raise NotFound("that file changed; ask again", code="file_not_found")
        response = web.StreamResponse(
            status=206,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {byte_range.start}-{byte_range.end - 1}/{size}",
            },
        )
        response.content_length = byte_range.length
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the peer went away")
        pacer = request.app[SHARES].pacer
        # Paced, a chunk at a time; else the whole range in one go.
        pieces = _pieces(byte_range) if pacer.active() else [byte_range]
        try:
            for piece in pieces:
                await pacer.wait(piece.length)
                if transport.get_extra_info("sslcontext") is None:  # sendfile(2): no copy
                    loop = asyncio.get_running_loop()
                    await loop.sendfile(transport, file, piece.start, piece.length)
                else:  # TLS encrypts in user space: read whole chunks in a thread, write them
                    await _copy(file, piece, response)
            await response.write_eof()
            bus = request.app[SHARES].bus
            caller = request.get(CALLER)
            if caller is not None and caller.peer and bus.wants(ModelBytesServed):
                bus.publish(ModelBytesServed(caller.peer, byte_range.length))
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
            # The puller hung up: a duplicate answered elsewhere first, or it gave up on
            # this node. Ordinary in a swarm, not an error.
            log.debug("a peer stopped reading %s mid-range", sha256)
        return response
    finally:
        file.close()


def _pieces(byte_range: ByteRange) -> list[ByteRange]:
    starts = range(byte_range.start, byte_range.end, CHUNK_BYTES)
    return [ByteRange(start, min(start + CHUNK_BYTES, byte_range.end)) for start in starts]


def _check_held(downloads: Downloads, sha256: str, byte_range: ByteRange) -> None:
    """A range of a file still downloading must be made of chunks this node holds."""
    downloading = downloads.get(sha256)
    if downloading is None:
        raise NotFound("that file changed; ask again", code="file_not_found")
    wanted = range(byte_range.first_chunk, byte_range.first_chunk + byte_range.chunks)
    if not downloading.have.issuperset(wanted):
        raise RangeNotSatisfiable(
            "this node is still pulling that file and holds only some of those chunks",
            size=downloading.manifest.size,
        )


async def _copy(file: BinaryIO, byte_range: ByteRange, response: web.StreamResponse) -> None:
    """The range, a chunk at a time: asyncio's own fallback for TLS reads 256 KiB at a
    time through a stand-in protocol (measured on loopback: 45 MB/s, this 230)."""
    left = byte_range.length
    await asyncio.to_thread(file.seek, byte_range.start)
    while left > 0:
        data = await asyncio.to_thread(file.read, min(CHUNK_BYTES, left))
        if not data:
            raise ConnectionResetError("the file ended early")
        left -= len(data)
        await response.write(data)
