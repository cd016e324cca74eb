"""A small blocking client for the CLI's calls to a node's API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from shoal.protocol import error_message


class NodeUnreachable(Exception):
    pass


class NodeRefused(Exception):
    """The node answered with an error; the message is the node's own."""


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
        raise NodeRefused(message) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        base = request.full_url.split("/shoal/")[0].split("/v1/")[0]
        raise NodeUnreachable(
            f"no Shoal node answers at {base} ({reason}); is `shoal serve` running?"
        ) from None
