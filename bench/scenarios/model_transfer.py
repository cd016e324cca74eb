"""Model transfer between peers, on a namespace LAN whose every host has an upload cap.

Hosts of tests/netns/lan.py, each with `tc tbf` at RATE_MBIT on its eth0 egress (an
upload cap per machine, as a switch port gives), each running a real `shoal serve --lan`
node; the nodes share a cluster secret and pair by themselves. `s1` is the seed; `p1`,
`p2`, `p3` pull; `w` only warms the seed up and leaves before anything is measured. An
agent in each host (`_transfer_agent.py`) makes the operator calls there (`POST
/shoal/v1/models/pull` with `"source": "peers"` answers loopback callers only) and the
raw copies. Model files are GGUFs (a real header, random bytes after it) of `size_mib`
in Hugging Face stores; every pull is of a file the puller never had, so nothing is
skipped or resumed.

- (a) one source: p1 pulls from s1 (mutual TLS, every 1 MiB chunk's SHA-256 checked,
  writes, fsync, the whole file's SHA-256, rename) vs a raw TCP copy of the same bytes
  over the same link (sendfile(2) on s1, recv into a file on p1: no hashing, no fsync).
  Rate in Mbit/s; DESIGN §11: ≥ 0.9×. Twice: a file s1 serves for the first time (it
  hashes the whole file before its first byte: `shoal.api.share`) and a file it served
  to `w` before. Beside them: the rate until the last chunk is in (the pull's "verifying"
  progress line; what follows is fsync, the whole file's SHA-256, rename, catalog
  refresh), and the CPU seconds per GiB of the puller's and the seed's node processes
  against the raw receiver's and sender's.
- (b) one seed, three pullers: p1, p2 and p3 pull one file at once, vs pull three files
  of that size one after the other (each from s1 alone; the sum of the three). DESIGN
  §11: at once ≤ 1.5× a single pull, which needs pullers to serve each other the chunks
  they hold (a swarm); a star, the seed's upload shared three ways, takes ~3×.
- (c) three sources: p1 pulls a file s1, p2 and p3 all hold, vs the pulls of (a) of a
  file s1 served before, in the same rounds (w took the first serve of both).

Rounds interleave all of it; within (a) the order rotates. The stores live on tmpfs
(/dev/shm when it has room): the disk of a shared machine would add the other work's
writeback to the figures. Needs root, iproute2 and the kernel's sch_tbf; without them
the scenario says why and measures nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Bound, Result, Row, spread
from bench.processes import ROOT
from bench.scenarios._common import command, healthy_peers
from shoal.trust.secret import new_secret, write_secret
from tests.models import tiny_gguf
from tests.netns.lan import Host, Lan, netns_available

NAME = "model_transfer"
TITLE = "Model transfer between peers: pull vs raw TCP copy; 1 seed → 3 pullers; 3 sources → 1"
PORT = 11450
RAW_PORT = 18300
RATE_MBIT = 200  # per host, upload: a LAN port, well below what a pull costs in CPU here
BURST = "128kb"  # ~5 ms at RATE_MBIT: a smooth rate, and more than one GSO segment
LATENCY = "25ms"  # tbf's queue, as time at RATE_MBIT
AGENT = Path(__file__).with_name("_transfer_agent.py")
MiB = 1 << 20
GiB = 1 << 30
PULL_TIMEOUT_S = 120.0
HOSTS = ("s1", "p1", "p2", "p3", "w")


@dataclass(frozen=True)
class Plan:
    size_mib: int  # every model file
    rounds: int  # of (a) and (c)
    star_rounds: int  # of (b): each moves six files' worth through the seed's link


QUICK = Plan(size_mib=8, rounds=2, star_rounds=1)
FULL = Plan(size_mib=64, rounds=5, star_rounds=3)


@dataclass(frozen=True)
class ModelFile:
    tag: str
    path: Path  # the bytes, outside any store (stores hard-link them)
    sha256: str
    size: int

    @property
    def name(self) -> str:
        """What the catalog names it (`<repo>:<quant>`), and what a pull asks for."""
        return f"transfer-{self.tag}:q4_k_m"


@dataclass(frozen=True)
class Files:
    cold: list[ModelFile]  # (a), served by s1 for the first time
    warm: list[ModelFile]  # (a), served by s1 to w before
    three: list[ModelFile]  # (c), on s1, p2 and p3
    sequential: list[list[ModelFile]]  # (b), three a round, on s1
    shared: list[ModelFile]  # (b), one a round, on s1

    def every(self) -> list[ModelFile]:
        flat = [m for run in self.sequential for m in run]
        return [*self.cold, *self.warm, *self.three, *flat, *self.shared]


@dataclass
class Pull:
    seconds: float
    started: float
    ended: float
    sources: int  # the most any progress line reported at once
    # From the progress lines (None if the "verifying" line did not come):
    chunks_s: float | None  # the request → every chunk in (manifest, the seed's check, …)
    tail_s: float | None  # every chunk in → the success line (fsync, hash, rename, list)


@dataclass
class Arm:
    """One side measured over rounds: rates, CPU per GiB of the two ends, phases."""

    mbit: list[float] = field(default_factory=list)
    receiver_cpu: list[float] = field(default_factory=list)  # s per GiB
    sender_cpu: list[float] = field(default_factory=list)
    chunks_mbit: list[float] = field(default_factory=list)  # the rate until every chunk is in
    tail_s: list[float] = field(default_factory=list)

    def add_phases(self, pull: Pull, size: int) -> None:
        if pull.chunks_s is not None and pull.tail_s is not None:
            self.chunks_mbit.append(_mbit(size, pull.chunks_s))
            self.tail_s.append(pull.tail_s)


@dataclass
class Figures:
    raw: Arm = field(default_factory=Arm)
    cold: Arm = field(default_factory=Arm)
    warm: Arm = field(default_factory=Arm)
    three: Arm = field(default_factory=Arm)
    three_sources: list[int] = field(default_factory=list)
    sequential_s: list[float] = field(default_factory=list)
    single_s: list[float] = field(default_factory=list)  # each pull of the sequential runs
    at_once_s: list[float] = field(default_factory=list)
    at_once_sources: list[int] = field(default_factory=list)
    at_once_cores: list[float] = field(default_factory=list)  # the four nodes' CPU / wall
    stagger_s: list[float] = field(default_factory=list)  # last start - first, at once
    others_cores: float | None = None  # CPU the rest of the machine used meanwhile


class Agent:
    """`_transfer_agent.py` in a host: one JSON command out, one JSON answer back."""

    def __init__(self, lan: Lan, host: Host) -> None:
        self.host = host
        self.process = lan.run(host, [sys.executable, str(AGENT)], pipes=True)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout_s: float = PULL_TIMEOUT_S + 30) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError(f"the agent on {self.host.name} said nothing in {timeout_s} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent on {self.host.name} exited")
        answer = dict(json.loads(line))
        if "error" in answer:
            raise RuntimeError(f"on {self.host.name}: {answer['error']}")
        return answer

    def call(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.receive()

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Cluster:
    lan: Lan
    home: Path
    hosts: dict[str, Host]
    nodes: dict[str, subprocess.Popen[bytes]]
    agents: dict[str, Agent]

    def cpu_s(self, *names: str) -> float:
        """CPU seconds so far of the named nodes' processes."""
        return sum(_cpu_s(self.nodes[name].pid) for name in names)

    def logs(self) -> str:
        tails = []
        for name in self.nodes:
            log = self.home / name / "node.log"
            if log.exists():
                tails.append(f"--- {name} (tail) ---\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(tails)


# -- files and stores --------------------------------------------------------------------


def _model_file(folder: Path, tag: str, head: bytes, body: bytes, size: int) -> ModelFile:
    """A GGUF of exactly `size` bytes: `head` (a header, then bytes of this file's own),
    then the random `body` every file shares, shifted by the head's length."""
    data = head + body[: size - len(head)]
    path = folder / f"{tag}.gguf"
    path.write_bytes(data)
    return ModelFile(tag, path, hashlib.sha256(data).hexdigest(), size)


def _files(folder: Path, plan: Plan) -> Files:
    folder.mkdir()
    header = tiny_gguf(folder / "header.gguf").read_bytes()
    size = plan.size_mib * MiB
    body = os.urandom(size)  # shared: generating 27 × size random bytes took 47 s here
    count = iter(range(1, 1_000_000))

    def make(tag: str) -> ModelFile:
        # Own bytes of a length no other file has: every chunk differs from file to file.
        own = os.urandom(MiB // 2 + 4096 * next(count))
        return _model_file(folder, tag, header + own, body, size)

    rounds, star = range(plan.rounds), range(plan.star_rounds)
    return Files(
        cold=[make(f"a{r}") for r in rounds],
        warm=[make(f"w{r}") for r in rounds],
        three=[make(f"c{r}") for r in rounds],
        sequential=[[make(f"b{r}-{i}") for i in (1, 2, 3)] for r in star],
        shared=[make(f"s{r}") for r in star],
    )


def _place(store: Path, model: ModelFile) -> None:
    """`model` in a Hugging Face store, as `huggingface_hub` lays it out (a hard link)."""
    repo = store / f"models--shoal-bench--transfer-{model.tag}"
    revision = "0" * 40
    blob = repo / "blobs" / model.sha256
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.link(model.path, blob)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    entry = snapshot / f"transfer-{model.tag}-Q4_K_M.gguf"
    entry.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@contextlib.contextmanager
def _without_shoal_environment() -> Iterator[None]:
    """No SHOAL_* variables for the block: Lan.run passes this process's environment on."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("SHOAL_")]:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _scratch(needed: int) -> Iterator[Path]:
    """A temporary folder on tmpfs if it has room for `needed` bytes, else in TMPDIR."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed else None
    with tempfile.TemporaryDirectory(prefix="shoal-bench-transfer-", dir=base) as tmp:
        yield Path(tmp)


# -- nodes -------------------------------------------------------------------------------


def _start_node(lan: Lan, host: Host, home: Path, secret: str) -> subprocess.Popen[bytes]:
    data = home / "data"
    write_secret(data, secret)  # where `shoal join --token` puts it
    config = home / "config.toml"
    store = home / "hub"
    config.write_text(
        f'[models]\nstore = "{store}"\nadopt_ollama = false\nadopt_lmstudio = false\n'
    )
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "share"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }
    argv = [
        sys.executable, "-m", "shoal", "serve", "--lan", "--port", str(PORT),
        "--name", host.name, "--data-dir", str(data), "--no-detect", "--no-embedded",
        "--config", str(config),
    ]  # fmt: skip
    return lan.run(host, argv, env=env, log=home / "node.log")


def _peers(agent: Agent) -> Any:
    answer = agent.call(op="get", url=f"http://127.0.0.1:{PORT}/shoal/v1/peers")
    return answer["body"] if answer["status"] == 200 else None


def _wait_peers(agent: Agent, want: dict[str, str | None], timeout_s: float = 60) -> None:
    """Until the node beside `agent` sees each of `want` healthy, advertising its model
    (a None model: until it no longer sees that peer healthy)."""
    deadline = time.monotonic() + timeout_s
    last: object = "no answer"
    while time.monotonic() < deadline:
        try:
            document = _peers(agent)
        except RuntimeError as exc:  # not listening yet
            last = exc
            document = None
        if document is not None:
            last = document
            if all(
                (peer in healthy_peers(document, model)) == (model is not None)
                for peer, model in want.items()
            ):
                return
        time.sleep(0.1)
    text = json.dumps(last, default=str)[:2000]
    raise RuntimeError(f"{agent.host.name}: no {want} within {timeout_s} s; last: {text}")


def _limit(lan: Lan, host: Host, on: bool = True) -> None:
    """The host's upload cap: tbf on its eth0, inside its namespace (off: none)."""
    tc = ["tc", "qdisc", "replace" if on else "del", "dev", host.ifname, "root"]
    if on:
        tc += ["tbf", "rate", f"{RATE_MBIT}mbit", "burst", BURST, "latency", LATENCY]
    lan.exec(host, tc)


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


# -- one measurement each ----------------------------------------------------------------


def _mbit(size: int, seconds: float) -> float:
    return size * 8 / 1e6 / seconds


def _phases(answer: dict[str, Any]) -> tuple[float | None, float | None]:
    """(seconds until every chunk was in, seconds from then to the success line), from
    the progress lines: the "verifying" line is sent when the last chunk is written."""
    started, ended = float(answer["started"]), float(answer["ended"])
    verifying = [t for t, status, _ in answer["progress"] if status == "verifying"]
    if not verifying:
        return None, None
    return verifying[0] - started, ended - verifying[0]


def _pulled(answer: dict[str, Any], model: ModelFile) -> Pull:
    last = answer["last"]
    if last.get("status") != "success" or last.get("downloaded_bytes") != model.size:
        raise RuntimeError(f"the pull of {model.name} did not end well: {last}")
    started, ended = float(answer["started"]), float(answer["ended"])
    chunks, tail = _phases(answer)
    return Pull(ended - started, started, ended, int(answer["sources"]), chunks, tail)


def _pull(agent: Agent, model: ModelFile) -> Pull:
    url = f"http://127.0.0.1:{PORT}"
    answer = agent.call(op="pull", url=url, model=model.name, timeout=PULL_TIMEOUT_S)
    return _pulled(answer, model)


def _measured_pull(cluster: Cluster, arm: Arm, puller: str, model: ModelFile) -> Pull:
    """A pull by `puller`, with the CPU it and s1 (a source of every file) spent on it."""
    before = cluster.cpu_s("s1"), cluster.cpu_s(puller)
    pull = _pull(cluster.agents[puller], model)
    per_gib = GiB / model.size
    arm.sender_cpu.append((cluster.cpu_s("s1") - before[0]) * per_gib)
    arm.receiver_cpu.append((cluster.cpu_s(puller) - before[1]) * per_gib)
    arm.mbit.append(_mbit(model.size, pull.seconds))
    arm.add_phases(pull, model.size)
    return pull


def _raw_copy(cluster: Cluster, arm: Arm, model: ModelFile) -> None:
    """`model`'s bytes over plain TCP, s1's link to a file on p1, with both ends' CPU."""
    sender, receiver = cluster.agents["s1"], cluster.agents["p1"]
    before = _cpu_s(sender.process.pid), _cpu_s(receiver.process.pid)
    sender.call(op="serve_raw", path=str(model.path), port=RAW_PORT)
    out = str(cluster.home / "raw-copy")
    answer = receiver.call(op="recv_raw", host=sender.host.ip, port=RAW_PORT, out=out)
    if answer["bytes"] != model.size:
        raise RuntimeError(f"the raw copy moved {answer['bytes']} of {model.size} bytes")
    per_gib = GiB / model.size
    arm.sender_cpu.append((_cpu_s(sender.process.pid) - before[0]) * per_gib)
    arm.receiver_cpu.append((_cpu_s(receiver.process.pid) - before[1]) * per_gib)
    arm.mbit.append(_mbit(model.size, float(answer["ended"]) - float(answer["started"])))


def _at_once(cluster: Cluster, f: Figures, model: ModelFile) -> None:
    pullers = [cluster.agents[name] for name in ("p1", "p2", "p3")]
    nodes = ("s1", "p1", "p2", "p3")
    before = cluster.cpu_s(*nodes)
    url = f"http://127.0.0.1:{PORT}"
    for agent in pullers:
        agent.send(op="pull", url=url, model=model.name, timeout=PULL_TIMEOUT_S)
    pulls = [_pulled(agent.receive(), model) for agent in pullers]
    wall = max(p.ended for p in pulls) - min(p.started for p in pulls)
    f.at_once_s.append(wall)
    f.at_once_cores.append((cluster.cpu_s(*nodes) - before) / wall)
    f.at_once_sources.extend(p.sources for p in pulls)
    f.stagger_s.append(max(p.started for p in pulls) - min(p.started for p in pulls))


# -- the scenario --------------------------------------------------------------------------


def _not_measured(quick: bool, reason: str) -> Result:
    rows = [
        Row(
            "(a) pull rate, one source",
            "Mbit/s",
            "raw TCP copy, same link",
            [],
            [],
            bound=Bound("ratio", ">=", 0.9),
            missing=reason,
        )
    ]
    return Result(NAME, TITLE, command(NAME, quick), rows, [f"not measured: {reason}"])


def run(quick: bool) -> Result:
    plan = QUICK if quick else FULL
    reason = netns_available()
    if reason is not None:
        return _not_measured(quick, reason)
    needed = 2 * 27 * plan.size_mib * MiB  # every file, and a pulled copy of each
    with _scratch(needed) as home, _without_shoal_environment(), Lan() as lan:
        hosts = {name: lan.add_host(name) for name in HOSTS}
        try:
            for host in hosts.values():
                _limit(lan, host)
        except subprocess.CalledProcessError as exc:
            return _not_measured(quick, f"no tc tbf here (the kernel's sch_tbf?): {exc}")
        made = time.monotonic()
        files = _files(home / "files", plan)
        made = time.monotonic() - made
        for model in files.every():
            _place(home / "s1" / "hub", model)
        for model in files.three:
            for holder in ("p2", "p3"):
                _place(home / holder / "hub", model)
        secret = new_secret()
        cluster = Cluster(
            lan,
            home,
            hosts,
            {name: _start_node(lan, host, home / name, secret) for name, host in hosts.items()},
            {name: Agent(lan, host) for name, host in hosts.items()},
        )
        try:
            setup = _setup(cluster, files)
            figures = _rounds(cluster, plan, files)
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            for agent in cluster.agents.values():
                agent.close()
    medium = "tmpfs" if str(home).startswith("/dev/shm") else "disk"
    notes = [
        f"files of {plan.size_mib} MiB (a GGUF header, then random bytes), each pulled once "
        f"by a puller that never had it; {plan.rounds} rounds of (a) and (c), "
        f"{plan.star_rounds} of (b); every host's upload capped at {RATE_MBIT} Mbit/s (tc tbf, "
        f"burst {BURST}, latency {LATENCY}); stores on {medium}; "
        "5 nodes on a 2-core machine, nothing pinned",
        f"setup: {made:.1f} s writing {len(files.every())} files; {setup}",
        *_notes(figures, plan.size_mib * MiB),
    ]
    return _result(quick, figures, notes)


def _setup(cluster: Cluster, files: Files) -> str:
    """Wait until every puller sees its sources; warm s1 up through w, then stop w."""
    started = time.monotonic()
    agents = cluster.agents
    _wait_peers(agents["p1"], {"s1": files.cold[0].name, "p2": files.three[0].name,
                               "p3": files.three[0].name})  # fmt: skip
    for name in ("p2", "p3", "w"):
        _wait_peers(agents[name], {"s1": files.cold[0].name})
    ready = time.monotonic() - started
    # s1 hashes a file before it first serves it: w takes that first serve of the warm
    # files, with s1's cap lifted for it (it is not measured), then leaves the LAN.
    warmed = time.monotonic()
    _limit(cluster.lan, cluster.hosts["s1"], on=False)
    for model in [*files.warm, *files.three]:  # the latter from s1, p2 and p3 at once
        _pull(agents["w"], model)
    _limit(cluster.lan, cluster.hosts["s1"])
    cluster.lan.stop(cluster.nodes["w"])
    for name in ("p1", "p2", "p3"):
        _wait_peers(agents[name], {"w": None})
    warmed = time.monotonic() - warmed
    return (
        f"{ready:.1f} s from the nodes' start to every puller seeing its sources (mDNS, the "
        f"cluster secret), {warmed:.1f} s for w to take the first serve of the files of (a) "
        "'served before' and of (c), then leave"
    )


def _rounds(cluster: Cluster, plan: Plan, files: Files) -> Figures:
    f = Figures()
    running = [p for p in cluster.nodes.values() if p.poll() is None]
    running += [a.process for a in cluster.agents.values() if a.process.poll() is None]
    alive = [psutil.Process(), *(psutil.Process(p.pid) for p in running)]
    began, busy = time.monotonic(), _busy_s()
    ours_before = sum(_cpu_s(p.pid) for p in alive)
    for r in range(plan.rounds):
        steps = ["raw", "cold", "warm"]
        for step in steps[r % 3 :] + steps[: r % 3]:
            if step == "raw":
                _raw_copy(cluster, f.raw, files.cold[r])
            else:
                model = files.cold[r] if step == "cold" else files.warm[r]
                _measured_pull(cluster, f.cold if step == "cold" else f.warm, "p1", model)
        f.three_sources.append(_measured_pull(cluster, f.three, "p1", files.three[r]).sources)
        if r < plan.star_rounds:
            singles = [
                _pull(cluster.agents[name], model)
                for name, model in zip(("p1", "p2", "p3"), files.sequential[r], strict=True)
            ]
            f.single_s.extend(p.seconds for p in singles)
            f.sequential_s.append(sum(p.seconds for p in singles))
            _at_once(cluster, f, files.shared[r])
    elapsed = time.monotonic() - began
    ours_spent = sum(_cpu_s(p.pid) for p in alive) - ours_before
    f.others_cores = max(0.0, (_busy_s() - busy - ours_spent) / elapsed)
    return f


def _notes(f: Figures, size: int) -> list[str]:
    fanned = max(f.at_once_sources, default=0)
    raw_s = [size * 8 / 1e6 / mbit for mbit in f.raw.mbit]
    return [
        "raw copy: sendfile(2) on s1, recv into a file on p1 (1 MiB reads, no hashing, no "
        "fsync); a pull: POST /shoal/v1/models/pull on p1 until its success line",
        "CPU: user + system seconds of the whole node process (or of the raw copy's agent "
        "process) per GiB moved; the seed's first serve includes hashing the whole file",
        f"(a) after the last chunk (fsync, the whole file's SHA-256, rename, catalog refresh, "
        f"the answer): {spread(f.cold.tail_s)} s (first serve), {spread(f.warm.tail_s)} s "
        f"(served before); a raw copy of the file takes {spread(raw_s)} s",
        f"(b) a single pull: {spread(f.single_s)} s; the three at once began within "
        f"{spread(f.stagger_s)} s of each other and kept {spread(f.at_once_cores)} cores busy "
        f"(the 4 nodes); sources a puller reported at once: max {fanned} "
        + (
            "(pullers served each other the chunks they had: a swarm)"
            if fanned > 1
            else "(the seed only: pullers did not serve the chunks they had)"
        ),
        f"(c) sources reported: {sorted(set(f.three_sources))}; the uploads allow "
        f"{3 * RATE_MBIT} Mbit/s; p1's CPU {spread(f.three.receiver_cpu)} s per GiB",
        "the rest of the machine (other work) used "
        + (f"{f.others_cores:.2f} cores" if f.others_cores is not None else "?")
        + " on average while this scenario measured",
    ]


def _result(quick: bool, f: Figures, notes: list[str]) -> Result:
    raw = ("raw TCP copy, same link", f.raw.mbit)
    rows = [
        Row("(a) pull rate, one source, its first serve", "Mbit/s", *raw, f.cold.mbit,
            bound=Bound("ratio", ">=", 0.9), target="DESIGN §11, hashing included"),
        Row("(a) pull rate, one source, served before", "Mbit/s", *raw, f.warm.mbit,
            bound=Bound("ratio", ">=", 0.9), target="DESIGN §11, hashing included"),
        Row("(a) pull rate until the last chunk is in, first serve", "Mbit/s", *raw,
            f.cold.chunks_mbit, missing="" if f.cold.chunks_mbit else "no verifying line"),
        Row("(a) pull rate until the last chunk is in, served before", "Mbit/s", *raw,
            f.warm.chunks_mbit, missing="" if f.warm.chunks_mbit else "no verifying line"),
        Row("(a) puller CPU per GiB", "s", "raw receiver", f.raw.receiver_cpu,
            f.warm.receiver_cpu, higher_is_better=False),
        Row("(a) seed CPU per GiB, its first serve", "s", "raw sender (sendfile)",
            f.raw.sender_cpu, f.cold.sender_cpu, higher_is_better=False),
        Row("(a) seed CPU per GiB, served before", "s", "raw sender (sendfile)",
            f.raw.sender_cpu, f.warm.sender_cpu, higher_is_better=False),
        Row("(b) 3 pullers, 1 seed: at once", "s", "one after the other (sum)",
            f.sequential_s, f.at_once_s, higher_is_better=False),
        Row("(b) 3 pullers, 1 seed: at once vs one pull", "s", "a single pull",
            [statistics.median(f.single_s)] if f.single_s else [], f.at_once_s,
            higher_is_better=False, bound=Bound("ratio", "<=", 1.5),
            target="DESIGN §11 (a swarm, not a star)"),
        Row("(c) pull rate, three sources", "Mbit/s", "one source (a, served before)",
            f.warm.mbit, f.three.mbit),
    ]  # fmt: skip
    return Result(NAME, TITLE, command(NAME, quick), rows, notes)


if __name__ == "__main__":  # pragma: no cover - handy when debugging the LAN by hand
    subprocess.run([sys.executable, "-m", "bench", NAME, "--quick"], check=False)
