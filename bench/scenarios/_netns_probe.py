"""Runs inside a host of the namespace LAN and waits for conditions on the nodes there.

The harness sits in the root namespace, which has no route into the LAN; this probe
polls for it, every 20 ms, and reports when a condition first held, as a
`time.monotonic()` stamp (CLOCK_MONOTONIC is the same in every network namespace).
One JSON command a line in: `{"url", "model", "chat": bool, "gone": bool, "timeout"}`;
one line out: `{"at": <monotonic> | null, "error": ...}`.

- without "model": until GET /healthz answers;
- with "model": until GET /v1/models lists it (with "gone": until it does not), and with
  "chat", until a chat completion for it is answered 200 as well.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

INTERVAL_S = 0.02


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _chat(url: str, model: str) -> bool:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return bool(response.status == 200)


def holds(command: dict[str, object]) -> bool:
    url, model = str(command["url"]), command.get("model")
    if model is None:
        _get(url + "/healthz")
        return True
    listed = any(m["id"] == model for m in _get(url + "/v1/models")["data"])  # type: ignore[index]
    if command.get("gone"):
        return not listed
    return listed and (not command.get("chat") or _chat(url, str(model)))


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        deadline = time.monotonic() + float(command.get("timeout", 30))
        answer: dict[str, object] = {"at": None, "error": "timed out"}
        while time.monotonic() < deadline:
            try:
                if holds(command):
                    answer = {"at": time.monotonic(), "error": None}
                    break
            except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
                answer["error"] = f"{type(exc).__name__}: {exc}"
            time.sleep(INTERVAL_S)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
