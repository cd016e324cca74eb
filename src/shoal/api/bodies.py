"""Reading a request body: bounded in size and in time, on every route that reads one.

A declared body larger than the route's cap is refused before any of it is read; a
chunked one as soon as it passes the cap (413 either way). A body that does not arrive
within the body timeout (a client that stalls or trickles, on purpose or not) is 408.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from shoal.errors import PayloadTooLarge, RequestTimeout

_READ_BYTES = 1 << 16


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    too_large = PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(_READ_BYTES):
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return bytes(body)
