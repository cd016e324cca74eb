"""The route table, each route with its audience, and the aiohttp application around it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from shoal import protocol as p
from shoal.api import mesh, metrics, openai, operator, pull, share
from shoal.api.access import access_middleware
from shoal.api.audience import Audience, Caller
from shoal.api.errors import Handler, errors_middleware
from shoal.dashboard import pages, stream
from shoal.settings import ClusterMode, Settings
from shoal.trust.keys import KeyStore

Method = Literal["GET", "POST"]


@dataclass(frozen=True, slots=True)
class Route:
    method: Method
    path: str
    handler: Handler
    audience: Audience


PUBLIC, CLIENT, LOCAL, PEER = Audience.PUBLIC, Audience.CLIENT, Audience.LOCAL, Audience.PEER

ROUTES: tuple[Route, ...] = (
    Route("GET", p.MODELS_PATH, openai.list_models, CLIENT),
    Route("POST", p.CHAT_PATH, openai.chat_completions, CLIENT),
    Route("POST", p.COMPLETIONS_PATH, openai.completions, CLIENT),
    Route("POST", p.EMBEDDINGS_PATH, openai.embeddings, CLIENT),
    Route("GET", p.HEALTHZ_PATH, operator.healthz, PUBLIC),
    Route("GET", p.STATUS_PATH, operator.status, CLIENT),
    Route("GET", p.METRICS_PATH, metrics.metrics, CLIENT),  # what status shows, as counters
    Route("GET", p.PEERS_PATH, operator.list_peers, CLIENT),
    Route("POST", p.PEERS_PATH, operator.join, LOCAL),  # makes the node contact an address
    Route("POST", p.SCAN_PATH, operator.scan, LOCAL),
    Route("GET", p.PAIRS_PATH, operator.list_pairs, LOCAL),
    Route("POST", p.PAIR_ACTION_PATH, operator.pair_action, LOCAL),
    Route("GET", p.LOCAL_MODELS_PATH, operator.local_models, LOCAL),  # paths on this disk
    Route("POST", p.LOAD_PATH, operator.load_model, LOCAL),
    Route("POST", p.UNLOAD_PATH, operator.unload_model, LOCAL),
    Route("POST", p.HELLO_PATH, mesh.trust_hello, PUBLIC),  # authenticates by itself
    Route("POST", p.CONFIRM_PATH, mesh.trust_confirm, PUBLIC),
    Route("POST", p.STATE_PATH, mesh.exchange_state, PEER),
    Route("POST", p.GOODBYE_PATH, mesh.goodbye, PEER),
    Route("GET", share.FILE_MANIFEST_PATH, share.file_manifest, PEER),  # model files
    Route("GET", share.FILE_PATH, share.file_range, PEER),
    Route("POST", pull.PULL_PATH, pull.pull_model, LOCAL),  # downloads, writes the store
    Route("POST", p.PEER_PULL_PATH, pull.pull_for_peer, PEER),  # `pull --on` this node
    Route("GET", p.EVENTS_PATH, stream.events, CLIENT),  # the live view; pairs: operator only
    Route("GET", p.DASHBOARD_PATH, pages.index, PUBLIC),  # static files, no data in them
    Route("GET", p.DASHBOARD_ASSET_PATH, pages.asset, PUBLIC),
)


def audience_of(
    routes: tuple[Route, ...], router: web.UrlDispatcher
) -> Callable[[web.Request], Audience]:
    """The audience of the route a request resolved to, by the route object aiohttp
    resolved (not the raw path, so no spelling of a URL reaches another route's
    audience); an unknown path or method needs what the client API needs."""
    declared: dict[tuple[str, str], Audience] = {(r.path, r.method): r.audience for r in routes}
    table: dict[web.AbstractRoute, Audience] = {}
    for route in router.routes():
        method = "GET" if route.method == "HEAD" else route.method
        if route.resource is not None and (route.resource.canonical, method) in declared:
            table[route] = declared[(route.resource.canonical, method)]

    def lookup(request: web.Request) -> Audience:
        return table.get(request.match_info.route, CLIENT)

    return lookup


def build_app(
    settings: Settings,
    *,
    keys: KeyStore,
    own_hosts: Callable[[], set[str]],
    caller_of: Callable[[web.Request], Caller],
    cluster_mode: Callable[[], ClusterMode],
    served_by: str,
    routes: tuple[Route, ...] = ROUTES,
) -> web.Application:
    """The application; the caller adds the services under `shoal.api.services` keys."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=settings.limits.max_body_bytes
    )
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)  # HEAD too, as aiohttp does
        else:
            app.router.add_route(route.method, route.path, route.handler)
    app.middlewares.append(  # after the routes: it looks their audiences up by route
        access_middleware(
            settings,
            keys,
            own_hosts,
            audience_of=audience_of(routes, app.router),
            caller_of=caller_of,
            cluster_mode=cluster_mode,
        )
    )

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault(p.SERVED_BY_HEADER, served_by)

    app.on_response_prepare.append(stamp)
    return app
