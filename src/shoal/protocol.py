"""Shoal's wire names in one place: HTTP paths, headers, reading an error body or usage.

The route table (`shoal.api.app`), the peer links, the admission handshake, the CLI and
the detector all name paths from here, so a path cannot be spelt two ways.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# -- the client API (OpenAI's paths) -----------------------------------------------------
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"

# -- the operator API --------------------------------------------------------------------
HEALTHZ_PATH = "/healthz"
STATUS_PATH = "/shoal/v1/status"
PEERS_PATH = "/shoal/v1/peers"  # GET: the cluster view; POST: join by address
SCAN_PATH = "/shoal/v1/peers/scan"
PAIRS_PATH = "/shoal/v1/pairs"
PAIR_ACTION_PATH = "/shoal/v1/pairs/{node}/{action}"
LOCAL_MODELS_PATH = "/shoal/v1/models/local"  # the GGUFs on this node's disk, with state
LOAD_PATH = "/shoal/v1/models/load"  # {"model": NAME}: load now, answer once loaded
UNLOAD_PATH = "/shoal/v1/models/unload"  # {"model": NAME}
EVENTS_PATH = "/shoal/v1/events"  # text/event-stream: a snapshot, then what changes
METRICS_PATH = "/metrics"  # Prometheus's text format (Prometheus's default path)

# -- the dashboard (static files: no data in them) ---------------------------------------
DASHBOARD_PATH = "/"
DASHBOARD_ASSET_PATH = "/dashboard/{asset}"

# -- node to node ------------------------------------------------------------------------
HELLO_PATH = "/shoal/v1/trust/hello"  # admission handshake, API port
CONFIRM_PATH = "/shoal/v1/trust/confirm"
STATE_PATH = "/shoal/v1/mesh/state"  # heartbeat and push, peer port (mutual TLS)
PEER_PULL_PATH = "/shoal/v1/peer/models/pull"  # a peer's operator asks us to pull
GOODBYE_PATH = "/shoal/v1/mesh/goodbye"

# -- headers -----------------------------------------------------------------------------
HOP_HEADER = "X-Shoal-Hop"  # set on every forwarded request
NODE_HEADER = "X-Shoal-Node"  # a client pins a node: by name, full ID, or ID prefix
LOCAL_ONLY_HEADER = "X-Shoal-Local-Only"  # a client forbids forwarding
SERVED_BY_HEADER = "X-Shoal-Served-By"  # the node that produced the answer
ROUTE_HEADER = "X-Shoal-Route"  # local, peer or retried


def error_message(raw: bytes) -> str | None:
    """The message of an OpenAI-shaped error body (`{"error": {"message": ...}}`, or the
    `{"error": "text"}` some servers send); None when the body is not one."""
    try:
        document: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else ""
    return None


# OpenAI's own order, matched at once; any other order (llama.cpp's server puts
# completion_tokens first) is found key by key.
_USAGE = re.compile(
    rb'"usage"\s*:\s*\{\s*"prompt_tokens"\s*:\s*(\d+)\s*,\s*"completion_tokens"\s*:\s*(\d+)'
)
_COUNT = re.compile(rb"\s*:\s*(\d+)")  # after a key: its integer value
_USAGE_SPAN = 512  # bytes after `"usage"` where its counts are (its details come later)


def usage_counts(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last `"usage"` object in the end of an OpenAI
    answer (a whole body, or a stream's last chunks); None when there is none.

    Searched, not parsed: this runs once per request, on the request path. A quote in
    generated text is escaped in JSON, so text cannot fake the key.
    """
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    found = _USAGE.match(tail, at)
    if found is not None:
        return int(found[1]), int(found[2])
    prompt = _count(tail, b'"prompt_tokens"', at)
    if prompt is None:
        return None
    return prompt, _count(tail, b'"completion_tokens"', at) or 0


def _count(tail: bytes, key: bytes, start: int) -> int | None:
    at = tail.find(key, start, start + _USAGE_SPAN)
    if at < 0:
        return None
    found = _COUNT.match(tail, at + len(key))
    return int(found[1]) if found else None
