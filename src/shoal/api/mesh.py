"""The peer protocol (state exchange, goodbye) and the cluster's operator views."""

from __future__ import annotations

import ipaddress
import logging

import orjson
from aiohttp import web

from shoal.api.state import NODE
from shoal.errors import Forbidden, InvalidRequest, UpstreamFailed
from shoal.mesh.state import ProtocolError, decode

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 20  # a snapshot with thousands of models is still far below 1 MiB


async def exchange_state(request: web.Request) -> web.Response:
    """A peer's heartbeat or push: take its snapshot, answer with ours."""
    node = request.app[NODE]
    try:
        state = decode(await request.content.read(_MAX_MESSAGE))
    except ProtocolError as exc:
        raise InvalidRequest(f"not a Shoal state snapshot: {exc}") from None
    if state.node_id == node.node_id:
        if state.instance != node.instance:  # not our own probe of our own address
            node.duplicate_id_seen(request.remote or "?")
            error = InvalidRequest(
                "you present this node's ID: two nodes share one identity "
                "(a copied data dir?); delete node.key on one of them"
            )
            error.status, error.code = 409, "duplicate_node_id"
            raise error
    else:
        node.peers.received(state, _address(request.remote or "", state.api_port))
    return _json_bytes(node.snapshot().encode())


async def goodbye(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        peer_id = orjson.loads(await request.content.read(4096))["node_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest('a goodbye is {"node_id": ...}') from None
    node.peers.goodbye(str(peer_id))
    return _json_bytes(b'{"ok":true}')


async def list_peers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return _json_bytes(orjson.dumps({"node_id": node.node_id, "peers": node.peer_list()}))


async def join(request: web.Request) -> web.Response:
    """`shoal join URL`: exchange states with a node by address (from this machine only)."""
    node = request.app[NODE]
    _loopback_only(request)
    try:
        url = str(orjson.loads(await request.read())["url"]).rstrip("/")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest('a join is {"url": "http://host:11450"}', param="url") from None
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("url must start with http:// or https://", param="url")
    state = await node.peers.probe(url, "join")
    if state is None:
        raise UpstreamFailed(f"no Shoal node answers at {url}")
    if state.node_id == node.node_id:
        raise InvalidRequest(f"{url} is this node itself", param="url")
    return _json_bytes(orjson.dumps({"node_id": state.node_id, "name": state.name, "url": url}))


async def scan(request: web.Request) -> web.Response:
    """`shoal peers --scan`: probe the local /24s (from this machine only)."""
    node = request.app[NODE]
    _loopback_only(request)
    return _json_bytes(orjson.dumps({"found": await node.scan()}))


def _loopback_only(request: web.Request) -> None:
    # These make the node contact addresses: only its own operator may ask for that.
    if not ipaddress.ip_address(request.remote or "0.0.0.0").is_loopback:
        raise Forbidden("this operation is only allowed from the node's own machine")


def _address(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def _json_bytes(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")
