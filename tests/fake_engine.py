"""A fake engine child for the supervisor's unit tests: the worker's contract, no model.

Run as `python tests/fake_engine.py --control DIR <the real worker's arguments>`. Like
`shoal.engine.worker` it serves GET /health and POST /v1/chat/completions on the Unix
socket given by `--socket`, and exits when its stdin closes. What it does wrong is
planned ahead in `DIR/plan.json`: a list of behaviours, one per start (the last one
repeats), so a test decides what each restart of the child will do without racing it.
A behaviour is a dict; empty means a well-behaved engine. Its keys:

    exit             exit with this status: at once, or after `after_s` seconds of serving
    after_s          see `exit`
    ready            false: never listen (a model that never finishes loading)
    stuck            true: never listen, and block the event loop for good (stuck in
                     native code while loading): an EOF on stdin no longer ends it
    hang_after       answer this many /health requests, then leave every later one
                     unanswered while the process stays alive and responsive to stdin
    chat_delay_s     send a chat answer's headers at once and its body this much later

What it did is written to DIR for the test to read: `starts` (one JSON line per start:
pid and argv), `hung-<pid>` (a line per /health request left unanswered) and
`stdin-closed-<pid>` (the parent closed our stdin).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _start(control: Path) -> dict[str, Any]:
    """Record this start and return its planned behaviour."""
    plan = json.loads((control / "plan.json").read_text())
    starts = control / "starts"
    index = len(starts.read_text().splitlines()) if starts.exists() else 0
    with starts.open("a") as out:
        out.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:]}) + "\n")
    behaviour: dict[str, Any] = plan[min(index, len(plan) - 1)]
    return behaviour


def _read_to_eof(control: Path) -> None:
    sys.stdin.buffer.read()
    (control / f"stdin-closed-{os.getpid()}").touch()


async def _serve(socket: Path, control: Path, behaviour: dict[str, Any]) -> None:
    if behaviour.get("ready", True) and not behaviour.get("stuck"):
        await _listen(socket, control, behaviour)
    if "after_s" in behaviour:
        asyncio.get_running_loop().call_later(behaviour["after_s"], os._exit, behaviour["exit"])
    # As the real worker: the supervisor holds our stdin open, and at its EOF the event
    # loop ends the process, so a blocked loop outlives it.
    eof = asyncio.get_running_loop().run_in_executor(None, _read_to_eof, control)
    if behaviour.get("stuck"):
        time.sleep(3600)  # noqa: ASYNC251 (blocking the loop is the point)
    await eof
    os._exit(0)


async def _listen(socket: Path, control: Path, behaviour: dict[str, Any]) -> None:
    # Imported here: aiohttp takes ~0.5 s to import, and a child that never listens
    # (most restarts in the tests) needs none of it.
    from aiohttp import web

    health_answers = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal health_answers
        if health_answers >= behaviour.get("hang_after", float("inf")):
            with (control / f"hung-{os.getpid()}").open("a") as out:
                out.write("missed\n")
            await asyncio.Event().wait()
        health_answers += 1
        return web.json_response({"status": "ok", "pid": os.getpid(), "answered": health_answers})

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.sleep(behaviour.get("chat_delay_s", 0.0))
        await response.write(json.dumps({"pid": os.getpid()}).encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.add_routes([web.get("/health", health), web.post("/v1/chat/completions", chat)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="fake-engine")
    parser.add_argument("--control", type=Path, required=True)
    # The real worker's contract: the supervisor must give at least these.
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--embedding-dir", type=Path, required=True)
    args, _ = parser.parse_known_args()
    behaviour = _start(args.control)
    if "exit" in behaviour and "after_s" not in behaviour:
        os._exit(behaviour["exit"])
    args.socket.unlink(missing_ok=True)  # left behind by a killed predecessor
    asyncio.run(_serve(args.socket, args.control, behaviour))


if __name__ == "__main__":
    main()
