"""Manifests (`shoal.models.manifest`): the chunk arithmetic, the Range rule, the JSON
form, hashing a file, and the cache in the data dir."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.models.manifest import (
    CHUNK_BYTES,
    MAX_CHUNKS_PER_REQUEST,
    ByteRange,
    Manifest,
    ManifestCache,
    ManifestError,
    RangeError,
    chunk_count,
    chunk_span,
    compute,
    file_sha256,
    is_sha256,
    parse_range,
)

MiB = CHUNK_BYTES
sizes = st.integers(min_value=0, max_value=64 * MiB) | st.sampled_from(
    [0, 1, MiB - 1, MiB, MiB + 1, 16 * MiB, 16 * MiB + 1, 17 * MiB]
)


# -- chunk arithmetic -------------------------------------------------------------------


@given(sizes)
def test_chunks_tile_the_file_in_order_each_whole_but_the_last(size: int) -> None:
    count = chunk_count(size)
    spans = [chunk_span(i, size) for i in range(count)]
    assert [start for start, _ in spans] == [i * MiB for i in range(count)]
    assert all(end == next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert (spans[-1][1] if spans else 0) == size
    assert all(end - start == MiB for start, end in spans[:-1])
    assert all(0 < end - start <= MiB for start, end in spans)
    with pytest.raises(IndexError):
        chunk_span(count, size)


def test_chunk_counts_at_the_edges() -> None:
    assert [chunk_count(n) for n in (0, 1, MiB - 1, MiB, MiB + 1)] == [0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="negative"):
        chunk_count(-1)
    with pytest.raises(IndexError):
        chunk_span(-1, MiB)


# -- ranges -----------------------------------------------------------------------------


def _rule(first: int, last: int, size: int) -> bool:
    """The rule, spelt differently from the code: whole chunks, at most 16, inside."""
    if not 0 <= first <= last < size:
        return False
    starts = {i * MiB for i in range(chunk_count(size))}
    ends = {min((i + 1) * MiB, size) for i in range(chunk_count(size))}
    if first not in starts or last + 1 not in ends:
        return False
    return (last + 1 - first + MiB - 1) // MiB <= MAX_CHUNKS_PER_REQUEST


@given(
    size=sizes,
    first=st.integers(0, 70 * MiB) | st.integers(0, 70).map(lambda i: i * MiB),
    length=st.integers(1, 20 * MiB) | st.integers(1, 20).map(lambda i: i * MiB),
)
def test_a_range_is_served_exactly_when_it_is_whole_chunks_inside_the_file(
    size: int, first: int, length: int
) -> None:
    last = first + length - 1
    if _rule(first, last, size):
        got = parse_range(f"bytes={first}-{last}", size)
        assert (got.start, got.end, got.length) == (first, last + 1, length)
        assert got.first_chunk == first // MiB
        assert 1 <= got.chunks <= MAX_CHUNKS_PER_REQUEST
    else:
        with pytest.raises(RangeError):
            parse_range(f"bytes={first}-{last}", size)


@given(size=sizes, data=st.data())
def test_every_window_of_up_to_16_chunks_is_served(size: int, data: st.DataObject) -> None:
    count = chunk_count(size)
    if count == 0:
        return
    first = data.draw(st.integers(0, count - 1))
    chunks = data.draw(st.integers(1, min(MAX_CHUNKS_PER_REQUEST, count - first)))
    start, end = chunk_span(first, size)[0], chunk_span(first + chunks - 1, size)[1]
    assert parse_range(f"bytes={start}-{end - 1}", size) == ByteRange(start, end)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=0-",  # open: the rest of the file
        "bytes=-1048576",  # a suffix
        "bytes=0-1048575,1048576-2097151",  # several
        "bytes=1-1048576",  # not on a chunk boundary
        "bytes=0-1048574",  # ends inside a chunk
        f"bytes=0-{17 * MiB - 1}",  # 17 chunks
        f"bytes={20 * MiB}-{21 * MiB - 1}",  # past the end
        f"bytes=0-{20 * MiB}",  # runs past the end
        "bytes=1048576-0",  # backwards
        "items=0-1048575",
        "bytes=0x0-1048575",
        "bytes= 0-1048575",
        "bytes=0-99999999999999999999",  # too long a number
    ],
)
def test_ranges_this_node_does_not_serve(header: str | None) -> None:
    with pytest.raises(RangeError):
        parse_range(header, 20 * MiB)


def test_the_last_short_chunk_ends_at_the_end_of_the_file() -> None:
    size = 3 * MiB + 10
    assert parse_range(f"bytes={3 * MiB}-{size - 1}", size) == ByteRange(3 * MiB, size)
    assert parse_range(f"bytes=0-{size - 1}", size).chunks == 4


# -- the JSON form ----------------------------------------------------------------------

H = "ab" * 32


def test_a_manifest_round_trips_through_its_wire_form() -> None:
    manifest = Manifest(H, MiB + 1, (H, "cd" * 32))
    assert manifest.wire() == {
        "sha256": H, "size": MiB + 1, "chunk_bytes": MiB, "chunks": [H, "cd" * 32]
    }  # fmt: skip
    assert Manifest.from_wire(json.loads(json.dumps(manifest.wire()))) == manifest


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"sha256": H, "size": 1, "chunk_bytes": MiB},  # no chunks
        {"sha256": H, "size": 1, "chunk_bytes": MiB, "chunks": [H], "extra": 1},
        {"sha256": H.upper(), "size": 1, "chunk_bytes": MiB, "chunks": [H]},
        {"sha256": H, "size": 1, "chunk_bytes": MiB, "chunks": []},  # too few
        {"sha256": H, "size": 1, "chunk_bytes": MiB, "chunks": [H, H]},  # too many
        {"sha256": H, "size": 1, "chunk_bytes": 4096, "chunks": [H]},
        {"sha256": H, "size": True, "chunk_bytes": MiB, "chunks": [H]},
        {"sha256": H, "size": -1, "chunk_bytes": MiB, "chunks": []},
        {"sha256": H, "size": 1.0, "chunk_bytes": MiB, "chunks": [H]},
        {"sha256": H, "size": 1, "chunk_bytes": MiB, "chunks": ["../x"]},
        {"sha256": H, "size": 1, "chunk_bytes": MiB, "chunks": H},
        {"sha256": H, "size": 1 << 60, "chunk_bytes": MiB, "chunks": []},
    ],
)
def test_malformed_manifests_are_refused(document: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_wire(document)


def test_sha256_spelling() -> None:
    assert is_sha256(H)
    assert not any(is_sha256(x) for x in (H.upper(), H[:-1], H + "0", "g" * 64, None, 5))


# -- hashing a file ---------------------------------------------------------------------


def _file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", [0, 1, MiB, 2 * MiB + 12345])
def test_compute_hashes_the_file_and_each_chunk(tmp_path: Path, size: int) -> None:
    data = _file(tmp_path / "f", size)
    manifest, key = compute(tmp_path / "f")
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.size == size == key[1]
    assert manifest.chunks == tuple(
        hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, size, MiB)
    )
    assert file_sha256(tmp_path / "f") == (manifest.sha256, key)


# -- the cache --------------------------------------------------------------------------


def test_the_cache_hashes_once_and_is_reused_after_a_restart(tmp_path: Path) -> None:
    data = _file(tmp_path / "f", 3 * MiB + 7)
    cache = ManifestCache.in_data_dir(tmp_path / "data")
    (tmp_path / "data").mkdir()
    first = cache.manifest(tmp_path / "f")
    assert cache.manifest(tmp_path / "f") == first
    assert cache.computed == 1
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]  # no leftovers

    again = ManifestCache(cache.path)  # a restarted node
    assert again.cached(tmp_path / "f") == first
    assert again.manifest(tmp_path / "f") == first
    assert again.computed == 0


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _file(path, 2 * MiB)
    cache = ManifestCache(tmp_path / "cache.json")
    old = cache.manifest(path)
    data = _file(path, 2 * MiB)  # same size, new bytes, new mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert cache.cached(path) is None
    new = cache.manifest(path)
    assert new != old and new.sha256 == hashlib.sha256(data).hexdigest()
    assert cache.computed == 2
    # Replaced by another file (a new inode) with the same size and mtime: stale too.
    other = tmp_path / "g"
    _file(other, 2 * MiB)
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(other, path)
    assert cache.cached(path) is None


def test_an_unreadable_cache_starts_afresh(tmp_path: Path) -> None:
    _file(tmp_path / "f", 10)
    for garbage in (b"{", b"[]", b'{"v": 1, "files": {"x": {"size": "1"}}}', b'{"v": 9}'):
        (tmp_path / "cache.json").write_bytes(garbage)
        cache = ManifestCache(tmp_path / "cache.json")
        assert cache.manifest(tmp_path / "f").size == 10
        assert json.loads((tmp_path / "cache.json").read_bytes())["v"] == 1


def test_forgetting_files_no_longer_catalogued(tmp_path: Path) -> None:
    for name in "ab":
        _file(tmp_path / name, 10)
    cache = ManifestCache(tmp_path / "cache.json")
    cache.manifest(tmp_path / "a")
    cache.manifest(tmp_path / "b")
    cache.forget_missing({str(tmp_path / "a")})
    again = ManifestCache(tmp_path / "cache.json")
    assert again.cached(tmp_path / "a") is not None
    assert again.cached(tmp_path / "b") is None
