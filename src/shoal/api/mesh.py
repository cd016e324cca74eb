"""The peer protocol (state exchange, goodbye) and the cluster's operator views."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import orjson
from aiohttp import web

from shoal.api.errors import Handler
from shoal.api.state import NODE
from shoal.errors import Forbidden, InvalidRequest, NotFound, UpstreamFailed
from shoal.mesh.state import ProtocolError, decode
from shoal.trust.handshake import HandshakeError

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 20  # a snapshot with thousands of models is still far below 1 MiB


PEER: web.RequestKey[str | None] = web.RequestKey("peer", str | None)  # type: ignore[arg-type]


@web.middleware
async def peer_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Name the paired node at the other end of a mutual-TLS request (None otherwise).

    Requests on the API port carry no client certificate; on the peer port the TLS
    handshake already refused every certificate but a paired node's. Its connections
    are tracked so that unpairing it cuts them at once.
    """
    peer_id = None
    transport = request.transport
    if isinstance(transport, asyncio.Transport) and transport.get_extra_info("ssl_object"):
        peer_id = request.app[NODE].trust.peer_of_connection(transport)
        if peer_id is None:
            raise Forbidden("this node does not trust your key")
    request[PEER] = peer_id
    return await handler(request)


def _require_peer(request: web.Request) -> str:
    peer_id: str | None = request.get(PEER)
    if peer_id is None:
        raise Forbidden("node-to-node calls need the peer port and a paired node's key")
    return peer_id


async def exchange_state(request: web.Request) -> web.Response:
    """A peer's heartbeat or push: take its snapshot, answer with ours."""
    node = request.app[NODE]
    peer_id = _require_peer(request)
    try:
        state = decode(await request.content.read(_MAX_MESSAGE))
    except ProtocolError as exc:
        raise InvalidRequest(f"not a Shoal state snapshot: {exc}") from None
    if state.node_id != peer_id:
        raise Forbidden("that snapshot is not the connecting node's own")
    node.peers.received(state, _address(request.remote or "", state.api_port))
    return _json_bytes(node.snapshot().encode())


async def goodbye(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.peers.goodbye(_require_peer(request))  # only a node itself can say it leaves
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
    joined = await node.peers.probe(url, "join")
    if joined is None:
        raise UpstreamFailed(f"no Shoal node answers at {url}, or the handshake failed (see log)")
    if joined.node_id == node.node_id:
        raise InvalidRequest(f"{url} is this node itself", param="url")
    return _json_bytes(
        orjson.dumps(
            {
                "node_id": joined.node_id,
                "name": joined.name,
                "url": url,
                "trust": joined.state.value,
                "code": joined.code,
            }
        )
    )


async def trust_hello(request: web.Request) -> web.Response:
    """Admission handshake, step 1 (on the API port: no trust exists yet)."""
    node = request.app[NODE]
    try:
        return _json_bytes(orjson.dumps(node.trust.hello(await _message(request))))
    except HandshakeError as exc:
        log.warning("refused a handshake from %s: %s", request.remote, exc)
        raise Forbidden(f"handshake refused: {exc}") from None


async def trust_confirm(request: web.Request) -> web.Response:
    """Admission handshake, step 2: the initiator's proof."""
    node = request.app[NODE]
    try:
        met = node.trust.confirm(await _message(request), request.remote or "")
    except HandshakeError as exc:
        log.warning("refused a handshake from %s: %s", request.remote, exc)
        raise Forbidden(f"handshake refused: {exc}") from None
    if met.state.value == "paired":
        node.peers.sighted(met.node_id, met.address, "peer")
    return _json_bytes(orjson.dumps({"trust": met.state.value, "code": met.code}))


async def _message(request: web.Request) -> dict[str, object]:
    try:
        document = orjson.loads(await request.content.read(_MAX_MESSAGE))
    except orjson.JSONDecodeError:
        raise InvalidRequest("not a JSON handshake message") from None
    if not isinstance(document, dict):
        raise InvalidRequest("a handshake message is a JSON object")
    return document


async def list_pairs(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _loopback_only(request)
    node.trust.store.reload()
    nodes = [
        {"node_id": n.node_id, "short_id": n.short_id, "name": n.name, "state": n.state.value,
         "address": n.address, "code": n.code}
        for n in node.trust.store.nodes()
    ]  # fmt: skip
    return _json_bytes(orjson.dumps({"mode": node.trust.mode, "nodes": nodes}))


async def pair_action(request: web.Request) -> web.Response:
    """`shoal pair accept|decline|unpair|forget ID`: applied live."""
    node = request.app[NODE]
    _loopback_only(request)
    node.trust.store.reload()
    found = node.trust.store.find(request.match_info["node"])
    if found is None:
        raise NotFound(f"no single known node matches {request.match_info['node']!r}")
    action = request.match_info["action"]
    if action == "accept":
        node.trust.accept(found)
        if found.address:
            node.peers.sighted(found.node_id, found.address, "join")
    elif action in ("decline", "unpair"):
        node.trust.revoke(found, forget=False)
    elif action == "forget":
        node.trust.revoke(found, forget=True)
    else:
        raise NotFound(f"no pair action {action!r}")
    return _json_bytes(orjson.dumps({"node_id": found.node_id, "name": found.name, "done": action}))


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
