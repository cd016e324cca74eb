"""Reading a GGUF's header: real files, files the `gguf` package writes, broken files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from gguf import GGUFEndian, GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.models.gguf_header import NotGGUF, quantization_name, read_header
from tests.models import packaged_gguf, requantized_gguf, tiny_gguf


def test_the_packaged_model() -> None:
    header = read_header(packaged_gguf())
    # What gguf.GGUFReader reads from the same file (checked once by hand; it takes 5 s).
    assert header.architecture == "llama"
    assert header.quantization == "Q4_1"
    assert (header.context_length, header.block_count, header.embedding_length) == (8192, 30, 576)
    assert (header.head_count, header.head_count_kv) == (9, 3)
    assert header.model_type == "model" and (header.split_count, header.split_no) == (1, 0)


def test_the_requantized_test_model_is_another_model() -> None:
    header = read_header(requantized_gguf())
    assert header.quantization == "Q8_0" and header.architecture == "llama"
    assert requantized_gguf().stat().st_size != packaged_gguf().stat().st_size


def test_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    path = tiny_gguf(
        tmp_path / "m.gguf",
        architecture="qwen2",
        file_type=7,
        context_length=32768,
        block_count=24,
        embedding_length=896,
        head_count=14,
        head_count_kv=2,
        vocabulary=5000,
        extra={"qwen2.attention.key_length": 64, "split.count": 1},
    )
    header = read_header(path)
    fields = GGUFReader(path).fields

    def value(key: str) -> object:
        return fields[key].contents()

    assert header.architecture == value("general.architecture") == "qwen2"
    file_type = value("general.file_type")
    assert isinstance(file_type, int)
    assert header.quantization == quantization_name(file_type) == "Q8_0"
    assert header.context_length == value("qwen2.context_length") == 32768
    assert header.block_count == value("qwen2.block_count") == 24
    assert header.embedding_length == value("qwen2.embedding_length") == 896
    assert header.head_count == value("qwen2.attention.head_count") == 14
    assert header.head_count_kv == value("qwen2.attention.head_count_kv") == 2
    assert header.key_length == 64 and header.value_length is None


def test_big_endian_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    writer = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG)
    writer.add_context_length(4096)
    writer.add_file_type(2)
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    header = read_header(path)
    assert (header.architecture, header.context_length, header.quantization) == (
        "llama",
        4096,
        "Q4_0",
    )


def test_per_layer_head_counts_take_the_largest(tmp_path: Path) -> None:
    path = tmp_path / "openelm.gguf"
    writer = GGUFWriter(str(path), "openelm")
    writer.add_head_count([3, 4, 5, 4])
    writer.add_head_count_kv([1, 2, 1, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    header = read_header(path)
    assert (header.head_count, header.head_count_kv, header.quantization) == (5, 2, None)


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"GGML" + b"\x00" * 60, b"hello, world", b"GGUF\x01\x00\x00\x00" + b"\x00" * 16],
)
def test_files_that_are_not_gguf_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(NotGGUF):
        read_header(path)


def test_a_truncated_header_is_refused_wherever_it_is_cut(tmp_path: Path) -> None:
    whole = tiny_gguf(tmp_path / "whole.gguf", vocabulary=20).read_bytes()
    kv_end = len(whole) - whole[::-1].index(b"tok19"[::-1])  # the last key-value byte
    cut = tmp_path / "cut.gguf"
    for length in range(kv_end):
        cut.write_bytes(whole[:length])
        with pytest.raises(NotGGUF):
            read_header(cut)


@given(st.binary(max_size=200), st.integers(0, 600))
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_garbage_is_refused_or_read_never_a_crash(
    tmp_path: Path, garbage: bytes, where: int
) -> None:
    whole = tiny_gguf(tmp_path / "base.gguf", vocabulary=5).read_bytes()
    where = min(where, len(whole))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(whole[:where] + garbage + whole[where + len(garbage) :])
    with contextlib.suppress(NotGGUF):
        read_header(path)
