"""The idle cost of a big cluster: N nodes on one namespace LAN (DESIGN §11, issue 13 #6).

N real `shoal serve --lan` nodes with no engine (`--no-embedded --no-detect`, no
backend), one per host of a namespace LAN (tests/netns/lan.py), all holding one cluster
secret (cluster mode "secret"). A probe on one more host
(bench/scenarios/_cluster_probe.py) polls every node's GET /shoal/v1/peers.

Per N:
- together: N-1 nodes are started together (spawned back to back) and the time from the
  last spawn until every one lists the N-2 others healthy is reported, given up after
  together_timeout_s(N). On this 2-core machine that figure is mostly the machine: each
  start costs about 1.4 s of CPU (imports, keys), N of them at once queue for 2 cores,
  as do the N² pairing handshakes; on a LAN every node has its own CPU;
- convergence (DESIGN §11's figure): then the N-th node is started, a new machine with
  the cluster secret, and the time from its spawn until every node lists all N-1 others
  healthy is reported; given up after CONVERGE_TIMEOUT_S (then reported, with how many
  nodes had converged). It includes the node's own start (about 1.4 s of CPU);
- idle CPU: once converged (or given up), the probe stops asking, and each node's CPU
  time is read from /proc/<pid>/stat over the window: % of one core per node, median
  and max; the machine's total busy time (/proc/stat) over the same window, in % of one
  core (200 % = both cores of this machine). The N-th node is new to every peer in this
  window (5 s heartbeats), the others are new to each other unless the together phase
  took more than a minute; ESTABLISHED_AFTER_S later, every peer is established (15 s
  heartbeats) and a second window is measured (full mode).

The kernel's neighbour (ARP) table is shared by every namespace, 1024 entries by default,
and a full mesh of N nodes needs about N² of them: gc_thresh1/2/3 are raised for the run
and restored after. Needs root and iproute2; without them the scenario says so and
measures nothing. `SHOAL_BENCH_IDLE_NODES=20,50,100` overrides the sizes;
`SHOAL_BENCH_IDLE_PROFILE=<dir>` runs `py-spy record` on one node during each window (and
on the N-th node from its start until convergence).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Bound, Result, Row
from bench.processes import ROOT
from bench.scenarios._common import command
from shoal.trust.keys import KeyStore
from shoal.trust.secret import new_secret, write_secret
from tests.netns.lan import Host, Lan, netns_available

NAME = "cluster_idle"
TITLE = "The idle cost of a big cluster: N nodes on a namespace LAN (no engine)"
PORT = 11450
PROBE = Path(__file__).with_name("_cluster_probe.py")
CONVERGE_TIMEOUT_S = 30.0  # from the last start; a cluster that takes longer is reported
ESTABLISHED_AFTER_S = 65.0  # after convergence: peers heartbeat every 15 s, not 5 s
SETTLE_S = 2.0  # after convergence, before the CPU window (the last pushes land)
CONVERGE_TARGET_S = 3.0  # DESIGN §11: 100 nodes see each other ≤ 3 s after the last start
IDLE_TARGET_PCT = 0.5  # DESIGN §11: ≤ 0.5 % of a core per node, idle
NEIGH = Path("/proc/sys/net/ipv4/neigh/default")
TICKS = os.sysconf("SC_CLK_TCK")


def together_timeout_s(nodes: int) -> float:
    """How long N nodes started at once get to converge: about 1.4 s of CPU each to
    start, on 2 cores, and the pairing after it; bounded so a run stays bounded."""
    return 30.0 + 1.5 * nodes


@dataclass
class Figures:
    nodes: int
    # N-1 nodes started together: last spawn → each sees the others; None: gave up.
    together_s: float | None
    together_converged: int
    converge_s: float | None  # last start → every node sees every other; None: gave up
    last_node_cpu_s: float  # the N-th node's CPU from its spawn to convergence
    per_node_converge_s: list[float]  # of the nodes that converged
    converged: int  # how many nodes saw all the others within the timeout
    node_cpu_pct: list[float]  # each node's idle CPU over the window, % of one core
    machine_pct: float  # the whole machine's busy time over the window, % of one core
    window_s: float
    stable: int  # nodes still listing every other healthy after the window
    errors: list[str]
    # The same figures (node CPU, machine, window) once peers are established (15 s
    # heartbeats), in full mode; None if not measured.
    established: tuple[list[float], float, float] | None = None


@contextlib.contextmanager
def neighbour_table(nodes: int) -> Iterator[None]:
    """Raise the shared ARP table's gc thresholds above what an N-node mesh needs; put
    the old values back afterwards, whatever happened."""
    names = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
    old = {name: int((NEIGH / name).read_text()) for name in names}
    need = (nodes + 2) ** 2
    new = {"gc_thresh1": need, "gc_thresh2": 2 * need, "gc_thresh3": 4 * need}
    try:
        for name in names:  # raised in order 3, 2, 1 would also do: 1 ≤ 2 ≤ 3 holds
            (NEIGH / name).write_text(str(max(old[name], new[name])))
        yield
    finally:
        for name in reversed(names):
            (NEIGH / name).write_text(str(old[name]))


def _process_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def _machine_busy_ticks() -> int:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def _serve(name: str, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "shoal", "serve", "--lan", "--port", str(PORT),
        "--name", name, "--data-dir", str(data_dir), "--no-detect", "--no-embedded",
    ]  # fmt: skip


def measure(
    nodes: int, window_s: float, home: Path, profile: Path | None, established: bool
) -> Figures:
    secret = new_secret()
    with neighbour_table(nodes), Lan() as lan:
        hosts = [lan.add_host(f"n{i}") for i in range(1, nodes + 1)]
        probe_host = lan.add_host("probe")
        specs: list[dict[str, str]] = []
        for host in hosts:
            data_dir = home / host.name / "data"
            write_secret(data_dir, secret)  # as `shoal join --token` leaves it
            key = KeyStore.in_data_dir(data_dir).create("bench")[1]
            specs.append({"name": host.name, "url": f"http://{host.ip}:{PORT}", "key": key})
        probe = lan.run(probe_host, [sys.executable, str(PROBE)], pipes=True)
        assert probe.stdin is not None and probe.stdout is not None

        def ask(message: dict[str, object]) -> dict[str, object]:
            assert probe.stdin is not None and probe.stdout is not None
            probe.stdin.write(json.dumps(message).encode() + b"\n")
            probe.stdin.flush()
            line = probe.stdout.readline()
            if not line:
                raise RuntimeError("the probe in the LAN exited")
            return dict(json.loads(line))

        env = {
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            "SHOAL_LOG_LEVEL": "warning",
            "SHOAL_CLUSTER__MODE": "secret",
        }

        def spawn(host: Host) -> subprocess.Popen[bytes]:
            node_home = home / host.name
            node_env = {**env, "XDG_CONFIG_HOME": str(node_home / "config")}
            argv = _serve(host.name, node_home / "data")
            return lan.run(host, argv, env=node_env, log=node_home / "node.log")

        processes = [spawn(host) for host in hosts[:-1]]  # together: back to back
        together_start = time.monotonic()
        answer = ask({"nodes": specs[:-1], "timeout": together_timeout_s(nodes)})
        together = [float(v) - together_start for v in dict(answer["at"]).values() if v]  # type: ignore[call-overload]
        together_s = max(together) if len(together) == nodes - 1 else None

        processes.append(spawn(hosts[-1]))  # the last start
        last_start = time.monotonic()
        spy = _profile(processes[-1].pid, CONVERGE_TIMEOUT_S, profile, f"start-{nodes}")
        answer = ask({"nodes": specs, "timeout": CONVERGE_TIMEOUT_S})
        last_node_cpu_s = _process_ticks(processes[-1].pid) / TICKS
        _stop_profile(spy)
        at = {str(k): v for k, v in dict(answer["at"]).items()}  # type: ignore[call-overload]
        reached = [float(v) - last_start for v in at.values() if v is not None]
        converged = len(reached)
        converge_s = max(reached) if converged == nodes else None
        reached_at = time.monotonic()
        last_errors = dict(answer["errors"])  # type: ignore[call-overload]
        errors = [f"{k}: {v}" for k, v in last_errors.items() if at.get(str(k)) is None][:3]
        time.sleep(SETTLE_S)
        spy = _profile(processes[0].pid, window_s, profile, f"new-{nodes}")
        cpu, machine, elapsed = _cpu_window(processes, window_s)
        _reap(spy)
        late: tuple[list[float], float, float] | None = None
        if established and converge_s is not None:
            # Membership calls a peer established after a minute alive without a miss.
            time.sleep(max(0.0, reached_at + ESTABLISHED_AFTER_S - time.monotonic()))
            spy = _profile(processes[0].pid, window_s, profile, f"established-{nodes}")
            late = _cpu_window(processes, window_s)
            _reap(spy)
        counts = dict(ask({"check": specs})["healthy"])  # type: ignore[call-overload]
        stable = sum(1 for c in counts.values() if c == nodes - 1)
        if len(cpu) < nodes:
            errors.append(f"{nodes - len(cpu)} node(s) exited; see their node.log")
        probe.stdin.close()
    return Figures(
        nodes,
        together_s,
        len(together),
        converge_s,
        last_node_cpu_s,
        reached,
        converged,
        cpu,
        machine,
        elapsed,
        stable,
        errors,
        late,
    )


def _cpu_window(
    processes: list[subprocess.Popen[bytes]], window_s: float
) -> tuple[list[float], float, float]:
    """Each running node's CPU and the machine's busy time over `window_s`, in % of one
    core, and the window's real length."""
    alive = [p for p in processes if p.poll() is None]
    before = {p.pid: _process_ticks(p.pid) for p in alive}
    machine_before, started = _machine_busy_ticks(), time.monotonic()
    time.sleep(window_s)
    after = {p.pid: _process_ticks(p.pid) for p in alive if p.poll() is None}
    machine_after, elapsed = _machine_busy_ticks(), time.monotonic() - started
    cpu = [100 * (after[pid] - before[pid]) / TICKS / elapsed for pid in after]
    return cpu, 100 * (machine_after - machine_before) / TICKS / elapsed, elapsed


def _profile(
    pid: int, window_s: float, profile: Path | None, label: str
) -> subprocess.Popen[bytes] | None:
    """`py-spy record` on one node for the window (raw, collapsed stacks), if asked."""
    spy = Path(sys.executable).parent / "py-spy"
    if profile is None or not spy.exists():
        return None
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(spy), "record", "--pid", str(pid), "--duration", str(int(window_s)),
            "--rate", "200", "--format", "raw", "--output", str(profile / f"{label}.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    """End a `py-spy record` early (it writes what it has on SIGINT)."""
    if spy is not None and spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    _reap(spy)


def _reap(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def _sizes(quick: bool) -> list[int]:
    override = os.environ.get("SHOAL_BENCH_IDLE_NODES", "")
    if override:
        return [int(n) for n in override.split(",")]
    return [5] if quick else [20, 50, 100]


def _rows(f: Figures) -> list[Row]:
    n = f.nodes
    gave_up = (
        ""
        if f.converge_s is not None
        else f"not converged in {CONVERGE_TIMEOUT_S:g} s ({f.converged}/{n} nodes saw all)"
    )
    rows = [
        Row(
            f"N={n}: {n - 1} started together → each sees the others",
            "s",
            "",
            [],
            [] if f.together_s is None else [f.together_s],
            higher_is_better=False,
            missing=""
            if f.together_s is not None
            else f"not converged in {together_timeout_s(n):g} s "
            f"({f.together_converged}/{n - 1} nodes saw all)",
        ),
        Row(
            f"N={n}: the N-th node's CPU, start to converged",
            "s",
            "",
            [],
            [f.last_node_cpu_s],
            higher_is_better=False,
        ),
        Row(
            f"N={n}: last start → every node sees all others",
            "s",
            "",
            [],
            [] if f.converge_s is None else [f.converge_s],
            higher_is_better=False,
            bound=Bound("value", "<=", CONVERGE_TARGET_S),
            target="DESIGN §11 (at N=100)",
            missing=gave_up,
        ),
        Row(
            f"N={n}: idle CPU per node (spread over nodes)",
            "% of a core",
            "",
            [],
            f.node_cpu_pct,
            higher_is_better=False,
            bound=Bound("value", "<=", IDLE_TARGET_PCT),
            target="DESIGN §11, median over nodes",
        ),
        Row(
            f"N={n}: idle CPU, the busiest node",
            "% of a core",
            "",
            [],
            [max(f.node_cpu_pct)] if f.node_cpu_pct else [],
            higher_is_better=False,
            bound=Bound("value", "<=", IDLE_TARGET_PCT),
            missing="" if f.node_cpu_pct else "no node was running",
        ),
        Row(
            f"N={n}: the machine's total, idle cluster",
            "% of a core",
            "",
            [],
            [f.machine_pct],
            higher_is_better=False,
        ),
    ]
    if f.established is not None:
        cpu, machine, _ = f.established
        rows += [
            Row(
                f"N={n}: idle CPU per node, peers established (15 s beats)",
                "% of a core",
                "",
                [],
                cpu,
                higher_is_better=False,
                bound=Bound("value", "<=", IDLE_TARGET_PCT),
                target="DESIGN §11, median over nodes",
            ),
            Row(
                f"N={n}: idle CPU, the busiest node, peers established",
                "% of a core",
                "",
                [],
                [max(cpu)] if cpu else [],
                higher_is_better=False,
                bound=Bound("value", "<=", IDLE_TARGET_PCT),
            ),
            Row(
                f"N={n}: the machine's total, peers established",
                "% of a core",
                "",
                [],
                [machine],
                higher_is_better=False,
            ),
        ]
    return rows


def _notes(f: Figures) -> list[str]:
    together = "n/a" if f.together_s is None else f"{f.together_s:.1f} s"
    notes = [
        f"N={f.nodes}: {f.nodes - 1} started together converged in {together} "
        f"({f.together_converged}/{f.nodes - 1}); then the last start: "
        f"{f.converged}/{f.nodes} converged"
        + (
            f" (per node: median {statistics.median(f.per_node_converge_s):.2f} s)"
            if f.per_node_converge_s
            else ""
        )
        + f"; CPU over {f.window_s:.1f} s: median "
        + (
            f"{statistics.median(f.node_cpu_pct):.2f} %, max {max(f.node_cpu_pct):.2f} %"
            if f.node_cpu_pct
            else "n/a"
        )
        + f" per node, machine {f.machine_pct:.1f} % of a core; {f.stable}/{f.nodes} still "
        "saw all others after the window",
    ]
    if f.established is not None and f.established[0]:
        cpu, machine, window = f.established
        notes.append(
            f"N={f.nodes}, peers established ({ESTABLISHED_AFTER_S:g} s after convergence), "
            f"CPU over {window:.1f} s: median {statistics.median(cpu):.2f} %, max "
            f"{max(cpu):.2f} % per node, machine {machine:.1f} % of a core"
        )
    if f.errors:
        notes.append(f"N={f.nodes}: {f.errors}")
    return notes


def run(quick: bool) -> Result:
    sizes = _sizes(quick)
    reason = netns_available()
    if reason is not None:
        empty = [Row("last start → every node sees all others", "s", "", [], [], missing=reason)]
        return Result(NAME, TITLE, command(NAME, quick), empty, [f"not measured: {reason}"])
    window_s = 10.0 if quick else 25.0
    profile_dir = os.environ.get("SHOAL_BENCH_IDLE_PROFILE")
    rows: list[Row] = []
    notes = [
        f"sizes {sizes}; nodes `--no-embedded --no-detect`, no backend, cluster mode secret, "
        f"one host each; N-1 started together, then the N-th (the last start); "
        f"convergence polled from one more host (every node in turn, 50 ms between "
        f"rounds), given up after {CONVERGE_TIMEOUT_S:g} s from the last start; "
        f"CPU window {window_s:g} s, {SETTLE_S:g} s after convergence, probe silent; "
        "the last node is new to its peers then (5 s heartbeats)",
    ]
    saved = dict(os.environ)
    try:
        # Lan.run hands this process's environment on: no SHOAL_* from the caller's shell.
        for key in [k for k in os.environ if k.startswith("SHOAL_")]:
            del os.environ[key]
        for nodes in sizes:
            with tempfile.TemporaryDirectory(prefix=f"shoal-bench-idle-{nodes}-") as tmp:
                profile = Path(profile_dir) if profile_dir else None
                figures = measure(nodes, window_s, Path(tmp), profile, not quick)
            rows += _rows(figures)
            notes += _notes(figures)
            print("\n".join(_notes(figures)), flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(NAME, TITLE, command(NAME, quick), rows, notes)


if __name__ == "__main__":  # pragma: no cover - handy when debugging the LAN by hand
    subprocess.run([sys.executable, "-m", "bench", NAME, "--quick"], check=False)
