"""Relaying an answer to the client: streams chunk by chunk, nothing buffered.

The dispatcher hands over an answer whose first byte is in (`routing.dispatch.Answer`):
until then a failure went to the next target. From here on the answer is the client's,
so a stream that breaks or stalls (`limits.stall_timeout_s`) ends with an error event.
"""

from __future__ import annotations

from aiohttp import web

from shoal.api.errors import error_response, sse_error_event
from shoal.errors import ShoalError, UpstreamFailed
from shoal.protocol import error_message
from shoal.routing.dispatch import Opened


async def relay(
    request: web.Request, opened: Opened, headers: dict[str, str]
) -> web.StreamResponse:
    answer = opened.answer
    if answer.streamed:
        return await _relay_stream(request, opened, headers)
    raw = await answer.read()  # already in: the dispatcher read it whole
    opened.first_byte()
    if answer.status >= 400 and error_message(raw) is None:
        error = UpstreamFailed(f"the backend answered {answer.status}")
        error.status = answer.status if answer.status < 500 else 502
        return error_response(error, headers)
    return web.Response(
        body=raw,
        status=answer.status,
        headers={**headers, "Content-Type": answer.content_type},
    )


async def _relay_stream(
    request: web.Request, opened: Opened, headers: dict[str, str]
) -> web.StreamResponse:
    answer = opened.answer
    response = web.StreamResponse(
        status=200,
        headers={
            **headers,
            "Content-Type": answer.content_type,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    chunks = answer.chunks()
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
