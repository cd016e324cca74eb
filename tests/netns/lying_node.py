"""A real Shoal node that lies about some model files, for the hostile-source tests.

    python tests/netns/lying_node.py serve --lan ...     (the arguments of `shoal`)

It is the normal node (`shoal.cli.main`), with the two peer handlers of
`shoal.api.share` and the state snapshot of `shoal.mesh.advert` replaced before the
route table is built. What it lies about is read from the JSON file named by
`SHOAL_LIE_PLAN`, keyed by the SHA-256 a peer asks for:

    {"lies": {sha256: {"kind": KIND, "serves": sha256 of a file it holds (impostor)}},
     "hostile": {"flag": path, "sha256": of a file it holds, "ids": [name, ...]}}

    other_manifest   the manifest of another file (its whole-file hash is not the one
                     advertised); the bytes are honest
    wrong_size       a manifest one chunk longer than the file advertised
    long_chunk       an honest manifest; every range one byte longer than asked
    short_chunk      an honest manifest; every range one byte shorter than asked
    impostor         advertises `sha256` for the file it holds under `serves` (same
                     size): a manifest naming `sha256` with that file's chunk hashes, and
                     that file's bytes; every chunk matches, the whole file does not

Once the `hostile` flag file exists, its snapshots also advertise the file `sha256`
under each of `ids` (names such as `../../x` or `/x`), as a peer's model names.
Every other file is served honestly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from shoal.api import share
from shoal.mesh.advert import OwnState
from shoal.mesh.state import NodeState
from shoal.models.manifest import CHUNK_BYTES, RangeError, parse_range

PLAN: dict[str, Any] = json.loads(Path(os.environ["SHOAL_LIE_PLAN"]).read_text())
LIES: dict[str, dict[str, str]] = PLAN.get("lies", {})
HOSTILE: dict[str, Any] | None = PLAN.get("hostile")

honest_manifest = share.file_manifest
honest_range = share.file_range
honest_snapshot = OwnState.snapshot
_told: list[bool] = []  # the hostile names said once in the log


async def lying_manifest(request: web.Request) -> web.Response:
    sha256 = request.match_info["sha256"]
    lie = LIES.get(sha256)
    if lie is None:
        return await honest_manifest(request)
    served = await request.app[share.SHARES].served(lie.get("serves", sha256))
    wire = served.manifest.wire()
    kind = lie["kind"]
    if kind == "other_manifest":
        wire["sha256"] = lie["other"]
    elif kind == "wrong_size":
        wire["size"] += CHUNK_BYTES
        wire["chunks"].append(wire["chunks"][-1])
    elif kind == "impostor":
        wire["sha256"] = sha256
    print(f"lying_node: {kind} manifest of {sha256[:12]}", file=sys.stderr, flush=True)
    return web.json_response(wire)


async def lying_range(request: web.Request) -> web.StreamResponse:
    sha256 = request.match_info["sha256"]
    lie = LIES.get(sha256)
    if lie is None or lie["kind"] in ("other_manifest", "wrong_size"):
        return await honest_range(request)
    served = await request.app[share.SHARES].served(lie.get("serves", sha256))
    size = served.manifest.size
    try:
        asked = parse_range(request.headers.get("Range"), size)
    except RangeError as exc:
        raise web.HTTPRequestedRangeNotSatisfiable(text=str(exc)) from None
    data = await asyncio.to_thread(_read, served.path, asked.start, asked.length)
    print(f"lying_node: {lie['kind']} range of {sha256[:12]}", file=sys.stderr, flush=True)
    if lie["kind"] == "long_chunk":
        data += b"\0"
    elif lie["kind"] == "short_chunk":
        data = data[:-1]
    return web.Response(
        status=206,
        body=data,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {asked.start}-{asked.end - 1}/{size}",
        },
    )


def _read(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as file:
        file.seek(start)
        return file.read(length)


def lying_snapshot(self: OwnState) -> NodeState:
    state = honest_snapshot(self)
    claims = {lie["serves"]: sha for sha, lie in LIES.items() if lie["kind"] == "impostor"}
    models = [
        dataclasses.replace(m, sha256=claims[m.sha256]) if m.sha256 in claims else m
        for m in state.models
    ]
    seq = state.seq
    if HOSTILE is not None and Path(HOSTILE["flag"]).exists():
        seq += 1 << 20  # a new snapshot: `seq` grows only when the content changes
        (held,) = [m for m in state.models if m.sha256 == HOSTILE["sha256"]]
        if not _told:
            _told.append(True)
            print(
                f"lying_node: hostile names {HOSTILE['ids']} from uptime {state.uptime_s}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        models += [dataclasses.replace(held, id=name, aliases=()) for name in HOSTILE["ids"]]
    return dataclasses.replace(state, models=tuple(models), seq=seq)


def main() -> None:
    # The route table (`shoal.api.app`) takes the handlers when it is imported: after this.
    assert "shoal.api.app" not in sys.modules, "patch the handlers before the routes exist"
    share.file_manifest = lying_manifest  # type: ignore[assignment]
    share.file_range = lying_range
    OwnState.snapshot = lying_snapshot  # type: ignore[method-assign]
    from shoal.cli import main as shoal_main

    shoal_main()


if __name__ == "__main__":
    main()
