"""The node-to-node protocol: the admission handshake, state exchange and goodbye.

The handshake runs on the API port (no trust exists yet, so its audience is public and
it authenticates by itself); state and goodbye run on the peer port, where the access
decision has already proven the caller to be a paired node.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from shoal.api.access import CALLER
from shoal.api.bodies import read_body
from shoal.api.operator import json
from shoal.api.services import ADMISSION, LIMITS, PEERS
from shoal.errors import BusyError, Forbidden, InvalidRequest
from shoal.mesh.state import ProtocolError, decode_message
from shoal.trust.handshake import ConfirmReply, HandshakeError

log = logging.getLogger(__name__)

# Body caps, per route, enforced before reading (`shoal.api.bodies`).
#: A snapshot with thousands of models is still far below 1 MiB.
STATE_MAX_BYTES = 1 << 20
#: Anyone may send a handshake message: a hello is about 1.5 KiB (its certificate at
#: most 4 KiB), so 16 KiB is room enough and costs a stranger's request little memory.
HANDSHAKE_MAX_BYTES = 16 * 1024


def _peer(request: web.Request) -> str:
    peer_id = request[CALLER].peer
    assert peer_id is not None, "the access decision lets only paired nodes reach this"
    return peer_id


async def exchange_state(request: web.Request) -> web.Response:
    """A peer's heartbeat or push: take its snapshot, answer with ours."""
    peer_id = _peer(request)
    try:
        message = decode_message(await _read(request, STATE_MAX_BYTES))
    except ProtocolError as exc:
        raise InvalidRequest(f"not a Shoal state snapshot: {exc}") from None
    if message.node_id != peer_id:
        raise Forbidden("that snapshot is not the connecting node's own")
    return _bytes(request.app[PEERS].answer(message, request.remote or ""))


async def goodbye(request: web.Request) -> web.Response:
    request.app[PEERS].goodbye(_peer(request))  # only a node itself can say it leaves
    return _bytes(b'{"ok":true}')


async def trust_hello(request: web.Request) -> web.Response:
    """Admission handshake, step 1: the initiator's key (and key share); ours back."""
    try:
        return json(request.app[ADMISSION].hello(await _message(request), request.remote or ""))
    except HandshakeError as exc:
        log.warning("refused a handshake from %s: %s", request.remote, exc)
        raise Forbidden(f"handshake refused: {exc}") from None
    except BusyError as exc:  # out of tries at the secret: 429, and no log line each
        log.debug("refused a handshake from %s: %s", request.remote, exc.message)
        raise


async def trust_confirm(request: web.Request) -> web.Response:
    """Admission handshake, step 2: the initiator's proof; ours back (secret mode)."""
    try:
        met = request.app[ADMISSION].confirm(await _message(request), request.remote or "")
    except HandshakeError as exc:
        log.warning("refused a handshake from %s: %s", request.remote, exc)
        raise Forbidden(f"handshake refused: {exc}") from None
    except BusyError as exc:
        log.debug("refused a handshake from %s: %s", request.remote, exc.message)
        raise
    reply = {"trust": met.node.state.value, "code": met.node.code, "proof": met.proof}
    return json(ConfirmReply.model_validate(reply).wire())  # what we send, we would accept


async def _message(request: web.Request) -> dict[str, object]:
    """The handshake message's JSON object, still to be checked (by `Trust`)."""
    try:
        document = orjson.loads(await _read(request, HANDSHAKE_MAX_BYTES))
    except orjson.JSONDecodeError:
        raise InvalidRequest("not a JSON handshake message") from None
    if not isinstance(document, dict):
        raise InvalidRequest("a handshake message is a JSON object")
    return document


async def _read(request: web.Request, limit: int) -> bytes:
    return await read_body(request, limit, request.app[LIMITS].body_timeout_s)


def _bytes(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")
