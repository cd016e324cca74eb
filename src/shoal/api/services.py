"""The narrow services handlers receive, under typed application keys.

The composition root (`shoal.node`) puts each service in the application; a handler
takes the one or two it needs (`request.app[DISPATCHER]`) and never sees the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from shoal.settings import LimitSettings

if TYPE_CHECKING:
    from shoal.api.views import Views
    from shoal.engine.managed import ManagedBackend
    from shoal.mesh.advert import OwnState
    from shoal.mesh.peers import Peers
    from shoal.mesh.scan import Scanner
    from shoal.routing.dispatch import Dispatcher
    from shoal.trust.admission import Admission

DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
VIEWS: web.AppKey[Views] = web.AppKey("views")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")
PEERS: web.AppKey[Peers] = web.AppKey("peers")
OWN_STATE: web.AppKey[OwnState] = web.AppKey("own_state")
SCANNER: web.AppKey[Scanner] = web.AppKey("scanner")
MANAGED: web.AppKey[ManagedBackend] = web.AppKey("managed")
LIMITS: web.AppKey[LimitSettings] = web.AppKey("limits", LimitSettings)
