"""Model files pulled from peers on a LAN of namespaces (issue 11): real node processes,
real mDNS, mutual TLS between them.

One LAN for the module. s1, s2 and s3 hold GGUFs in their HF stores (made here, tens of
MiB of random bytes behind a real header, each file named by its SHA-256); p and q pull
them; `liar` is a node run through tests/netns/lying_node.py, which lies about some of
its files; u is a node that is not paired with anyone; the agent on `client` is a LAN
client with an API key for each node. q's store is a 64 MiB tmpfs (the full-disk test).
Every node but u shares one cluster secret.

The pulls go through the operator API (`POST /shoal/v1/models/pull`, loopback only) from
an agent inside the puller's namespace, or through `shoal models pull` run there; the
success object says how many chunks each peer gave (`peers.sources`), which it dropped,
and how many chunks it verified bad. Links are slowed with `tc tbf` on the switch port
toward the puller where a transfer must last long enough to be interrupted; progress is
read from outside: the puller's have-bitmap, or the bytes the switch port has sent.

The tests run in order and the last ones kill s3 then s2. Nothing asserts a duration.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal.trust.secret import new_secret
from tests.conftest import llama_server_command, packaged_gguf
from tests.models import PACKAGED_NAME, hf_store, tiny_gguf
from tests.netns.cluster import PORT, Agent, Cluster, Node, require_netns, wait_until
from tests.netns.lan import Host, Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

MiB = 1 << 20
SECRET = new_secret()
REPO = "shoaltest/Share-GGUF"
SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
HERE = Path(__file__).resolve().parent
LOCAL = f"http://127.0.0.1:{PORT}"  # a node's operator API, from inside its namespace
PULL = LOCAL + "/shoal/v1/models/pull"
TMPFS_BYTES = 64 * MiB
RATE = "160mbit"  # 20 MB/s toward a puller whose transfer must be interrupted
SOURCES = ("s1", "s2", "s3")


@dataclass(frozen=True)
class Made:
    """A model file made for the test: where it is, its catalog name and its hash."""

    path: Path
    name: str
    sha256: str
    size: int

    @property
    def chunks(self) -> int:
        return -(-self.size // MiB)


def make_gguf(path: Path, size: int, seed: int) -> Path:
    """A GGUF the catalog lists (a real header), padded to `size` with random bytes."""
    tiny_gguf(path, file_type=7)  # LLAMA_FTYPE_MOSTLY_Q8_0, as the name says
    rng = random.Random(seed)
    with path.open("ab") as out:
        while (left := size - out.tell()) > 0:
            out.write(rng.randbytes(min(left, 8 * MiB)))
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


def made(path: Path) -> Made:
    stem, quant = path.name.removesuffix(".gguf").rsplit(".", 1)
    return Made(path, f"{stem.lower()}:{quant.lower()}", sha256_of(path), path.stat().st_size)


# The files and who holds them (s1's copy of "three" is its own: the rot test damages it).
FILES = {  # key: (file name, MiB, holders)
    "one": ("Share-One.Q8_0.gguf", 24, ("s1",)),
    "three": ("Share-Three.Q8_0.gguf", 48, ("s1", "s2", "s3")),
    "resume": ("Share-Resume.Q8_0.gguf", 96, ("s1",)),
    "big": ("Share-Big.Q8_0.gguf", 80, ("s1",)),  # more than q's tmpfs holds, even empty
    "survive": ("Share-Survive.Q8_0.gguf", 48, ("s2", "s3")),
    "alone": ("Share-Alone.Q8_0.gguf", 48, ("s2",)),
}
LIES = {  # the liar's files: key -> (file name, lie)
    "lie-other": ("Lie-Other.Q8_0.gguf", "other_manifest"),
    "lie-size": ("Lie-Size.Q8_0.gguf", "wrong_size"),
    "lie-long": ("Lie-Long.Q8_0.gguf", "long_chunk"),
    "lie-short": ("Lie-Short.Q8_0.gguf", "short_chunk"),
    "lie-impostor": ("Lie-Impostor.Q8_0.gguf", "impostor"),
    "lie-names": ("Lie-Names.Q8_0.gguf", None),
}


@dataclass
class ShareLan:
    lan: Lan
    cluster: Cluster
    home: Path
    files: dict[str, Made]
    claimed: str  # the SHA-256 the impostor advertises for its file
    token: str  # in every hostile name: nothing named so may appear anywhere
    hostile_ids: tuple[str, ...]
    flag: Path  # makes the liar advertise the hostile names
    agents: dict[str, Agent] = field(default_factory=dict)  # inside p, q and u
    ids: dict[str, str] = field(default_factory=dict)  # node name -> node id

    def node(self, name: str) -> Node:
        return self.cluster.nodes[name]

    def store(self, name: str) -> Path:
        return self.node(name).home / "hub"

    def host(self, name: str) -> Host:
        return self.node(name).host


# The liar's heartbeats every second: its peers see a new advert of it within a second.
FAST_HEARTBEATS = """
[mesh]
new_interval_s = 1.0
established_interval_s = 1.0
stable_interval_s = 1.0
"""


def node_config(home: Path, binary: Path, more: str = "") -> str:
    return (
        more
        + f"""
[models]
store = "{home / "hub"}"
adopt_ollama = false
adopt_lmstudio = false
llama_server = "{binary}"
context = 1024
parallel = 1
"""
    )


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShareLan]:
    require_netns()
    home = tmp_path_factory.mktemp("share-lan")
    folder = home / "files"
    files = {
        key: made(make_gguf(folder / name, mib * MiB, seed))
        for seed, (key, (name, mib, _)) in enumerate(FILES.items())
    }
    s1_three = folder / "s1" / FILES["three"][0]  # s1's own copy, damaged later
    s1_three.parent.mkdir()
    shutil.copyfile(files["three"].path, s1_three)
    for seed, (key, (name, _)) in enumerate(LIES.items(), start=100):
        files[key] = made(make_gguf(folder / "liar" / name, 4 * MiB, seed))
    # The impostor claims the hash of a file of the same size that nobody holds.
    claimed = hashlib.sha256(random.Random(7).randbytes(files["lie-impostor"].size)).hexdigest()
    token = f"shoal-evil-{secrets.token_hex(4)}"
    hostile_ids = (f"../../{token}:q8_0", f"/tmp/{token}:q8_0", f"shoaltest/x/../../{token}.gguf")
    flag = home / "liar-hostile-names"
    plan = {
        "lies": {
            files[key].sha256: {"kind": lie, "other": hashlib.sha256(b"another").hexdigest()}
            for key, (_, lie) in LIES.items()
            if lie not in (None, "impostor")
        }
        | {claimed: {"kind": "impostor", "serves": files["lie-impostor"].sha256}},
        "hostile": {"flag": str(flag), "sha256": files["lie-names"].sha256, "ids": hostile_ids},
    }
    (home / "lie-plan.json").write_text(json.dumps(plan))

    for node in SOURCES:
        held = {
            name: s1_three if (key, node) == ("three", "s1") else files[key].path
            for key, (name, _, holders) in FILES.items()
            if node in holders
        }
        hf_store(home / node / "hub", REPO, held)
    hf_store(home / "s1" / "hub", SMOL_REPO, {packaged_gguf().name: packaged_gguf()})
    hf_store(home / "liar" / "hub", REPO, {LIES[k][0]: files[k].path for k in LIES})

    binary, engine_env = llama_server_command()
    env = {k: v for k, v in engine_env.items() if k.startswith(("LD_", "GGML"))}
    tmpfs = home / "q" / "hub"
    tmpfs.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "shoal-test"]
    subprocess.run([*mount, tmpfs], check=True, timeout=10)
    try:
        with Lan() as lan:
            names = (*SOURCES, "p", "q", "liar", "u", "client")
            hosts = {name: lan.add_host(name) for name in names}
            nodes = {
                name: make_node(name, hosts[name], home, binary, env)
                for name in names
                if name != "client"
            }
            cluster = Cluster(lan, hosts["client"], Agent(lan, hosts["client"]), nodes)
            built = ShareLan(lan, cluster, home, files, claimed, token, hostile_ids, flag)
            try:
                for node in nodes.values():
                    cluster.start(node)
                built.agents = {name: Agent(lan, hosts[name]) for name in ("p", "q", "u")}
                paired = (*SOURCES, "p", "q", "liar")
                for viewer in ("p", "q"):
                    others = [n for n in paired if n != viewer]
                    wait_until(
                        lambda v=viewer, o=others: cluster.sees_all_healthy(v, o),  # type: ignore[misc]
                        90, f"{viewer} to see every paired node",
                    )  # fmt: skip
                built.ids = {n: p["node_id"] for n, p in cluster.peers_of("p").items()}
                yield built
            finally:
                lan.teardown()
                for agent in (cluster.agent, *built.agents.values()):
                    agent.close()
                cluster.report()
    finally:
        unmount(tmpfs)


def make_node(name: str, host: Host, home: Path, binary: Path, env: dict[str, str]) -> Node:
    """A node with its own store; u has no cluster secret; the liar runs lying_node.py."""
    env = env | {"HOME": str(home / name), "HF_HUB_OFFLINE": "1"}
    program: tuple[str, ...] = ("-m", "shoal")
    if name == "liar":
        env["SHOAL_LIE_PLAN"] = str(home / "lie-plan.json")
        program = (str(HERE / "lying_node.py"),)
    return Node(
        name, host, home / name, ("--no-embedded",),
        secret=None if name == "u" else SECRET,
        config=node_config(home / name, binary, FAST_HEARTBEATS if name == "liar" else ""),
        env=env, program=program,
    )  # fmt: skip


def unmount(path: Path) -> None:
    if subprocess.run(["umount", path], check=False, timeout=10).returncode:
        subprocess.run(["umount", "-l", path], check=False, timeout=10)


# -- helpers -----------------------------------------------------------------------------


def holders(share: ShareLan, viewer: str, model: str) -> set[str]:
    """The nodes `viewer` lists as holding `model` (its /v1/models)."""
    document = share.cluster.agent.json(share.node(viewer).url + "/v1/models") or {"data": []}
    for entry in document["data"]:
        if entry["id"] == model:
            return set(entry.get("nodes") or ())
    return set()


def wait_for_holders(share: ShareLan, viewer: str, model: str, expected: set[str]) -> None:
    wait_until(
        lambda: expected <= holders(share, viewer, model),
        60, f"{viewer} to see {model} on {sorted(expected)}",
    )  # fmt: skip


def pull_request(share: ShareLan, puller: str, model: str, *, stream: bool) -> dict[str, Any]:
    body = {"model": model, "source": "peers", "stream": stream}
    return share.agents[puller].request("POST", PULL, body, timeout=120)


def pull(share: ShareLan, puller: str, model: str, *, stream: bool = False) -> dict[str, Any]:
    agent = share.agents[puller]
    agent.send(pull_request(share, puller, model, stream=stream))
    return agent.receive(180)


def lines(answer: dict[str, Any]) -> list[dict[str, Any]]:
    assert answer.get("status") == 200, answer
    return [json.loads(line) for line in answer["body"].splitlines() if line.strip()]


def success(answer: dict[str, Any]) -> dict[str, Any]:
    last = lines(answer)[-1]
    assert last["status"] == "success", last
    return last


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    """The API's error object of a refused call (OpenAI's shape)."""
    assert "status" in answer and answer["status"] >= 400, answer
    error = json.loads(answer["body"])["error"]
    assert {"message", "type", "code"} <= error.keys(), error
    return dict(error)


def blobs_named(store: Path, sha256: str) -> list[Path]:
    """Everything in the store named after the file's hash (the blob, its partials)."""
    return sorted(p for p in store.rglob(f"{sha256}*") if p.parent.name == "blobs")


def assert_pulled(share: ShareLan, puller: str, file: Made) -> Path:
    """The file is in the puller's store under its real name, byte for byte; no partial
    of it is left."""
    (blob,) = blobs_named(share.store(puller), file.sha256)
    assert blob.name == file.sha256
    assert sha256_of(blob) == file.sha256
    assert filecmp.cmp(blob, file.path, shallow=False)
    return blob


def assert_not_published(share: ShareLan, puller: str, file: Made) -> list[Path]:
    """Nothing under the file's real name (a partial kept for a resume is allowed)."""
    found = blobs_named(share.store(puller), file.sha256)
    assert all(p.name.endswith((".incomplete", ".incomplete.have")) for p in found), found
    links = [p for p in share.store(puller).rglob("*.gguf") if file.sha256 in str(p.resolve())]
    assert not links, links
    return found


@contextmanager
def slowed(share: ShareLan, host: str, rate: str = RATE) -> Iterator[None]:
    """Everything the switch sends toward `host` at `rate` (tbf on its switch port)."""
    port = share.host(host).port
    tc = ["tc", "-n", share.lan.bridge_ns, "qdisc"]
    shape = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
    subprocess.run([*tc, "replace", "dev", port, *shape], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", port, "root"], check=False, timeout=10)


def bytes_toward(share: ShareLan, host: str) -> int:
    """Bytes the switch has sent toward `host` through its shaped port."""
    argv = ["tc", "-s", "-j", "-n", share.lan.bridge_ns, "qdisc", "show", "dev"]
    shown = subprocess.run([*argv, share.host(host).port], check=True, timeout=10, text=True,
                           capture_output=True).stdout  # fmt: skip
    return max(int(q.get("bytes", 0)) for q in json.loads(shown))


def have_chunks(share: ShareLan, puller: str, file: Made) -> int:
    """Chunks the puller's have-bitmap names (what a resume will keep), 0 without one."""
    path = share.store(puller) / f"models--{REPO.replace('/', '--')}" / "blobs"
    try:
        raw = (path / f"{file.sha256}.incomplete.have").read_bytes()
    except FileNotFoundError:
        return 0
    bits = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return sum(bin(byte).count("1") for byte in bits)


def kill(share: ShareLan, name: str) -> None:
    """SIGKILL the node (`ip netns exec` execs it: the Popen's pid is the node's)."""
    process = share.node(name).process
    assert process is not None and process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


# -- the tests ---------------------------------------------------------------------------


def test_lan_clients_and_unpaired_nodes_get_no_file(share: ShareLan) -> None:
    one = share.files["one"]
    s1 = share.node("s1")
    files = f"{s1.url}/shoal/v1/files/{one.sha256}"
    # A LAN client with a valid API key: the file routes are for paired nodes only.
    for url, headers in ((files + "/manifest", {}), (files, {"Range": f"bytes=0-{MiB - 1}"})):
        answer = share.cluster.agent.call("GET", url, headers=headers, timeout=10)
        assert answer["status"] == 403, answer
        error = error_of(answer)
        print(f"LAN client -> {url.rsplit('/', 1)[-1]}: 403 {error}")
        assert error["code"] == "forbidden" and "peer" in error["message"], error
    # The unpaired node u, with its own node certificate, on s1's mutual-TLS peer port.
    peer_url = f"https://{s1.host.ip}:{PORT + 1}/shoal/v1/files/{one.sha256}/manifest"
    probe = [sys.executable, str(HERE / "stranger_fetch.py"), str(share.node("u").data_dir)]
    ran = share.lan.exec(share.host("u"), [*probe, peer_url], timeout=30)
    answer = json.loads(ran.stdout)
    print(f"unpaired node -> s1's peer port: {answer}")
    if "error" not in answer:  # refused in HTTP rather than in the TLS handshake
        assert answer["status"] in (401, 403), answer
        assert "chunks" not in answer["body"]
        assert {"message", "type", "code"} <= json.loads(answer["body"])["error"].keys()
    # And u's own node is not told of the file: asking it to pull is a clean 404.
    refused = pull(share, "u", one.name)
    assert refused["status"] == 404 and error_of(refused)["code"] == "not_on_peers", refused
    assert not blobs_named(share.store("u"), one.sha256)


def test_one_peer_through_the_cli(share: ShareLan) -> None:
    one = share.files["one"]
    wait_for_holders(share, "p", one.name, {"s1"})
    p = share.node("p")
    argv = [
        "env", "HF_HUB_OFFLINE=1", "COLUMNS=200", sys.executable, "-m", "shoal",
        "models", "pull", one.name, "--json", "--config", str(p.home / "config.toml"),
    ]  # fmt: skip
    ran = share.lan.exec(share.host("p"), argv, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    print(f"shoal models pull {one.name}: {result.get('peers')}")
    assert result["revision"] == "peers"
    assert result["size_bytes"] == result["downloaded_bytes"] == one.size
    assert result["peers"]["sources"] == {share.ids["s1"]: one.chunks}
    assert result["peers"]["dropped"] == [] and result["peers"]["bad_chunks"] == 0
    blob = assert_pulled(share, "p", one)
    assert Path(result["path"]).resolve() == blob.resolve()
    wait_until(lambda: one.name in share.cluster.models_at("p"), 30, "p to list what it pulled")


def test_three_peers_at_once_all_give_chunks(share: ShareLan) -> None:
    three = share.files["three"]
    wait_for_holders(share, "p", three.name, set(SOURCES))
    answer = pull(share, "p", three.name, stream=True)
    done = success(answer)
    progress = [line for line in lines(answer) if line["status"] == "downloading"]
    seen = sorted({line.get("sources") for line in progress})
    print(f"3 sources: {done['peers']}; live sources in the progress lines: {seen}")
    assert done["downloaded_bytes"] == three.size
    by_source = done["peers"]["sources"]
    assert set(by_source) == {share.ids[s] for s in SOURCES}, by_source
    assert all(chunks > 0 for chunks in by_source.values()), by_source
    assert sum(by_source.values()) == three.chunks
    assert done["peers"]["dropped"] == [] and done["peers"]["bad_chunks"] == 0
    assert any(line.get("sources") == 3 for line in progress), progress
    assert_pulled(share, "p", three)


def test_a_source_whose_copy_rotted_is_caught_and_dropped(share: ShareLan) -> None:
    """s1 has served "three" (to p, above), so it trusts its copy while the file's size,
    mtime and inode stay. One bit of every chunk flips on its disk, in place, with the
    mtime put back: s1 serves the rotten bytes under the old hash. q pulls "three" from
    s1, s2, s3 (and p): every chunk from s1 fails its hash and is fetched elsewhere, and
    s1 is dropped (`strikes_to_drop` is 3: one bad chunk alone may be a flipped bit in
    transit, so the source rots in every chunk here)."""
    three = share.files["three"]
    (blob,) = blobs_named(share.store("s1"), three.sha256)
    before = blob.stat()
    with blob.open("r+b") as file:
        for chunk in range(three.chunks):
            offset = chunk * MiB + MiB // 2
            file.seek(offset)
            byte = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([byte ^ 0x10]))
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = blob.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns,
    )  # fmt: skip
    assert sha256_of(blob) != three.sha256

    wait_for_holders(share, "q", three.name, set(SOURCES))
    done = success(pull(share, "q", three.name))
    print(f"q, with s1 rotten: {done['peers']}")
    s1 = share.ids["s1"]
    assert done["peers"]["dropped"] == [s1]
    assert done["peers"]["bad_chunks"] >= 3
    assert done["peers"]["sources"].get(s1, 0) == 0
    assert sum(done["peers"]["sources"].values()) == three.chunks
    assert_pulled(share, "q", three)
    assert f"dropped the peer {s1[:12]}" in share.node("q").log_text()


def test_a_puller_killed_mid_transfer_resumes(share: ShareLan) -> None:
    resume = share.files["resume"]
    wait_for_holders(share, "p", resume.name, {"s1"})
    agent = share.agents["p"]
    with slowed(share, "p"):
        agent.send(pull_request(share, "p", resume.name, stream=True))
        # The bitmap names chunks once they are on disk for good (every 64 MiB synced).
        wait_until(lambda: have_chunks(share, "p", resume) > 0, 60, "p to sync some chunks")
        kill(share, "p")
    kept = have_chunks(share, "p", resume)
    cut = agent.receive(30)
    print(f"p killed with {kept} of {resume.chunks} chunks on disk; its pull got {cut}"[:300])
    assert 0 < kept < resume.chunks
    assert_not_published(share, "p", resume)

    node = share.node("p")
    node.log.rename(node.home / "node-before-kill.log")
    share.cluster.start(node)
    wait_for_holders(share, "p", resume.name, {"s1"})
    done = success(pull(share, "p", resume.name))
    print(f"p again: {done['peers']}, {done['downloaded_bytes']} of {resume.size} bytes")
    assert done["peers"]["resumed_chunks"] >= kept
    assert done["downloaded_bytes"] == done["peers"]["fetched_bytes"]
    assert done["downloaded_bytes"] <= resume.size - kept * MiB
    assert_pulled(share, "p", resume)


def test_a_full_disk_fails_cleanly(share: ShareLan) -> None:
    big = share.files["big"]
    assert big.size > TMPFS_BYTES
    wait_for_holders(share, "q", big.name, {"s1"})
    answer = pull(share, "q", big.name)
    error = error_of(answer)
    print(f"q's {TMPFS_BYTES // MiB} MiB store, a {big.size // MiB} MiB file: {error}")
    assert answer["status"] == 507, answer
    assert "space" in error["message"] or "disk" in error["message"]
    assert not blobs_named(share.store("q"), big.sha256)  # not even a partial
    assert_not_published(share, "q", big)


@pytest.mark.parametrize("key", [k for k, (_, lie) in LIES.items() if lie is not None])
def test_a_lying_source_is_refused_and_nothing_is_kept(share: ShareLan, key: str) -> None:
    lie = LIES[key][1]
    file = share.files[key]
    sha256 = share.claimed if lie == "impostor" else file.sha256
    wait_for_holders(share, "p", file.name, {"liar"})
    answer = pull(share, "p", file.name)
    error = error_of(answer)
    print(f"{lie}: {answer['status']} {error}")
    assert answer["status"] in (502, 503), answer
    assert error["code"] == "peers_failed", error
    left = blobs_named(share.store("p"), sha256)
    if lie in ("other_manifest", "wrong_size", "impostor"):  # refused before or at the end
        assert left == [], left
    assert_not_published(share, "p", Made(file.path, file.name, sha256, file.size))
    assert f"lying_node: {lie}" in share.node("liar").log_text()  # the lie was told


def hostile_names_seen(share: ShareLan) -> None:
    """Make the liar advertise its hostile names; return once p has had a snapshot of
    it made after that (or has stopped trusting its state)."""
    share.flag.touch()
    said = re.compile(r"lying_node: hostile names .* from uptime ([0-9.]+)")
    wait_until(lambda: said.search(share.node("liar").log_text()), 30, "the liar to lie")
    match = said.search(share.node("liar").log_text())
    assert match is not None
    since = float(match[1])

    def seen() -> bool:
        liar = share.cluster.peers_of("p").get("liar") or {}
        return (liar.get("uptime_s") or 0.0) >= since or liar.get("health") != "healthy"

    wait_until(seen, 30, "p to get a snapshot of the liar with hostile names")


def test_hostile_names_write_nothing_outside_the_store(share: ShareLan) -> None:
    hostile_names_seen(share)
    listed = share.cluster.models_at("p")
    answers = {name: pull(share, "p", name) for name in share.hostile_ids}
    for name, answer in answers.items():
        print(f"pull {name!r} (listed by p: {name in listed}): {answer}"[:300])
    near = [Path("/"), Path("/tmp"), Path("/work"), Path.cwd(), Path.cwd().parent]
    found = [p for folder in near for p in folder.glob(f"*{share.token}*")]
    store = share.store("p")
    found += [p for p in share.home.rglob(f"*{share.token}*") if not p.is_relative_to(store)]
    assert not found, found
    store = store.resolve()
    for answer in answers.values():
        if answer.get("status") == 200:  # taken under a name of p's own, in its store
            assert Path(success(answer)["path"]).resolve().is_relative_to(store), answer
        else:
            error_of(answer)


def test_hostile_names_are_refused_at_the_peer_boundary(share: ShareLan) -> None:
    hostile_names_seen(share)
    listed = share.cluster.models_at("p")
    assert not listed & set(share.hostile_ids), sorted(listed & set(share.hostile_ids))
    for name in share.hostile_ids:
        answer = pull(share, "p", name)
        assert answer["status"] in (400, 404), answer
        error_of(answer)


def test_a_source_killed_mid_transfer_the_others_finish(share: ShareLan) -> None:
    survive = share.files["survive"]
    wait_for_holders(share, "p", survive.name, {"s2", "s3"})
    agent = share.agents["p"]
    with slowed(share, "p"):
        start = bytes_toward(share, "p")
        agent.send(pull_request(share, "p", survive.name, stream=True))
        wait_until(
            lambda: bytes_toward(share, "p") - start > survive.size // 4,
            60, "a quarter of the file to reach p",
        )  # fmt: skip
        kill(share, "s3")
        answer = agent.receive(120)
    done = success(answer)
    print(f"s3 killed mid-transfer: {done['peers']}")
    assert done["downloaded_bytes"] == survive.size
    assert done["peers"]["sources"].get(share.ids["s2"], 0) > 0
    assert_pulled(share, "p", survive)


def test_the_only_source_killed_fails_cleanly(share: ShareLan) -> None:
    alone = share.files["alone"]
    wait_for_holders(share, "p", alone.name, {"s2"})
    agent = share.agents["p"]
    with slowed(share, "p"):
        start = bytes_toward(share, "p")
        agent.send(pull_request(share, "p", alone.name, stream=False))
        wait_until(
            lambda: bytes_toward(share, "p") - start > alone.size // 4,
            60, "a quarter of the file to reach p",
        )  # fmt: skip
        kill(share, "s2")
        answer = agent.receive(120)
    error = error_of(answer)
    print(f"s2, the only source, killed: {answer['status']} {error}")
    assert answer["status"] in (502, 503, 504), answer
    assert error["code"] == "peers_failed", error
    kept = assert_not_published(share, "p", alone)
    print(f"left for a resume: {[p.name for p in kept]}")


@pytest.mark.engine
def test_the_pulled_model_answers_a_chat_request(share: ShareLan) -> None:
    wait_for_holders(share, "p", PACKAGED_NAME, {"s1"})
    done = success(pull(share, "p", PACKAGED_NAME))
    assert done["downloaded_bytes"] == packaged_gguf().stat().st_size
    assert done["peers"]["sources"] == {share.ids["s1"]: -(-done["size_bytes"] // MiB)}
    wait_until(lambda: "p" in holders(share, "p", PACKAGED_NAME), 30, "p to list it")
    local_only = {"X-Shoal-Local-Only": "1"}  # p must answer itself, not forward to s1
    deadline = time.monotonic() + 120
    while True:
        answer = share.cluster.chat("p", PACKAGED_NAME, headers=local_only, timeout=60)
        if answer["status"] != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # loading: what an SDK does on 503 + Retry-After, in small
    assert answer["status"] == 200, answer
    assert answer["headers"]["X-Shoal-Served-By"] == "p"
    content = json.loads(answer["body"])["choices"][0]["message"]["content"]
    print(f"p, with the model it pulled: {content!r}")
    assert content
