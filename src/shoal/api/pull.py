"""`POST /shoal/v1/models/pull`: `shoal models pull` through the operator API, for the
dashboard (this machine's operator only: it makes the node download and write).

    request   {"model": REF, "revision": "main", "stream": true, "source": "any",
               "on": NODE}
              REF may also be any name a paired peer advertises a file under: that file
              comes from the peers holding it (`shoal.models.peer_pull`), the Hub
              if they fail; "source": "peers" asks the peers only (404 if none has it);
              "on": another node of the cluster (its name, or the start of its ID)
              pulls it into its own store instead, and this node relays its answer
    answer    NDJSON, one object a line, as Ollama's /api/pull streams:
              {"status": "downloading", "file", "completed", "total", "rate_bps", "eta_s", ...}
              {"status": "verifying", "file", ...}
              {"status": "success", "model", "path", "files", ...}    last, or
              {"status": "error", "error": {"message", "type", "code"}}  last
    "stream": false waits and answers the success object alone.

A file fetched from peers adds how each peer did to the success object (`peers`:
{"sources": {node_id: chunks accepted}, "dropped": [node_id], "bad_chunks",
"resumed_chunks", "fetched_bytes"}, from `PeerPullStatistics`).

Errors found before the first byte moves (a bad REF, no such repo or file, offline,
not enough disk space) are the usual error answers with their HTTP status. A caller
that goes away cancels its pull; what was downloaded stays for the next one to resume.

A peer's operator asks this node to pull (`on`) through `POST /shoal/v1/peer/models/pull`
over the mutual-TLS peer port, with the same body less `on`: only paired peers reach
it, and `models.remote_pulls = "off"` refuses it (403).

`Pulls` runs each pull in a thread of its own (a download is blocking I/O for minutes),
publishes its progress on the event bus for the dashboard, and refreshes the catalog
once the file is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from shoal.api.bodies import read_body
from shoal.api.errors import error_body
from shoal.api.services import LIMITS, PEERS
from shoal.errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    ShoalError,
)
from shoal.events import EventBus, ModelPulled, ModelPullFailed, ModelPullProgress
from shoal.models.pull_refs import HubRef, check_revision, parse_ref

if TYPE_CHECKING:
    from shoal.mesh.peers import Peer, Peers
    from shoal.models.downloads import Downloads
    from shoal.models.peer_pull import Holding, PeerOffer, PeerPullStatistics
    from shoal.models.pull import Hub, Pulled, PullProgress

log = logging.getLogger(__name__)

Statistics = Callable[["PeerPullStatistics"], None]  # told how each peer did in a pull

PULL_PATH = "/shoal/v1/models/pull"
#: Bytes of a peer's error answer relayed to the operator.
_MAX_RELAYED_ERROR = 64 * 1024
# Seconds between two progress events of one pull: a dashboard redraws at this pace,
# and huggingface_hub reports every 10 MiB (a hundred times a second on a fast LAN).
PROGRESS_INTERVAL_S = 0.25


class Pulls:
    def __init__(
        self,
        store: Path,
        bus: EventBus,
        refresh: Callable[[], Awaitable[None]] | None = None,
        *,
        hub: Callable[[], Hub] | None = None,
        peers: Peers | None = None,
        downloads: Downloads | None = None,
        accept_from_peers: bool = True,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self.store = store
        self.bus = bus
        self.refresh = refresh  # the node's: rescan the stores, list what was pulled
        self._hub = hub
        self._peers = peers  # paired peers: asked first for a file they advertise
        self._downloads = downloads  # what this node serves of the files it pulls
        self.accept_from_peers = accept_from_peers  # models.remote_pulls = "paired"
        self._interval = progress_interval_s
        self._ids = itertools.count(1)

    def offer(self, model: str) -> PeerOffer | None:
        """The file paired peers advertise under `model` with its SHA-256, if any."""
        from shoal.models.peer_pull import find_offer

        if self._peers is None:
            return None
        return find_offer((p.state for p in self._peers.routable() if p.state), model)

    async def run_named(
        self, model: str, revision: str, statistics: Statistics | None = None
    ) -> AsyncGenerator[PullProgress | Pulled, None]:
        """`model` from the peers that advertise it, else (or if they fail) from the Hub."""
        from shoal.models.peer_pull import PeerPullFailed

        offer = self.offer(model)
        if offer is not None:
            try:
                async for item in self.run_peers(offer, statistics):
                    yield item
                return
            except PeerPullFailed as exc:
                try:
                    ref = parse_ref(model)
                except InvalidRequest:
                    raise exc from None  # a peer's name only: no Hub to fall back to
                log.warning("pulling %s from peers failed (%s); trying the Hub", model, exc)
        else:
            ref = parse_ref(model)
        async for item in self.run(ref, revision):
            yield item

    async def run_peers(
        self, offer: PeerOffer, statistics: Statistics | None = None
    ) -> AsyncGenerator[PullProgress | Pulled, None]:
        """The pull of `offer` from the peers holding it: progress, then what was pulled.
        Leaving the iteration early cancels it (what was verified stays for a resume)."""
        from shoal.models.peer_pull import holders, peer_sources, pull_from_peers

        peers = self._peers
        assert peers is not None
        pull_id = next(self._ids)
        updates: asyncio.Queue[PullProgress] = asyncio.Queue()
        sources = peer_sources(offer, peers.link)

        def directory() -> dict[str, Holding]:  # peers with it, or pulling it too
            return holders((p.state for p in peers.routable() if p.state), offer.sha256, peers.link)

        task = asyncio.create_task(
            pull_from_peers(
                offer, self.store, sources, directory=directory, downloads=self._downloads,
                on_progress=updates.put_nowait, statistics=statistics,
            )
        )  # fmt: skip
        outcome: tuple[str | None, str] | None = ("cancelled", "the pull was cancelled")
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    item = getter.result()
                    self.bus.publish(
                        ModelPullProgress(
                            pull_id, offer.name, item.filename, item.done, item.total,
                            item.rate_bps,
                        )
                    )  # fmt: skip
                    yield item
                    continue
                getter.cancel()
                try:
                    pulled = task.result()
                except ShoalError as exc:
                    outcome = (exc.code, exc.message)
                    raise
                outcome = None
                await self._pulled(pull_id, pulled)
                yield pulled
                return
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if outcome is not None:
                self.bus.publish(ModelPullFailed(pull_id, offer.name, *outcome))

    async def run(self, ref: HubRef, revision: str) -> AsyncGenerator[PullProgress | Pulled, None]:
        """The pull's progress as it goes, then what was pulled; a failure raises. Leaving
        the iteration early (the caller went away) cancels the pull."""
        from shoal.models.pull import Hub, PullProgress, pull

        pull_id = next(self._ids)
        model = str(ref)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[PullProgress | Pulled | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        hub = self._hub() if self._hub is not None else Hub.from_environ()
        last = 0.0

        def post(item: PullProgress | Pulled | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the node has stopped
                loop.call_soon_threadsafe(updates.put_nowait, item)

        def progress(update: PullProgress) -> None:  # on the pull's thread
            nonlocal last
            now = time.monotonic()
            between = update.resumed < update.done < update.total  # not a first or last
            if update.stage == "downloading" and between and now - last < self._interval:
                return
            last = now
            post(update)

        def work() -> None:
            try:
                post(
                    pull(
                        ref, store=self.store, revision=revision, hub=hub,
                        on_progress=progress, cancel=cancel,
                    )
                )  # fmt: skip
            except BaseException as exc:  # handed to the loop, raised there
                post(exc)

        threading.Thread(target=work, name=f"shoal-pull-{pull_id}", daemon=True).start()
        outcome: tuple[str | None, str] | None = ("cancelled", "the pull was cancelled")
        try:
            while True:
                item = await updates.get()
                if isinstance(item, BaseException):
                    code = item.code if isinstance(item, ShoalError) else None
                    outcome = (code, getattr(item, "message", None) or str(item))
                    raise item
                if isinstance(item, PullProgress):
                    self.bus.publish(
                        ModelPullProgress(
                            pull_id, model, item.filename, item.done, item.total, item.rate_bps
                        )
                    )
                    yield item
                    continue
                outcome = None
                await self._pulled(pull_id, item)
                yield item
                return
        finally:
            cancel.set()  # a no-op once the pull is over; else it stops at its next chunk
            if outcome is not None:
                self.bus.publish(ModelPullFailed(pull_id, model, *outcome))

    async def _pulled(self, pull_id: int, pulled: Pulled) -> None:
        if self.refresh is not None:
            try:
                await self.refresh()
            except Exception:
                log.exception("the catalog could not be refreshed after pulling %s", pulled.ref)
        self.bus.publish(
            ModelPulled(
                pull_id,
                pulled.ref,
                tuple(f"{pulled.repo_id}/{f.filename}" for f in pulled.files),
                str(pulled.files[0].path),
                pulled.size_bytes,
                pulled.downloaded_bytes,
                pulled.seconds,
            )
        )


PULLS: web.AppKey[Pulls] = web.AppKey("pulls", Pulls)


async def pull_model(request: web.Request) -> web.StreamResponse:
    """The operator's pull, here or (`on`) on another node of the cluster."""
    body = await _body(request)
    on = body.pop("on", None)
    if on is not None:
        return await _relay(request, on, body)
    return await _serve(request, body)


async def pull_for_peer(request: web.Request) -> web.StreamResponse:
    """A paired peer's operator asks this node to pull into its own store."""
    pulls = request.app.get(PULLS)
    if pulls is not None and not pulls.accept_from_peers:
        raise Forbidden('this node pulls only for its own operator (models.remote_pulls = "off")')
    body = await _body(request)
    if "on" in body:
        raise InvalidRequest("a pull asked by a peer is not passed on", param="on")
    return await _serve(request, body)


async def _body(request: web.Request) -> dict[str, object]:
    limits = request.app[LIMITS]
    raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not JSON", code="invalid_json") from None
    if not isinstance(body, dict) or "model" not in body:
        raise InvalidRequest(
            'a pull is {"model": "org/repo:q4_k_m", "revision": "main"}',
            param="model",
            code="missing_required_parameter",
        )
    return body


async def _serve(request: web.Request, body: dict[str, object]) -> web.StreamResponse:
    model = body["model"]
    revision = check_revision(body.get("revision"))
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false", param="stream", code="invalid_type")
    pulls = request.app.get(PULLS)
    if pulls is None:
        raise BackendUnavailable("this node has no model store to pull into", retry_after=60)

    source = body.get("source", "any")
    if source not in ("any", "peers"):
        raise InvalidRequest('source must be "any" or "peers"', param="source")
    # A name paired peers advertise (with its SHA-256) is pulled from them first; any
    # other must be a Hub REF, checked before anything starts. "peers": from them only
    # (the CLI, which pulls from the Hub itself, with its own environment).
    offer = pulls.offer(model) if isinstance(model, str) else None
    found: list[PeerPullStatistics] = []  # how each peer did, for the success object
    if source == "peers":
        if offer is None:
            raise ModelNotFound(f"no paired peer advertises {model!r}", code="not_on_peers")
        updates = pulls.run_peers(offer, found.append)
    elif offer is None:
        updates = pulls.run(parse_ref(model), revision)
    else:
        assert isinstance(model, str)
        updates = pulls.run_named(model, revision, found.append)
    try:
        # The first update before any byte of the answer: what fails while resolving
        # the REF or checking the disk is an ordinary error answer with its status.
        update = await anext(updates)
        if not stream:
            async for later in updates:
                update = later  # the last one is the result
            return web.Response(body=_line(update, found), content_type="application/json")
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            await response.write(_line(update, found))
            async for update in updates:
                await response.write(_line(update, found))
        except ShoalError as exc:
            error = orjson.loads(error_body(exc))
            await response.write(orjson.dumps({"status": "error", **error}) + b"\n")
        except ConnectionResetError:
            return response  # the caller went away: closing `updates` cancels the pull
        await response.write_eof()
        return response
    finally:
        await updates.aclose()


async def _relay(request: web.Request, on: object, body: dict[str, object]) -> web.StreamResponse:
    """Ask the node `on` to pull, over its peer link; its answer relayed as it comes."""
    peers = request.app.get(PEERS)
    if not isinstance(on, str) or not on.strip():
        raise InvalidRequest("on must be a node's name or the start of its ID", param="on")
    peer = _node_named(peers.routable() if peers is not None else [], on.strip())
    assert peers is not None and peer.state is not None
    try:
        async with peers.link(peer.view.peer_id).pull(orjson.dumps(body)) as answer:
            if answer.status != 200:  # the peer's own error answer, in the API's shape
                raw = await answer.content.read(_MAX_RELAYED_ERROR)
                return web.Response(status=answer.status, body=raw, content_type="application/json")
            response = web.StreamResponse(
                headers={
                    "Content-Type": answer.headers.get("Content-Type", "application/json"),
                    "Cache-Control": "no-cache",
                }
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendUnavailable(
            f"the node {peer.state.name!r} could not be reached ({type(exc).__name__})",
            retry_after=5,
        ) from None


def _node_named(peers: list[Peer], on: str) -> Peer:
    """The live peer whose name is `on`, or whose ID starts with it (6 digits or more)."""
    lowered = on.lower()
    named = [p for p in peers if p.state is not None and p.state.name == on]
    if not named and len(lowered) >= 6:
        named = [p for p in peers if p.state is not None and p.view.peer_id.startswith(lowered)]
    if not named:
        raise NotFound(f"no live peer is named {on!r}", code="node_not_found")
    if len(named) > 1:
        raise InvalidRequest(f"{on!r} names {len(named)} peers: give its ID", param="on")
    return named[0]


def _line(update: PullProgress | Pulled, peers: list[PeerPullStatistics]) -> bytes:
    from shoal.models.pull import PullProgress

    if isinstance(update, PullProgress):
        document: dict[str, object] = {
            "status": update.stage,
            "file": update.filename,
            "completed": update.done,
            "total": update.total,
            "resumed": update.resumed,
            "rate_bps": round(update.rate_bps),
            "eta_s": None if update.eta_s is None else round(update.eta_s, 1),
            "part": update.file_index,
            "parts": update.file_count,
        }
        if update.sources is not None:
            document["sources"] = update.sources
    else:
        document = {"status": "success", **update.to_json()}
        if peers:  # fetched from peers: how each did
            stats = peers[-1]
            document["peers"] = {
                "sources": dict(stats.by_source),
                "dropped": list(stats.dropped),
                "bad_chunks": stats.bad_chunks,
                "resumed_chunks": stats.resumed_chunks,
                "fetched_bytes": stats.fetched_bytes,
            }
    return orjson.dumps(document) + b"\n"
