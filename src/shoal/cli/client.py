"""A small blocking client for the CLI's calls to a node's API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class NodeUnreachable(Exception):
    pass


def get_json(base_url: str, path: str, timeout: float = 10.0) -> Any:
    url = base_url.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise NodeUnreachable(f"{url} answered {exc.code}: {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NodeUnreachable(
            f"no Shoal node answers at {base_url} ({reason}); is `shoal serve` running?"
        ) from None
