"""Pulling a model file from paired peers (`shoal.models.peer_pull`), between real nodes
in one process: the holders keep the packaged SmolLM2 GGUF in their HF stores (hard
links to the packaged file, never written), the puller fetches it over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from shoal.api import share
from shoal.events import ModelPulled
from shoal.mesh.state import ModelAdvert, NodeState
from shoal.models.manifest import ByteRange, Manifest
from shoal.models.peer_pull import (
    PEER_SNAPSHOT,
    PEERS_REPO,
    FileSource,
    Holding,
    PeerOffer,
    PeerPullFailed,
    PeerPullStatistics,
    find_offer,
    peer_sources,
    pull_from_peers,
)
from shoal.models.peer_pull import (
    holders as holders_of,
)
from shoal.models.pull import repo_folder
from tests.cluster import RunningNode, model_node, wait_until
from tests.conftest import llama_server_command
from tests.inprocess.test_share import REPO
from tests.models import PACKAGED_NAME, hf_store, packaged_gguf, sha256_of

pytestmark = [pytest.mark.timeout(180)]

MiB = 1 << 20


async def meet(holder: RunningNode, puller: RunningNode) -> None:
    await puller.node.admission.meet(holder.url, "join")
    await wait_until(
        lambda: any(
            p.state is not None and p.state.node_id == holder.node_id and p.state.models
            for p in puller.node.peers.routable()
        ),
        15,
        f"{puller.node.name} to see {holder.node.name}'s models",
    )


def offer_of(puller: RunningNode) -> PeerOffer:
    states = [p.state for p in puller.node.peers.routable() if p.state is not None]
    offer = find_offer(states, PACKAGED_NAME)
    assert offer is not None
    return offer


@contextlib.asynccontextmanager
async def holders(tmp_path: Path, count: int) -> AsyncIterator[list[RunningNode]]:
    gguf = packaged_gguf()
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for index in range(1, count + 1):
            name = f"a{index}"
            hf_store(tmp_path / name / "hub", REPO, {gguf.name: gguf})
            nodes.append(await stack.enter_async_context(model_node(tmp_path, name)))
        yield nodes


async def test_a_node_pulls_a_model_its_peer_holds_and_lists_it(tmp_path: Path) -> None:
    gguf = packaged_gguf()
    sha, size = sha256_of(gguf), gguf.stat().st_size
    async with holders(tmp_path, 1) as (a,), model_node(tmp_path, "b") as b:
        await meet(a, b)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                b.url + "/shoal/v1/models/pull", json={"model": PACKAGED_NAME, "stream": True}
            ) as response,
        ):
            assert response.status == 200
            lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
        last = lines[-1]
        assert last["status"] == "success", last
        assert last["downloaded_bytes"] == size
        assert any(line.get("sources") == 1 for line in lines[:-1])
        store = tmp_path / "b" / "hub"
        blob = repo_folder(store, REPO) / "blobs" / sha
        assert sha256_of(blob) == sha and blob.read_bytes() == gguf.read_bytes()
        pointer = repo_folder(store, REPO) / "snapshots" / PEER_SNAPSHOT / gguf.name
        assert pointer.resolve() == blob.resolve()
        assert not list(blob.parent.glob("*.incomplete*"))
        model = b.node.catalog.find(PACKAGED_NAME)
        assert model is not None and model.sha256 == sha and model.store == "hf"
        await b.wait_for(ModelPulled, model=PACKAGED_NAME)

        # Again: already there, nothing fetched.
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                b.url + "/shoal/v1/models/pull", json={"model": PACKAGED_NAME, "stream": False}
            ) as response,
        ):
            assert (await response.json())["downloaded_bytes"] == 0
            # Peers only (the CLI's ask): a name no peer advertises is a 404 at once.
            body = {"model": "nothing-here:q4_0", "source": "peers"}
            async with session.post(b.url + "/shoal/v1/models/pull", json=body) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "not_on_peers"


async def pull(
    puller: RunningNode, sources: dict[str, FileSource] | None = None
) -> PeerPullStatistics:
    offer = offer_of(puller)
    found: list[PeerPullStatistics] = []
    if sources is None:
        sources = peer_sources(offer, puller.node.peers.link)
    store = puller.node.settings.models.store
    assert store is not None
    await pull_from_peers(offer, Path(store), sources, statistics=found.append)
    (stats,) = found
    return stats


def blob_of(tmp_path: Path, name: str) -> Path:
    return repo_folder(tmp_path / name / "hub", REPO) / "blobs" / sha256_of(packaged_gguf())


async def test_three_holders_are_all_used(tmp_path: Path) -> None:
    size = packaged_gguf().stat().st_size
    async with holders(tmp_path, 3) as sources, model_node(tmp_path, "b") as b:
        for a in sources:
            await meet(a, b)
        await wait_until(lambda: len(offer_of(b).peers) == 3, 15, "three holders")
        stats = await pull(b)
        print(f"3 sources: {size / stats.seconds / 1e6:.0f} MB/s, {stats.by_source}")
        assert sorted(stats.by_source) == sorted(a.node_id for a in sources)
        assert all(chunks > 0 for chunks in stats.by_source.values()), stats.by_source
        assert sum(stats.by_source.values()) == -(-size // (1 << 20))
        assert blob_of(tmp_path, "b").read_bytes() == packaged_gguf().read_bytes()


async def test_a_source_flipping_a_bit_is_caught_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = share._copy
    liar = str(tmp_path / "a1")

    async def flipping(file: Any, byte_range: ByteRange, response: Any) -> None:
        if not file.name.startswith(liar):
            return await copy(file, byte_range, response)
        await asyncio.to_thread(file.seek, byte_range.start)
        data = bytearray(await asyncio.to_thread(file.read, byte_range.length))
        data[len(data) // 2] ^= 0x01  # one bit of one chunk of every answer
        await response.write(bytes(data))
        return None

    monkeypatch.setattr(share, "_copy", flipping)
    async with holders(tmp_path, 3) as sources, model_node(tmp_path, "b") as b:
        for a in sources:
            await meet(a, b)
        await wait_until(lambda: len(offer_of(b).peers) == 3, 15, "three holders")
        stats = await pull(b)
        assert stats.dropped == (sources[0].node_id,)
        assert stats.bad_chunks >= 3
        assert blob_of(tmp_path, "b").read_bytes() == packaged_gguf().read_bytes()


async def test_two_pullers_of_one_seed_fetch_from_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node still pulling a file serves the chunks it has (a swarm, not a star): the
    seed serves one request at a time, slowly, so the second puller starts while the
    first is midway and takes part of the file from it."""
    copy = share._copy
    seed = str(tmp_path / "a1")
    one_at_a_time = asyncio.Lock()

    async def slow_seed(file: Any, byte_range: ByteRange, response: Any) -> None:
        if not file.name.startswith(seed):
            return await copy(file, byte_range, response)
        async with one_at_a_time:
            await asyncio.sleep(0.04 * byte_range.chunks)  # about 25 MiB/s in all
            return await copy(file, byte_range, response)

    monkeypatch.setattr(share, "_copy", slow_seed)
    gguf = packaged_gguf()
    async with (
        holders(tmp_path, 1) as (a,),
        model_node(tmp_path, "b") as b,
        model_node(tmp_path, "c") as c,
    ):
        await meet(a, b)
        await meet(a, c)
        await c.node.admission.meet(b.url, "join")
        await wait_until(
            lambda: any(p.view.peer_id == b.node_id for p in c.node.peers.routable()),
            15,
            "c to see b",
        )

        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(
                session.post(
                    b.url + "/shoal/v1/models/pull", json={"model": PACKAGED_NAME, "stream": False}
                )
            )
            await wait_until(
                lambda: any(
                    p.state is not None and p.state.files and len(p.state.files[0].chunks()) >= 8
                    for p in c.node.peers.routable()
                    if p.view.peer_id == b.node_id
                ),
                60,
                "b to advertise 8 chunks of the file it is pulling",
            )
            offer = offer_of(c)
            assert offer.peers == (a.node_id,)  # b holds none of it whole
            found: list[PeerPullStatistics] = []

            def directory() -> dict[str, Holding]:
                routable = c.node.peers.routable()
                return holders_of(
                    (p.state for p in routable if p.state), offer.sha256, c.node.peers.link
                )

            store = c.node.settings.models.store
            assert store is not None
            await pull_from_peers(
                offer, Path(store), peer_sources(offer, c.node.peers.link), directory=directory,
                downloads=c.node.downloads, statistics=found.append,
            )  # fmt: skip
            async with await first as response:
                assert response.status == 200, await response.text()
        (stats,) = found
        print(f"c's chunks by source: {stats.by_source}")
        assert stats.by_source.get(b.node_id, 0) > 0, stats.by_source
        assert blob_of(tmp_path, "c").read_bytes() == gguf.read_bytes()
        assert blob_of(tmp_path, "b").read_bytes() == gguf.read_bytes()
        assert not c.node.downloads.adverts() and not b.node.downloads.adverts()


class Stalling:
    """A source that serves `limit` requests, then never answers."""

    def __init__(self, inner: FileSource, limit: int) -> None:
        self.inner, self.limit = inner, limit
        self.served = 0
        self.stuck = asyncio.Event()

    async def file_manifest(self, sha256: str, timeout_s: float) -> object:
        return await self.inner.file_manifest(sha256, timeout_s)

    async def file_range(self, sha256: str, first: int, last: int, timeout_s: float) -> bytes:
        if self.served >= self.limit:
            self.stuck.set()
            await asyncio.Event().wait()
        self.served += 1
        return await self.inner.file_range(sha256, first, last, timeout_s)


async def test_a_cancelled_pull_resumes(tmp_path: Path) -> None:
    gguf = packaged_gguf()
    size = gguf.stat().st_size
    async with holders(tmp_path, 1) as (a,), model_node(tmp_path, "b") as b:
        await meet(a, b)
        offer = offer_of(b)
        (link,) = peer_sources(offer, b.node.peers.link).values()
        stalling = Stalling(link, 3)  # 3 of the first 4 requests (4 chunks each) answered
        task = asyncio.create_task(pull(b, {a.node_id: stalling}))
        stuck = asyncio.create_task(stalling.stuck.wait())
        await asyncio.wait({task, stuck}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert stuck.done() and not task.done()
        await asyncio.sleep(0.2)  # the answers in flight land
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blobs = blob_of(tmp_path, "b").parent
        assert not blob_of(tmp_path, "b").exists()
        assert list(blobs.glob("*.incomplete.have"))

        stats = await pull(b)
        print(f"1 source (resumed {stats.resumed_chunks} chunks): {stats.by_source}")
        assert stats.resumed_chunks > 0
        assert 0 < stats.fetched_bytes < size
        got = blob_of(tmp_path, "b")
        assert hashlib.sha256(got.read_bytes()).hexdigest() == sha256_of(gguf)


async def test_one_source_rate(tmp_path: Path) -> None:
    size = packaged_gguf().stat().st_size
    async with holders(tmp_path, 1) as (a,), model_node(tmp_path, "b") as b:
        await meet(a, b)
        stats = await pull(b)
        print(f"1 source: {size / stats.seconds / 1e6:.0f} MB/s")
        assert stats.fetched_bytes == size


async def test_the_cli_pulls_from_peers_through_the_node(tmp_path: Path) -> None:
    gguf = packaged_gguf()
    async with holders(tmp_path, 1) as (a,), model_node(tmp_path, "b") as b:
        await meet(a, b)
        port = int(b.url.rsplit(":", 1)[1])
        config = tmp_path / "b.toml"
        store = tmp_path / "b" / "hub"
        config.write_text(f'port = {port}\n[models]\nstore = "{store}"\n')
        env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal", "models", "pull", PACKAGED_NAME,
            "--config", str(config), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
        assert child.returncode == 0, stderr.decode()
        result = orjson.loads(stdout)
        assert result["revision"] == "peers"
        assert result["downloaded_bytes"] == gguf.stat().st_size
        assert blob_of(tmp_path, "b").read_bytes() == gguf.read_bytes()


async def test_an_operator_makes_another_node_pull(tmp_path: Path) -> None:
    """`pull --on b` at c: b fetches the file from a, its progress relayed to c's
    operator; a node with `models.remote_pulls = "off"` refuses, an unknown one is 404."""
    gguf = packaged_gguf()
    async with (
        holders(tmp_path, 1) as (a,),
        model_node(tmp_path, "b") as b,
        model_node(tmp_path, "c") as c,
        model_node(tmp_path, "d", remote_pulls="off") as d,
    ):
        await meet(a, b)
        for target in (b, d):
            await c.node.admission.meet(target.url, "join")
        await wait_until(lambda: len(c.node.peers.routable()) >= 3, 15, "c to see a, b, d")
        await wait_until(lambda: len(d.node.peers.routable()) >= 1, 15, "d to see c")
        pull_url = c.url + "/shoal/v1/models/pull"
        async with aiohttp.ClientSession() as session:
            async with session.post(pull_url, json={"model": PACKAGED_NAME, "on": "b"}) as answer:
                assert answer.status == 200
                lines = [orjson.loads(line) for line in (await answer.read()).splitlines()]
            assert lines[-1]["status"] == "success", lines[-1]
            assert lines[-1]["revision"] == "peers"
            assert any(line["status"] == "downloading" for line in lines[:-1])
            assert blob_of(tmp_path, "b").read_bytes() == gguf.read_bytes()
            assert not blob_of(tmp_path, "c").exists()

            for on, status, code in (("d", 403, "forbidden"), ("nobody", 404, "node_not_found")):
                body = {"model": PACKAGED_NAME, "on": on}
                async with session.post(pull_url, json=body) as answer:
                    assert answer.status == status, await answer.text()
                    assert (await answer.json())["error"]["code"] == code
        assert not list((tmp_path / "d" / "hub").rglob("*.gguf"))


class FakeSource:
    """A peer serving `data` under a manifest (possibly a lying one), no network."""

    def __init__(self, data: bytes, manifest: Manifest) -> None:
        self.data, self.manifest = data, manifest
        self.requests = 0

    async def file_manifest(self, sha256: str, timeout_s: float) -> object:
        return self.manifest.wire()

    async def file_range(self, sha256: str, first: int, last: int, timeout_s: float) -> bytes:
        self.requests += 1
        return self.data[first : last + 1]


def fake_offer(sha: str, size: int) -> PeerOffer:
    model = ModelAdvert("tiny:q8_0", size_bytes=size, sha256=sha)
    return PeerOffer("tiny:q8_0", sha, model, ("p1",))


async def test_a_manifest_for_another_file_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    data = random.Random(3).randbytes(3 * MiB)
    other = hashlib.sha256(b"another file").hexdigest()
    chunks = tuple(hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB))
    lying = FakeSource(data, Manifest(other, len(data), chunks))
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(PeerPullFailed):
        await pull_from_peers(fake_offer(sha, len(data)), tmp_path, {"p1": lying})
    assert lying.requests == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # noqa: ASYNC240 - a test's look
    assert all(p.name.endswith(".lock") for p in written), written

    # The right hash but chunk hashes that do not add up to it: caught at the end.
    honest_name = Manifest(sha, len(data), (chunks[1], chunks[1], chunks[2]))
    with pytest.raises(PeerPullFailed):  # chunk 0 never matches: the source is dropped
        await pull_from_peers(
            fake_offer(sha, len(data)), tmp_path, {"p1": FakeSource(data, honest_name)}
        )
    assert not (repo_folder(tmp_path, PEERS_REPO) / "blobs" / sha).exists()

    # Another file whose manifest names it `sha`: every chunk matches its manifest, the
    # whole file does not; nothing is kept under the real name, nor partially.
    other_data = random.Random(4).randbytes(len(data))
    other_chunks = tuple(
        hashlib.sha256(other_data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)
    )
    impostor = FakeSource(other_data, Manifest(sha, len(data), other_chunks))
    with pytest.raises(PeerPullFailed, match="manifest is wrong"):
        await pull_from_peers(fake_offer(sha, len(data)), tmp_path, {"p1": impostor})
    blobs = repo_folder(tmp_path, PEERS_REPO) / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == []


async def test_a_file_with_no_hub_name_lands_where_the_catalog_finds_it(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2 * MiB + 4)
    sha = hashlib.sha256(data).hexdigest()
    chunks = tuple(hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB))
    source = FakeSource(data, Manifest(sha, len(data), chunks))
    pulled = await pull_from_peers(fake_offer(sha, len(data)), tmp_path, {"p1": source})
    (f,) = pulled.files
    assert f.path == repo_folder(tmp_path, PEERS_REPO) / "snapshots" / sha / "tiny-q8_0.gguf"
    assert f.path.read_bytes() == data and f.downloaded_bytes == len(data)


@pytest.mark.engine
async def test_the_pulled_model_answers_a_chat_request(tmp_path: Path) -> None:
    binary, _ = llama_server_command()
    engine = {"llama_server": binary, "context": 1024, "parallel": 1}
    async with holders(tmp_path, 1) as (a,), model_node(tmp_path, "b", **engine) as b:
        await meet(a, b)
        await pull(b)
        await b.node.refresh_models()
        await wait_until(lambda: b.node.catalog.find(PACKAGED_NAME), 10, "b to list it")
        client = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=8)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model=PACKAGED_NAME,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
            )
        assert raw.headers["X-Shoal-Served-By"] == "b"
        assert raw.parse().choices[0].message.content


def test_find_offer_by_name_alias_or_hub_ref() -> None:
    sha, other = "a" * 64, "b" * 64
    full = f"{REPO}/SmolLM2-135M-Instruct.Q4_1.gguf"
    advert = ModelAdvert(PACKAGED_NAME, aliases=(full,), sha256=sha)
    holdings = {
        "p1": (advert,),
        "p2": (ModelAdvert("x:q8_0", sha256=sha),),
        "p3": (ModelAdvert("y", sha256=other),),
    }
    states = [NodeState(p, p, "0", 1, 1, 1.0, models) for p, models in holdings.items()]
    for name in (PACKAGED_NAME, full.lower(), f"{REPO}:Q4_1", f"{REPO.lower()}:q4_1"):
        offer = find_offer(states, name)
        assert offer is not None and offer.sha256 == sha and offer.peers == ("p1", "p2"), name
    for name in (f"{REPO}:q8_0", "nothing", "org/other:q4_1"):
        assert find_offer(states, name) is None, name
    assert find_offer(states, "y") is not None
    assert find_offer([], PACKAGED_NAME) is None
