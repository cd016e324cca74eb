"""`shoal.api.requests`: the request boundary refuses bad bodies with a 400 naming the
field (strictly typed, as OpenAI types them), lets unknown fields through, never fails
any other way, and forwards exactly what it checked."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.api.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    as_json,
    encode,
    joined_text,
    parse,
)
from shoal.errors import InvalidRequest

MODELS = (ChatRequest, CompletionRequest, EmbeddingRequest)
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "Once", **fields}).encode()


def embedding(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "input": "text", **fields}).encode()


BUILDERS = {ChatRequest: chat, CompletionRequest: completion, EmbeddingRequest: embedding}


def refused(model: type, raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(model, raw)
    assert caught.value.status == 400
    return caught.value


# -- the body as a whole ------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_empty_body(model: type) -> None:
    error = refused(model, b"")
    assert "empty" in error.message
    assert error.param is None


@pytest.mark.parametrize("raw", [b"{", b"{'model': 'm'}", b"nul", b"\xff\xfe{}", b'{"a":1,}'])
@pytest.mark.parametrize("model", MODELS)
def test_invalid_json(model: type, raw: bytes) -> None:
    error = refused(model, raw)
    assert "not valid JSON" in error.message
    assert error.param is None


@pytest.mark.parametrize("raw", [b"[]", b"[{}]", b"1", b'"model"', b"null", b"true"])
@pytest.mark.parametrize("model", MODELS)
def test_json_that_is_not_an_object(model: type, raw: bytes) -> None:
    error = refused(model, raw)
    assert "JSON object" in error.message
    assert error.param is None


def test_nesting_beyond_the_json_parser_limit_is_refused() -> None:
    raw = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    refused(ChatRequest, raw)


# -- required fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "document", "param"),
    [
        (ChatRequest, {"messages": USER}, "model"),
        (ChatRequest, {"model": "m"}, "messages"),
        (CompletionRequest, {"prompt": "x"}, "model"),
        (CompletionRequest, {"model": "m"}, "prompt"),
        (EmbeddingRequest, {"input": "x"}, "model"),
        (EmbeddingRequest, {"model": "m"}, "input"),
        (ChatRequest, {}, "model"),
    ],
)
def test_missing_field_is_named(model: type, document: dict[str, Any], param: str) -> None:
    error = refused(model, orjson.dumps(document))
    assert error.param == param
    assert error.message == f"Missing required parameter: '{param}'."
    assert error.code == "missing_required_parameter"


@pytest.mark.parametrize("value", ["", "x" * 257, 7, None, ["m"]])
@pytest.mark.parametrize("model", MODELS)
def test_bad_model_id(model: type, value: Any) -> None:
    assert refused(model, BUILDERS[model](model=value)).param == "model"


@pytest.mark.parametrize("model", MODELS)
def test_longest_model_id_is_accepted(model: type) -> None:
    assert parse(model, BUILDERS[model](model="x" * 256)).model == "x" * 256


# -- ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3),
        ("temperature", -0.1),
        ("top_p", -1),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 1_000_001),
        ("n", 0),
        ("n", 129),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("seed", 2**64),
        ("stream", "sometimes"),
        ("stop", 5),
        ("stop", ["ok", 5]),
    ],
)
@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest])
def test_out_of_range_generation_field_is_named(model: type, field: str, value: Any) -> None:
    error = refused(model, BUILDERS[model](**{field: value}))
    assert error.param is not None
    assert error.param.partition("[")[0] == field  # `stop[1]`: the item that is wrong
    assert f"'{error.param}'" in error.message
    assert error.code in ("invalid_type", "invalid_value")


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0, "top_p": 0, "max_tokens": 1, "n": 1},
        {"temperature": 2, "top_p": 1, "max_tokens": 1_000_000, "n": 128},
        {"presence_penalty": -2, "frequency_penalty": 2, "seed": -(2**63)},
        {"seed": 2**64 - 1, "stop": ["a", "b"]},
        {"stop": "\n", "stream": True, "stream_options": {"include_usage": True}},
    ],
)
@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest])
def test_boundary_values_are_accepted(model: type, fields: dict[str, Any]) -> None:
    body = parse(model, BUILDERS[model](**fields))
    for key, value in fields.items():
        got = getattr(body, key)
        if key == "stream_options":
            assert got.include_usage is value["include_usage"]
        else:
            assert got == value


def test_max_completion_tokens_is_checked() -> None:
    assert refused(ChatRequest, chat(max_completion_tokens=0)).param == "max_completion_tokens"
    assert parse(ChatRequest, chat(max_completion_tokens=5)).max_completion_tokens == 5


def test_stream_options_include_usage_must_be_a_boolean() -> None:
    error = refused(ChatRequest, chat(stream_options={"include_usage": "lots"}))
    assert error.param is not None
    assert error.param.startswith("stream_options")
    assert "include_usage" in error.param


# -- chat messages ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["bot", "", "USER", None])
def test_wrong_role_names_the_message_field(role: Any) -> None:
    error = refused(ChatRequest, chat(messages=[USER[0], {"role": role, "content": "x"}]))
    assert error.param is not None
    assert error.param.startswith("messages")
    assert "1" in error.param
    assert error.param.endswith("role")


def test_missing_role_is_refused() -> None:
    error = refused(ChatRequest, chat(messages=[{"content": "x"}]))
    assert error.param is not None
    assert error.param.endswith("role")


@pytest.mark.parametrize("messages", [[], "hello", {"role": "user"}, [None], ["hello"]])
def test_messages_must_be_a_non_empty_list_of_objects(messages: Any) -> None:
    error = refused(ChatRequest, chat(messages=messages))
    assert error.param is not None
    assert error.param.startswith("messages")


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_openai_role_is_accepted(role: str) -> None:
    (message,) = parse(ChatRequest, chat(messages=[{"role": role, "content": "x"}])).messages
    assert message.role == role


def test_content_parts_and_null_content_are_accepted() -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {}}]
    body = parse(
        ChatRequest,
        chat(
            messages=[
                {"role": "user", "content": parts},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            ]
        ),
    )
    assert as_json(body)["messages"][0]["content"] == parts
    assert body.messages[1].content is None
    assert body.messages[1].model_extra == {"tool_calls": [{"id": "c1"}]}


def test_content_of_the_wrong_type_is_refused() -> None:
    error = refused(ChatRequest, chat(messages=[{"role": "user", "content": 42}]))
    assert error.param is not None
    assert error.param.startswith("messages")
    assert "content" in error.param


# -- unknown fields pass through ----------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_unknown_fields_pass_through(model: type) -> None:
    extra = {"tools": [{"type": "function"}], "user": "u-1", "x_vendor": {"a": [1, None]}}
    body = parse(model, BUILDERS[model](**extra))
    assert body.model_extra == extra


def test_parsed_body_is_frozen() -> None:
    body = parse(ChatRequest, chat())
    with pytest.raises(Exception, match="frozen"):
        body.model = "other"


# -- prompt and input shapes --------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt", ["Once", ["Once", "Twice"], [1, 2, 3], [[1, 2], [3]], "p" * 10_000]
)
def test_prompt_shapes(prompt: Any) -> None:
    assert parse(CompletionRequest, completion(prompt=prompt)).prompt == prompt


@pytest.mark.parametrize("prompt", [[], [-1], [[1, -2]], {"text": "x"}, 5, [1.5], ["a", 1]])
def test_bad_prompt_is_refused(prompt: Any) -> None:
    error = refused(CompletionRequest, completion(prompt=prompt))
    assert error.param is not None
    assert error.param.startswith("prompt")


@pytest.mark.parametrize("value", ["a", ["a", "b"], [1, 2], [[1], [2, 3]], ["a"] * 2048])
def test_input_shapes(value: Any) -> None:
    assert parse(EmbeddingRequest, embedding(input=value)).input == value


@pytest.mark.parametrize("value", [[], ["a"] * 2049, [-1], 3, None, [["a"]]])
def test_bad_input_is_refused(value: Any) -> None:
    error = refused(EmbeddingRequest, embedding(input=value))
    assert error.param is not None
    assert error.param.startswith("input")


def test_one_long_text_is_a_valid_embedding_input() -> None:
    text = "word " * 1000  # 5000 characters, one input
    assert parse(EmbeddingRequest, embedding(input=text)).input == text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"encoding_format": "hex"}, "encoding_format"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": 65537}, "dimensions"),
    ],
)
def test_bad_embedding_options(fields: dict[str, Any], param: str) -> None:
    assert refused(EmbeddingRequest, embedding(**fields)).param == param


def test_embedding_options_accepted() -> None:
    body = parse(EmbeddingRequest, embedding(encoding_format="base64", dimensions=384))
    assert (body.encoding_format, body.dimensions) == ("base64", 384)
    assert parse(EmbeddingRequest, embedding()).encoding_format == "float"


# -- strict types, as OpenAI's: a string is never taken for a number or a boolean -------


@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [
        ("max_tokens", "3", "an integer", "a string"),
        ("max_tokens", 3.0, "an integer", "a decimal number"),
        ("max_tokens", True, "an integer", "a boolean"),
        ("stream", "false", "a boolean", "a string"),
        ("stream", 0, "a boolean", "an integer"),
        ("temperature", "0.5", "a number", "a string"),
        ("temperature", False, "a number", "a boolean"),
        ("n", "1", "an integer", "a string"),
        ("seed", "7", "an integer", "a string"),
        ("stream_options", "yes", "an object", "a string"),
    ],
)
@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest])
def test_a_value_of_the_wrong_type_is_refused_not_coerced(
    model: type, field: str, value: Any, expected: str, got: str
) -> None:
    error = refused(model, BUILDERS[model](**{field: value}))
    assert (error.param, error.code) == (field, "invalid_type")
    assert error.message == (
        f"Invalid type for '{field}': expected {expected}, but got {got} instead."
    )


@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest])
def test_an_integer_is_a_number(model: type) -> None:
    body = parse(model, BUILDERS[model](temperature=1, top_p=0, presence_penalty=-2))
    assert (body.temperature, body.top_p, body.presence_penalty) == (1, 0, -2)


@pytest.mark.parametrize(
    ("model", "fields", "param", "code"),
    [
        (ChatRequest, {"logprobs": 2}, "logprobs", "invalid_type"),
        (ChatRequest, {"top_logprobs": 21}, "top_logprobs", "invalid_value"),
        (ChatRequest, {"response_format": {"type": "xml"}}, "response_format.type", None),
        (ChatRequest, {"response_format": "json"}, "response_format", "invalid_type"),
        (ChatRequest, {"logit_bias": {"50256": 101}}, "logit_bias.50256", "invalid_value"),
        (ChatRequest, {"logit_bias": {"50256": "-1"}}, "logit_bias.50256", "invalid_type"),
        (ChatRequest, {"logit_bias": {"word": 1}}, "logit_bias.word", "invalid_value"),
        (ChatRequest, {"logit_bias": [1]}, "logit_bias", "invalid_type"),
        (CompletionRequest, {"logprobs": True}, "logprobs", "invalid_type"),
        (CompletionRequest, {"logprobs": 6}, "logprobs", "invalid_value"),
        (CompletionRequest, {"echo": "true"}, "echo", "invalid_type"),
        (CompletionRequest, {"suffix": 5}, "suffix", "invalid_type"),
        (EmbeddingRequest, {"dimensions": "384"}, "dimensions", "invalid_type"),
    ],
)
def test_fields_the_engine_reads_are_checked(
    model: type, fields: dict[str, Any], param: str, code: str | None
) -> None:
    error = refused(model, BUILDERS[model](**fields))
    assert error.param == param
    assert error.code == (code or "invalid_value")


# -- content parts ------------------------------------------------------------------------


def with_content(content: Any) -> bytes:
    return chat(messages=[{"role": "user", "content": content}])


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        ([{"type": "text"}], "messages[0].content[0].text", "missing_required_parameter"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text", "invalid_type"),
        ([{"text": "hi"}], "messages[0].content[0].type", "missing_required_parameter"),
        (["hi"], "messages[0].content[0]", "invalid_type"),
        ([], "messages[0].content", "invalid_value"),
        ({"type": "text", "text": "hi"}, "messages[0].content", "invalid_type"),
    ],
)
def test_malformed_content_parts_are_named(content: Any, param: str, code: str) -> None:
    error = refused(ChatRequest, with_content(content))
    assert (error.param, error.code) == (param, code)


def test_text_parts_keep_their_extra_fields() -> None:
    parts = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]
    assert orjson.loads(encode(parse(ChatRequest, with_content(parts))))["messages"] == [
        {"role": "user", "content": parts}
    ]


@pytest.mark.parametrize(
    ("parts", "text"),
    [
        ([{"type": "text", "text": "a"}], "a"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb"),
        ([{"type": "text", "text": ""}], ""),
        ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}], None),
        ([{"type": "refusal", "refusal": "no"}], None),
    ],
)
def test_joined_text(parts: list[dict[str, Any]], text: str | None) -> None:
    assert joined_text(parts) == text


# -- what is forwarded is what was checked ------------------------------------------------


def test_a_duplicate_key_is_forwarded_once_with_the_value_checked() -> None:
    raw = b'{"model": "m", "prompt": "x", "stream": true, "max_tokens": 0, "max_tokens": 3}'
    body = parse(CompletionRequest, raw)
    assert body.max_tokens == 3
    assert encode(body).count(b"max_tokens") == 1
    assert orjson.loads(encode(body))["max_tokens"] == 3


def test_fields_left_out_stay_out() -> None:
    forwarded = orjson.loads(encode(parse(EmbeddingRequest, embedding())))
    assert forwarded == {"model": "m", "input": "text"}  # no default filled in
    forwarded = orjson.loads(encode(parse(ChatRequest, chat(max_tokens=None))))
    assert forwarded == {"model": "m", "messages": USER, "max_tokens": None}


# -- fuzzing: a model or InvalidRequest, never anything else ------------------------------

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)

FIELDS = sorted(
    {name for model in MODELS for name in model.model_fields}
    | {"role", "content", "include_usage", "logit_bias"}
)

messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls"]),
        st.sampled_from(["user", "system", "bot"]) | json_values,
        max_size=4,
    ),
    max_size=3,
)

plausible_bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    json_values | messages | st.sampled_from(["m", "", "user"]),
    max_size=8,
)


def check(model: type, raw: bytes) -> None:
    """Anything but a model or InvalidRequest propagates and fails the test."""
    error: InvalidRequest | None = None
    try:
        result = parse(model, raw)
    except InvalidRequest as exc:
        error = exc
    if error is None:
        assert isinstance(result, model)
    else:
        assert isinstance(error.message, str)
        assert error.message
        assert error.param is None or isinstance(error.param, str)


@FUZZ
@given(model=st.sampled_from(MODELS), raw=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(model: type, raw: bytes) -> None:
    check(model, raw)


@FUZZ
@given(model=st.sampled_from(MODELS), document=json_values)
def test_fuzz_arbitrary_json(model: type, document: Any) -> None:
    check(model, json.dumps(document).encode())


@FUZZ
@given(model=st.sampled_from(MODELS), document=plausible_bodies)
def test_fuzz_objects_with_known_field_names(model: type, document: dict[str, Any]) -> None:
    check(model, json.dumps(document).encode())


@FUZZ
@given(
    model=st.sampled_from(MODELS),
    document=plausible_bodies,
    text=st.text(max_size=50),
)
def test_fuzz_text_with_surrogates_and_junk(
    model: type, document: dict[str, Any], text: str
) -> None:
    raw = json.dumps(document, ensure_ascii=True).encode()
    middle = len(raw) // 2
    check(model, raw[:middle] + text.encode("utf-8", "surrogatepass") + raw[middle:])


@FUZZ
@given(model=st.sampled_from(MODELS), document=plausible_bodies)
def test_fuzz_what_is_forwarded_is_what_was_checked(model: type, document: dict[str, Any]) -> None:
    """Every accepted body is forwarded as the JSON it was read as (no value changed,
    none added), and reads back as the same request."""
    try:
        body = parse(model, json.dumps(document).encode())
    except InvalidRequest:
        return
    forwarded = orjson.loads(encode(body))
    assert forwarded == orjson.loads(json.dumps(document))
    assert parse(model, encode(body)) == body
