"""`shoal models pull` against a local Hub stand-in (`tests.hub`), through the real
`huggingface_hub`: the layout, the checksum, resumes, a full disk, offline mode, the
token, the operator API and the CLI. Nothing here can reach huggingface.co."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shoal.api import pull as pull_api
from shoal.api.access import peer_port_caller
from shoal.api.app import build_app
from shoal.api.services import LIMITS
from shoal.engine.assets import default_chat_model
from shoal.errors import InvalidRequest, ModelNotFound, UpstreamFailed
from shoal.events import Event, EventBus, ModelPulled, ModelPullFailed, ModelPullProgress
from shoal.models.catalog import LocalModel
from shoal.models.pull import (
    ChecksumMismatch,
    Hub,
    HubOffline,
    NotEnoughSpace,
    PullCancelled,
    Pulled,
    PullProgress,
    pull,
)
from shoal.models.pull_refs import parse_ref
from shoal.settings import Settings
from shoal.trust.keys import KeyStore
from tests.hub import LocalHub, TinyModels, hub_env, tiny_models, tree
from tests.support import clean_env, wait_for

Client = TestClient[web.Request, web.Application]
Run = subprocess.CompletedProcess[str]
CHUNK = 10 << 20  # huggingface_hub's download chunk: what is on disk after a cut


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return tiny_models(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def hub(tiny: TinyModels) -> Iterator[LocalHub]:
    with LocalHub() as hub:
        hub.add_repo("org/tiny", tiny.repo_files)
        yield hub


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def pull_from(hub: LocalHub, store: Path, ref: str, **options: object) -> Pulled:
    return pull(parse_ref(ref), store=store, hub=Hub(hub.endpoint, False), **options)  # type: ignore[arg-type]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(store: Path) -> list[str]:
    """Anything partial, or under a real name, in the store's blobs and snapshots."""
    return [e for e in tree(store) if "/blobs/" in e or ("/snapshots/" in e and "->" in e)]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# -- the pull itself ---------------------------------------------------------------------


def test_pull_writes_the_hub_cache_layout_byte_for_byte(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    seen: list[PullProgress] = []
    pulled = pull_from(hub, store, "org/tiny:Q4_K_M", on_progress=seen.append)

    commit, digest = hub.repos["org/tiny"].commit, sha256(tiny.q4_k_m)
    folder = store / "models--org--tiny"
    assert (folder / "blobs" / digest).read_bytes() == tiny.q4_k_m
    link = folder / "snapshots" / commit / "Tiny-Q4_K_M.gguf"
    assert os.readlink(link) == f"../../blobs/{digest}"
    assert (folder / "refs" / "main").read_text() == commit
    assert not list(store.rglob("*.incomplete"))
    assert pulled.commit == commit and pulled.files[0].path == link
    assert pulled.files[0].sha256 == digest
    assert pulled.downloaded_bytes == pulled.size_bytes == len(tiny.q4_k_m)
    assert seen[0].done == 0 and seen[-1].stage == "verifying"
    assert any(p.done == len(tiny.q4_k_m) and p.stage == "downloading" for p in seen)

    # What hf_hub_download itself writes, on the same Hub, is the same layout.
    from huggingface_hub import hf_hub_download, scan_cache_dir

    theirs = tmp_path / "theirs"
    hf_hub_download("org/tiny", "Tiny-Q4_K_M.gguf", cache_dir=theirs, endpoint=hub.endpoint)
    ours = [e for e in tree(store) if not e.startswith(".locks")]
    assert ours == [e for e in tree(theirs) if not e.startswith((".locks", "CACHEDIR"))]
    # ... and huggingface_hub finds ours, offline.
    found = hf_hub_download("org/tiny", "Tiny-Q4_K_M.gguf", cache_dir=store, local_files_only=True)
    assert Path(found) == link
    (repo,) = scan_cache_dir(store).repos
    assert repo.repo_id == "org/tiny" and repo.size_on_disk == len(tiny.q4_k_m)

    # Pulled again: nothing moves.
    hub.requests.clear()
    again = pull_from(hub, store, "org/tiny:q4_k_m")
    assert again.downloaded_bytes == 0 and again.files[0].path == link
    assert not hub.seen("GET", "/cdn/")


def test_a_file_in_a_folder_and_a_revision(hub: LocalHub, tiny: TinyModels, tmp_path: Path) -> None:
    commit = hub.repos["org/tiny"].commit
    pulled = pull_from(hub, tmp_path, "org/tiny/fp/Tiny-F16.gguf", revision=commit)
    link = tmp_path / "models--org--tiny" / "snapshots" / commit / "fp" / "Tiny-F16.gguf"
    assert os.readlink(link) == f"../../../blobs/{sha256(tiny.f16)}"
    assert link.read_bytes() == tiny.f16
    assert pulled.revision == commit
    assert not (tmp_path / "models--org--tiny" / "refs").exists()  # a commit needs no ref


def test_a_split_gguf_comes_whole(hub: LocalHub, tiny: TinyModels, tmp_path: Path) -> None:
    parts = {"M-Q2_K-00001-of-00002.gguf": tiny.q8_0, "M-Q2_K-00002-of-00002.gguf": tiny.f16}
    repo = hub.add_repo("org/split", {**parts, "mmproj-M-F16.gguf": tiny.f16})
    seen: list[PullProgress] = []
    pulled = pull_from(hub, tmp_path, "org/split:q2_k", on_progress=seen.append)
    assert [f.filename for f in pulled.files] == list(parts)
    for name, data in parts.items():
        assert (tmp_path / "models--org--split/snapshots" / repo.commit / name).read_bytes() == data
    assert {(p.file_index, p.file_count) for p in seen} == {(1, 2), (2, 2)}
    assert pulled.to_json()["path"].endswith("M-Q2_K-00001-of-00002.gguf")


def test_a_corrupted_byte_is_caught_and_nothing_is_kept(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    hub.corrupt_at = len(tiny.q4_k_m) - 1000
    with pytest.raises(ChecksumMismatch) as caught:
        pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    assert sha256(tiny.q4_k_m) in caught.value.message
    assert caught.value.code == "checksum_mismatch"
    assert leftovers(tmp_path) == []

    hub.corrupt_at = None  # the next pull starts afresh, and is right
    assert pull_from(hub, tmp_path, "org/tiny:q4_k_m").downloaded_bytes == len(tiny.q4_k_m)
    assert hub.ranges() == ["", ""]


def test_a_cut_connection_resumes_with_a_range(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    hub.drop_after, hub.drops = CHUNK + (1 << 20), 1
    pulled = pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    assert hub.ranges() == ["", f"bytes={CHUNK}-"]  # huggingface_hub's own retry
    assert pulled.files[0].path.read_bytes() == tiny.q4_k_m


def test_an_interrupted_pull_resumes_where_it_stopped(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    cancel = threading.Event()

    def stop_after_a_chunk(progress: PullProgress) -> None:
        if progress.done >= CHUNK:
            cancel.set()

    hub.hold_after = CHUNK + (1 << 20)  # so that the first chunk is all it gets
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            pull_from, hub, tmp_path, "org/tiny:q4_k_m", on_progress=stop_after_a_chunk,
            cancel=cancel,
        )  # fmt: skip
        assert hub.held.wait(10)
        wait_for(cancel.is_set, 10, "the first chunk to be written")
        hub.hold_after = None
        hub.release.set()
        with pytest.raises(PullCancelled):
            first.result(30)
    digest = sha256(tiny.q4_k_m)
    partial = tmp_path / "models--org--tiny" / "blobs" / f"{digest}.incomplete"
    assert partial.stat().st_size == CHUNK
    assert not (partial.parent / digest).exists()
    assert not list(tmp_path.glob("models--org--tiny/snapshots/*/*.gguf"))

    pulled = pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    assert hub.ranges()[-1] == f"bytes={CHUNK}-"
    assert pulled.downloaded_bytes == len(tiny.q4_k_m) - CHUNK
    assert pulled.files[0].path.read_bytes() == tiny.q4_k_m
    assert not partial.exists()


def test_a_server_that_ignores_the_range_still_gives_the_right_file(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / f"{sha256(tiny.q4_k_m)}.incomplete"
    partial.write_bytes(tiny.q4_k_m[:3_000_000])
    hub.ignore_range = True
    pulled = pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    assert hub.ranges() == ["bytes=3000000-"]
    assert pulled.files[0].path.read_bytes() == tiny.q4_k_m  # rewound, hashed again


def test_two_pulls_of_one_file_download_it_once(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    hub.hold_after = 1 << 20
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(pull_from, hub, tmp_path, "org/tiny:q4_k_m")
        assert hub.held.wait(10)
        second = pool.submit(pull_from, hub, tmp_path, "org/tiny/Tiny-Q4_K_M.gguf")
        wait_for(lambda: len(hub.seen("GET", "/api/")) == 2, 10, "the second pull to start")
        hub.release.set()
        results = sorted(f.result(30).downloaded_bytes for f in (first, second))
    assert results == [0, len(tiny.q4_k_m)]  # the second waited on the lock, then found it
    assert len(hub.seen("GET", "/cdn/")) == 1


def test_what_a_killed_hf_hub_download_left_is_resumed(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    digest = sha256(tiny.q4_k_m)
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{digest}.0badf00d.incomplete").write_bytes(tiny.q4_k_m[:5_000_000])
    (blobs / f"{digest}.12345678.incomplete").write_bytes(tiny.q4_k_m[:1000])
    pulled = pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    assert hub.ranges() == ["bytes=5000000-"]
    assert pulled.files[0].path.read_bytes() == tiny.q4_k_m
    assert sorted(p.name for p in blobs.iterdir()) == [digest]


def test_a_disk_too_small_is_refused_before_a_byte_moves(hub: LocalHub, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "8m") as store:
        with pytest.raises(NotEnoughSpace) as caught:
            pull_from(hub, store, "org/tiny:q4_k_m")
        assert caught.value.status == 507
        assert "12.6 MB more" in caught.value.message
        assert not hub.seen("GET", "/cdn/")
        assert leftovers(store) == []


def test_a_disk_that_fills_up_midway_fails_cleanly(hub: LocalHub, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "16m") as store:
        hub.hold_after = 1 << 20
        with ThreadPoolExecutor(1) as pool:
            pulling = pool.submit(pull_from, hub, store, "org/tiny:q4_k_m")
            assert hub.held.wait(10)
            # Someone else fills the disk meanwhile.
            with (store / "filler").open("wb") as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
            hub.release.set()
            with pytest.raises(NotEnoughSpace, match="filled up"):
                pulling.result(30)
        assert leftovers(store) == []


def test_offline_uses_the_store_or_says_why_not(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    offline = Hub(hub.endpoint, offline=True)
    with pytest.raises(HubOffline, match="HF_HUB_OFFLINE is set"):
        pull(parse_ref("org/tiny:q4_k_m"), store=tmp_path, hub=offline)
    assert hub.requests == []

    online = pull_from(hub, tmp_path, "org/tiny:q4_k_m")
    hub.requests.clear()
    for ref in ("org/tiny:q4_k_m", "org/tiny/Tiny-Q4_K_M.gguf", "org/tiny"):
        found = pull(parse_ref(ref), store=tmp_path, hub=offline)
        assert found.files == tuple(replace(f, downloaded_bytes=0) for f in online.files)
    with pytest.raises(HubOffline, match="it has: org/tiny:q4_k_m"):
        pull(parse_ref("org/tiny:q8_0"), store=tmp_path, hub=offline)
    assert hub.requests == []


def test_hub_errors_in_shoals_terms(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no repo org/nothing"):
        pull_from(hub, tmp_path, "org/nothing:q4_k_m")
    with pytest.raises(ModelNotFound, match="no revision 'v9'"):
        pull_from(hub, tmp_path, "org/tiny:q4_k_m", revision="v9")
    with pytest.raises(ModelNotFound, match="it has: org/tiny:f16, org/tiny:q4_k_m"):
        pull_from(hub, tmp_path, "org/tiny:q2_k")
    with pytest.raises(InvalidRequest, match="matches 3 models"):
        pull_from(hub, tmp_path, "org/tiny")
    down = Hub("http://127.0.0.1:9", offline=False)  # discard: nothing listens
    with pytest.raises(UpstreamFailed) as caught:
        pull(parse_ref("org/tiny:q4_k_m"), store=tmp_path, hub=down)
    assert caught.value.code == "hub_unreachable"


def test_the_token_goes_to_the_hub_and_never_to_its_cdn(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.require_token = "hf_stand_in_token"
    with pytest.raises(ModelNotFound, match="private: set HF_TOKEN"):
        pull_from(hub, tmp_path, "org/tiny:q8_0")
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    pull_from(hub, tmp_path, "org/tiny:q8_0")
    (cdn,) = hub.seen("GET", "/cdn/")
    assert "Authorization" not in cdn.headers and cdn.port != hub.seen("HEAD")[0].port
    assert hub.seen("HEAD")[0].headers["Authorization"] == "Bearer hf_stand_in_token"


# -- the operator API --------------------------------------------------------------------


class CountingCatalog:
    def __init__(self) -> None:
        self.refreshes = 0

    def models(self) -> list[LocalModel]:
        return []

    def find(self, name: str) -> LocalModel | None:
        return None

    async def refresh(self) -> None:
        self.refreshes += 1


@contextlib.asynccontextmanager
async def api(
    hub: LocalHub, tmp_path: Path, *, from_the_lan: bool = False
) -> AsyncIterator[tuple[Client, list[Event], CountingCatalog]]:
    settings = Settings(data_dir=tmp_path / "data", lan=from_the_lan)
    app = build_app(
        settings,
        keys=KeyStore.in_data_dir(settings.data_dir),
        own_hosts=lambda: {"127.0.0.1"},
        caller_of=peer_port_caller(lambda transport: None, lambda remote: not from_the_lan),
        cluster_mode=lambda: "open",
        served_by="test",
    )
    bus, events, catalog = EventBus(), list[Event](), CountingCatalog()
    bus.subscribe(Event, events.append)
    app[LIMITS] = settings.limits
    app[pull_api.PULLS] = pull_api.Pulls(
        tmp_path / "store",
        bus,
        catalog.refresh,
        hub=lambda: Hub(hub.endpoint, False),
    )
    async with TestClient(TestServer(app)) as client:
        yield client, events, catalog


async def post_pull(client: Client, body: object) -> tuple[int, str, list[Any]]:
    async with client.post(pull_api.PULL_PATH, data=orjson.dumps(body)) as response:
        lines = [orjson.loads(line) async for line in response.content if line.strip()]
        return response.status, response.headers["Content-Type"], lines


async def test_the_api_streams_progress_and_publishes_events(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    async with api(hub, tmp_path) as (client, events, catalog):
        status, kind, lines = await post_pull(client, {"model": "org/tiny:q4_k_m"})
    assert status == 200 and kind.startswith("application/x-ndjson")
    assert lines[0]["status"] == "downloading" and lines[0]["completed"] == 0
    assert lines[0]["total"] == len(tiny.q4_k_m)
    assert [line["status"] for line in lines[-2:]] == ["verifying", "success"]
    assert lines[-1]["files"][0]["sha256"] == sha256(tiny.q4_k_m)
    assert lines[-1]["downloaded_bytes"] == len(tiny.q4_k_m)
    assert lines[-1]["path"].endswith("/Tiny-Q4_K_M.gguf")
    progress = [e for e in events if isinstance(e, ModelPullProgress)]
    assert progress[0].completed == 0 and progress[-1].completed == len(tiny.q4_k_m)
    (done,) = [e for e in events if isinstance(e, ModelPulled)]
    assert done.files == ("org/tiny/Tiny-Q4_K_M.gguf",) and done.model == "org/tiny:q4_k_m"
    assert catalog.refreshes == 1


async def test_the_api_answers_errors_before_streaming_with_their_status(
    hub: LocalHub, tmp_path: Path
) -> None:
    async with api(hub, tmp_path) as (client, events, catalog):
        status, _, (error,) = await post_pull(client, {"model": "org/tiny:q2_k"})
        assert status == 404 and error["error"]["code"] == "model_not_found"
        assert "org/tiny:q4_k_m" in error["error"]["message"]
        for hostile in ("../../etc/passwd", "org/repo/..\\x.gguf", "org/re\u0440o:q4", 7):
            status, _, (error,) = await post_pull(client, {"model": hostile})
            assert status == 400 and error["error"]["param"] == "model"
        status, _, (error,) = await post_pull(client, {"model": "org/tiny", "revision": "../x"})
        assert status == 400 and error["error"]["param"] == "revision"
        status, _, (error,) = await post_pull(client, {"revision": "main"})
        assert status == 400 and error["error"]["code"] == "missing_required_parameter"
    assert not hub.seen(path_prefix="/cdn/") and len(hub.requests) == 1  # the q2_k lookup
    (failed,) = [e for e in events if isinstance(e, ModelPullFailed)]
    assert failed.code == "model_not_found" and catalog.refreshes == 0


async def test_the_api_ends_a_broken_stream_with_an_error_line(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    hub.corrupt_at = 5
    async with api(hub, tmp_path) as (client, events, _):
        status, _, lines = await post_pull(client, {"model": "org/tiny:q8_0"})
    assert status == 200 and lines[0]["status"] == "downloading"
    assert lines[-1]["status"] == "error"
    assert lines[-1]["error"]["code"] == "checksum_mismatch"
    assert [e.code for e in events if isinstance(e, ModelPullFailed)] == ["checksum_mismatch"]


async def test_the_api_is_for_this_machines_operator_only(hub: LocalHub, tmp_path: Path) -> None:
    async with api(hub, tmp_path, from_the_lan=True) as (client, events, _):
        status, _, (error,) = await post_pull(client, {"model": "org/tiny:q4_k_m"})
    assert status == 403 and "own machine" in error["error"]["message"]
    assert hub.requests == [] and events == []


async def test_the_api_without_streaming_answers_the_result(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    async with api(hub, tmp_path) as (client, _, _):
        status, kind, (result,) = await post_pull(
            client, {"model": "org/tiny:f16", "stream": False}
        )
    assert status == 200 and kind.startswith("application/json")
    assert result["status"] == "success" and result["size_bytes"] == len(tiny.f16)


# -- the CLI -----------------------------------------------------------------------------


def shoal(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "models", "pull", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def cli_env(hub: LocalHub, home: Path) -> dict[str, str]:
    return {
        **clean_env(home),
        **hub_env(hub, home),
        "HF_HUB_CACHE": str(home / "store"),
        "COLUMNS": "120",
    }


def test_the_cli_shows_progress_and_exits_0(
    hub: LocalHub, tiny: TinyModels, tmp_path: Path
) -> None:
    env = cli_env(hub, tmp_path)
    result = shoal(env, "org/tiny:q4_k_m", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert Path(document["path"]).read_bytes() == tiny.q4_k_m
    assert document["path"].startswith(str(tmp_path / "store" / "models--org--tiny"))
    # Not a terminal: the bar is drawn once, when it is done.
    assert "Tiny-Q4_K_M.gguf" in result.stderr and "12.6/12.6 MB" in result.stderr
    assert "MB/s" in result.stderr
    # A terminal (as Rich sees it): the bar moves.
    live = shoal({**env, "TTY_COMPATIBLE": "1"}, "org/tiny:q8_0")
    assert live.returncode == 0 and "1.0/1.0 MB" in live.stderr and "0.0/1.0 MB" in live.stderr
    assert "SHA-256 checked" in live.stdout
    again = shoal(env, "org/tiny:q4_k_m")
    assert again.returncode == 0 and "already in the store" in again.stdout


def test_the_cli_exit_codes_mean_something(hub: LocalHub, tmp_path: Path) -> None:
    env = cli_env(hub, tmp_path)
    bad = shoal(env, "org/../etc:q4")
    assert bad.returncode == 2 and "'..'" in bad.stderr
    assert shoal(env, "org/tiny:q2_k").returncode == 2
    assert shoal(env, "org/tiny:q4_k_m", "--revision", "a/../b").returncode == 2
    offline = shoal({**env, "HF_HUB_OFFLINE": "1"}, "org/tiny:q4_k_m")
    assert offline.returncode == 4 and "HF_HUB_OFFLINE" in offline.stderr
    down = shoal({**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, "org/tiny:q4_k_m")
    assert down.returncode == 4, down.stderr
    assert not hub.seen("GET", "/cdn/")


def test_the_cli_on_a_full_disk_exits_5(hub: LocalHub, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as store:
        result = shoal({**cli_env(hub, tmp_path), "HF_HUB_CACHE": str(store)}, "org/tiny:q4_k_m")
        assert result.returncode == 5 and "needs 12.6 MB more" in result.stderr
        assert leftovers(store) == []


def test_a_killed_cli_pull_resumes(hub: LocalHub, tiny: TinyModels, tmp_path: Path) -> None:
    env = cli_env(hub, tmp_path)
    hub.hold_after = CHUNK + (1 << 20)
    child = subprocess.Popen(
        [sys.executable, "-m", "shoal", "models", "pull", "org/tiny:q4_k_m"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = (
        tmp_path / "store" / "models--org--tiny" / "blobs" / f"{sha256(tiny.q4_k_m)}.incomplete"
    )
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size >= CHUNK, 30, "a chunk")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    hub.hold_after = None
    hub.release.set()
    result = shoal(env, "org/tiny:q4_k_m", "--json")
    assert result.returncode == 0, result.stderr
    assert hub.ranges()[-1] == f"bytes={CHUNK}-"
    assert json.loads(result.stdout)["downloaded_bytes"] == len(tiny.q4_k_m) - CHUNK


def test_the_packaged_smollm2_through_the_cli(hub: LocalHub, tmp_path: Path) -> None:
    """A real model's worth of bytes (98 MB) from the stand-in, for the figure in the log."""
    data = default_chat_model().read_bytes()
    hub.add_repo(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": data}
    )
    started = time.monotonic()
    result = shoal(
        cli_env(hub, tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:q4_1", "--json"
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["files"][0]["sha256"] == sha256(data)
    assert Path(document["path"]).read_bytes() == data
    print(f"pulled {len(data) / 1e6:.0f} MB in {document['seconds']:.2f} s "
          f"({len(data) / document['seconds'] / 1e6:.0f} MB/s), CLI {elapsed:.2f} s")  # fmt: skip
