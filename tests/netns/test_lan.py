"""The Lan itself: reachability, isolation, mDNS across the bridge, netem, teardown."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns.lan import MARKERS, Host, Lan, list_netns
from tests.netns.probe import SERVICE_TYPE

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]

PROBE = str(Path(__file__).with_name("probe.py"))
ECHO_PORT = 7000


def probe(*args: str) -> list[str]:
    return [sys.executable, PROBE, *args]


def round_trips(lan: Lan, source: Host, target: Host, deadline: float = 5) -> dict[str, Any]:
    """TCP connect and five one-byte round trips from source to target's echo server."""
    argv = probe("rtt", target.ip, str(ECHO_PORT), "--deadline", str(deadline))
    result = lan.exec(source, argv, timeout=deadline + 5)
    return dict(json.loads(result.stdout))


def reachable(lan: Lan, source: Host, target: Host) -> bool:
    argv = probe("rtt", target.ip, str(ECHO_PORT), "--count", "1", "--deadline", "1")
    return lan.exec(source, argv, timeout=6, check=False).returncode == 0


def ours(lan: Lan) -> list[str]:
    return [n for n in list_netns() if n.startswith(lan.prefix + "-")]


def test_hosts_reach_each_other_and_nothing_else(lan: Lan) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    assert lan.subnet is not None and a.ip != b.ip
    assert lan.ping(a, b) and lan.ping(b, a)

    # The root namespace has neither the addresses nor a route of the test subnet, and
    # none of its interfaces is a cable into the Lan.
    subnet = str(lan.subnet)
    assert (
        subprocess.run(
            ["ip", "-o", "-4", "addr", "show", "to", subnet], capture_output=True, check=True
        ).stdout.strip()
        == b""
    )
    assert (
        subprocess.run(
            ["ip", "-4", "route", "show", "table", "all", "root", subnet],
            capture_output=True,
            check=True,
        ).stdout.strip()
        == b""
    )
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, check=True).stdout
    assert lan.prefix.encode() not in root_links

    # A host has no route out of its /24 (asked of the routing table; nothing is sent).
    for outside in ("192.0.2.2", "1.1.1.1", "10.0.0.1"):
        route = lan.exec(a, ["ip", "route", "get", outside], check=False)
        assert route.returncode != 0 and "unreachable" in route.stderr, route
    routes = [line.split()[0] for line in lan.exec(a, ["ip", "-4", "route"]).stdout.splitlines()]
    assert sorted(routes) == sorted([subnet, "224.0.0.0/4"])


def test_mdns_service_found_across_the_bridge(lan: Lan, tmp_path: Path) -> None:
    pytest.importorskip("zeroconf", reason="python-zeroconf is not installed")
    a, b, c = lan.add_host("a"), lan.add_host("b"), lan.add_host("c")
    register = probe(
        "mdns-register", "--name", "node-a", "--ip", a.ip, "--port", "8080",
        "--txt", "role=worker", "--txt", "models=smollm2",
    )  # fmt: skip
    lan.run(a, register, log=tmp_path / "register.log")
    # Two browsers on two other ports of the bridge: multicast reaches every port.
    c_log = tmp_path / "browse-c.log"
    browse_c = lan.run(c, probe("mdns-browse", "--timeout", "10"), log=c_log)
    result_b = lan.exec(b, probe("mdns-browse", "--timeout", "10"), timeout=20, check=False)
    browse_c.wait(15)

    logs = f"\nregister: {(tmp_path / 'register.log').read_text()}\nc: {c_log.read_text()}"
    assert result_b.returncode == 0, f"b: {result_b.stderr}{logs}"
    assert browse_c.returncode == 0, f"c did not find the service{logs}"
    for output in (result_b.stdout, c_log.read_text()):
        found = json.loads(output.strip().splitlines()[-1])
        assert found["name"] == f"node-a.{SERVICE_TYPE}"
        assert found["addresses"] == [a.ip]
        assert found["port"] == 8080
        assert found["properties"] == {"role": "worker", "models": "smollm2"}


@pytest.mark.parametrize("backend", ["tc", "relay"])
def test_netem_delay_and_clear(lan: Lan, backend: str) -> None:
    if backend == "tc" and not lan.tc_netem_supported():
        pytest.skip("this kernel has no sch_netem (CONFIG_NET_SCH_NETEM)")
    lan.netem_backend = "tc" if backend == "tc" else "relay"
    a, b = lan.add_host("a"), lan.add_host("b")
    lan.run(a, probe("echo-server", "--port", str(ECHO_PORT)))
    before = round_trips(lan, b, a)  # waits for the server

    lan.netem(a, delay_ms=100)  # a's replies leave 100 ms late
    delayed = round_trips(lan, b, a)
    assert min(delayed["rtts_ms"]) >= 100, delayed
    assert delayed["connect_ms"] >= 100, delayed  # the SYN-ACK too

    lan.clear_netem(a)
    after = round_trips(lan, b, a)
    assert statistics.median(after["rtts_ms"]) < 50, after
    assert statistics.median(before["rtts_ms"]) < 50, before


def test_partition_and_total_loss(lan: Lan) -> None:
    a, b = lan.add_host("a"), lan.add_host("b")
    lan.run(a, probe("echo-server", "--port", str(ECHO_PORT)))
    round_trips(lan, b, a)

    lan.link(a, up=False)  # a's eth0 down
    assert not reachable(lan, b, a) and not lan.ping(b, a, timeout=1)
    lan.link(a, up=True)
    assert reachable(lan, b, a)
    assert "224.0.0.0/4 dev eth0" in lan.exec(a, ["ip", "route"]).stdout

    lan.link(a, up=False, at_switch=True)  # cable pulled at the bridge
    assert not reachable(lan, b, a)
    lan.link(a, up=True, at_switch=True)
    assert reachable(lan, b, a)

    lan.netem(a, loss_pct=100)
    assert not reachable(lan, b, a)
    lan.clear_netem(a)
    assert reachable(lan, b, a)


@pytest.mark.usefixtures("require_netns")
def test_teardown_after_an_exception_leaves_nothing() -> None:
    lan = Lan()
    with pytest.raises(RuntimeError, match="boom"), lan:
        a, b = lan.add_host("a"), lan.add_host("b")
        sleeper = lan.run(a, ["sleep", "60"])
        lan.run(b, ["sleep", "60"])
        lan.netem(b, delay_ms=10)
        assert len(ours(lan)) == 3
        raise RuntimeError("boom")
    assert ours(lan) == []
    assert sleeper.returncode is not None
    assert not (MARKERS / lan.prefix).exists()
    lan.teardown()  # idempotent


@pytest.mark.usefixtures("require_netns")
def test_leftovers_of_a_dead_run_are_removed() -> None:
    crashed = Lan()
    crashed.add_host("a")
    crashed.run(crashed.hosts["a"], ["sleep", "60"])
    # Pretend its owner died without tearing down: the marker names a reaped process.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (MARKERS / crashed.prefix).write_text(f"{dead.pid} 0\n")
    try:
        with Lan() as fresh:
            assert ours(crashed) == []
            assert fresh.add_host("a").ip.startswith(str(fresh.subnet).rsplit(".", 1)[0])
    finally:
        crashed.teardown()
    assert ours(crashed) == [] and os.path.exists(MARKERS)
