"""`Shares` (`shoal.api.share`): which file a hash names, and the verification before a
file is first served; and the hash in the peer advert (`shoal.mesh.state`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import orjson
import pytest

from shoal.api.share import Shares
from shoal.errors import Forbidden, NotFound
from shoal.mesh.state import ModelAdvert, NodeState, ProtocolError, decode
from shoal.models.catalog import LocalModel
from shoal.models.manifest import CHUNK_BYTES, ManifestCache


class FakeCatalog:
    def __init__(self, *models: LocalModel) -> None:
        self._models = list(models)

    def models(self) -> list[LocalModel]:
        return list(self._models)

    def find(self, name: str) -> LocalModel | None:
        return next((m for m in self._models if m.name == name), None)

    async def refresh(self) -> None:
        pass


def _model(path: Path, sha256: str | None) -> LocalModel:
    return LocalModel(name=path.name, path=path, size_bytes=path.stat().st_size,
                      store="hf", sha256=sha256)  # fmt: skip


def _damage_keeping_the_key(path: Path) -> None:
    """Flip one bit in place, size, mtime and inode unchanged (bit rot, a bad copy tool)."""
    status = path.stat()
    with path.open("r+b") as file:
        file.seek(CHUNK_BYTES + 5)
        byte = file.read(1)
        file.seek(CHUNK_BYTES + 5)
        file.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    data = os.urandom(3 * CHUNK_BYTES + 99)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def test_a_file_is_verified_once_for_many_concurrent_first_requests(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    path, sha = blob
    shares = Shares(FakeCatalog(_model(path, sha)), ManifestCache(tmp_path / "m.json"), "paired")
    served = await asyncio.gather(*(shares.served(sha) for _ in range(8)))
    assert {s.manifest.sha256 for s in served} == {sha}
    assert shares.verifications == 1
    await shares.served(sha)
    assert shares.verifications == 1


async def test_a_file_damaged_under_an_unchanged_key_is_not_served_after_a_restart(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    path, sha = blob
    cache = ManifestCache(tmp_path / "m.json")
    shares = Shares(FakeCatalog(_model(path, sha)), cache, "paired")
    assert (await shares.served(sha)).manifest.sha256 == sha  # cached under its key
    _damage_keeping_the_key(path)
    assert ManifestCache(cache.path).cached(path) is not None  # the cache cannot tell

    restarted = Shares(FakeCatalog(_model(path, sha)), ManifestCache(cache.path), "paired")
    for _ in range(2):
        with pytest.raises(NotFound) as caught:
            await restarted.served(sha)
        assert caught.value.code == "file_damaged"
    assert restarted.verifications == 1  # refused again without hashing again


async def test_a_file_with_no_upstream_hash_is_served_by_its_computed_one(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    path, sha = blob
    cache = ManifestCache(tmp_path / "m.json")
    shares = Shares(FakeCatalog(_model(path, None)), cache, "paired")
    with pytest.raises(NotFound):  # not hashed yet: this node does not know it holds it
        await shares.served(sha)
    await asyncio.to_thread(cache.manifest, path)
    assert (await shares.served(sha)).path == path
    # Changed (same size, key unchanged) after a restart: no longer that hash.
    _damage_keeping_the_key(path)
    restarted = Shares(FakeCatalog(_model(path, None)), ManifestCache(cache.path), "paired")
    with pytest.raises(NotFound):
        await restarted.served(sha)


async def test_a_file_changed_after_it_was_verified_is_verified_again(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    path, sha = blob
    shares = Shares(FakeCatalog(_model(path, sha)), ManifestCache(tmp_path / "m.json"), "paired")
    await shares.served(sha)
    _damage_keeping_the_key(path)
    os.utime(path, ns=(0, 10**18))
    with pytest.raises(NotFound):
        await shares.served(sha)
    assert shares.verifications == 2


async def test_a_rescan_forgets_the_manifests_of_files_no_longer_held(
    tmp_path: Path, blob: tuple[Path, str]
) -> None:
    path, sha = blob
    catalog = FakeCatalog(_model(path, sha))
    cache = ManifestCache(tmp_path / "m.json")
    shares = Shares(catalog, cache, "paired")
    await shares.served(sha)
    await shares.forget_removed()  # still held: kept
    assert ManifestCache(cache.path).cached(path) is not None
    catalog._models.clear()  # the file left the catalog (removed, or its store dropped)
    await shares.forget_removed()
    assert ManifestCache(cache.path).cached(path) is None


async def test_sharing_off_refuses_everything(tmp_path: Path, blob: tuple[Path, str]) -> None:
    path, sha = blob
    shares = Shares(FakeCatalog(_model(path, sha)), ManifestCache(tmp_path / "m.json"), "off")
    with pytest.raises(Forbidden):
        await shares.served(sha)
    assert shares.verifications == 0


# -- the advert -------------------------------------------------------------------------


def _state(advert: ModelAdvert) -> NodeState:
    return NodeState("a" * 64, "a", "1", 11450, 1, 1.0, models=(advert,))


def test_the_advert_carries_a_models_sha256() -> None:
    advert = ModelAdvert("smol:q4_1", False, ("completions",), sha256="ab" * 32)
    assert decode(_state(advert).encode()).models == (advert,)
    bare = ModelAdvert("smol:q4_1", False)
    assert b"sha256" not in _state(bare).encode()
    assert decode(_state(bare).encode()).models == (bare,)


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "../" * 20, 5, True, ["ab" * 32]])
def test_a_malformed_sha256_in_an_advert_is_refused(bad: object) -> None:
    encoded = _state(ModelAdvert("m", sha256="ab" * 32)).encode()
    document = orjson.loads(encoded)
    document["models"][0]["sha256"] = bad
    with pytest.raises(ProtocolError):
        decode(orjson.dumps(document))
