"""The one place where errors become HTTP responses, in OpenAI's error shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from shoal.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ShoalError,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(error: ShoalError) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    )


def error_response(error: ShoalError, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {**(headers or {}), **error.headers()}
    return web.Response(
        body=error_body(error),
        status=error.status,
        content_type="application/json",
        headers=all_headers,
    )


def sse_error_event(error: ShoalError) -> bytes:
    """An error inside a stream that has started: the OpenAI SDKs raise it as APIError."""
    return b"data: " + error_body(error) + b"\n\n"


def from_http_exception(exc: web.HTTPException) -> ShoalError:
    """aiohttp's own refusals (routing, body size) in Shoal's terms."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body is too large")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"method not allowed; use {', '.join(sorted(exc.allowed_methods))}")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint")
    error: ShoalError
    if exc.status >= 500:
        error = ShoalError(exc.reason or "internal error")
    else:
        error = InvalidRequest(exc.reason or "bad request", code=_HTTP_CODES.get(exc.status))
    error.status = exc.status
    return error


# Codes for the other refusals aiohttp raises inside a handler, named after the status.
_HTTP_CODES = {
    408: "request_timeout",
    411: "length_required",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ShoalError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(from_http_exception(exc))
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_response(ShoalError("internal error; see the node's log"))
