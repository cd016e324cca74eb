"""An HTTP client that lives inside a namespace, driven by the test over stdin/stdout.

The test process sits in the root namespace, which has no route to the LAN's addresses;
this agent runs in a host of the LAN and makes requests for it. One JSON object a line
in (`method`, `url`, `body`, `headers`, `timeout`), one a line out (`status`, `headers`,
`body`, `seconds`), or `{"error": ...}` when no answer came. `timeout` bounds the
connection and every read, so a request that hangs ends as `TimeoutError`.

With `"stream": true` the body is read line by line as it arrives, and the answer also
has `first_byte_seconds` (None if no byte came). `{"batch": [call, ...]}` makes every
call at once, each in its own thread and `at` seconds after the batch began (default 0),
and answers `{"results": [answer, ...]}` in the same order, each with `started` (its
offset from the batch's start) once all have ended.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def call(spec: dict[str, Any]) -> dict[str, Any]:
    body = spec.get("body")
    request = urllib.request.Request(
        spec["url"],
        data=body.encode() if body is not None else None,
        headers=spec.get("headers") or {},
        method=spec.get("method", "GET"),
    )
    started = time.monotonic()
    answer: dict[str, Any]
    first_byte: list[float] = []
    try:
        with urllib.request.urlopen(request, timeout=spec.get("timeout", 10)) as response:
            answer = {"status": response.status, "headers": dict(response.headers)}
            if spec.get("stream"):
                lines = []
                for line in response:  # raises TimeoutError if the stream goes silent
                    if not first_byte:
                        first_byte.append(time.monotonic() - started)
                    lines.append(line)
                answer["body"] = b"".join(lines).decode(errors="replace")
            else:
                answer["body"] = response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        with exc:
            answer = {"status": exc.code, "headers": dict(exc.headers),
                      "body": exc.read().decode(errors="replace")}  # fmt: skip
    except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: a body cut short
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    answer["seconds"] = time.monotonic() - started
    if spec.get("stream"):
        answer["first_byte_seconds"] = first_byte[0] if first_byte else None
    return answer


def batch(calls: list[dict[str, Any]]) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in calls]
    began = time.monotonic()

    def run(index: int, spec: dict[str, Any]) -> None:
        time.sleep(max(0.0, began + float(spec.get("at", 0)) - time.monotonic()))
        started = time.monotonic() - began
        try:
            results[index] = call(spec)
        except Exception as exc:  # an agent bug must not lose the other answers
            results[index] = {"error": f"{type(exc).__name__}: {exc}"}
        results[index]["started"] = started

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results}


def main() -> None:
    for line in sys.stdin:
        spec = json.loads(line)
        answer = batch(spec["batch"]) if "batch" in spec else call(spec)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
