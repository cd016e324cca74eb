"""Shoal's operator API: /healthz and /shoal/v1/status."""

from __future__ import annotations

import orjson
from aiohttp import web

from shoal.api.state import NODE


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await node.refresh()
    return web.Response(body=orjson.dumps(node.status()), content_type="application/json")
