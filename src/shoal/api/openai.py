"""OpenAI's client API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from shoal.api.relay import relay
from shoal.api.requests import ChatRequest, CompletionRequest, EmbeddingRequest, RequestBody, parse
from shoal.api.state import NODE
from shoal.backends.base import Operation
from shoal.errors import PayloadTooLarge
from shoal.routing.rank import hop_policy


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.CHAT, ChatRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.COMPLETION, CompletionRequest)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _forward(request, Operation.EMBEDDING, EmbeddingRequest)


async def list_models(request: web.Request) -> web.Response:
    """Every model the cluster can serve now, each once, with the nodes that hold it."""
    node = request.app[NODE]
    merged: dict[str, dict[str, Any]] = {}

    def add(model_id: str, node_name: str, loaded: bool, facts: dict[str, Any]) -> None:
        model = merged.setdefault(
            model_id,
            {"id": model_id, "object": "model", "created": 0, "owned_by": "shoal",
             "loaded": False, "nodes": [], "backends": [], **facts},
        )  # fmt: skip
        model["loaded"] = model["loaded"] or loaded
        if node_name not in model["nodes"]:
            model["nodes"].append(node_name)

    for info, entry in node.registry.models():
        add(info.id, node.name, info.loaded, _facts(info.as_dict()))
        merged[info.id]["backends"].append(entry.backend.name)
    if not hop_policy(request.headers).local_only:
        for peer in node.peers.routable():
            assert peer.state is not None
            for advert in peer.state.models:
                add(advert.id, peer.state.name, advert.loaded, _facts(asdict(advert)))
    body = {"object": "list", "data": sorted(merged.values(), key=lambda m: m["id"])}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _facts(model: dict[str, Any]) -> dict[str, Any]:
    keys = ("context_length", "quantization", "size_bytes", "operations")
    return {key: model.get(key) for key in keys}


async def _forward(
    request: web.Request, op: Operation, schema: type[RequestBody]
) -> web.StreamResponse:
    node = request.app[NODE]
    raw = await _read_body(request, node.settings.limits.max_body_bytes)
    body = parse(schema, raw)
    policy = hop_policy(request.headers)
    async with node.dispatcher.open(op, body.model, raw, policy) as opened:
        headers = {"X-Shoal-Route": opened.route}
        if opened.upstream.served_by:  # the peer that produced it says so
            headers["X-Shoal-Served-By"] = opened.upstream.served_by
        return await relay(request, opened.upstream, headers)


async def _read_body(request: web.Request, limit: int) -> bytes:
    # Refuse a declared oversize body before reading any of it; a chunked body is cut
    # off by aiohttp at the application's client_max_size while it is read.
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
