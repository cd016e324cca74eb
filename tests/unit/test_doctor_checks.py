"""`shoal doctor`'s judgments as text: each firewall's answer, clocks, disk, and the
sentence for a node found but not reachable (reference 002's edge-case table)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from shoal.cli import doctor, firewall


def runner(outputs: dict[str, str]) -> firewall.Runner:
    def run(argv: Sequence[str]) -> str | None:
        return outputs.get(" ".join(argv))

    return run


def test_no_firewall() -> None:
    assert firewall.hints([11450, 11451], runner({}), system="Linux") == []


def test_ufw() -> None:
    closed = runner({"ufw status": "Status: active\n\nTo Action From\n22/tcp ALLOW Anywhere\n"})
    [hint] = firewall.hints([11450, 11451], closed, system="Linux")
    assert hint.blocking and "5353" in hint.summary and hint.fix is not None
    assert "ufw allow 5353/udp" in hint.fix and "11450:11451/tcp" in hint.fix
    opened = runner({"ufw status": "Status: active\n5353/udp ALLOW\n11450:11451/tcp ALLOW\n"})
    assert not firewall.hints([11450, 11451], opened, system="Linux")[0].blocking
    assert firewall.hints([11450], runner({"ufw status": "Status: inactive"}), "Linux") == []


def test_firewalld() -> None:
    closed = runner({"firewall-cmd --state": "running", "firewall-cmd --list-all": "services: ssh"})
    [hint] = firewall.hints([11450, 11451], closed, system="Linux")
    assert hint.blocking and "--add-service=mdns" in (hint.fix or "")
    assert "--add-port=11450-11451/tcp" in (hint.fix or "")
    opened = runner(
        {
            "firewall-cmd --state": "running",
            "firewall-cmd --list-all": "services: ssh mdns\nports: 11450-11451/tcp",
        }
    )
    assert not firewall.hints([11450, 11451], opened, system="Linux")[0].blocking


def test_nftables() -> None:
    ruleset = (
        "table inet filter {\n chain input {\n"
        "  type filter hook input priority 0; policy drop;\n  tcp dport 22 accept\n }\n}\n"
    )
    [hint] = firewall.hints([11460], runner({"nft list ruleset": ruleset}), system="Linux")
    assert hint.blocking and "udp dport 5353 accept" in (hint.fix or "")
    accepting = ruleset.replace("policy drop", "policy accept")
    assert not firewall.hints([11460], runner({"nft list ruleset": accepting}), "Linux")[0].blocking


def test_macos_and_windows() -> None:
    mac = runner(
        {f"{firewall.MACOS_FIREWALL} --getglobalstate": "Firewall is enabled. (State = 1)"}
    )
    [hint] = firewall.hints([11450], mac, system="Darwin")
    assert hint.blocking and "--unblockapp" in (hint.fix or "")
    off = runner(
        {f"{firewall.MACOS_FIREWALL} --getglobalstate": "Firewall is disabled. (State = 0)"}
    )
    assert firewall.hints([11450], off, system="Darwin") == []
    windows = runner({"netsh advfirewall show allprofiles state": "Domain Profile\nState ON\n"})
    [hint] = firewall.hints([11450, 11451], windows, system="Windows")
    assert "localport=11450-11451" in (hint.fix or "") and "localport=5353" in (hint.fix or "")


def test_clock() -> None:
    assert doctor.clock("b", 0.3).level == "ok"
    slow = doctor.clock("b", -5.0)
    assert slow.level == "warn" and "5.0 s behind" in slow.summary
    assert doctor.clock("b", 86_000.0).level == "fail"


def test_unreachable_sentences() -> None:
    refused = doctor.unreachable("peer b", doctor.Probe("http://10.0.0.2:11450", "refused"))
    assert refused.level == "fail" and "loopback" in refused.summary
    assert "shoal serve --lan" in (refused.fix or "")
    timeout = doctor.unreachable("peer b", doctor.Probe("http://10.0.0.2:11450", "timeout"))
    assert "firewall" in (timeout.fix or "") and "11450" in (timeout.fix or "")


def test_probe_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        assert doctor.probe(f"http://127.0.0.1:{port}").outcome == "refused"


def test_snapshot_carries_the_clock() -> None:
    from shoal.mesh.state import NodeState, decode

    state = NodeState("a" * 64, "n", "0.1.0", 11450, 1, 2.0, clock=1_800_000_000.25)
    assert decode(state.encode()).clock == 1_800_000_000.25
    older = NodeState("a" * 64, "n", "0.1.0", 11450, 1, 2.0)  # a node that does not send it
    assert b"clock" not in older.encode() and decode(older.encode()).clock is None
