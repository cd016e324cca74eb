"""Runs inside a host of the namespace LAN for the model_transfer scenario.

The harness sits in the root namespace, which has no route into the LAN, and a pull is
an operator call (`POST /shoal/v1/models/pull` answers loopback callers only): this agent
makes the calls where they must be made. One JSON command a line in, one JSON answer a
line out; stamps are `time.monotonic()` (CLOCK_MONOTONIC is the same in every network
namespace, so stamps from agents on different hosts compare).

    {"op": "get", "url"}                       -> {"status", "body"} (body: JSON or None)
    {"op": "serve_raw", "path", "port"}        -> {"ok"}; then, in a thread, the next
                                                  connection gets the file by sendfile(2)
    {"op": "recv_raw", "host", "port", "out"}  -> {"started", "ended", "bytes"}: the file
                                                  received into `out` (written, no fsync)
    {"op": "pull", "url", "model", "timeout"}  -> {"started", "ended", "last", "sources",
                                                  "progress"}: the pull's NDJSON, streamed;
                                                  progress: [stamp, status, completed] a line
Any failure answers {"error": "..."} instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

RECV_BYTES = 1 << 20  # one read of the raw copy: as large as one chunk of a peer pull


def get(command: dict[str, Any]) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(command["url"], timeout=5) as response:
            return {"status": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        with exc:
            return {"status": exc.code, "body": None}


def serve_raw(command: dict[str, Any]) -> dict[str, Any]:
    listener = socket.create_server(("0.0.0.0", int(command["port"])), reuse_port=True)
    path = str(command["path"])

    def send_once() -> None:
        with listener:
            listener.settimeout(60)
            connection, _ = listener.accept()
            with connection, open(path, "rb") as file:
                connection.sendfile(file)

    threading.Thread(target=send_once, daemon=True).start()
    return {"ok": True}


def recv_raw(command: dict[str, Any]) -> dict[str, Any]:
    buffer = bytearray(RECV_BYTES)
    view = memoryview(buffer)
    received = 0
    started = time.monotonic()
    with (
        socket.create_connection((command["host"], int(command["port"])), timeout=30) as conn,
        open(command["out"], "wb") as out,
    ):
        while count := conn.recv_into(buffer):
            out.write(view[:count])
            received += count
    ended = time.monotonic()
    os.unlink(command["out"])
    return {"started": started, "ended": ended, "bytes": received}


def pull(command: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"model": command["model"], "source": "peers", "stream": True})
    request = urllib.request.Request(
        command["url"] + "/shoal/v1/models/pull",
        body.encode(),
        {"Content-Type": "application/json"},
    )
    lines: list[dict[str, Any]] = []
    progress: list[tuple[float, str, int]] = []  # (stamp, status, bytes completed)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=float(command.get("timeout", 120))) as answer:
            for line in answer:
                lines.append(json.loads(line))
                status = str(lines[-1].get("status"))
                progress.append((time.monotonic(), status, int(lines[-1].get("completed", 0))))
    except urllib.error.HTTPError as exc:
        with exc:
            return {"error": f"HTTP {exc.code}: {exc.read()[:500]!r}"}
    ended = time.monotonic()
    last = lines[-1] if lines else {}
    sources = max((int(line.get("sources") or 0) for line in lines), default=0)
    return {
        "started": started,
        "ended": ended,
        "last": last,
        "sources": sources,
        "progress": progress,
    }


OPERATIONS = {"get": get, "serve_raw": serve_raw, "recv_raw": recv_raw, "pull": pull}


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = OPERATIONS[command["op"]](command)
        except (OSError, ValueError, KeyError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
