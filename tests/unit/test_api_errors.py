"""`shoal.api.errors`: every error leaves in OpenAI's shape, with the right status."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from shoal.api.errors import (
    error_body,
    error_response,
    errors_middleware,
    from_http_exception,
    sse_error_event,
)
from shoal.errors import (
    BackendUnavailable,
    BusyError,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ShoalError,
    Unauthorized,
    UpstreamFailed,
    UpstreamTimeout,
)


def decode(response: web.Response) -> dict[str, Any]:
    assert isinstance(response.body, bytes)
    document = orjson.loads(response.body)
    assert list(document) == ["error"]
    assert set(document["error"]) == {"message", "type", "param", "code"}
    return document["error"]


@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    [
        (InvalidRequest("bad", param="top_p"), 400, "invalid_request_error", "invalid_request"),
        (Unauthorized("who"), 401, "authentication_error", "invalid_api_key"),
        (Forbidden("no"), 403, "permission_error", "forbidden"),
        (ModelNotFound("m?", param="model"), 404, "invalid_request_error", "model_not_found"),
        (NotFound("where"), 404, "invalid_request_error", "not_found"),
        (MethodNotAllowed("GET"), 405, "invalid_request_error", "method_not_allowed"),
        (PayloadTooLarge("big"), 413, "invalid_request_error", "payload_too_large"),
        (BusyError("later"), 429, "rate_limit_error", "busy"),
        (BackendUnavailable("down"), 503, "server_error", "backend_unavailable"),
        (UpstreamFailed("reset"), 502, "server_error", "upstream_failed"),
        (UpstreamTimeout("slow"), 504, "server_error", "upstream_timeout"),
        (ShoalError("oops"), 500, "server_error", None),
    ],
)
def test_error_response_shape_and_status(
    error: ShoalError, status: int, kind: str, code: str | None
) -> None:
    response = error_response(error)
    assert response.status == status
    assert response.content_type == "application/json"
    assert decode(response) == {
        "message": error.message,
        "type": kind,
        "param": error.param,
        "code": code,
    }


@pytest.mark.parametrize(
    ("error", "status"),
    [(InvalidRequest("x"), 400), (UpstreamFailed("x"), 502), (ModelNotFound("x"), 404)],
)
def test_no_retry_after_unless_busy(error: ShoalError, status: int) -> None:
    response = error_response(error)
    assert response.status == status
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(1.0, "1"), (2, "2"), (0.2, "1"), (0, "1"), (-5, "1"), (2.1, "3"), (30.0, "30")],
)
@pytest.mark.parametrize("kind", [BusyError, BackendUnavailable])
def test_retry_after_is_a_whole_number_of_seconds_at_least_one(
    kind: type[BusyError], retry_after: float, header: str
) -> None:
    response = error_response(kind("wait", retry_after=retry_after))
    assert response.headers["Retry-After"] == header


def test_default_retry_after() -> None:
    assert error_response(BusyError("wait")).headers["Retry-After"] == "1"


def test_extra_headers_are_kept_and_not_mutated() -> None:
    headers = {"X-Shoal-Served-By": "desk"}
    response = error_response(BackendUnavailable("down", retry_after=3), headers)
    assert response.headers["X-Shoal-Served-By"] == "desk"
    assert response.headers["Retry-After"] == "3"
    assert headers == {"X-Shoal-Served-By": "desk"}


def test_error_body_and_sse_event() -> None:
    error = InvalidRequest("bad value", param="n")
    expected = {
        "error": {
            "message": "bad value",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_request",
        }
    }
    assert orjson.loads(error_body(error)) == expected
    event = sse_error_event(error)
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert orjson.loads(event[len(b"data: ") : -2]) == expected


# -- aiohttp's own refusals ------------------------------------------------------------------


def test_from_http_exception_too_large() -> None:
    error = from_http_exception(web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20))
    assert isinstance(error, PayloadTooLarge)
    assert error.status == 413


def test_from_http_exception_method_not_allowed_lists_methods() -> None:
    error = from_http_exception(web.HTTPMethodNotAllowed("GET", ["POST", "OPTIONS"]))
    assert isinstance(error, MethodNotAllowed)
    assert error.status == 405
    assert "OPTIONS, POST" in error.message


def test_from_http_exception_not_found() -> None:
    error = from_http_exception(web.HTTPNotFound())
    assert isinstance(error, NotFound)
    assert error.status == 404


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (web.HTTPBadRequest(reason="Bad header"), 400, "Bad header"),
        (web.HTTPUnsupportedMediaType(), 415, "Unsupported Media Type"),
        (web.HTTPLengthRequired(), 411, "Length Required"),
    ],
)
def test_from_http_exception_other_statuses_are_kept(
    exc: web.HTTPException, status: int, message: str
) -> None:
    error = from_http_exception(exc)
    assert isinstance(error, InvalidRequest)
    assert error.status == status
    assert error.message == message
    assert InvalidRequest.status == 400  # the instance changed, not the class
    assert error_response(error).status == status


# -- the middleware ------------------------------------------------------------------------


def request() -> web.Request:
    return make_mocked_request("POST", "/v1/chat/completions")


async def test_middleware_passes_answers_through() -> None:
    answer = web.Response(text="ok")

    async def handler(_: web.Request) -> web.StreamResponse:
        return answer

    assert await errors_middleware(request(), handler) is answer


async def test_middleware_turns_shoal_errors_into_responses() -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        raise BackendUnavailable("restarting", retry_after=4)

    response = await errors_middleware(request(), handler)
    assert isinstance(response, web.Response)
    assert response.status == 503
    assert response.headers["Retry-After"] == "4"
    assert decode(response)["message"] == "restarting"


async def test_middleware_turns_http_errors_into_openai_errors() -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    response = await errors_middleware(request(), handler)
    assert isinstance(response, web.Response)
    assert response.status == 404
    assert decode(response)["code"] == "not_found"


async def test_middleware_lets_redirects_through() -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    with pytest.raises(web.HTTPFound):
        await errors_middleware(request(), handler)


async def test_middleware_hides_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        raise KeyError("secret-internal-detail")

    with caplog.at_level(logging.ERROR, logger="shoal.api.errors"):
        response = await errors_middleware(request(), handler)
    assert isinstance(response, web.Response)
    assert response.status == 500
    body = decode(response)
    assert body["type"] == "server_error"
    assert "secret-internal-detail" not in body["message"]
    assert any("secret-internal-detail" in r.getMessage() or r.exc_info for r in caplog.records)
