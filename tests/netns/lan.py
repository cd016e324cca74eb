"""A LAN on one machine: Linux network namespaces joined by a bridge (DESIGN.md §10).

    with Lan() as lan:
        a, b = lan.add_host("a"), lan.add_host("b")
        node = lan.run(a, [sys.executable, "-m", "shoal", "serve", ...], log=path)
        lan.netem(b, delay_ms=100, loss_pct=5)   # b's outgoing traffic
        lan.link(a, up=False)                    # partition a
    # every process killed, every namespace deleted, even on an exception

Topology, all of it inside namespaces this module creates (the root namespace's
networking is never touched):

    <prefix>-br     bridge br0 (multicast snooping off, STP off, no address, IPv6 off)
                    and the switch-side end pN of every host's cable
    <prefix>-<name> one per host: lo, and eth0 (peer of pN) with 10.231.X.N/24 and a
                    route for 224.0.0.0/4, so mDNS leaves by eth0; no default route

X is random per Lan and checked against the root namespace's addresses and routes, N is
1, 2, … in the order hosts are added. A host has no route beyond its /24, so test traffic
cannot leave the LAN.

Delay and loss use `tc netem` on the host's eth0 when the kernel has sch_netem. When it
does not (some VM kernels are built without it), the host's cable is rewired at the
switch through `relay.py`, a userspace forwarder that applies the same delay, jitter and
loss to frames leaving the host.

Leftovers: each Lan writes /run/shoal-netns/<prefix> (owner pid and start time) before
creating anything and removes it last; a new Lan deletes the namespaces of Lans whose
owner is gone (a crashed or killed test run), and `shl<6 hex>-*` namespaces (the
automatic prefixes) with no marker.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

HERE = Path(__file__).resolve().parent
RELAY = HERE / "relay.py"
PROBE = HERE / "probe.py"
MARKERS = Path("/run/shoal-netns")
AUTO_PREFIX = re.compile(r"^shl[0-9a-f]{6}$")
PREFIX = re.compile(r"^shl[a-z0-9]{1,9}$")  # every namespace of ours starts with shl
HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
PROBE_NETNS = re.compile(r"^shlprobe-(\d+)$")
SUBNET = "10.231.{}.0/24"
BRIDGE = "br0"
IFNAME = "eth0"
MULTICAST = "224.0.0.0/4"
COMMAND_TIMEOUT = 10.0  # for each `ip`/`tc` invocation
GRACE = 2.0  # between SIGTERM and SIGKILL

NetemBackend = Literal["auto", "tc", "relay"]


class LanCommandError(subprocess.CalledProcessError):
    """A failed command, with its stderr in the message."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


@dataclass(frozen=True)
class Host:
    name: str
    netns: str  # `ip netns exec <netns> …`
    ip: str  # IPv4 address of eth0
    index: int  # 1-based; the last octet of ip
    port: str  # the switch-side end of its cable, in the bridge namespace
    mac: str  # of eth0
    ifname: str = IFNAME
    prefixlen: int = 24

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


def _run(
    argv: list[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell) in its own process group; on timeout kill the whole group."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=5)
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    except BaseException:  # interrupted: nothing of it may survive
        _signal_group(process.pid, signal.SIGKILL)
        process.communicate(timeout=5)
        raise
    if check and process.returncode:
        raise LanCommandError(process.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return _run(argv, check=check).stdout


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def list_netns() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_netns_processes(netns: str) -> None:
    """SIGTERM every process inside netns, SIGKILL what is left after GRACE."""
    listed = _ip("netns", "pids", netns, check=False).split()
    pids = [int(p) for p in listed if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + GRACE
        while pids and time.monotonic() < deadline:
            remaining = set(_ip("netns", "pids", netns, check=False).split())
            pids = [p for p in pids if str(p) in remaining]
            if pids:
                time.sleep(0.05)


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    _ip("netns", "del", netns, check=False)


def _owner_alive(prefix: str) -> bool:
    try:
        pid, start = (MARKERS / prefix).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == start


def cleanup_leftovers(also: tuple[str, ...] = ()) -> list[str]:
    """Delete namespaces left by Lans whose process is gone; return their names.

    Covers every `shl<6 hex>-*` namespace, every prefix with a marker, and the prefixes
    in `also`. Namespaces of a live owner are left alone.
    """
    markers = {p.name for p in MARKERS.iterdir()} if MARKERS.is_dir() else set()
    removed = []
    for netns in list_netns():
        if probe := PROBE_NETNS.match(netns):
            if not Path(f"/proc/{probe[1]}").exists():
                _delete_netns(netns)
                removed.append(netns)
            continue
        prefix = netns.split("-", 1)[0]
        if "-" not in netns or not (
            AUTO_PREFIX.match(prefix) or prefix in markers or prefix in also
        ):
            continue
        if not _owner_alive(prefix):
            _delete_netns(netns)
            removed.append(netns)
    for prefix in markers:
        if not _owner_alive(prefix):
            with contextlib.suppress(OSError):
                (MARKERS / prefix).unlink()
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the root namespace's addresses and routes (default excluded)."""
    networks = []
    for match in re.finditer(r"\binet (\S+)", _ip("-o", "-4", "addr", "show")):
        networks.append(ipaddress.IPv4Interface(match[1]).network)
    route_types = {"unicast", "local", "broadcast", "multicast", "throw", "unreachable"}
    route_types |= {"prohibit", "blackhole", "nat", "anycast"}
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        if not words:
            continue
        dest = words[1] if words[0] in route_types and len(words) > 1 else words[0]
        if dest != "default":
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.IPv4Network(dest, strict=False))
    return networks


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for third in secrets.SystemRandom().sample(range(256), 256):
        candidate = ipaddress.IPv4Network(SUBNET.format(third))
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError(f"every {SUBNET.format('X')} overlaps a network of this machine")


@functools.cache
def netns_available() -> str | None:
    """None when this process can build a Lan, else why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return f"building network namespaces needs root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    probe = f"shlprobe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", "name", BRIDGE, "type", "bridge", netns=probe)
        _ip("link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", netns=probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot build network namespaces here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


_tc_netem: bool | None = None  # does the kernel have sch_netem? (probed once)


class Lan:
    """A LAN on one machine: a bridge in its own namespace, one namespace per host."""

    def __init__(self, prefix: str | None = None, *, netem_backend: NetemBackend = "auto"):
        if prefix is None:
            prefix = "shl" + secrets.token_hex(3)
        elif not PREFIX.match(prefix):
            raise ValueError(f"prefix must match {PREFIX.pattern}: {prefix!r}")
        self.prefix = prefix
        self.bridge_ns = f"{prefix}-br"
        self.netem_backend: NetemBackend = netem_backend  # "auto": tc if the kernel can
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # created by us, in creation order
        self._processes: list[subprocess.Popen[bytes]] = []
        self._relays: dict[str, subprocess.Popen[str]] = {}
        self._tc_hosts: set[str] = set()
        self._state: Literal["new", "up", "down"] = "new"

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Lan:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    @property
    def _marker(self) -> Path:
        return MARKERS / self.prefix

    def start(self) -> None:
        """Create the bridge namespace (add_host calls this when needed)."""
        if self._state == "up":
            return
        if self._state == "down":
            raise RuntimeError(f"Lan {self.prefix} was torn down")
        self._state = "up"
        atexit.register(self.teardown)
        try:
            cleanup_leftovers(also=(self.prefix,))
            if _owner_alive(self.prefix):
                raise RuntimeError(f"Lan prefix {self.prefix} is in use by a live process")
            MARKERS.mkdir(parents=True, exist_ok=True)
            self._marker.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
            self.subnet = _pick_subnet()
            self._add_netns(self.bridge_ns)
            # A switch has no IP stack: keep the bridge and the relay ports silent.
            self._disable_ipv6(self.bridge_ns)
            _ip("link", "set", "lo", "up", netns=self.bridge_ns)
            _ip(
                "link", "add", "name", BRIDGE, "type", "bridge",
                "mcast_snooping", "0", "stp_state", "0",
                netns=self.bridge_ns,
            )  # fmt: skip
            _ip("link", "set", BRIDGE, "up", netns=self.bridge_ns)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Kill every process, delete every namespace. Idempotent; safe after failures."""
        if self._state == "down":
            return
        self._state = "down"
        atexit.unregister(self.teardown)
        self.stop(*self._relays.values(), *self._processes)
        for relay in self._relays.values():
            for pipe in (relay.stdin, relay.stdout, relay.stderr):
                if pipe:
                    pipe.close()
        # Hosts first: deleting a host namespace deletes its cable; the bridge last.
        for netns in reversed(self._namespaces):
            _delete_netns(netns)
        left = set(self._namespaces) & set(list_netns())
        if not left:
            with contextlib.suppress(OSError):
                self._marker.unlink()
        if left:
            raise RuntimeError(f"could not delete network namespaces {sorted(left)}")

    def _add_netns(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._namespaces.append(netns)

    def _disable_ipv6(self, netns: str) -> None:
        """net.ipv6.conf.{all,default}.disable_ipv6=1 inside netns (per-netns sysctls)."""
        code = (
            "for dev in ('all', 'default'):\n"
            "    with open(f'/proc/sys/net/ipv6/conf/{dev}/disable_ipv6', 'w') as f:\n"
            "        f.write('1')\n"
        )
        _run(["ip", "netns", "exec", netns, sys.executable, "-c", code])

    # -- hosts and processes --------------------------------------------------------

    def add_host(self, name: str) -> Host:
        """A new namespace cabled to the bridge, eth0 up with the next address."""
        self.start()
        assert self.subnet is not None
        if not HOST_NAME.match(name) or name == "br":
            raise ValueError(f"host name must match {HOST_NAME.pattern} and not be 'br'")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("a Lan holds at most 250 hosts")
        netns, port = f"{self.prefix}-{name}", f"p{index}"
        ip = str(self.subnet.network_address + index)
        self._add_netns(netns)
        _ip(
            "link", "add", "name", port, "type", "veth",
            "peer", "name", IFNAME, "netns", netns,
            netns=self.bridge_ns,
        )  # fmt: skip
        _ip("link", "set", port, "master", BRIDGE, "up", netns=self.bridge_ns)
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", IFNAME, netns=netns)
        _ip("link", "set", IFNAME, "up", netns=netns)
        _ip("route", "replace", MULTICAST, "dev", IFNAME, netns=netns)
        mac = json.loads(_ip("-j", "link", "show", IFNAME, netns=netns))[0]["address"]
        host = Host(name, netns, ip, index, port, mac, prefixlen=self.subnet.prefixlen)
        self.hosts[name] = host
        return host

    def run(
        self,
        host: Host,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start argv inside host, in a new process group; killed at teardown.

        env is added to this process's environment. log gets stdout and stderr; without
        it they are inherited (pytest captures them). With pipes, stdin and stdout are
        pipes to talk to the process.
        """
        command = ["ip", "netns", "exec", host.netns, *argv]
        full_env = {**os.environ, **(env or {})}
        with contextlib.ExitStack() as stack:
            out: IO[bytes] | None = None
            if log is not None:
                out = stack.enter_context(log.open("wb"))
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=subprocess.STDOUT if out else None,
                env=full_env,
                start_new_session=True,
            )
        self._processes.append(process)
        return process

    def stop(self, *processes: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
        """SIGTERM each process group, SIGKILL it after GRACE, reap it."""
        running = [p for p in processes if p.poll() is None]
        for process in running:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(5)

    def exec(
        self, host: Host, argv: list[str], timeout: float = 10, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside host to completion; killed (with its children) at timeout."""
        return _run(["ip", "netns", "exec", host.netns, *argv], timeout=timeout, check=check)

    def ping(self, source: Host, target: Host | str, timeout: float = 2) -> bool:
        """One ICMP echo from source; `ping` if installed, else a raw-socket probe."""
        address = target.ip if isinstance(target, Host) else target
        if shutil.which("ping"):
            wait = str(max(1, math.ceil(timeout)))
            argv = ["ping", "-n", "-c", "1", "-W", wait, address]
        else:
            argv = [sys.executable, str(PROBE), "icmp", address, "--timeout", str(timeout)]
        return self.exec(source, argv, timeout=timeout + 5, check=False).returncode == 0

    # -- impairments ----------------------------------------------------------------

    def tc_netem_supported(self) -> bool:
        """Whether the kernel has sch_netem (probed once, on a veth in the bridge ns)."""
        global _tc_netem
        if _tc_netem is None:
            self.start()
            _ip("link", "add", "name", "nprobe0", "type", "veth", "peer", "name", "nprobe1",
                netns=self.bridge_ns)  # fmt: skip
            try:
                tc = ["tc", "-n", self.bridge_ns, "qdisc", "add", "dev", "nprobe0", "root"]
                _tc_netem = _run([*tc, "netem", "delay", "1ms"], check=False).returncode == 0
            finally:
                _ip("link", "del", "nprobe0", netns=self.bridge_ns)
        return _tc_netem

    def _backend(self) -> Literal["tc", "relay"]:
        if self.netem_backend == "relay":
            return "relay"
        if self.tc_netem_supported():
            return "tc"
        if self.netem_backend == "tc":
            raise RuntimeError("this kernel has no sch_netem (tc netem); use the relay")
        return "relay"

    def netem(
        self, host: Host, *, delay_ms: int = 0, jitter_ms: int = 0, loss_pct: float = 0
    ) -> None:
        """Delay, jitter and loss on everything host sends (its eth0 egress)."""
        if delay_ms < 0 or jitter_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError("delay and jitter must be >= 0, loss in [0, 100]")
        if self._backend() == "tc":
            argv = ["tc", "-n", host.netns, "qdisc", "replace", "dev", IFNAME, "root", "netem"]
            if delay_ms or jitter_ms:
                argv += ["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
            if loss_pct:
                argv += ["loss", f"{loss_pct}%"]
            _run(argv)
            self._tc_hosts.add(host.name)
        else:
            self._relay_netem(host, delay_ms, jitter_ms, loss_pct)

    def clear_netem(self, host: Host) -> None:
        """Back to a clean cable."""
        relay = self._relays.pop(host.name, None)
        if relay is not None:
            self._unwire_relay(host, relay)
        if host.name in self._tc_hosts:
            self._tc_hosts.discard(host.name)
            tc = ["tc", "-n", host.netns, "qdisc"]
            _run([*tc, "del", "dev", IFNAME, "root"], check=False)
            if "netem" in _run([*tc, "show", "dev", IFNAME]).stdout:
                raise RuntimeError(f"netem still on {host.name}'s {IFNAME}")

    def _relay_netem(self, host: Host, delay_ms: float, jitter_ms: float, loss: float) -> None:
        params = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss_pct": loss}
        relay = self._relays.get(host.name)
        if relay is not None and relay.poll() is None:
            assert relay.stdin is not None
            relay.stdin.write(json.dumps(params) + "\n")
            relay.stdin.flush()
            self._expect(relay, "ok")
            return
        if relay is not None:  # died: rewire from scratch
            self._unwire_relay(host, self._relays.pop(host.name))
        # pN (host side) -- relay -- qN ==veth== rN (bridge port)
        inner, uplink, br = f"q{host.index}", f"r{host.index}", self.bridge_ns
        _ip("link", "add", "name", inner, "type", "veth", "peer", "name", uplink, netns=br)
        _ip("link", "set", inner, "promisc", "on", "up", netns=br)
        _ip("link", "set", host.port, "promisc", "on", netns=br)
        relay = subprocess.Popen(
            [
                "ip", "netns", "exec", br, sys.executable, str(RELAY),
                "--outer", host.port, "--inner", inner,
                "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                "--loss-pct", str(loss),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        self._relays[host.name] = relay
        self._expect(relay, "ready")
        _ip("link", "set", host.port, "nomaster", netns=br)
        _ip("link", "set", uplink, "master", BRIDGE, "up", netns=br)

    def _unwire_relay(self, host: Host, relay: subprocess.Popen[str]) -> None:
        self.stop(relay)
        for pipe in (relay.stdin, relay.stdout, relay.stderr):
            if pipe:
                pipe.close()
        br = self.bridge_ns
        _ip("link", "set", host.port, "promisc", "off", "master", BRIDGE, netns=br)
        _ip("link", "del", f"q{host.index}", netns=br, check=False)  # and its peer rN

    def _expect(self, relay: subprocess.Popen[str], word: str, timeout: float = 5) -> None:
        assert relay.stdout is not None and relay.stderr is not None
        ready, _, _ = select.select([relay.stdout], [], [], timeout)
        line = relay.stdout.readline().strip() if ready else ""
        if line != word:
            self.stop(relay)
            raise RuntimeError(f"relay said {line!r}, not {word!r}: {relay.stderr.read()}")

    def link(self, host: Host, up: bool, *, at_switch: bool = False) -> None:
        """Partition host (up=False) or heal it.

        By default eth0 goes down inside the host (the node sees its interface vanish);
        at_switch=True unplugs the cable at the bridge instead (eth0 stays configured and
        only loses carrier).
        """
        state = "up" if up else "down"
        if at_switch:
            _ip("link", "set", host.port, state, netns=self.bridge_ns)
            return
        _ip("link", "set", IFNAME, state, netns=host.netns)
        if up:  # the kernel drops a device's routes when it goes down
            _ip("route", "replace", MULTICAST, "dev", IFNAME, netns=host.netns)
