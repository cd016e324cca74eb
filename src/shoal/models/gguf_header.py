"""What a GGUF file's header says about the model: architecture, quantization, context
length and the shapes the KV cache's size follows from.

The file is memory-mapped and only its key-value section is walked; arrays (the
tokenizer's vocabulary and merges, a few hundred thousand strings) are stepped over, not
decoded. `gguf.GGUFReader` decodes every element into NumPy views: 5.4 s for the
packaged SmolLM2 (49k tokens) on this machine's CPU, tens of seconds for a 150k-token
vocabulary, against ~0.1 s here. The format's constants (value types, file types) come
from the `gguf` package, the reference implementation.
See https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"GGUF"
# Version 1 counted with 32-bit integers and has not been written since 2023.
_VERSIONS = (2, 3)
# Sanity limits: a real header has tens of keys; a key is a short dotted name.
_MAX_KV = 100_000
_MAX_KEY_BYTES = 65_535
_MAX_STRING_BYTES = 1 << 20
_MAX_ARRAY_DEPTH = 4
# Per-layer arrays (head counts that vary by layer) are read when they are this short.
_MAX_READ_ARRAY = 4096

# GGUFValueType -> struct code, for the scalar types.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class NotGGUF(ValueError):
    """The file is not a readable GGUF (wrong magic, unknown version, truncated, absurd)."""


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    architecture: str | None
    quantization: str | None  # "Q4_K_M", from general.file_type
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None  # per head, when it is not embedding_length / head_count
    value_length: int | None
    model_type: str | None  # general.type: "model", "adapter", "mmproj", ...
    split_count: int  # 1 unless the model is split over several files
    split_no: int  # 0 for the first file of a split model


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path`; `NotGGUF` if it is not one, `OSError` as raised."""
    with path.open("rb") as file:
        try:
            view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise NotGGUF("the file is empty") from None
    with view:
        values = _Parser(view).key_values()
    return _header_from(values)


def quantization_name(file_type: int) -> str | None:
    """general.file_type -> "Q4_K_M" (llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    from gguf.constants import LlamaFileType

    try:
        member = LlamaFileType(file_type)
    except ValueError:
        return None
    if member is LlamaFileType.GUESSED:
        return None
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


class _Parser:
    def __init__(self, view: mmap.mmap) -> None:
        self._view = view
        self._end = len(view)
        self._offset = 0
        self._order = "<"

    def key_values(self) -> dict[str, Any]:
        if self._take(4) != _MAGIC:
            raise NotGGUF("no GGUF magic number")
        (version,) = self._unpack("I")
        if version & 0xFFFF == 0 and version != 0:  # written big-endian
            self._order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in _VERSIONS:
            raise NotGGUF(f"GGUF version {version} is not supported")
        _tensors, kv_count = self._unpack("QQ")
        if kv_count > _MAX_KV:
            raise NotGGUF(f"{kv_count} metadata keys is not a plausible header")
        values: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string(_MAX_KEY_BYTES)
            (value_type,) = self._unpack("I")
            values[key] = self._value(value_type, depth=0)
        return values

    def _value(self, value_type: int, depth: int) -> Any:
        code = _SCALARS.get(value_type)
        if code is not None:
            return self._unpack(code)[0]
        if value_type == _STRING:
            return self._string(_MAX_STRING_BYTES)
        if value_type == _ARRAY:
            return self._array(depth)
        raise NotGGUF(f"unknown metadata value type {value_type}")

    def _array(self, depth: int) -> list[Any] | None:
        """A short numeric array's values; longer ones (and strings) are stepped over."""
        if depth >= _MAX_ARRAY_DEPTH:
            raise NotGGUF("arrays nested too deep")
        element_type, count = self._unpack("IQ")
        code = _SCALARS.get(element_type)
        if code is not None:
            size = struct.calcsize(code) * count
            if count <= _MAX_READ_ARRAY:
                self._need(size)
                values = list(
                    struct.unpack_from(f"{self._order}{count}{code}", self._view, self._offset)
                )
                self._offset += size
                return values
            self._skip(size)
            return None
        if element_type == _STRING:
            self._skip_strings(count)
            return None
        if element_type == _ARRAY:
            for _ in range(count):
                self._array(depth + 1)
            return None
        raise NotGGUF(f"unknown array element type {element_type}")

    def _skip_strings(self, count: int) -> None:
        # The hot loop (a vocabulary): offsets only, no decoding, no slicing.
        unpack_from, view, end, offset = (
            struct.Struct(f"{self._order}Q").unpack_from,
            self._view,
            self._end,
            self._offset,
        )
        for _ in range(count):
            if offset + 8 > end:
                raise NotGGUF("the file ends inside its header")
            offset += 8 + unpack_from(view, offset)[0]
        if offset > end:
            raise NotGGUF("the file ends inside its header")
        self._offset = offset

    def _string(self, limit: int) -> str:
        (length,) = self._unpack("Q")
        if length > limit:
            self._skip(length)
            return ""
        return self._take(length).decode("utf-8", "replace")

    def _unpack(self, codes: str) -> tuple[Any, ...]:
        fmt = self._order + codes
        size = struct.calcsize(fmt)
        self._need(size)
        values = struct.unpack_from(fmt, self._view, self._offset)
        self._offset += size
        return values

    def _take(self, size: int) -> bytes:
        self._need(size)
        data = self._view[self._offset : self._offset + size]
        self._offset += size
        return data

    def _skip(self, size: int) -> None:
        self._need(size)
        self._offset += size

    def _need(self, size: int) -> None:
        if self._offset + size > self._end:
            raise NotGGUF("the file ends inside its header")


def _header_from(values: dict[str, Any]) -> GGUFHeader:
    architecture = _text(values.get("general.architecture"))
    prefix = f"{architecture}." if architecture else "\x00"

    def number(key: str) -> int | None:
        value = values.get(prefix + key)
        if isinstance(value, list):  # per layer: the largest decides the memory
            value = max((v for v in value if isinstance(v, int)), default=None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        return value

    file_type = values.get("general.file_type")
    return GGUFHeader(
        architecture=architecture,
        quantization=(
            quantization_name(file_type)
            if isinstance(file_type, int) and not isinstance(file_type, bool)
            else None
        ),
        context_length=number("context_length"),
        block_count=number("block_count"),
        embedding_length=number("embedding_length"),
        head_count=number("attention.head_count"),
        head_count_kv=number("attention.head_count_kv"),
        key_length=number("attention.key_length"),
        value_length=number("attention.value_length"),
        model_type=_text(values.get("general.type")),
        split_count=max(1, _count(values.get("split.count"), 1)),
        split_no=_count(values.get("split.no"), 0),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 100_000:
        return value
    return default
