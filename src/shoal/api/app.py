"""The route table and the aiohttp application around it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from shoal.api import mesh, openai, operator
from shoal.api.access import MachineHosts, access_middleware
from shoal.api.errors import errors_middleware
from shoal.api.state import NODE
from shoal.trust.keys import KeyStore

if TYPE_CHECKING:
    from shoal.node import Node

ROUTES = [
    web.get("/v1/models", openai.list_models),
    web.post("/v1/chat/completions", openai.chat_completions),
    web.post("/v1/completions", openai.completions),
    web.post("/v1/embeddings", openai.embeddings),
    web.get("/healthz", operator.healthz),
    web.get("/shoal/v1/status", operator.status),
    web.get("/shoal/v1/peers", mesh.list_peers),
    web.post("/shoal/v1/peers", mesh.join),
    web.post("/shoal/v1/peers/scan", mesh.scan),
    web.post("/shoal/v1/mesh/state", mesh.exchange_state),
    web.post("/shoal/v1/mesh/goodbye", mesh.goodbye),
    web.post("/shoal/v1/trust/hello", mesh.trust_hello),
    web.post("/shoal/v1/trust/confirm", mesh.trust_confirm),
    web.get("/shoal/v1/pairs", mesh.list_pairs),
    web.post("/shoal/v1/pairs/{node}/{action}", mesh.pair_action),
]


def build_app(node: Node) -> web.Application:
    app = web.Application(
        middlewares=[
            errors_middleware,
            mesh.peer_identity,
            access_middleware(
                node.settings,
                KeyStore.in_data_dir(node.settings.data_dir),
                MachineHosts(node.settings, extra=[f"shoal-{node.node_id[:12]}.local"]),
                cluster_mode=lambda: node.trust.mode,
                peer_request=lambda request: request.get(mesh.PEER) is not None,
            ),
        ],
        client_max_size=node.settings.limits.max_body_bytes,
    )
    app[NODE] = node
    app.add_routes(ROUTES)
    served_by = node.name

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Shoal-Served-By", served_by)

    app.on_response_prepare.append(stamp)
    return app
