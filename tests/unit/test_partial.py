"""`Partial`: a file pulled chunk by chunk into the store, with real files in tmp dirs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ChecksumMismatch, InvalidRequest, NotEnoughSpace, UpstreamFailed
from shoal.models.partial import Partial

CHUNK = 4096  # small chunks keep the files small; the code does not care


def manifest(data: bytes, chunk: int = CHUNK) -> tuple[str, int, list[str]]:
    hashes = [hashlib.sha256(data[i : i + chunk]).hexdigest() for i in range(0, len(data), chunk)]
    return hashlib.sha256(data).hexdigest(), len(data), hashes


def chunks_of(data: bytes, chunk: int = CHUNK) -> list[bytes]:
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


@pytest.fixture
def data() -> bytes:
    return random.Random(7).randbytes(10 * CHUNK + 123)  # 11 chunks, the last short


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    folder = tmp_path / "blobs"
    folder.mkdir()
    return folder


def open_partial(blobs: Path, data: bytes, **kwargs: Any) -> Partial:
    sha, size, hashes = manifest(data)
    return Partial.open(blobs, sha, size, hashes, CHUNK, **kwargs)


def test_chunks_written_out_of_order_finish_byte_identical(blobs: Path, data: bytes) -> None:
    p = open_partial(blobs, data)
    assert p.path.stat().st_size == len(data)  # preallocated
    assert not p.blob.exists()
    order = list(range(11))
    random.Random(1).shuffle(order)
    pieces = chunks_of(data)
    for i in order:
        assert p.write(i, pieces[i])
        assert not p.blob.exists()
    assert p.complete()
    assert p.finish() == blobs / hashlib.sha256(data).hexdigest()
    assert p.blob.read_bytes() == data
    assert sorted(f.name for f in blobs.iterdir()) == [p.blob.name]


def test_a_chunk_written_twice_is_written_once(blobs: Path, data: bytes) -> None:
    p = open_partial(blobs, data)
    assert p.write(0, data[:CHUNK])
    assert not p.write(0, data[:CHUNK])
    p.close()
    p.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        p.write(1, data[CHUNK : 2 * CHUNK])


@pytest.mark.parametrize(
    ("index", "piece", "expected"),
    [
        (0, b"x" * CHUNK, None),  # wrong bytes
        (1, b"", None),  # empty
        (10, b"\0" * CHUNK, None),  # the short last chunk, padded
        (0, "first", "f" * 64),  # right bytes, a caller's hash that is not the manifest's
    ],
)
def test_a_wrong_chunk_is_refused_and_nothing_is_written(
    blobs: Path, data: bytes, index: int, piece: bytes | str, expected: str | None
) -> None:
    if piece == "first":
        piece = data[:CHUNK]
    p = open_partial(blobs, data)
    before = p.path.read_bytes()
    with pytest.raises(ChecksumMismatch, match=f"chunk {index}"):
        p.write(index, piece, expected)  # type: ignore[arg-type]
    assert p.have == frozenset()
    assert p.path.read_bytes() == before
    with pytest.raises(ValueError, match="chunk 11"):
        p.write(11, b"")
    p.close()


def test_the_callers_expected_hash_is_accepted_when_it_is_the_manifests(
    blobs: Path, data: bytes
) -> None:
    p = open_partial(blobs, data)
    assert p.write(0, data[:CHUNK], hashlib.sha256(data[:CHUNK]).hexdigest())
    p.close()


def test_finish_refuses_an_incomplete_file(blobs: Path, data: bytes) -> None:
    p = open_partial(blobs, data)
    p.write(0, data[:CHUNK])
    with pytest.raises(ValueError, match="10 chunks missing"):
        p.finish()
    assert not p.blob.exists()
    p.close()


def test_a_manifest_whose_chunks_do_not_make_its_file_keeps_nothing(
    blobs: Path, data: bytes
) -> None:
    _, size, hashes = manifest(data)
    liar = hashlib.sha256(b"another file").hexdigest()
    p = Partial.open(blobs, liar, size, hashes, CHUNK)
    for i, piece in enumerate(chunks_of(data)):
        p.write(i, piece)
    with pytest.raises(ChecksumMismatch, match="manifest is wrong"):
        p.finish()
    assert list(blobs.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../" + "a" * 61, "A" * 64, "a" * 63, "a" * 65, "/etc/passwd", "", "a" * 63 + "\n"]
)
def test_a_name_that_is_not_a_sha256_is_refused_before_any_file(blobs: Path, name: str) -> None:
    with pytest.raises(InvalidRequest):
        Partial.open(blobs, name, 0, [], CHUNK)
    assert list(blobs.iterdir()) == []


@pytest.mark.parametrize(
    ("size", "hashes"),
    [(CHUNK + 1, ["a" * 64]), (CHUNK, ["a" * 64, "b" * 64]), (CHUNK, ["../x"]), (1, ["A" * 64])],
)
def test_a_manifest_that_does_not_fit_its_size_is_refused(
    blobs: Path, size: int, hashes: list[str]
) -> None:
    with pytest.raises(UpstreamFailed, match="manifest"):
        Partial.open(blobs, "a" * 64, size, hashes, CHUNK)
    assert list(blobs.iterdir()) == []


def test_an_empty_file(blobs: Path) -> None:
    sha = hashlib.sha256(b"").hexdigest()
    p = Partial.open(blobs, sha, 0, [], CHUNK)
    assert p.complete()
    assert p.finish().read_bytes() == b""


# -- resume ------------------------------------------------------------------------------


def test_a_restart_keeps_the_synced_chunks_after_checking_them(blobs: Path, data: bytes) -> None:
    pieces = chunks_of(data)
    p = open_partial(blobs, data, sync_every=2)
    for i in (3, 7, 1, 9, 10):
        p.write(i, pieces[i])
    # killed: no close(); 4 chunks were synced with the bitmap, the fifth not
    q = open_partial(blobs, data)
    assert q.have == {1, 3, 7, 9}
    for i in set(range(11)) - q.have:
        q.write(i, pieces[i])
    assert q.finish().read_bytes() == data
    p.discard()  # (closes the old descriptor; the files are gone already)
    assert sorted(f.name for f in blobs.iterdir()) == [q.blob.name]


def test_close_syncs_for_a_resume(blobs: Path, data: bytes) -> None:
    pieces = chunks_of(data)
    with open_partial(blobs, data) as p:
        p.write(4, pieces[4])
    assert open_partial(blobs, data).have == {4}


def test_a_corrupted_kept_chunk_is_discarded_on_resume(blobs: Path, data: bytes) -> None:
    pieces = chunks_of(data)
    with open_partial(blobs, data) as p:
        for i in (0, 2, 5):
            p.write(i, pieces[i])
    with p.path.open("r+b") as f:  # one flipped bit in chunk 2
        f.seek(2 * CHUNK + 17)
        byte = f.read(1)[0]
        f.seek(2 * CHUNK + 17)
        f.write(bytes([byte ^ 0x10]))
    q = open_partial(blobs, data)
    assert q.have == {0, 5}
    for i in set(range(11)) - q.have:
        q.write(i, pieces[i])
    assert q.finish().read_bytes() == data


def test_a_bitmap_for_another_file_or_size_is_ignored(blobs: Path, data: bytes) -> None:
    pieces = chunks_of(data)
    with open_partial(blobs, data) as p:
        p.write(0, pieces[0])
    p.have_path.write_bytes(p.have_path.read_bytes().replace(b" 4096\n", b" 4097\n"))
    # no trusted bitmap: the whole chunks from the start are checked instead (chunk 1 is
    # preallocated zeros and fails; chunk 0 is real and is kept)
    assert open_partial(blobs, data).have == {0}


def test_the_front_of_a_hub_partial_file_is_adopted(blobs: Path, data: bytes) -> None:
    sha, _, _ = manifest(data)
    (blobs / f"{sha}.incomplete").write_bytes(data[: 3 * CHUNK + 100])  # as `pull.py` leaves it
    p = open_partial(blobs, data)
    assert p.have == {0, 1, 2}
    p.close()


def test_a_longer_partial_file_is_cut_to_size(blobs: Path, data: bytes) -> None:
    sha, _, _ = manifest(data)
    (blobs / f"{sha}.incomplete").write_bytes(data + b"junk")
    p = open_partial(blobs, data)
    assert p.complete()
    assert p.finish().read_bytes() == data


# -- disk space --------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_is_refused_before_preallocating(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 << 20)
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(NotEnoughSpace, match="needs"):
            open_partial(disk, data)
        assert list(disk.iterdir()) == []


def test_a_disk_that_fills_while_preallocating_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(3).randbytes(3 << 20)
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        plenty = shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
        monkeypatch.setattr(shutil, "disk_usage", lambda _: plenty)
        with pytest.raises(NotEnoughSpace, match="cannot hold"):
            open_partial(disk, data)
        assert list(disk.iterdir()) == []


# -- any order of writes, kills and corruptions ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    order=st.permutations(range(11)),
    kills=st.sets(st.integers(0, 10)),
    corrupt=st.sets(st.integers(0, 10)),
    sync_every=st.integers(1, 5),
)
def test_any_history_of_writes_and_restarts_ends_byte_identical(
    order: list[int], kills: set[int], corrupt: set[int], sync_every: int
) -> None:
    data = random.Random(11).randbytes(10 * CHUNK + 5)
    pieces = chunks_of(data)
    with tempfile.TemporaryDirectory() as folder:
        blobs = Path(folder)
        p = open_partial(blobs, data, sync_every=sync_every)
        for step, i in enumerate(order):
            if i not in p.have:
                p.write(i, pieces[i])
            if step in kills:  # killed (no close), a chunk on disk damaged, restarted
                damaged = min(corrupt, default=None)
                if damaged is not None:
                    corrupt.discard(damaged)
                    with p.path.open("r+b") as f:
                        f.seek(damaged * CHUNK)
                        f.write(b"\xff")
                os.close(p._fd)  # type: ignore[arg-type]  # a kill: nothing synced on the way
                p._fd = None
                p = open_partial(blobs, data, sync_every=sync_every)
                on_disk = chunks_of(p.path.read_bytes())
                assert all(on_disk[k] == pieces[k] for k in p.have)
            assert not p.blob.exists()
        for i in set(range(11)) - p.have:
            p.write(i, pieces[i])
        assert p.finish().read_bytes() == data
        assert [f.name for f in blobs.iterdir()] == [p.blob.name]
