"""A small blocking client for the CLI's calls to a node's API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from shoal.protocol import error_message


class NodeUnreachable(Exception):
    pass


class NodeRefused(Exception):
    """The node answered with an error; the message is the node's own."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def get_json(
    base_url: str, path: str, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> Any:
    return _call(
        urllib.request.Request(base_url.rstrip("/") + path, headers=headers or {}), timeout
    )


def post_json(base_url: str, path: str, body: Any, timeout: float = 60.0) -> Any:
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return _call(request, timeout)


def _call(request: urllib.request.Request, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            message = error_message(exc.read()) or f"HTTP {exc.code}"
        raise NodeRefused(message, exc.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        base = request.full_url.split("/shoal/")[0].split("/v1/")[0]
        raise NodeUnreachable(
            f"no Shoal node answers at {base} ({reason}); is `shoal serve` running?"
        ) from None


def post_lines(base_url: str, path: str, body: Any, timeout: float = 60.0) -> Iterator[Any]:
    """POST, then the NDJSON answer one object at a time (`timeout`: each read's)."""
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            message = error_message(exc.read()) or f"HTTP {exc.code}"
        raise NodeRefused(message, exc.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NodeUnreachable(f"no Shoal node answers at {base_url} ({reason})") from None
    with response:
        for line in response:
            if line.strip():
                yield json.loads(line)
