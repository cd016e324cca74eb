"""An HTTP client that lives inside a namespace, driven by the test over stdin/stdout.

The test process sits in the root namespace, which has no route to the LAN's addresses;
this agent runs in a host of the LAN and makes requests for it. One JSON object a line
in (`method`, `url`, `body`, `headers`, `timeout`), one a line out (`status`, `headers`,
`body`, `seconds`), or `{"error": ...}` when no answer came.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request


def main() -> None:
    for line in sys.stdin:
        call = json.loads(line)
        body = call.get("body")
        request = urllib.request.Request(
            call["url"],
            data=body.encode() if body is not None else None,
            headers=call.get("headers") or {},
            method=call.get("method", "GET"),
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=call.get("timeout", 10)) as response:
                answer = {"status": response.status, "headers": dict(response.headers),
                          "body": response.read().decode(errors="replace")}  # fmt: skip
        except urllib.error.HTTPError as exc:
            with exc:
                answer = {"status": exc.code, "headers": dict(exc.headers),
                          "body": exc.read().decode(errors="replace")}  # fmt: skip
        except OSError as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answer["seconds"] = time.monotonic() - started
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
