"""The state snapshot codec, the subnet scan's targets, and the node identity."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import stat
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.mesh import identity
from shoal.mesh.scan import scan_targets
from shoal.mesh.state import (
    MAX_FILES,
    MAX_INTRODUCTIONS,
    FileAdvert,
    Hardware,
    Introduction,
    Load,
    ModelAdvert,
    NodeState,
    ProtocolError,
    api_address,
    decode,
)

NODE_ID = "ab" * 32


def sample() -> NodeState:
    return NodeState(
        node_id=NODE_ID,
        name="studio",
        version="0.1.0",
        api_port=11450,
        seq=7,
        uptime_s=12.5,
        models=(
            ModelAdvert("llama3", True, ("chat/completions", "completions"), 4_000_000, "Q4_K_M"),
            ModelAdvert("minilm", False, ("embeddings",)),
            ModelAdvert("smol:q4_1", False, ("completions",), aliases=("org/smol/smol.gguf",)),
        ),
        load=Load(in_flight=1, queued=2, capacity=2, slots=3, wait_s=1.5),
        hardware=Hardware(cpu="x", cores=8, ram_bytes=32 << 30, gpu="rtx", vram_bytes=8 << 30),
        peers=(
            Introduction("cd" * 32, "http://10.0.0.3:11450"),
            Introduction("ef" * 32, "http://[fd00::4]:11450"),
        ),
        files=(FileAdvert.of("12" * 32, 10 * MiB + 1, MiB, (0, 3, 10)),),
    )


MiB = 1 << 20


def test_round_trip() -> None:
    assert decode(sample().encode()) == sample()


@pytest.mark.parametrize(
    "aliases",
    ["org/x.gguf", ["../etc/passwd"], ["a\\b"], ["x\u0000"], ["ok"] * 9, [7], ["\u0430bc"]],
)
def test_model_aliases_are_valid_names_and_few(aliases: object) -> None:
    document = orjson.loads(sample().encode())
    document["models"][0]["aliases"] = aliases
    with pytest.raises(ProtocolError, match="aliases"):
        decode(orjson.dumps(document))


def test_hardware_score_counts_gpu_memory_most() -> None:
    plain = Hardware(cores=8, ram_bytes=32 << 30)
    gpu = Hardware(cores=8, ram_bytes=32 << 30, vram_bytes=8 << 30)
    assert gpu.score - plain.score == pytest.approx(16)
    assert plain.score == pytest.approx(16)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", 2),
        ("node_id", "xyz"),
        ("node_id", "AB" * 32),
        ("api_port", 0),
        ("api_port", "11450"),
        ("seq", -1),
        ("seq", True),
        ("name", ""),
        ("name", "n" * 300),
        ("models", "llama3"),
        ("models", [{"id": "m", "loaded": "yes", "operations": []}]),
        ("models", [{"id": "m", "loaded": True, "operations": "chat"}]),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 0}),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 1, "slots": -1}),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 1, "slots": "2"}),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 1, "wait_s": -1}),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 1, "wait_s": "1"}),
        ("load", {"in_flight": 0, "queued": 0, "capacity": 1, "wait_s": True}),
        ("hardware", None),
        ("uptime_s", float("nan")),
    ],
)
def test_malformed_snapshots_are_refused(field: str, value: object) -> None:
    document = orjson.loads(sample().encode())
    document[field] = value
    with pytest.raises(ProtocolError):
        decode(_dumps(document))


PEER = {"node_id": "cd" * 32, "address": "http://10.0.0.3:11450"}


@pytest.mark.parametrize(
    "peers",
    [
        "http://10.0.0.3:11450",
        [PEER] * (MAX_INTRODUCTIONS + 1),
        ["cd" * 32],
        [{"node_id": "cd" * 32}],
        [{**PEER, "name": "extra"}],  # strict: nothing but the two fields
        [{**PEER, "node_id": "xyz"}],
        [{**PEER, "address": "http://studio.local:11450"}],  # names are not introduced
        [{**PEER, "address": "https://10.0.0.3:11450"}],
        [{**PEER, "address": "http://10.0.0.3"}],
        [{**PEER, "address": "http://10.0.0.3:70000"}],
        [{**PEER, "address": "http://user@10.0.0.3:11450"}],
        [{**PEER, "address": "http://10.0.0.3:11450/v1"}],
        [{**PEER, "address": 11450}],
    ],
)
def test_malformed_introductions_are_refused(peers: object) -> None:
    document = orjson.loads(sample().encode())
    document["peers"] = peers
    with pytest.raises(ProtocolError):
        decode(_dumps(document))


@pytest.mark.parametrize("name", ["../../x:q8_0", "/tmp/x", "a\u0000b", "\u0430bc", "x y"])
def test_a_model_with_an_invalid_name_is_left_out_not_the_peer(name: str) -> None:
    document = orjson.loads(sample().encode())
    document["models"][0]["id"] = name
    state = decode(orjson.dumps(document))
    assert [m.id for m in state.models] == [m.id for m in sample().models[1:]]


def test_a_file_being_pulled_says_which_chunks_it_holds() -> None:
    (file,) = decode(sample().encode()).files
    assert file.chunks() == {0, 3, 10} and file.have == bytes([0b10010000, 0b00100000])
    # Bits past the last chunk (padding) name nothing.
    assert FileAdvert("12" * 32, 9 * MiB, MiB, b"\x00\xff").chunks() == {8}
    assert FileAdvert.of("12" * 32, 0, MiB, ()).have == b""


FILE = {"sha256": "12" * 32, "size": 3 * MiB, "chunk_bytes": MiB, "have": "gA=="}


@pytest.mark.parametrize(
    "files",
    [
        {"x": FILE},
        [FILE] * (MAX_FILES + 1),
        [{**FILE, "extra": 1}],
        [{**FILE, "sha256": "../../etc/passwd"}],
        [{**FILE, "size": -1}],
        [{**FILE, "size": (1 << 40) + 1}],
        [{**FILE, "chunk_bytes": 0}],
        [{**FILE, "have": "gAAA"}],  # 3 bytes for 3 chunks: one is enough
        [{**FILE, "have": "not base64!"}],
        [{**FILE, "have": 128}],
    ],
)
def test_malformed_files_are_refused(files: object) -> None:
    document = orjson.loads(sample().encode())
    document["files"] = files
    with pytest.raises(ProtocolError):
        decode(_dumps(document))


def test_a_snapshot_that_introduces_nobody_may_leave_the_list_out() -> None:
    document = orjson.loads(sample().encode())
    del document["peers"]
    assert decode(_dumps(document)).peers == ()


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("http://10.0.0.3:11450/", "http://10.0.0.3:11450"),
        ("http://[FD00::4]:11450", "http://[fd00::4]:11450"),
        ("http://127.0.0.1:8", "http://127.0.0.1:8"),
        ("http://10.0.0.3:0", None),
        ("http://010.0.0.3:11450", None),
        ("http://studio:11450", None),
        (None, None),
    ],
)
def test_api_addresses_are_ip_literals_normalised(raw: object, address: str | None) -> None:
    assert api_address(raw) == address


def _dumps(document: dict[str, object]) -> bytes:
    # The standard encoder writes what a broken peer could send: NaN, huge integers.
    return json.dumps(document).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_never_fails_otherwise_on_bytes(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(raw)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_decode_never_fails_otherwise_on_json(document: object) -> None:
    with contextlib.suppress(ProtocolError):
        decode(_dumps(document))  # type: ignore[arg-type]


def test_scan_targets_cover_the_24_without_ourselves() -> None:
    network = ipaddress.IPv4Network("10.1.2.0/24")
    targets = scan_targets([network], 11450, exclude=["10.1.2.7"])
    assert len(targets) == 253
    assert "http://10.1.2.1:11450" in targets
    assert "http://10.1.2.7:11450" not in targets
    assert "http://10.1.2.255:11450" not in targets  # broadcast is no host


def test_identity_is_stable_private_and_fingerprinted(tmp_path: Path) -> None:
    first = identity.load_or_create(tmp_path)
    again = identity.load_or_create(tmp_path)
    assert first.node_id == again.node_id
    assert len(first.node_id) == 64
    assert first.node_id == identity.node_id_of(first.public_key)
    assert stat.S_IMODE(os.stat(tmp_path / identity.KEY_FILE).st_mode) == 0o600
    assert first.short_id.startswith("SHOAL-") and len(first.short_id) == 20
    other = identity.load_or_create(tmp_path / "other")
    assert other.node_id != first.node_id


def test_loosened_key_permissions_are_tightened(tmp_path: Path) -> None:
    identity.load_or_create(tmp_path)
    (tmp_path / identity.KEY_FILE).chmod(0o644)
    identity.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / identity.KEY_FILE).st_mode) == 0o600


# -- one side of an exchange: `have`, and `Unchanged` ------------------------------------


def test_a_message_carries_a_snapshot_or_unchanged_and_what_it_holds_of_the_receiver() -> None:
    from shoal.mesh.state import (
        Message,
        Seen,
        Unchanged,
        decode_message,
        encode_body,
        encode_unchanged,
        with_times,
    )

    state = dataclasses.replace(sample(), boot="b00t0001", clock=1.7e9)
    have = Seen("0ther000", 41)
    whole = with_times(encode_body(state), state.uptime_s, state.clock, have)
    assert decode_message(whole) == Message(state, have)
    assert decode(whole) == state  # an older node reads it: `have` is ignored
    assert decode_message(state.encode()) == Message(state, None)  # an older node's
    brief = with_times(encode_unchanged(state), 13.0, 1.7e9 + 1, None)
    assert decode_message(brief) == Message(Unchanged(NODE_ID, 7, "b00t0001", 13.0, 1.7e9 + 1))
    assert len(brief) < len(whole) / 5


@pytest.mark.parametrize(
    "patch",
    [
        {"have": {"boot": "b00t0001"}},
        {"have": {"boot": "b00t0001", "seq": -1}},
        {"have": {"boot": "no", "seq": 1}},
        {"have": {"boot": "b00t0001", "seq": 1, "more": 1}},
        {"have": [1]},
        {"unchanged": False},
        {"unchanged": True, "boot": None},
        {"unchanged": True, "seq": "7"},
        {"unchanged": True, "uptime_s": None},
        {"unchanged": True, "node_id": "x"},
    ],
)
def test_malformed_messages_are_refused(patch: dict[str, object]) -> None:
    from shoal.mesh.state import decode_message

    document = json.loads(dataclasses.replace(sample(), boot="b00t0001").encode())
    document.update(patch)
    with pytest.raises(ProtocolError):
        decode_message(orjson.dumps(document))
