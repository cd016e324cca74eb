"""Model files served to paired peers (`shoal.api.share`), between real nodes in one
process: a holds the packaged SmolLM2 GGUF in an HF store (its blob named by its real
SHA-256), b is paired with a and fetches over mutual TLS on a's peer port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from shoal.events import ModelBytesServed
from shoal.models.manifest import CACHE_FILE, CHUNK_BYTES
from shoal.trust import certs
from tests.cluster import RunningNode, model_node, wait_until
from tests.models import PACKAGED_NAME, hf_store, packaged_gguf, sha256_of

pytestmark = [pytest.mark.timeout(120)]

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
MiB = CHUNK_BYTES


@contextlib.asynccontextmanager
async def peer_session(
    fetcher: RunningNode, holder: RunningNode
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A session on `holder`'s peer port with `fetcher`'s certificate, and its base URL."""
    context = fetcher.node.trust.client_context(holder.node_id)
    url = fetcher.node.trust.peer_url(holder.node_id, "127.0.0.1")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session, url


async def get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def paired(a: RunningNode, b: RunningNode) -> None:
    await b.node.admission.meet(a.url, "join")
    await b.wait_for_model(PACKAGED_NAME)


async def test_a_paired_peer_gets_the_manifest_and_byte_ranges_of_a_held_file(
    tmp_path: Path,
) -> None:
    gguf = packaged_gguf()
    sha = sha256_of(gguf)
    size = gguf.stat().st_size
    hf_store(tmp_path / "a" / "hub", REPO, {gguf.name: gguf})
    async with model_node(tmp_path, "a") as a, model_node(tmp_path, "b") as b:
        await paired(a, b)
        # a advertises the file's hash with the model.
        (advert,) = [
            m
            for peer in b.node.peers.peers()
            if peer.state is not None
            for m in peer.state.models
            if m.id == PACKAGED_NAME
        ]
        assert advert.sha256 == sha

        async with peer_session(b, a) as (session, base):
            files = f"{base}/shoal/v1/files/{sha}"
            answers = await asyncio.gather(*(get(session, files + "/manifest") for _ in range(4)))
            assert a.node.shares.verifications == 1  # four first requests, one verification
            status, _, body = answers[0]
            assert status == 200 and all(answer[2] == body for answer in answers)
            manifest = orjson.loads(body)
            assert (manifest["sha256"], manifest["size"], manifest["chunk_bytes"]) == (
                sha, size, MiB
            )  # fmt: skip
            assert len(manifest["chunks"]) == -(-size // MiB)

            data = gguf.read_bytes()
            last = (size - 1) // MiB
            for first, chunks in ((0, 16), (5, 1), (last - 2, 3), (last, 1)):
                start, end = first * MiB, min((first + chunks) * MiB, size)
                status, headers, got = await get(
                    session, files, {"Range": f"bytes={start}-{end - 1}"}
                )
                assert status == 206
                assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
                assert got == data[start:end]
                assert [
                    hashlib.sha256(got[i : i + MiB]).hexdigest() for i in range(0, len(got), MiB)
                ] == manifest["chunks"][first : first + chunks]
            # Each range served is told, for /metrics: to whom, how many bytes.
            served = [e for e in a.events if isinstance(e, ModelBytesServed)]
            assert {e.peer_id for e in served} == {b.node_id}
            assert sum(e.nbytes for e in served) == 19 * MiB + 2 * (size - last * MiB)
            headers = {"Range": f"bytes=0-{MiB - 1}"}
            async with session.head(files, headers=headers) as response:
                assert response.status == 206
                assert response.headers["Content-Length"] == str(MiB)
                assert await response.read() == b""
            assert a.node.shares.verifications == 1

            for bad in (
                None,
                "bytes=1-1048576",  # unaligned start
                "bytes=0-1000",  # unaligned end
                f"bytes=0-{17 * MiB - 1}",  # 17 chunks
                f"bytes={(last + 1) * MiB}-{(last + 2) * MiB - 1}",  # beyond the end
                f"bytes={last * MiB}-{size}",  # one byte past it
                "bytes=0-",
            ):
                status, headers, body = await get(session, files, {"Range": bad} if bad else {})
                assert status == 416, bad
                assert headers["Content-Range"] == f"bytes */{size}"
                assert orjson.loads(body)["error"]["code"] == "range_not_satisfiable"

            for name, expected in (("A" * 64, 400), ("abc", 400), ("0" * 64, 404)):
                for path in (f"/shoal/v1/files/{name}", f"/shoal/v1/files/{name}/manifest"):
                    headers = {"Range": "bytes=0-1048575"}
                    status, _, body = await get(session, base + path, headers)
                    assert status == expected, (path, status)
                    assert "error" in orjson.loads(body)

        cache = a.node.settings.data_dir / CACHE_FILE
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert sha in cache.read_text()


async def test_lan_clients_and_unpaired_nodes_get_nothing(tmp_path: Path) -> None:
    gguf = packaged_gguf()
    sha = sha256_of(gguf)
    hf_store(tmp_path / "a" / "hub", REPO, {gguf.name: gguf})
    async with model_node(tmp_path, "a") as a, model_node(tmp_path, "c") as c:
        await wait_until(lambda: a.node.catalog.models(), 10, "a to list its model")
        # The API port: refused by the access decision, whoever asks.
        async with aiohttp.ClientSession() as session:
            for path in (f"/shoal/v1/files/{sha}", f"/shoal/v1/files/{sha}/manifest"):
                headers = {"Range": "bytes=0-1048575"}
                status, _, body = await get(session, a.url + path, headers)
                assert status == 403
                assert "peer port" in orjson.loads(body)["error"]["message"]
        # The peer port, with a certificate a has never paired: no TLS session at all.
        context = certs.client_context(c.node.identity, c.node.trust.cert, a.node.trust.cert)
        connector = aiohttp.TCPConnector(ssl=context)
        url = f"https://127.0.0.1:{a.node.trust.peer_port}/shoal/v1/files/{sha}/manifest"
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientError):
                await get(session, url)
        assert a.node.shares.verifications == 0


async def test_sharing_off_refuses_paired_peers(tmp_path: Path) -> None:
    gguf = packaged_gguf()
    sha = sha256_of(gguf)
    hf_store(tmp_path / "a" / "hub", REPO, {gguf.name: gguf})
    async with model_node(tmp_path, "a", share="off") as a, model_node(tmp_path, "b") as b:
        await paired(a, b)
        async with peer_session(b, a) as (session, base):
            for path in (f"/shoal/v1/files/{sha}/manifest", f"/shoal/v1/files/{sha}"):
                status, _, body = await get(session, base + path, {"Range": "bytes=0-1048575"})
                assert status == 403
                assert orjson.loads(body)["error"]["type"] == "permission_error"


async def test_a_same_size_damaged_file_is_never_served_under_its_hash(tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"  # never the packaged file: it is linked, not copied
    shutil.copyfile(packaged_gguf(), copy)
    sha = sha256_of(copy)
    snapshot = hf_store(tmp_path / "a" / "hub", REPO, {copy.name: copy})
    blob = (snapshot / copy.name).resolve()
    async with model_node(tmp_path, "a") as a, model_node(tmp_path, "b") as b:
        await b.node.admission.meet(a.url, "join")
        await wait_until(lambda: a.node.catalog.models(), 10, "a to list the copy")
        async with peer_session(b, a) as (session, base):
            files = f"{base}/shoal/v1/files/{sha}"
            status, _, _ = await get(session, files + "/manifest")
            assert status == 200
            with blob.open("r+b") as file:  # one bit, mid-file; the size stays
                file.seek(40 * MiB + 3)
                byte = file.read(1)
                file.seek(40 * MiB + 3)
                file.write(bytes([byte[0] ^ 0x10]))
            assert blob.stat().st_size == copy.stat().st_size
            for path, headers in (("/manifest", {}), ("", {"Range": f"bytes=0-{MiB - 1}"})):
                status, _, body = await get(session, files + path, headers)
                assert status == 404
                assert orjson.loads(body)["error"]["code"] == "file_damaged"
            assert a.node.shares.verifications == 2


async def test_sharing_gives_way_to_inference(tmp_path: Path) -> None:
    """While the holder serves inference, what it sends is paced to
    `models.share_rate_limit`; while it serves none, not at all."""
    gguf = packaged_gguf()
    sha = sha256_of(gguf)
    hf_store(tmp_path / "a" / "hub", REPO, {gguf.name: gguf})
    async with model_node(tmp_path, "a") as a, model_node(tmp_path, "b") as b:
        await paired(a, b)
        busy = False
        pacer = a.node.shares.pacer
        pacer.rate, pacer.busy = 8e6, lambda: busy  # 8 MB/s while "serving inference"
        headers = {"Range": f"bytes=0-{16 * MiB - 1}"}
        async with peer_session(b, a) as (session, base):
            files = f"{base}/shoal/v1/files/{sha}"
            status, _, idle = await get(session, files, headers)
            assert status == 206 and pacer.waited_s == 0

            busy = True
            started = asyncio.get_running_loop().time()
            status, _, paced = await get(session, files, headers)
            elapsed = asyncio.get_running_loop().time() - started
        assert status == 206 and paced == idle == gguf.read_bytes()[: 16 * MiB]
        # 16 MiB at 8 MB/s after a 4 MiB burst: at least 1.5 s of waiting.
        assert pacer.waited_s >= 1.4 and elapsed >= 1.4, (pacer.waited_s, elapsed)
