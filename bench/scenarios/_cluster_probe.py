"""Runs inside a host of the namespace LAN and watches N nodes converge (cluster_idle).

One JSON command on stdin: `{"nodes": [{"name", "url", "key"}], "timeout": s}`. It polls
each node's GET /shoal/v1/peers (with that node's API key) in turn, dropping a node from
the round once it lists every other node healthy, until all have or `timeout` passes.
One line out: `{"at": {name: <monotonic> | null}, "errors": {name: last error}}`, stamps
from `time.monotonic()` (CLOCK_MONOTONIC is the same in every network namespace). A
second command `{"check": [...same nodes...]}` asks once, of every node, how many of the
others it lists healthy: `{"healthy": {name: count}}`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

PAUSE_S = 0.05  # between rounds; a round itself asks every node not yet converged


def healthy_peers(node: dict[str, str]) -> set[str]:
    request = urllib.request.Request(
        node["url"] + "/shoal/v1/peers", headers={"Authorization": f"Bearer {node['key']}"}
    )
    with urllib.request.urlopen(request, timeout=2) as response:
        document = json.loads(response.read())
    return {p["name"] for p in document["peers"] if p.get("health") == "healthy"}


def converge(nodes: list[dict[str, str]], timeout: float) -> dict[str, object]:
    names = {n["name"] for n in nodes}
    at: dict[str, float | None] = {n["name"]: None for n in nodes}
    errors: dict[str, str] = {}
    waiting = list(nodes)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for node in list(waiting):
            try:
                seen = healthy_peers(node)
            except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
                errors[node["name"]] = f"{type(exc).__name__}: {exc}"
                continue
            if names - {node["name"]} <= seen:
                at[node["name"]] = time.monotonic()
                waiting.remove(node)
        time.sleep(PAUSE_S)
    return {"at": at, "errors": errors}


def check(nodes: list[dict[str, str]]) -> dict[str, object]:
    names = {n["name"] for n in nodes}
    counts: dict[str, int | None] = {}
    for node in nodes:
        try:
            counts[node["name"]] = len(healthy_peers(node) & (names - {node["name"]}))
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            counts[node["name"]] = None
    return {"healthy": counts}


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        if "check" in command:
            answer = check(command["check"])
        else:
            answer = converge(command["nodes"], float(command.get("timeout", 60)))
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
