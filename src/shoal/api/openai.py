"""OpenAI's client API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import orjson
from aiohttp import web

from shoal.api.access import API_KEY
from shoal.api.bodies import read_body
from shoal.api.relay import relay
from shoal.api.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    RequestBody,
    encode,
    parse,
)
from shoal.api.services import DISPATCHER, LIMITS, VIEWS
from shoal.backends.base import Operation
from shoal.protocol import ROUTE_HEADER, SERVED_BY_HEADER
from shoal.routing.affinity import Prompt
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
    limits = app[LIMITS]
    raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
    body = parse(schema, raw)
    policy = hop_policy(request.headers, _prompt(body))
    # A LAN client's key is its class when requests queue, with the key's weight.
    key = request.get(API_KEY)
    cls, weight = (f"key:{key.id}", key.weight) if key is not None else (None, None)
    # The checked body is what travels on, never the client's bytes (shoal.api.requests).
    dispatcher = app[DISPATCHER]
    async with dispatcher.open(
        op, body.model, encode(body), policy, cls=cls, weight=weight
    ) as opened:
        headers: dict[str, str] = {ROUTE_HEADER: opened.route}
        if opened.upstream.served_by:  # the peer that produced it says so
            headers[SERVED_BY_HEADER] = opened.upstream.served_by
        return await relay(request, opened, headers)


def _prompt(body: RequestBody) -> Prompt | None:
    """The prompt, for cache affinity: keyed later, only if there is a choice of node."""
    if isinstance(body, ChatRequest):
        return Prompt(body.model, messages=body.messages)
    if isinstance(body, CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return Prompt(body.model, text=prompt)
    return None
