"""Hypothesis-generated documents against the strict schemas of what a stranger or a peer
sends (issue 9): the handshake messages (`shoal.trust.handshake.parse`) and the state
snapshot (`shoal.mesh.state.decode`). Whatever arrives, the parser answers with the
message or with its own refusal (HandshakeError, ProtocolError), never another exception:
anything else would be a 500 and a traceback on the node that received it.

tests/unit/test_handshake_schema.py and tests/unit/test_mesh_state.py feed any JSON and
mutations of one valid message; here the documents are built from each message's own
JSON schema (every field present, each of roughly its type, so that validation reaches
every field and the checks across fields), then mutated at any depth; snapshots are
generated valid (and must round-trip) and mutated at any depth.
"""

from __future__ import annotations

import base64
import copy
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.mesh import identity
from shoal.mesh import state as state_mod
from shoal.mesh.state import Hardware, Load, ModelAdvert, NodeState, ProtocolError, decode
from shoal.models.names import is_valid_name
from shoal.trust import certs, handshake
from shoal.trust.handshake import HandshakeError, parse

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: Every message a node parses from another: found in the module, so a new one is fuzzed too.
KINDS: tuple[type[Any], ...] = tuple(
    kind
    for kind in vars(handshake).values()
    if isinstance(kind, type)
    and issubclass(kind, handshake._Message)
    and not kind.__name__.startswith("_")
)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real node's ID, key and certificate, to make documents that pass the checks
    across fields (the ID is the key's hash, the certificate holds the key)."""
    home: Path = tmp_path_factory.mktemp("fuzz-identity")
    me = identity.load_or_create(home)
    cert = certs.load_or_create_cert(me, home).decode()
    key = base64.b64encode(me.public_key).decode()
    return {"node_id": me.node_id, "public_key": key, "cert": cert}


# -- documents from a JSON schema -------------------------------------------------------


def b64_of_about(sizes: tuple[int, ...] = (31, 32, 33, 63, 64, 65)) -> st.SearchStrategy[str]:
    """Base64 of random bytes of about the lengths keys, nonces, signatures and proofs
    have, so that the exact-length checks are reached both ways."""
    return st.sampled_from(sizes).flatmap(
        lambda n: st.binary(min_size=n, max_size=n).map(lambda b: base64.b64encode(b).decode())
    )


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of roughly the shape `schema` describes (the subset pydantic writes)."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"]) | LEAVES
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | st.text(max_size=10)
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "binary":
            return b64_of_about() | st.text(max_size=50)
        if "pattern" in schema:
            top = schema.get("maxLength", 80)
            return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) <= top)
        top = min(schema.get("maxLength", 80), 120)
        return st.text(min_size=schema.get("minLength", 0), max_size=top) | st.text(
            string.printable, max_size=top
        )
    if kind == "integer":
        low, high = schema.get("minimum", -(2**40)), schema.get("maximum", 2**40)
        return st.integers(low, high) | st.integers(low - 2, low) | st.integers(high, high + 2)
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=3)
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {key: from_schema(value, defs) for key, value in properties.items() if key in required},
            optional={
                key: from_schema(value, defs)
                for key, value in properties.items()
                if key not in required
            },
        )
    return LEAVES


def message_documents(kind: type[Any]) -> st.SearchStrategy[dict[str, Any]]:
    schema = kind.model_json_schema()
    return from_schema(schema, schema.get("$defs", {}))


# -- mutations at any depth ---------------------------------------------------------------


def places(document: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON document, the containers themselves included."""
    found: list[tuple[Any, Any]] = []
    stack = [document]
    while stack:
        container = stack.pop()
        keys = list(container) if isinstance(container, dict) else range(len(container))
        for key in keys:
            found.append((container, key))
            if isinstance(container[key], dict | list):
                stack.append(container[key])
    return found


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    """`document` with one to three changes anywhere in it."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        spots = places(document)
        if not spots:
            break
        container, key = draw(st.sampled_from(spots))
        how = draw(st.sampled_from(["replace", "drop", "add", "wrap", "grow"]))
        value = container[key]
        if how == "replace":
            container[key] = draw(LEAVES | st.lists(LEAVES, max_size=2) | st.just({}))
        elif how == "drop":
            del container[key]
        elif how == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=12))] = draw(LEAVES)
        elif how == "add":
            container.append(copy.deepcopy(value))
        elif how == "wrap":
            container[key] = [value]
        elif isinstance(value, str):
            container[key] = value + draw(st.text(min_size=1, max_size=8))
        elif isinstance(value, int) and not isinstance(value, bool):
            container[key] = value + draw(st.sampled_from([-1, 1, 2**32, -(2**63), 2**64]))
    return document


# -- the handshake --------------------------------------------------------------------------


def parses_or_refuses(kind: type[Any], document: object) -> None:
    """`parse` answers the message or HandshakeError with a one-line reason."""
    try:
        parse(kind, document)
    except HandshakeError as exc:
        reason = str(exc)
        assert reason.startswith(f"malformed {kind.what}"), reason
        assert "\n" not in reason and "\x1b" not in reason, reason


def test_every_message_kind_is_fuzzed() -> None:
    names = {kind.__name__ for kind in KINDS}
    assert {"Hello", "HelloReply", "Confirm", "ConfirmReply"} <= names, names


@FUZZ
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_schema_shaped_messages_are_parsed_or_refused(
    real: dict[str, str], data: st.DataObject, kind: type[Any]
) -> None:
    document = data.draw(message_documents(kind))
    if data.draw(st.booleans()):  # a real identity: the checks across fields are reached
        document.update({k: v for k, v in real.items() if k in kind.model_fields})
    parses_or_refuses(kind, document)
    parses_or_refuses(kind, data.draw(mutated(document)))


@FUZZ
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_messages_of_another_kind_are_refused_not_crashed(
    real: dict[str, str], data: st.DataObject, kind: type[Any]
) -> None:
    other = data.draw(st.sampled_from(KINDS))
    document = {**data.draw(message_documents(other)), **real}
    parses_or_refuses(kind, document)


# -- the state snapshot -----------------------------------------------------------------------

HEX = "0123456789abcdef"
names = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=64
).filter(lambda n: n == n.strip() and n.isprintable())
texts = st.text(min_size=1, max_size=256)
small = st.integers(0, 2**30)
optional_ints = st.none() | st.integers(0, 2**62)
snapshots = st.builds(
    NodeState,
    node_id=st.text(HEX, min_size=64, max_size=64),
    name=names,
    version=texts,
    api_port=st.integers(1, 65535),
    seq=st.integers(0, 2**63),
    uptime_s=st.floats(0, 1e12, exclude_max=True),
    models=st.lists(
        st.builds(
            ModelAdvert,
            id=texts.filter(is_valid_name),  # others are left out of a snapshot
            loaded=st.booleans(),
            operations=st.lists(st.text(max_size=256), max_size=4).map(tuple),
            size_bytes=optional_ints,
            quantization=st.none() | texts,
            context_length=optional_ints,
        ),
        max_size=4,
    ).map(tuple),
    load=st.builds(Load, in_flight=small, queued=small, capacity=st.integers(1, 2**30)),
    hardware=st.builds(
        Hardware,
        cpu=st.text(max_size=256),
        cores=st.integers(1, 2**16),
        ram_bytes=st.integers(0, 2**60),
        gpu=st.none() | texts,
        vram_bytes=optional_ints,
    ),
)


def seed_snapshot() -> dict[str, Any]:
    """A valid snapshot with every part filled in, as a JSON document."""
    state = NodeState(
        node_id="ab" * 32, name="studio", version="0.1.0", api_port=11450, seq=7,
        uptime_s=12.5,
        models=(ModelAdvert("llama3", True, ("chat/completions",), 4_000_000, "Q4_K_M", 8192),),
        load=Load(1, 0, 2),
        hardware=Hardware(cpu="x", cores=8, ram_bytes=32 << 30, gpu="rtx", vram_bytes=8 << 30),
    )  # fmt: skip
    document: dict[str, Any] = json.loads(state.encode())
    if hasattr(state_mod, "Introduction"):  # the peers a snapshot introduces (issue 9, 14)
        document["peers"] = [{"node_id": "cd" * 32, "address": "http://10.0.0.2:11450"}]
    return document


def decodes_or_refuses(raw: bytes) -> NodeState | None:
    try:
        return decode(raw)
    except ProtocolError:
        return None


def test_the_seed_snapshot_is_valid() -> None:
    assert decodes_or_refuses(json.dumps(seed_snapshot()).encode()) is not None


@FUZZ
@given(snapshots)
def test_valid_snapshots_round_trip(snapshot: NodeState) -> None:
    assert decode(snapshot.encode()) == snapshot


@FUZZ
@given(mutated(seed_snapshot()))
def test_snapshots_mutated_anywhere_are_decoded_or_refused(document: dict[str, Any]) -> None:
    # The standard encoder writes what a broken peer could: huge integers, deep nesting.
    decodes_or_refuses(json.dumps(document).encode())


@FUZZ
@given(snapshots, st.data())
def test_generated_snapshots_mutated_anywhere_are_decoded_or_refused(
    snapshot: NodeState, data: st.DataObject
) -> None:
    document = data.draw(mutated(json.loads(snapshot.encode())))
    decodes_or_refuses(json.dumps(document).encode())
