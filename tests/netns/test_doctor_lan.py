"""`shoal doctor` on a namespace LAN, with real mDNS: node a sees its own advert and a
healthy peer d (same secret), and names the two problems of reference 002's table it
can meet here — node b with another cluster secret, and node c bound to loopback that a
lists as a static peer ("found but unreachable")."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.trust.secret import new_secret
from tests.netns.cluster import PORT, Agent, Cluster, Node, start_backend, wait_until
from tests.netns.lan import Lan

pytestmark = pytest.mark.netns

BACKEND_PORT = 18090


@pytest.fixture
def cluster(lan: Lan, tmp_path: Path) -> Iterator[Cluster]:
    ours, theirs = new_secret(), new_secret()
    a, b, c, d, client = (lan.add_host(n) for n in ("a", "b", "c", "d", "client"))
    start_backend(lan, a, BACKEND_PORT, ["doctor-model"])
    config = (
        f"lan = true\nport = {PORT}\ndata_dir = {json.dumps(str(tmp_path / 'a' / 'data'))}\n"
        f'peers = ["http://{c.ip}:{PORT}"]\n'
    )
    backend = ("--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}")
    nodes = {
        "a": Node("a", a, tmp_path / "a", backend, secret=ours, config=config),
        "b": Node("b", b, tmp_path / "b", ("--no-embedded",), secret=theirs),
        "c": Node("c", c, tmp_path / "c", ("--no-embedded", "--no-lan")),  # 127.0.0.1 only
        "d": Node("d", d, tmp_path / "d", ("--no-embedded",), secret=ours),
    }
    built = Cluster(lan, client, Agent(lan, client), nodes)
    try:
        for node in nodes.values():
            built.start(node)
        wait_until(lambda: built.health("a", "d") == "healthy", 30, "a to see d healthy")
        wait_until(lambda: built.agent.json(nodes["b"].url + "/healthz"), 30, "b to answer")
        yield built
    finally:
        built.agent.close()
        if any(not node.alive() for node in nodes.values()):
            built.report()


def test_doctor_names_each_problem(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.nodes["a"]
    done = cluster.lan.exec(
        a.host,
        [
            sys.executable,
            "-m",
            "shoal",
            "doctor",
            "--json",
            "--config",
            str(a.home / "config.toml"),
        ],
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    by_level: dict[str, list[dict[str, Any]]] = {}
    for check in report["checks"]:
        by_level.setdefault(check["level"], []).append(check)
    ok = " | ".join(c["summary"] for c in by_level.get("ok", []))
    assert "this node's mDNS advert is seen" in ok
    assert "peer d at" in ok and "is healthy" in ok
    assert "d's clock is within" in ok
    assert "backend " in ok

    fails = {c["summary"]: c for c in by_level.get("fail", [])}
    assert len(fails) == 2, fails
    secret = next(c for s, c in fails.items() if "another cluster secret" in s)
    assert secret["check"] == "trust" and secret["summary"].startswith("b-")
    assert "shoal join" in secret["fix"] and "--token -" in secret["fix"]
    loopback = next(c for s, c in fails.items() if "refuses connections" in s)
    c_ip = cluster.nodes["c"].host.ip
    assert f"http://{c_ip}:{PORT}" in loopback["summary"]
    assert "bound to loopback" in loopback["summary"]
    assert "shoal serve --lan" in loopback["fix"]
