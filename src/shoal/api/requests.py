"""Parsing and range-checking OpenAI request bodies at the boundary.

Only the fields Shoal or a backend relies on are checked; unknown fields pass through
to the backend untouched. The body itself is forwarded as the bytes the client sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.errors import InvalidRequest

_MAX_ID = 256
_MAX_ITEMS = 2048  # OpenAI's limit on embedding inputs per request

NonNegInt = Annotated[int, Field(ge=0)]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    model: str = Field(min_length=1, max_length=_MAX_ID)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Generation(RequestBody):
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(default=None)
    logprobs: Any = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1, max_length=100_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[NonNegInt] | list[list[NonNegInt]] = Field(min_length=1)
    echo: bool = False


class EmbeddingRequest(RequestBody):
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=_MAX_ITEMS)]
        | Annotated[list[NonNegInt], Field(min_length=1)]
        | Annotated[list[list[NonNegInt]], Field(min_length=1, max_length=_MAX_ITEMS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)


def parse(model: type[RequestBody], raw: bytes) -> Any:
    """Decode and check a body; raise InvalidRequest naming the offending field."""
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_path(first["loc"])
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param=param) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's location as OpenAI writes it: `messages[0].role`, without union tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (set(part) & set("[-") or part in _TYPE_TAGS):  # union member tags
            path += f".{part}" if path else part
    return path or None
