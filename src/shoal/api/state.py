"""Typed keys under which the composition root hands the node to handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from shoal.node import Node

NODE: web.AppKey[Node] = web.AppKey("node")
