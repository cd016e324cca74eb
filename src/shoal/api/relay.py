"""Relaying a backend's answer to the client: streams chunk by chunk, nothing buffered."""

from __future__ import annotations

from aiohttp import web

from shoal.api.errors import error_response, sse_error_event
from shoal.errors import ShoalError, UpstreamError, UpstreamFailed
from shoal.protocol import error_message
from shoal.routing.dispatch import Opened

_SSE = "text/event-stream"


async def relay(
    request: web.Request, opened: Opened, headers: dict[str, str]
) -> web.StreamResponse:
    upstream = opened.upstream
    if upstream.status == 200 and upstream.content_type.startswith(_SSE):
        return await _relay_stream(request, opened, headers)
    try:
        raw = await upstream.read()
    except UpstreamError as exc:
        opened.broke()
        return error_response(exc, headers)
    opened.first_byte()
    if upstream.status >= 400 and error_message(raw) is None:
        error = UpstreamFailed(f"the backend answered {upstream.status}")
        error.status = upstream.status if upstream.status < 500 else 502
        return error_response(error, headers)
    return web.Response(
        body=raw,
        status=upstream.status,
        headers={**headers, "Content-Type": upstream.content_type},
    )


async def _relay_stream(
    request: web.Request, opened: Opened, headers: dict[str, str]
) -> web.StreamResponse:
    upstream = opened.upstream
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
    chunks = upstream.chunks()
    try:
        # The first chunk apart, so that the loop over the rest carries no check.
        async for chunk in chunks:
            await response.write(chunk)
            opened.first_byte()
            break
        async for chunk in chunks:
            await response.write(chunk)
    except ShoalError as exc:
        # The stream has started: the status line is sent, so the error travels as an
        # event the OpenAI SDKs raise, never as a silent truncation.
        opened.broke()
        await response.write(sse_error_event(exc))
    await response.write_eof()
    return response
