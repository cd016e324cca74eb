"""OpenAI request bodies, parsed once at the boundary: what is checked is what is forwarded.

`parse` reads a body into a model that checks every field Shoal or the embedded engine
acts on. Types are strict, as OpenAI's are: it refuses `"max_tokens": "3"` and
`"stream": "false"` with 400 `invalid_type` naming the parameter, and so does Shoal,
rather than guess (a number is taken where a decimal is expected, as JSON has one
number type; a decimal where an integer is expected is not). The body a backend
receives is `encode(request)`, the checked model written back as JSON, never the bytes
the client sent: a duplicate key or a value that another JSON parser reads differently
cannot make a backend act on something that was not checked. Fields Shoal does not
know pass through with their values unchanged, for the backend to check (but for an
integer beyond 64 bits, which the JSON parser reads as a decimal number).

The engine worker parses what it receives with the same models, so a body that reaches
it unchecked (or a check that is missing here) is still a 400 there, never a 500.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic_core import ErrorDetails

from shoal.errors import InvalidRequest

_MAX_ID = 256
_MAX_ITEMS = 2048  # OpenAI's limit on embedding inputs per request
# Text parts of one message are joined with a newline, as llama.cpp's server and vLLM
# join them for chat templates that take a string.
TEXT_PART_SEPARATOR = "\n"

NonNegInt = Annotated[int, Field(ge=0)]
_CHECKED = ConfigDict(extra="allow", frozen=True, strict=True)


class RequestBody(BaseModel):
    model_config = _CHECKED

    model: str = Field(min_length=1, max_length=_MAX_ID)


class StreamOptions(BaseModel):
    model_config = _CHECKED

    include_usage: bool = False


TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # a JSON object key
Bias = Annotated[float, Field(ge=-100, le=100)]


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
    logit_bias: dict[TokenId, Bias] | None = None


class TextPart(BaseModel):
    model_config = _CHECKED

    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """An image, audio, file or refusal part: the backend that takes it checks it."""

    model_config = _CHECKED

    type: str = Field(min_length=1, max_length=64)


def _part_kind(part: Any) -> str:
    is_text = isinstance(part, TextPart) or (isinstance(part, dict) and part.get("type") == "text")
    return "text-part" if is_text else "other-part"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text-part")] | Annotated[OtherPart, Tag("other-part")],
    Discriminator(_part_kind),
]


class Message(BaseModel):
    model_config = _CHECKED

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None


class ResponseFormat(BaseModel):
    model_config = _CHECKED

    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1, max_length=100_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[NonNegInt] | list[list[NonNegInt]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # a count of top tokens here
    suffix: str | None = None


class EmbeddingRequest(RequestBody):
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=_MAX_ITEMS)]
        | Annotated[list[NonNegInt], Field(min_length=1)]
        | Annotated[list[list[NonNegInt]], Field(min_length=1, max_length=_MAX_ITEMS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)


R = TypeVar("R", bound=RequestBody)


def parse(model: type[R], raw: bytes) -> R:
    """Decode and check a body; raise InvalidRequest naming the offending field."""
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = f"request body is not valid JSON: {exc}"
        raise InvalidRequest(message, code="invalid_json") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _refusal(exc.errors()) from None


def encode(request: RequestBody) -> bytes:
    """The checked request as the JSON a backend receives: every field the client set,
    with the value that was checked, and nothing else."""
    return orjson.dumps(as_json(request))


def as_json(request: RequestBody) -> dict[str, Any]:
    """The checked request as plain JSON values, the fields the client set only."""
    return request.model_dump(exclude_unset=True)


def joined_text(parts: Sequence[Mapping[str, Any]]) -> str | None:
    """The text of content parts that are all text, joined; None if any part is not."""
    if all(part.get("type") == "text" for part in parts):
        return TEXT_PART_SEPARATOR.join(str(part["text"]) for part in parts)
    return None


# -- refusals in OpenAI's words ----------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _refusal(errors: list[ErrorDetails]) -> InvalidRequest:
    """One error for the client, about the first field found wrong, phrased as OpenAI
    phrases it. Of a union's errors, the one from the member that got furthest says
    most: the deepest, and at equal depth one from a member of the input's type."""
    field = errors[0]["loc"][:1]
    error = max(
        (e for e in errors if e["loc"][:1] == field),
        key=lambda e: (len(e["loc"]), e["type"] not in _EXPECTED),
    )
    param = _param_path(error["loc"])
    name = param or "body"
    if error["type"] == "missing":
        message, code = f"Missing required parameter: '{name}'.", "missing_required_parameter"
    elif error["type"] in _EXPECTED:
        expected, got = _EXPECTED[error["type"]], _json_type(error["input"])
        message = f"Invalid type for '{name}': expected {expected}, but got {got} instead."
        code = "invalid_type"
    else:
        message, code = f"Invalid value for '{name}': {error['msg']}.", "invalid_value"
    return InvalidRequest(message, param=param, code=code)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


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
