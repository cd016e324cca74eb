"""Discovery: node start → routable from a peer, on a LAN of namespaces with real mDNS.

A LAN of three hosts built from Linux network namespaces (tests/netns/lan.py): `a`
runs the fake backend and, in each trial, a freshly started node with a new identity;
`b` runs a node that stays up; `c` runs a probe (bench/scenarios/_netns_probe.py) that
polls both nodes every 20 ms. Nothing is configured but `--lan`: no static peers.

Per trial, from the moment the `shoal serve` process of a new node is spawned:
- baseline: until the new node itself lists the model (it is up and has probed its
  backend: the floor, with no network discovery in it);
- Shoal: until `b` lists the model *and* answers a chat completion for it (routable
  from a peer, found by mDNS alone).
The new node is then stopped (SIGTERM) and the next trial waits until `b` has dropped
it. Needs root and iproute2; without them the scenario says so and measures nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Bound, Result, Row
from bench.processes import ROOT
from bench.scenarios._common import MODEL, command
from tests.netns.lan import Host, Lan, netns_available

NAME = "discovery"
TITLE = "Discovery: node start → routable from a peer (namespace LAN, real mDNS)"
PORT = 11450
BACKEND_PORT = 18090
PROBE = Path(__file__).with_name("_netns_probe.py")


class Probe:
    def __init__(self, lan: Lan, host: Host) -> None:
        self.process = lan.run(host, [sys.executable, str(PROBE)], pipes=True)

    def send(self, url: str, **condition: object) -> None:
        assert self.process.stdin is not None
        line = json.dumps({"url": url, **condition}) + "\n"
        self.process.stdin.write(line.encode())
        self.process.stdin.flush()

    def answer(self) -> dict[str, object]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the probe in the LAN exited")
        return dict(json.loads(line))

    def wait(self, url: str, **condition: object) -> float | None:
        self.send(url, **condition)
        at = self.answer()["at"]
        return None if at is None else float(str(at))


def _node_env(home: Path) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "SHOAL_LOG_LEVEL": "info",
        # Trust (pairing) is the LAN default once built; this measures discovery alone.
        "SHOAL_CLUSTER__MODE": "open",
    }


def _serve(name: str, home: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shoal",
        "serve",
        "--lan",
        "--port",
        str(PORT),
        "--name",
        name,
        "--data-dir",
        str(home / "data"),
        "--no-detect",
        "--no-embedded",
        *extra,
    ]


def run(quick: bool) -> Result:
    trials = 3 if quick else 20
    reason = netns_available()
    if reason is not None:
        rows = [
            Row(
                "node start → routable from a peer",
                "s",
                "node start → serving locally",
                [],
                [],
                higher_is_better=False,
                compare="added",
                missing=reason,
            )
        ]
        return Result(NAME, TITLE, command(NAME, quick), rows, [f"not measured: {reason}"])
    local: list[float] = []
    routable: list[float] = []
    failures: list[str] = []
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-discovery-") as tmp, Lan() as lan:
        home = Path(tmp)
        os.environ.clear()  # Lan.run passes this process's environment on: no SHOAL_* in it
        os.environ.update(clean)
        ha, hb, hc = lan.add_host("a"), lan.add_host("b"), lan.add_host("c")
        lan.run(
            ha,
            [
                sys.executable,
                "-m",
                "bench.fake_backend",
                "--port",
                str(BACKEND_PORT),
                "--models",
                MODEL,
            ],
            env={"PYTHONPATH": str(ROOT)},
            log=home / "backend.log",
        )
        lan.run(hb, _serve("b", home / "b"), env=_node_env(home / "b"), log=home / "b.log")
        url_a, url_b = f"http://{ha.ip}:{PORT}", f"http://{hb.ip}:{PORT}"
        probe_a, probe_b = Probe(lan, hc), Probe(lan, hc)
        if probe_b.wait(url_b, timeout=60) is None:
            raise RuntimeError(f"node b did not come up:\n{(home / 'b.log').read_text()[-2000:]}")
        for trial in range(trials):
            trial_home = home / f"a{trial}"
            started = time.monotonic()
            node = lan.run(
                ha,
                _serve(f"a{trial}", trial_home, "--backend", f"http://127.0.0.1:{BACKEND_PORT}"),
                env=_node_env(trial_home),
                log=home / f"a{trial}.log",
            )
            probe_a.send(url_a, model=MODEL, timeout=60)
            probe_b.send(url_b, model=MODEL, chat=True, timeout=60)
            at_local, at_peer = probe_a.answer(), probe_b.answer()
            if at_local["at"] is None or at_peer["at"] is None:
                failures.append(f"trial {trial}: {at_local['error']} / {at_peer['error']}")
            else:
                local.append(float(str(at_local["at"])) - started)
                routable.append(float(str(at_peer["at"])) - started)
            lan.stop(node)
            if probe_b.wait(url_b, model=MODEL, gone=True, timeout=60) is None:
                failures.append(f"trial {trial}: b still lists the model 60 s after a stopped")
        for probe in (probe_a, probe_b):
            if probe.process.stdin is not None:
                probe.process.stdin.close()
    rows = [
        Row(
            "node start → routable from a peer",
            "s",
            "node start → serving locally",
            local,
            routable,
            higher_is_better=False,
            compare="added",
            bound=Bound("value", "<=", 2.0),
            target="p50 over trials",
        ),
    ]
    notes = [
        f"{trials} trials, each a fresh node (new identity) on host a; b stays up; polled "
        "every 20 ms from host c; the added time is what discovery costs beyond startup",
    ]
    if failures:
        notes.append(f"{len(failures)} failed trial(s): {failures[:3]}")
    return Result(NAME, TITLE, command(NAME, quick), rows, notes)


if __name__ == "__main__":  # pragma: no cover - handy when debugging the LAN by hand
    subprocess.run([sys.executable, "-m", "bench", NAME, "--quick"], check=False)
