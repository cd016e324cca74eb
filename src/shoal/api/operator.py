"""Shoal's operator API: health, this node's status, the cluster view, joining, pairing,
the models on this node's disk (list, load, unload)."""

from __future__ import annotations

import orjson
from aiohttp import web

from shoal.api.services import ADMISSION, MANAGED, SCANNER, VIEWS
from shoal.errors import InvalidRequest, NotFound, UpstreamFailed
from shoal.mesh.identity import short_id
from shoal.models.names import check_name
from shoal.trust.admission import PAIR_ACTIONS


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def status(request: web.Request) -> web.Response:
    return json(await request.app[VIEWS].status())


async def list_peers(request: web.Request) -> web.Response:
    return json(request.app[VIEWS].peers())


async def join(request: web.Request) -> web.Response:
    """`shoal join URL`: meet a node by address."""
    try:
        url = str(orjson.loads(await request.read())["url"]).rstrip("/")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest('a join is {"url": "http://host:11450"}', param="url") from None
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("url must start with http:// or https://", param="url")
    admission = request.app[ADMISSION]
    joined = await admission.meet(url, "join")
    if joined is None:
        raise UpstreamFailed(f"no Shoal node answers at {url}, or the handshake failed (see log)")
    if joined.node_id == admission.node_id:
        raise InvalidRequest(f"{url} is this node itself", param="url")
    return json(
        {
            "node_id": joined.node_id,
            "short_id": short_id(joined.node_id),
            "name": joined.name,
            "url": url,
            "trust": joined.state.value,
            "code": joined.code,
        }
    )


async def scan(request: web.Request) -> web.Response:
    """`shoal peers --scan`: probe the local /24s."""
    found = await request.app[SCANNER].run()
    return json(
        {
            "found": [
                {"url": url, "node_id": n.node_id, "name": n.name, "trust": n.state.value}
                for url, n in found
            ]
        }
    )


async def list_pairs(request: web.Request) -> web.Response:
    return json(request.app[VIEWS].pairs())


async def pair_action(request: web.Request) -> web.Response:
    """`shoal pair accept|decline|unpair|forget ID`: applied live."""
    action = request.match_info["action"]
    if action not in PAIR_ACTIONS:
        raise NotFound(f"no pair action {action!r}; one of {', '.join(PAIR_ACTIONS)}")
    chosen = next(a for a in PAIR_ACTIONS if a == action)  # the Literal, typed
    node = request.app[ADMISSION].decide(request.match_info["node"], chosen)
    return json(
        {"node_id": node.node_id, "short_id": node.short_id, "name": node.name, "done": action}
    )


async def local_models(request: web.Request) -> web.Response:
    """`shoal models --local`: every GGUF on this disk, loaded or not, with its memory."""
    return json({"data": request.app[MANAGED].local_models()})


async def load_model(request: web.Request) -> web.Response:
    """`shoal models load NAME`: answered once the model is loaded (or failed to)."""
    name = _model_name(await request.read())
    return json(await request.app[MANAGED].load(name))


async def unload_model(request: web.Request) -> web.Response:
    """`shoal models unload NAME`: answered once its engine has stopped."""
    name = _model_name(await request.read())
    return json(await request.app[MANAGED].unload(name))


def _model_name(raw: bytes) -> str:
    try:
        name = orjson.loads(raw)["model"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequest('the body is {"model": "NAME"}', param="model") from None
    return check_name(name)


def json(document: object) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")
