"""OpenAI's client API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from shoal.api.relay import relay
from shoal.api.requests import ChatRequest, CompletionRequest, EmbeddingRequest, RequestBody, parse
from shoal.api.state import NODE
from shoal.backends.base import Operation
from shoal.errors import PayloadTooLarge


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.CHAT, ChatRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.COMPLETION, CompletionRequest)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.EMBEDDING, EmbeddingRequest)


async def list_models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    merged: dict[str, dict[str, Any]] = {}
    for info, entry in node.registry.models():
        model = merged.setdefault(
            info.id,
            {
                "id": info.id,
                "object": "model",
                "created": 0,
                "owned_by": "shoal",
                "loaded": False,
                "nodes": [node.name],
                "backends": [],
                "context_length": info.context_length,
                "quantization": info.quantization,
                "size_bytes": info.size_bytes,
                "operations": sorted(info.operations),
            },
        )
        model["loaded"] = model["loaded"] or info.loaded
        model["backends"].append(entry.backend.name)
    body = {"object": "list", "data": sorted(merged.values(), key=lambda m: m["id"])}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _forward(
    request: web.Request, op: Operation, schema: type[RequestBody]
) -> web.StreamResponse:
    node = request.app[NODE]
    raw = await _read_body(request, node.settings.limits.max_body_bytes)
    body = parse(schema, raw)
    async with node.dispatcher.open(op, body.model, raw) as opened:
        route = "retried" if opened.retried else "local"
        return await relay(request, opened.upstream, {"X-Shoal-Route": route})


async def _read_body(request: web.Request, limit: int) -> bytes:
    # Refuse a declared oversize body before reading any of it; a chunked body is cut
    # off by aiohttp at the application's client_max_size while it is read.
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
