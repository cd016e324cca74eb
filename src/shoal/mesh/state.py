"""A node's state snapshot, as peers exchange it on every heartbeat, and its codec.

The snapshot says what a node can serve (models, with aliases and whether loaded), how
busy it is (in flight, queued, capacity), what it runs on (hardware) and since when,
and whom it knows: its live peers and the API address it reaches each at, so that a
mesh found piecemeal (one node's scan reaching the others) completes itself
(`shoal.mesh.introductions`). `seq` grows with every change, so a receiver keeps only
the newest it has seen. It also lists the model files the node is still pulling, each
with a have-bitmap of the chunks it holds verified, so that peers pulling the same file
fetch those chunks from it too (`shoal.models.downloads`). Decoding checks every field:
a peer's bytes are input like any other.

One side of a state exchange is a `Message`: the sender's snapshot, and which snapshot
of the receiver's the sender holds (`have`, a `Seen`). When the receiver already holds
the sender's current snapshot (the `have` it sent says so), the snapshot is replaced by
`Unchanged`: the sender's ID, seq, boot, uptime and clock, a tenth of the bytes and
none of the parsing. Both fields are optional: a node that sends no `have` (an older
one) always gets and gives whole snapshots.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from shoal.models.manifest import is_sha256
from shoal.models.names import is_valid_name

PROTOCOL_VERSION = 1
_MAX_MODELS = 4096
#: Other names one model answers to, in a snapshot (a Hub file's full name, duplicates).
MAX_ALIASES = 8
_MAX_TEXT = 256
#: A node's name is chosen by whoever runs it and shown to other operators (`shoal pair
#: list`, status, logs): short, one line, no terminal escapes.
MAX_NAME_CHARS = 64
#: Peers one snapshot introduces: a mesh larger than this is introduced in turns.
MAX_INTRODUCTIONS = 64
_INTRODUCTION_KEYS = frozenset({"node_id", "address"})
#: Files still downloading, in one snapshot: a node pulls a few at a time. With files
#: of at most 1 TiB (a bitmap of 128 KiB at 1 MiB chunks, 171 KiB in base64) four fit
#: in a snapshot (at most 1 MiB) with room to spare.
MAX_FILES = 4
_FILE_KEYS = frozenset({"sha256", "size", "chunk_bytes", "have"})
MAX_FILE_BYTES = 1 << 40


class ProtocolError(ValueError):
    """A peer sent something that is not a valid Shoal message."""


@dataclass(frozen=True, slots=True)
class ModelAdvert:
    id: str
    loaded: bool = True
    operations: tuple[str, ...] = ()
    size_bytes: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    aliases: tuple[str, ...] = ()  # other names it answers to (shoal.backends.base.ModelInfo)
    # The file's SHA-256 when the node holds it on disk and knows it: peers fetch the
    # file by it (`shoal.api.share`).
    sha256: str | None = None

    def answers_to(self, name: str) -> bool:
        return name == self.id or name in self.aliases


@dataclass(frozen=True, slots=True)
class FileAdvert:
    """A model file this node is still pulling: the chunks it holds, verified, which it
    serves to peers pulling the same file (`have`: bit i of byte i // 8, most
    significant first, set when chunk i is held)."""

    sha256: str
    size: int
    chunk_bytes: int
    have: bytes

    @classmethod
    def of(cls, sha256: str, size: int, chunk_bytes: int, chunks: Iterable[int]) -> FileAdvert:
        bitmap = bytearray(-(-_chunk_count(size, chunk_bytes) // 8))
        for index in chunks:
            bitmap[index >> 3] |= 0x80 >> (index & 7)
        return cls(sha256, size, chunk_bytes, bytes(bitmap))

    def chunks(self) -> frozenset[int]:
        """The chunks held (a padding bit past the last chunk names none)."""
        count = _chunk_count(self.size, self.chunk_bytes)
        return frozenset(
            index
            for i, byte in enumerate(self.have)
            if byte
            for bit in range(8)
            if byte & (0x80 >> bit) and (index := (i << 3) + bit) < count
        )


def _chunk_count(size: int, chunk_bytes: int) -> int:
    return -(-size // chunk_bytes)


@dataclass(frozen=True, slots=True)
class Load:
    in_flight: int = 0
    queued: int = 0
    capacity: int = 1  # the spillover threshold routing compares loads by
    # Requests its backends can run at once, when all of them say (llama-server slots,
    # the embedded engine's 1); None: some queue by themselves (no limit to wait for).
    slots: int | None = None
    # Seconds a request queued now would wait, as its queue estimates (0: none queued).
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu: str = ""
    cores: int = 1
    ram_bytes: int = 0
    gpu: str | None = None
    vram_bytes: int | None = None

    @property
    def score(self) -> float:
        """A rough strength for tie-breaks: cores, memory, and GPU memory counted most."""
        gib = 1 << 30
        return self.cores + self.ram_bytes / (4 * gib) + 2 * (self.vram_bytes or 0) / gib


@dataclass(frozen=True, slots=True)
class Introduction:
    """A live peer of the sender, and the API address (`http://IP:port`) it reaches it at."""

    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class Seen:
    """One snapshot of a node, as another acknowledges holding it: its boot and `seq`."""

    boot: str
    seq: int


@dataclass(frozen=True, slots=True)
class Unchanged:
    """A snapshot's stand-in: "my state is still the one you hold" (the sender's `seq` of
    this `boot`), with what changes by itself."""

    node_id: str
    seq: int
    boot: str
    uptime_s: float
    clock: float | None = None

    @property
    def seen(self) -> Seen:
        return Seen(self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class Message:
    """One side of a state exchange: the sender's snapshot (or `Unchanged`), and which of
    the receiver's snapshots the sender holds (None: none, or a node that does not say)."""

    state: NodeState | Unchanged
    have: Seen | None = None

    @property
    def node_id(self) -> str:
        return self.state.node_id


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: str
    name: str
    version: str
    api_port: int
    seq: int
    uptime_s: float
    models: tuple[ModelAdvert, ...] = ()
    load: Load = field(default_factory=Load)
    hardware: Hardware = field(default_factory=Hardware)
    peers: tuple[Introduction, ...] = ()
    files: tuple[FileAdvert, ...] = ()  # files being pulled, with the chunks held
    # The sender's wall clock (Unix seconds) as it made the snapshot: receivers measure
    # the skew between clocks (`shoal doctor`). None from nodes that do not send it.
    clock: float | None = None
    # Random per start of the sender's process: a new one means it restarted (its `seq`
    # began again), so its snapshot replaces the old even with a lower `seq`. None from
    # nodes that do not send it (then a lower uptime says so).
    boot: str | None = None

    @property
    def seen(self) -> Seen | None:
        """Which snapshot this is, as a receiver acknowledges it (None without a boot ID:
        an older node, which never sends `Unchanged`)."""
        return None if self.boot is None else Seen(self.boot, self.seq)

    def encode(self) -> bytes:
        return with_times(encode_body(self), self.uptime_s, self.clock, None)


def encode_body(state: NodeState) -> bytes:
    """The snapshot without what changes by itself (uptime, clock): the same bytes for one
    `seq`, so a sender encodes it once and adds those with `with_times`."""
    load, hardware = state.load, state.hardware
    return orjson.dumps(
        {
            "v": PROTOCOL_VERSION,
            "node_id": state.node_id,
            "name": state.name,
            "version": state.version,
            "api_port": state.api_port,
            "seq": state.seq,
            "models": [_model_dict(m) for m in state.models],
            "load": {
                "in_flight": load.in_flight,
                "queued": load.queued,
                "capacity": load.capacity,
                **({"slots": load.slots} if load.slots is not None else {}),
                **({"wait_s": load.wait_s} if load.wait_s else {}),
            },
            "hardware": {
                "cpu": hardware.cpu,
                "cores": hardware.cores,
                "ram_bytes": hardware.ram_bytes,
                "gpu": hardware.gpu,
                "vram_bytes": hardware.vram_bytes,
            },
            "peers": [{"node_id": p.node_id, "address": p.address} for p in state.peers],
            **({"files": [_file_dict(f) for f in state.files]} if state.files else {}),
            **({"boot": state.boot} if state.boot is not None else {}),
        }
    )


def with_times(body: bytes, uptime_s: float, clock: float | None, have: Seen | None) -> bytes:
    """`body` (a JSON object: `encode_body`'s, or `encode_unchanged`'s) with the sender's
    uptime and clock, and the `have` of a `Message`, added."""
    tail: dict[str, Any] = {"uptime_s": uptime_s}
    if clock is not None:
        tail["clock"] = clock
    if have is not None:
        tail["have"] = {"boot": have.boot, "seq": have.seq}
    return body[:-1] + b"," + orjson.dumps(tail)[1:]


def encode_unchanged(state: NodeState) -> bytes:
    """`Unchanged` for `state` (which has a boot ID), without its times (`with_times`)."""
    assert state.boot is not None, "only a snapshot with a boot ID can be acknowledged"
    return orjson.dumps(
        {
            "v": PROTOCOL_VERSION,
            "node_id": state.node_id,
            "unchanged": True,
            "seq": state.seq,
            "boot": state.boot,
        }
    )


def _file_dict(file: FileAdvert) -> dict[str, Any]:
    return {
        "sha256": file.sha256,
        "size": file.size,
        "chunk_bytes": file.chunk_bytes,
        "have": base64.b64encode(file.have).decode(),
    }


def _model_dict(model: ModelAdvert) -> dict[str, Any]:
    return {
        "id": model.id,
        "loaded": model.loaded,
        "operations": list(model.operations),
        "size_bytes": model.size_bytes,
        "quantization": model.quantization,
        "context_length": model.context_length,
        **({"aliases": list(model.aliases)} if model.aliases else {}),
        **({"sha256": model.sha256} if model.sha256 else {}),
    }


def decode(raw: bytes) -> NodeState:
    """Parse and check a snapshot; raise ProtocolError on anything malformed."""
    return _state(_document(raw))


def decode_message(raw: bytes) -> Message:
    """Parse and check one side of a state exchange (a whole snapshot, as older nodes
    send, is one); raise ProtocolError on anything malformed."""
    doc = _document(raw)
    have = doc.get("have")
    seen = None if have is None else _seen(have)
    unchanged = doc.get("unchanged")
    if unchanged is None:
        return Message(_state(doc), seen)
    if unchanged is not True:
        raise ProtocolError("unchanged must be true when present")
    boot = _boot(doc.get("boot"))
    if boot is None:
        raise ProtocolError("an unchanged state names the boot it is of")
    state = Unchanged(
        node_id=_node_id(doc.get("node_id")),
        seq=_int(doc, "seq", 0, 2**63),
        boot=boot,
        uptime_s=_number(doc, "uptime_s"),
        clock=None if doc.get("clock") is None else _number(doc, "clock"),
    )
    return Message(state, seen)


def _document(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("a snapshot is a JSON object")
    if doc.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {doc.get('v')!r}; this node speaks {PROTOCOL_VERSION}"
        )
    return doc


_SEEN_KEYS = frozenset({"boot", "seq"})


def _seen(value: object) -> Seen:
    if not isinstance(value, dict) or value.keys() != _SEEN_KEYS:
        raise ProtocolError("have is an object of boot and seq, nothing else")
    boot = _boot(value["boot"])
    if boot is None:
        raise ProtocolError("have names a boot")
    return Seen(boot, _int(value, "seq", 0, 2**63))


def _state(doc: dict[str, Any]) -> NodeState:
    node_id = _node_id(doc.get("node_id"))
    models = doc.get("models")
    if not isinstance(models, list) or len(models) > _MAX_MODELS:
        raise ProtocolError("models must be a list")
    load = _obj(doc, "load")
    hardware = _obj(doc, "hardware")
    return NodeState(
        node_id=node_id,
        name=checked_name(doc.get("name")),
        version=_text(doc, "version"),
        api_port=_int(doc, "api_port", 1, 65535),
        seq=_int(doc, "seq", 0, 2**63),
        uptime_s=_number(doc, "uptime_s"),
        # A model whose name is not a valid model name (a path, `..`, a control
        # character) is left out, not the peer: one odd backend must not cut a node off.
        models=tuple(m for m in map(_model, models) if is_valid_name(m.id)),
        load=Load(
            in_flight=_int(load, "in_flight", 0, 1 << 30),
            queued=_int(load, "queued", 0, 1 << 30),
            capacity=_int(load, "capacity", 1, 1 << 30),
            slots=None if load.get("slots") is None else _int(load, "slots", 0, 1 << 30),
            wait_s=_number(load, "wait_s") if "wait_s" in load else 0.0,
        ),
        hardware=Hardware(
            cpu=_text(hardware, "cpu", allow_empty=True),
            cores=_int(hardware, "cores", 1, 1 << 16),
            ram_bytes=_int(hardware, "ram_bytes", 0, 1 << 60),
            gpu=_optional_text(hardware, "gpu"),
            vram_bytes=_optional_int(hardware, "vram_bytes"),
        ),
        peers=_introductions(doc.get("peers", [])),
        files=_files(doc.get("files", [])),
        clock=None if doc.get("clock") is None else _number(doc, "clock"),
        boot=_boot(doc.get("boot")),
    )


def _boot(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 8 <= len(value) <= 32 or not value.isalnum():
        raise ProtocolError("boot must be 8 to 32 letters and digits")
    return value


def _files(value: object) -> tuple[FileAdvert, ...]:
    """The "files" list: at most MAX_FILES files being pulled, each exactly a SHA-256, a
    size, a chunk size and a have-bitmap of exactly the file's chunk count."""
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise ProtocolError(f"files must be a list of at most {MAX_FILES}")
    found = []
    for entry in value:
        if not isinstance(entry, dict) or entry.keys() != _FILE_KEYS:
            raise ProtocolError("a file is an object of sha256, size, chunk_bytes and have")
        sha256 = _sha256(entry)
        size = _int(entry, "size", 0, MAX_FILE_BYTES)
        chunk_bytes = _int(entry, "chunk_bytes", 1 << 16, 1 << 26)
        have = entry["have"]
        expected = -(-_chunk_count(size, chunk_bytes) // 8)
        try:
            bitmap = base64.b64decode(have, validate=True) if isinstance(have, str) else None
        except binascii.Error:
            bitmap = None
        if sha256 is None or bitmap is None or len(bitmap) != expected:
            raise ProtocolError("a file's have must be base64 of one bit per chunk")
        found.append(FileAdvert(sha256, size, chunk_bytes, bitmap))
    return tuple(found)


_NODE_ID = re.compile(r"[0-9a-f]{64}")


def _node_id(value: object) -> str:
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value):
        raise ProtocolError("node_id must be 64 lowercase hex digits")
    return value


def _introductions(value: object) -> tuple[Introduction, ...]:
    """The "peers" list: at most MAX_INTRODUCTIONS entries of exactly a node ID and an
    API address (absent from snapshots of nodes that introduce nobody)."""
    if not isinstance(value, list) or len(value) > MAX_INTRODUCTIONS:
        raise ProtocolError(f"peers must be a list of at most {MAX_INTRODUCTIONS}")
    found = []
    for entry in value:
        if not isinstance(entry, dict) or entry.keys() != _INTRODUCTION_KEYS:
            raise ProtocolError("a peer is an object of node_id and address, nothing else")
        address = api_address(entry["address"])
        if address is None:
            raise ProtocolError("a peer's address must be http://IP:port")
        found.append(Introduction(_node_id(entry["node_id"]), address))
    return tuple(found)


def api_address(value: object) -> str | None:
    """`value` as a node's API address, normalised — `http://IP:port`, an IP literal, no
    path, user or query — or None if it is not one. Names are not introduced: the
    receiver may not resolve them as the sender does."""
    if not isinstance(value, str) or len(value) > 80:
        return None
    return _api_address(value)


# Every snapshot sent and received carries up to MAX_INTRODUCTIONS addresses, the same
# ones beat after beat: parsing them anew was a sixth of an idle node's CPU at 20 peers.
@functools.lru_cache(maxsize=4096)
def _api_address(value: str) -> str | None:
    try:
        parts = urlsplit(value.rstrip("/"))
        port = parts.port
        ip = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return None
    if parts.scheme != "http" or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None or not port:
        return None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}"


def checked_name(value: object) -> str:
    """A node name as another node sent it, stripped, if it is fit to show an operator:
    1 to MAX_NAME_CHARS printable characters (no control characters, newlines or escape
    sequences, which could forge a log line or drive the operator's terminal)."""
    if not isinstance(value, str):
        raise ProtocolError("name must be a string")
    name = value.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ProtocolError(f"name must be 1 to {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise ProtocolError("name must be printable characters only")
    return name


def _model(entry: Any) -> ModelAdvert:
    if not isinstance(entry, dict):
        raise ProtocolError("a model is a JSON object")
    operations = entry.get("operations")
    if not isinstance(operations, list) or not all(
        isinstance(op, str) and len(op) <= _MAX_TEXT for op in operations
    ):
        raise ProtocolError("model operations must be a list of names")
    loaded = entry.get("loaded")
    if not isinstance(loaded, bool):
        raise ProtocolError("model loaded must be true or false")
    return ModelAdvert(
        id=_text(entry, "id"),
        loaded=loaded,
        operations=tuple(operations),
        size_bytes=_optional_int(entry, "size_bytes"),
        quantization=_optional_text(entry, "quantization"),
        context_length=_optional_int(entry, "context_length"),
        aliases=_aliases(entry),
        sha256=_sha256(entry),
    )


def _sha256(entry: dict[str, Any]) -> str | None:
    value = entry.get("sha256")
    if value is not None and not is_sha256(value):
        raise ProtocolError("model sha256 must be 64 lowercase hex digits")
    return value


def _aliases(entry: dict[str, Any]) -> tuple[str, ...]:
    aliases = entry.get("aliases", [])
    if (
        not isinstance(aliases, list)
        or len(aliases) > MAX_ALIASES
        or not all(isinstance(a, str) and is_valid_name(a) for a in aliases)
    ):
        raise ProtocolError(f"model aliases must be at most {MAX_ALIASES} valid model names")
    return tuple(aliases)


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{key} must be an object")
    return value


def _text(doc: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > _MAX_TEXT or (not value and not allow_empty):
        raise ProtocolError(f"{key} must be a short non-empty string")
    return value


def _optional_text(doc: dict[str, Any], key: str) -> str | None:
    return None if doc.get(key) is None else _text(doc, key)


def _int(doc: dict[str, Any], key: str, low: int, high: int) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _optional_int(doc: dict[str, Any], key: str) -> int | None:
    return None if doc.get(key) is None else _int(doc, key, 0, 1 << 62)


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise ProtocolError(f"{key} must be a non-negative number")
    return float(value)


def local_hardware() -> Hardware:
    """What this machine is, read once at start (no GPU probing without a vendor tool)."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Hardware(
        cpu=cpu[:_MAX_TEXT],
        cores=os.cpu_count() or 1,
        ram_bytes=int(psutil.virtual_memory().total),
    )
