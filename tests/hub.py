"""A Hugging Face Hub stand-in on loopback, for pulls that must never reach the Internet.

It answers what `huggingface_hub` asks, with the headers it reads (see its
`file_download.get_hf_file_metadata`, `hf_api.HfApi.model_info`, `utils._http`):

    GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]
         the repo at a revision: `sha` (the commit), `siblings` with size, blobId and,
         for LFS files, lfs {sha256, size, pointerSize}
    HEAD|GET /{org}/{name}/resolve/{rev}/{file}
         an LFS file: 302 to the CDN origin with X-Repo-Commit, X-Linked-Etag (the
         SHA-256), X-Linked-Size and the pointer's ETag, as the Hub answers; a small
         git file: 200 with its body and its git ETag
    HEAD|GET /cdn/{sha256}   (on a second port: another origin, as the Hub's CDN is,
         so the library stops at the 302 and never sends the token there)
         the bytes, with Range (206 + Content-Range) and ETag
    Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which
    `hf_raise_for_status` turns into the library's own exceptions.

Knobs for tests: `corrupt_at` flips one byte of every body served; `drop_after` cuts the
next `drops` CDN answers after that many bytes; `hold_after` stops sending after that
many bytes until `release` is set; `ignore_range` answers 200 with the whole file;
`require_token` answers 401 without it; `requests` records what was asked. It runs its
own event loop in a thread, so blocking code (the CLI's path) and async tests can both
use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web

_PIECE = 1 << 20  # bytes per write of a body


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HostedFile:
    data: bytes
    lfs: bool

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.data)}\n"
        ).encode()
        self.pointer_size = len(pointer)
        # Git's object ID of what git holds: the LFS pointer, or the file itself.
        self.blob_id = git_blob_id(pointer if self.lfs else self.data)


@dataclass
class HostedRepo:
    repo_id: str
    commit: str
    files: dict[str, HostedFile]
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    port: int


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, HostedRepo] = {}
        self.corrupt_at: int | None = None
        self.drop_after: int | None = None
        self.drops = 0
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.held = threading.Event()  # set once a body has stopped at hold_after
        self.require_token: str | None = None
        self.ignore_range = False  # answer 200 and the whole file, as some CDNs do
        self.requests: list[Seen] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hub", daemon=True)
        self._runner: web.AppRunner | None = None
        self.endpoint = ""
        self.cdn = ""

    # -- content -----------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, branches: tuple[str, ...] = ("main",)
    ) -> HostedRepo:
        """A repo with one commit; `*.gguf` files in LFS, others in git."""
        commit = hashlib.sha1("\0".join([repo_id, *sorted(files)]).encode()).hexdigest()
        hosted = {
            name: HostedFile(data, lfs=name.endswith(".gguf")) for name, data in files.items()
        }
        repo = HostedRepo(repo_id, commit, hosted, dict.fromkeys(branches, commit))
        self.repos[repo_id] = repo
        return repo

    def seen(self, method: str | None = None, path_prefix: str = "") -> list[Seen]:
        return [
            s
            for s in list(self.requests)
            if (method is None or s.method == method) and s.path.startswith(path_prefix)
        ]

    def ranges(self) -> list[str]:
        """The Range headers of the CDN requests, in order (absent: "")."""
        return [s.headers.get("Range", "") for s in self.seen("GET", "/cdn/")]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LocalHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._info)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        app.router.add_get("/cdn/{sha256}", self._cdn)  # HEAD too
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ports = []
        for _ in range(2):  # the Hub, and its CDN on another origin
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        self.cdn = f"http://127.0.0.1:{ports[1]}"

    # -- handlers ----------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: object) -> web.StreamResponse:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), port))
        return await handler(request)  # type: ignore[operator, no-any-return]

    def _refused(self, request: web.Request) -> web.Response | None:
        wanted = self.require_token
        if wanted is not None and request.headers.get("Authorization") != f"Bearer {wanted}":
            return _error(401, "RepoNotFound", "Invalid username or password.")
        return None

    def _repo_at(self, request: web.Request) -> tuple[HostedRepo, str] | web.Response:
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}")
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        revision = request.match_info.get("revision", "main")
        commit = repo.commit if revision == repo.commit else repo.branches.get(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return repo, commit

    async def _info(self, request: web.Request) -> web.Response:
        found = self._refused(request) or self._repo_at(request)
        if isinstance(found, web.Response):
            return found
        repo, commit = found
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, object]] = []
        for name, f in repo.files.items():
            sibling: dict[str, object] = {"rfilename": name}
            if blobs:
                sibling["size"] = len(f.data)  # the file's, as the Hub gives it
                sibling["blobId"] = f.blob_id
                if f.lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": len(f.data),
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "tags": ["gguf"],
                "siblings": siblings,
            }
        )

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        found = self._refused(request) or self._repo_at(request)
        if isinstance(found, web.Response):
            return found
        repo, commit = found
        hosted = repo.files.get(request.match_info["path"])
        if hosted is None:
            response = _error(404, "EntryNotFound", "Entry not found")
            response.headers["X-Repo-Commit"] = commit
            return response
        if not hosted.lfs:
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hosted.blob_id}"'}
            return await self._body(request, hosted.data, headers)
        return web.Response(
            status=302,
            headers={
                "Location": f"{self.cdn}/cdn/{hosted.sha256}?X-Amz-Signature=stand-in",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{hosted.sha256}"',
                "X-Linked-Size": str(len(hosted.data)),
                "ETag": f'"{hosted.blob_id}"',
            },
        )

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        for repo in self.repos.values():
            for hosted in repo.files.values():
                if hosted.lfs and hosted.sha256 == sha256:
                    return await self._body(request, hosted.data, {"ETag": f'"{sha256}"'})
        return web.Response(status=404)

    async def _body(
        self, request: web.Request, data: bytes, headers: dict[str, str]
    ) -> web.StreamResponse:
        start, end = 0, len(data)
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if match and not self.ignore_range:
            start = int(match[1])
            end = min(end, int(match[2]) + 1) if match[2] else end
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        with contextlib.suppress(ConnectionResetError):  # a client gone (a killed pull)
            await self._send(request, response, data, start, end)
        return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, data: bytes, start: int, end: int
    ) -> None:
        cut = None
        if self.drop_after is not None and self.drops > 0:
            self.drops -= 1
            cut = self.drop_after
        hold, sent = self.hold_after, 0
        for offset in range(start, end, _PIECE):
            piece = data[offset : min(end, offset + _PIECE)]
            if self.corrupt_at is not None and offset <= self.corrupt_at < offset + len(piece):
                at = self.corrupt_at - offset
                piece = piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1 :]
            if cut is not None and sent + len(piece) >= cut:
                await response.write(piece[: cut - sent])
                assert request.transport is not None
                request.transport.close()  # the body ends short of its Content-Length
                return
            if hold is not None and sent + len(piece) > hold:
                await response.write(piece[: hold - sent])
                self.held.set()
                await asyncio.to_thread(self.release.wait)
                piece, sent, hold = piece[hold - sent :], hold, None
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": message},
        status=status,
        headers={"X-Error-Code": code, "X-Error-Message": message},
    )


def write_gguf(path: Path, *, name: str, tensor_bytes: int, seed: int) -> bytes:
    """A small real GGUF (a llama header and one F32 tensor of noise); returns its bytes."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_block_count(1)
    values = np.random.default_rng(seed).standard_normal(tensor_bytes // 4, dtype=np.float32)
    writer.add_tensor("token_embd.weight", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@dataclass
class TinyModels:
    """GGUFs made once per session: a `tiny` repo with three quantizations (one bigger
    than huggingface_hub's 10 MiB download chunk, so a cut and a resume land inside it)
    and a README that git, not LFS, holds."""

    q4_k_m: bytes
    q8_0: bytes
    f16: bytes
    repo_files: dict[str, bytes]


def tiny_models(folder: Path) -> TinyModels:
    q4 = write_gguf(folder / "a.gguf", name="Tiny Q4_K_M", tensor_bytes=12 << 20, seed=1)
    q8 = write_gguf(folder / "b.gguf", name="Tiny Q8_0", tensor_bytes=1 << 20, seed=2)
    f16 = write_gguf(folder / "c.gguf", name="Tiny F16", tensor_bytes=1 << 18, seed=3)
    files = {
        "Tiny-Q4_K_M.gguf": q4,
        "Tiny-Q8_0.gguf": q8,
        "fp/Tiny-F16.gguf": f16,
        "README.md": b"# Tiny\n",
    }
    return TinyModels(q4, q8, f16, files)


def hub_env(hub: LocalHub, home: Path) -> dict[str, str]:
    """The environment that points huggingface_hub (and Shoal) at the stand-in only."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }


def tree(folder: Path) -> Iterator[str]:
    """Every entry under `folder`, relative, with ` -> target` for links."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        yield f"{rel} -> {path.readlink()}" if path.is_symlink() else rel
