"""What a host firewall may block between Shoal nodes, and how to open it, per OS.

`shoal doctor` asks the firewalls it finds for their state with read-only commands
(`ufw status`, `firewall-cmd --list-all`, `nft list ruleset`, the macOS application
firewall's `--getglobalstate`, `netsh advfirewall show`), then judges their output here:
the judging is pure, so each firewall's answer is tested as text.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MDNS_PORT = 5353  # UDP, RFC 6762 §3
COMMAND_TIMEOUT_S = 3.0
MACOS_FIREWALL = "/usr/libexec/ApplicationFirewall/socketfilterfw"

# argv -> its output, or None when it cannot be run (absent, refused, timed out).
Runner = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True, slots=True)
class Hint:
    """One firewall found: whether it may block Shoal, and the commands that open it."""

    firewall: str
    blocking: bool  # active, with no rule seen for Shoal's ports
    summary: str
    fix: str | None = None


def run(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None and not argv[0].startswith("/"):
        return None
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def hints(tcp_ports: Sequence[int], runner: Runner = run, system: str | None = None) -> list[Hint]:
    """Every firewall found on this machine, judged for UDP 5353 and `tcp_ports`."""
    system = system or platform.system()
    if system == "Darwin":
        return _macos(runner)
    if system == "Windows":
        return _windows(tcp_ports, runner)
    found = []
    for judge in (_ufw, _firewalld, _nftables):
        hint = judge(tcp_ports, runner)
        if hint is not None:
            found.append(hint)
    return found


def _span(ports: Sequence[int], sep: str) -> str:
    low, high = min(ports), max(ports)
    return str(low) if low == high else f"{low}{sep}{high}"


def _ufw(ports: Sequence[int], runner: Runner) -> Hint | None:
    output = runner(["ufw", "status"])
    if output is None or "Status: active" not in output:
        return None
    fix = f"sudo ufw allow {MDNS_PORT}/udp && sudo ufw allow {_span(ports, ':')}/tcp"
    missing = [str(p) for p in (MDNS_PORT, *ports) if str(p) not in output]
    if not missing:
        return Hint("ufw", False, "ufw is active and has rules for Shoal's ports")
    return Hint("ufw", True, f"ufw is active with no rule for port(s) {', '.join(missing)}", fix)


def _firewalld(ports: Sequence[int], runner: Runner) -> Hint | None:
    state = runner(["firewall-cmd", "--state"])
    if state is None or "running" not in state:
        return None
    listing = runner(["firewall-cmd", "--list-all"]) or ""
    mdns_open = "mdns" in listing or f"{MDNS_PORT}/udp" in listing
    tcp_open = all(str(p) in listing for p in ports)
    fix = (
        "sudo firewall-cmd --permanent --add-service=mdns "
        f"--add-port={_span(ports, '-')}/tcp && sudo firewall-cmd --reload"
    )
    if mdns_open and tcp_open:
        return Hint("firewalld", False, "firewalld is running and allows mDNS and Shoal's ports")
    return Hint(
        "firewalld",
        True,
        "firewalld is running and its zone does not allow "
        + " and ".join(
            w for w, ok in (("mDNS", mdns_open), ("Shoal's TCP ports", tcp_open)) if not ok
        ),
        fix,
    )


def _nftables(ports: Sequence[int], runner: Runner) -> Hint | None:
    ruleset = runner(["nft", "list", "ruleset"])
    if not ruleset or "hook input" not in ruleset:
        return None
    drops = "policy drop" in ruleset or "policy reject" in ruleset
    if not drops:
        return Hint("nftables", False, "nftables has input rules but accepts by default")
    missing = [str(p) for p in (MDNS_PORT, *ports) if str(p) not in ruleset]
    if not missing:
        return Hint("nftables", False, "nftables drops by default and mentions Shoal's ports")
    tcp = ", ".join(str(p) for p in ports)
    fix = (
        f"sudo nft add rule inet filter input udp dport {MDNS_PORT} accept && "
        f"sudo nft add rule inet filter input tcp dport {{ {tcp} }} accept "
        "(use your own table and chain names; make it permanent in /etc/nftables.conf)"
    )
    return Hint(
        "nftables",
        True,
        f"nftables drops input by default with no rule for port(s) {', '.join(missing)}",
        fix,
    )


def _macos(runner: Runner) -> list[Hint]:
    output = runner([MACOS_FIREWALL, "--getglobalstate"])
    if output is None or "enabled" not in output.lower() or "disabled" in output.lower():
        return []
    python = sys.executable  # what runs `shoal serve` too
    fix = (
        f"allow incoming connections for Shoal's Python: sudo {MACOS_FIREWALL} --add "
        f"{python} && sudo {MACOS_FIREWALL} --unblockapp {python} "
        "(or System Settings > Network > Firewall > Options)"
    )
    return [Hint("macOS application firewall", True, "the application firewall is on", fix)]


def _windows(ports: Sequence[int], runner: Runner) -> list[Hint]:
    output = runner(["netsh", "advfirewall", "show", "allprofiles", "state"])
    if output is None or "ON" not in output.upper():
        return []
    fix = (
        'netsh advfirewall firewall add rule name="Shoal" dir=in action=allow protocol=TCP '
        f"localport={_span(ports, '-')} && netsh advfirewall firewall add rule "
        f'name="Shoal mDNS" dir=in action=allow protocol=UDP localport={MDNS_PORT} '
        "(in an administrator prompt; or allow Python in Windows Defender Firewall)"
    )
    return [Hint("Windows Defender Firewall", True, "Windows Defender Firewall is on", fix)]
