"""Relaying a backend's answer to the client: streams chunk by chunk, nothing buffered."""

from __future__ import annotations

import orjson
from aiohttp import web

from shoal.api.errors import error_response, sse_error_event
from shoal.backends.base import Upstream
from shoal.errors import ShoalError, UpstreamError, UpstreamFailed

_SSE = "text/event-stream"


async def relay(
    request: web.Request, upstream: Upstream, headers: dict[str, str]
) -> web.StreamResponse:
    if upstream.status == 200 and upstream.content_type.startswith(_SSE):
        return await _relay_stream(request, upstream, headers)
    try:
        raw = await upstream.read()
    except UpstreamError as exc:
        return error_response(exc, headers)
    if upstream.status >= 400 and not _is_openai_error(raw):
        error = UpstreamFailed(f"the backend answered {upstream.status}")
        error.status = upstream.status if upstream.status < 500 else 502
        return error_response(error, headers)
    return web.Response(
        body=raw,
        status=upstream.status,
        headers={**headers, "Content-Type": upstream.content_type},
    )


async def _relay_stream(
    request: web.Request, upstream: Upstream, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={
            **headers,
            "Content-Type": upstream.content_type,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks():
            await response.write(chunk)
    except ShoalError as exc:
        # The stream has started: the status line is sent, so the error travels as an
        # event the OpenAI SDKs raise, never as a silent truncation.
        await response.write(sse_error_event(exc))
    await response.write_eof()
    return response


def _is_openai_error(raw: bytes) -> bool:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and isinstance(document.get("error"), dict | str)
