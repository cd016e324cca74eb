"""OpenAI's client API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import orjson
from aiohttp import web

from shoal.api.relay import relay
from shoal.api.requests import ChatRequest, CompletionRequest, EmbeddingRequest, RequestBody, parse
from shoal.api.services import DISPATCHER, LIMITS, VIEWS
from shoal.backends.base import Operation
from shoal.errors import PayloadTooLarge
from shoal.protocol import ROUTE_HEADER, SERVED_BY_HEADER
from shoal.routing.rank import hop_policy


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.CHAT, ChatRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.COMPLETION, CompletionRequest)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.EMBEDDING, EmbeddingRequest)


async def list_models(request: web.Request) -> web.Response:
    """Every model the cluster can serve now, each once, with the nodes that hold it."""
    local_only = hop_policy(request.headers).local_only
    body = request.app[VIEWS].models(local_only=local_only)
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _forward(
    request: web.Request, op: Operation, schema: type[RequestBody]
) -> web.StreamResponse:
    app = request.app
    raw = await _read_body(request, app[LIMITS].max_body_bytes)
    body = parse(schema, raw)
    policy = hop_policy(request.headers)
    async with app[DISPATCHER].open(op, body.model, raw, policy) as opened:
        headers: dict[str, str] = {ROUTE_HEADER: opened.route}
        if opened.upstream.served_by:  # the peer that produced it says so
            headers[SERVED_BY_HEADER] = opened.upstream.served_by
        return await relay(request, opened, headers)


async def _read_body(request: web.Request, limit: int) -> bytes:
    # Refuse a declared oversize body before reading any of it; a chunked body is cut
    # off by aiohttp at the application's client_max_size while it is read.
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
