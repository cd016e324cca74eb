"""Shoal's one exception tree, split by who is at fault.

    ShoalError
    ├── ClientError            the request is wrong: 4xx, the client should fix it
    │   ├── InvalidRequest         400  bad JSON, missing or invalid field
    │   ├── Unauthorized           401
    │   ├── Forbidden              403
    │   ├── ModelNotFound          404
    │   ├── ModelTooLarge          400  the model cannot fit in this node's memory
    │   ├── NotFound               404  unknown path
    │   ├── MethodNotAllowed       405
    │   ├── RequestTimeout         408  the body did not arrive in time
    │   ├── PayloadTooLarge        413
    │   ├── UnsupportedEncoding    415  a Content-Encoding the node does not inflate
    │   └── RangeNotSatisfiable    416  a model file range a peer may not ask for
    ├── BusyError              429/503 with Retry-After: try again later
    │   ├── QueueFull              429  every holder busy, the model's queue full
    │   ├── QueueTimeout           429  every holder stayed busy while the request waited
    │   ├── BackendUnavailable     503  the backend is down or restarting
    │   └── ModelNotReady          503  a managed model is loading, restarting, or waiting
    │                                   for memory held by busy models
    ├── UpstreamError          a backend or peer (or the Hub) failed us
    │   ├── UpstreamFailed         502  refused, reset, crashed, garbage answer
    │   │   └── ChecksumMismatch   502  a download whose SHA-256 is not its source's
    │   └── UpstreamTimeout        504
    ├── HubOffline             503  HF_HUB_OFFLINE is set and the file is not in the store
    ├── NotEnoughSpace         507  the disk cannot hold a download
    └── ConfigError            the operator's configuration is wrong (not an HTTP error)

Errors are turned into HTTP responses in exactly one place, `shoal.api.errors`.
Messages are shown to clients: they never contain secrets or stack traces. Each class
has a default `code`; a raise site may name a finer one, in OpenAI's vocabulary where it
has one (`missing_required_parameter`, `invalid_type`, `invalid_value`,
`unsupported_parameter`, `unsupported_value`).
"""

from __future__ import annotations

import math


class ShoalError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Headers the answer must carry with this error (Retry-After, Accept-Encoding)."""
        return {}


class ClientError(ShoalError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    code = "invalid_request"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"


class ModelTooLarge(ClientError):
    """A managed model that cannot fit in memory even with every other model unloaded:
    refused before it loads, never left to the OOM killer. Not retried by the SDKs (a
    4xx): only a smaller model, a shorter context or more memory changes the answer."""

    code = "model_too_large"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedEncoding(ClientError):
    status = 415
    code = "unsupported_content_encoding"

    def __init__(self, message: str, *, accepted: tuple[str, ...]) -> None:
        super().__init__(message)
        self.accepted = accepted

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": ", ".join(self.accepted)}  # RFC 7694


class RangeNotSatisfiable(ClientError):
    """A range of a model file that is not chunk-aligned, too long, or past its end."""

    status = 416
    code = "range_not_satisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message, param="Range")
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}  # RFC 9110 §15.5.17


class BusyError(ShoalError):
    status = 429
    type = "rate_limit_error"
    code = "busy"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class QueueFull(BusyError):
    code = "queue_full"


class QueueTimeout(BusyError):
    code = "queue_timeout"


class BackendUnavailable(BusyError):
    status = 503
    type = "server_error"
    code = "backend_unavailable"


class ModelNotReady(BusyError):
    """503 with Retry-After: the model is loading (or waits for memory that busy models
    hold). Not a BackendUnavailable: the backend is fine, and routing must not mark it
    down (which would hide every other model it serves)."""

    status = 503
    type = "server_error"
    code = "model_loading"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        if code is not None:
            self.code = code


class UpstreamError(ShoalError):
    status = 502
    type = "server_error"
    code = "upstream_failed"


class UpstreamFailed(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ChecksumMismatch(UpstreamFailed):
    """A downloaded file whose SHA-256 is not the one its source announced."""

    code = "checksum_mismatch"


class HubOffline(ShoalError):
    """HF_HUB_OFFLINE is set and what was asked for is not complete in the store."""

    status = 503
    code = "hub_offline"


class NotEnoughSpace(ShoalError):
    """The disk cannot hold a download (checked before it starts, and if it fills)."""

    status = 507
    code = "insufficient_storage"


class ConfigError(ShoalError):
    """The operator's configuration is wrong; raised at start-up, shown on the console."""
