"""The dashboard's page and files, read once from the package and served from memory.

They hold no data (the page fetches it with the caller's rights), so anyone may load
them: a browser on the LAN must get the page before it can ask its user for an API key.
The headers keep the page to itself: no other site may frame it (the Accept button of a
pairing must not be clickjacked), and it may load nothing but this node's files.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

from shoal.errors import NotFound

_TYPES: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

_files: dict[str, bytes] = {}


def _file(name: str) -> bytes:
    if name not in _files:  # first use: a few tens of KiB, kept for the node's life
        _files[name] = resources.files("shoal.dashboard").joinpath("static", name).read_bytes()
    return _files[name]


def _answer(name: str) -> web.Response:
    return web.Response(
        body=_file(name), content_type=_TYPES[name], charset="utf-8", headers=SECURITY_HEADERS
    )


async def index(request: web.Request) -> web.Response:
    """`GET /`: the page."""
    return _answer("index.html")


async def asset(request: web.Request) -> web.Response:
    """`GET /dashboard/{asset}`: one of the page's files, by its name in a fixed list."""
    name = request.match_info["asset"]
    if name not in _TYPES or name == "index.html":
        raise NotFound(f"no dashboard file {name[:64]!r}")
    return _answer(name)
