"""`shoal doctor`: what stands between this machine and a working cluster, and what to do.

Each check gathers its facts (the local node's JSON API, the ports, an mDNS browse, the
peers' `/healthz`, the firewall, the disk) and returns `Finding`s, each a plain sentence
and, when something is wrong, the thing to do about it. It works with the node stopped:
then it checks that the ports are free for it. Exit code 1 when any finding fails, 2
for a configuration that does not load.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import typer
from rich.markup import escape

from shoal import __version__, protocol
from shoal import settings as settings_mod
from shoal.cli import client, firewall
from shoal.cli.common import ConfigOpt, JsonOpt, out
from shoal.errors import ConfigError
from shoal.mesh.state import PROTOCOL_VERSION
from shoal.models.stores import store_dir
from shoal.trust import secret as secret_mod
from shoal.trust.handshake import secret_fingerprint

Level = Literal["ok", "info", "warn", "fail"]

PROBE_TIMEOUT_S = 2.0  # a LAN peer answers /healthz in milliseconds
BROWSE_S = 2.0  # mDNS answers come within RFC 6762 §6's 20-120 ms; two seconds is ample
RESOLVE_TIMEOUT_MS = 1500
# Disk: a small GGUF is 100 MB to 1 GB, a usual one 4-8 GB.
DISK_FAIL_BYTES = 1 << 30
DISK_WARN_BYTES = 8 << 30
# Clocks: beyond a couple of seconds logs and request timings of two nodes disagree;
# beyond 12 hours the peers' certificates (valid from a day before they were made)
# approach being "not yet valid" to a node whose clock is behind.
SKEW_WARN_S = 2.0
SKEW_FAIL_S = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # ports, node, mdns, peers, trust, backends, disk, clock, version, firewall
    level: Level
    summary: str
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    """What answered at a node's API address."""

    url: str
    outcome: Literal["shoal", "other", "refused", "timeout", "unreachable"]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Advert:
    name: str
    url: str
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.properties.get("id", "")


def doctor(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    browse_s: float = typer.Option(BROWSE_S, "--browse-s", help="Seconds to listen on mDNS."),
) -> None:
    """Check this node and its network: ports, firewall, mDNS, peers, trust, backends,
    disk, clocks and versions; say what to do about each problem."""
    try:
        settings = settings_mod.load(config)
    except ConfigError as exc:
        findings = [
            Finding(
                "config", "fail", str(exc), "fix the file (`shoal init --force` writes a fresh one)"
            )
        ]
        _report(findings, as_json)
        raise typer.Exit(2) from None
    findings = diagnose(settings, browse_s=browse_s)
    _report(findings, as_json)
    raise typer.Exit(1 if any(f.level == "fail" for f in findings) else 0)


def diagnose(settings: settings_mod.Settings, *, browse_s: float = BROWSE_S) -> list[Finding]:
    findings: list[Finding] = []
    url = local_url(settings)
    running = probe(url)
    status = _get(url, protocol.STATUS_PATH) if running.outcome == "shoal" else None
    if status is None:
        findings += _stopped(settings, running)
    else:
        findings += _running(settings, status)
    peers = (_get(url, protocol.PEERS_PATH) or {}).get("peers", []) if status else []
    pairs = (_get(url, protocol.PAIRS_PATH) or {}).get("nodes", []) if status else []
    adverts: list[Advert] | None = None
    if settings.lan and settings.mesh.mdns:
        adverts, found = _mdns(status, browse_s)
        findings += found
        findings += _firewall(settings)
    findings += _peers(settings, status, peers, adverts or [])
    findings += _trust(settings, status["node_id"] if status else None, adverts or [], pairs)
    if status is not None:
        findings += _backends(status, peers)
        findings += _skew(peers)
    findings += [disk(settings)]
    return findings


# -- the local node and its ports -------------------------------------------------------


def local_url(settings: settings_mod.Settings) -> str:
    host = settings.bind_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"


def peer_port(settings: settings_mod.Settings) -> int | None:
    """The fixed peer port, as the node picks it; None when the system chooses one."""
    if settings.mesh.peer_port:
        return settings.mesh.peer_port
    return settings_mod.DEFAULT_PORT + 1 if settings.port == settings_mod.DEFAULT_PORT else None


def _stopped(settings: settings_mod.Settings, running: Probe) -> list[Finding]:
    start = "start it: `shoal serve" + (" --lan" if settings.lan else "") + "`"
    findings = [Finding("node", "info", f"no Shoal node answers at {local_url(settings)}", start)]
    ports = [settings.port] + ([p] if (p := peer_port(settings)) else [])
    for port in ports:
        findings.append(port_free(settings.bind_host, port, settings))
    return findings


def port_free(host: str, port: int, settings: settings_mod.Settings) -> Finding:
    """Whether `shoal serve` could bind host:port now, and who holds it if not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            return _bind_failure(host, port, exc)
    return Finding("ports", "ok", f"TCP {host}:{port} is free for the node")


def _bind_failure(host: str, port: int, exc: OSError) -> Finding:
    where = f"TCP {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        holder = port_holder(port)
        return Finding(
            "ports",
            "fail",
            f"{where} is taken by {holder or 'another process'}: the node cannot start",
            f"stop {holder or 'it'}, or give the node another port: "
            f"`shoal config set port {port + 10}` (or `shoal serve --port {port + 10}`)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return Finding(
            "ports",
            "fail",
            f"{host} is not an address of this machine",
            "set `host` to one of this machine's addresses, or use `lan = true` to bind all",
        )
    if exc.errno == errno.EACCES:
        return Finding(
            "ports",
            "fail",
            f"{where}: binding needs privileges (port < 1024)",
            "use a port above 1023, e.g. the default 11450",
        )
    return Finding("ports", "fail", f"{where} cannot be bound: {exc.strerror}")


def port_holder(port: int) -> str | None:
    """`name (pid N)` of the process listening on TCP `port`, when the system tells."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            try:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def _running(settings: settings_mod.Settings, status: dict[str, Any]) -> list[Finding]:
    url = status.get("url", "")
    findings = [
        Finding(
            "node",
            "ok",
            f"node {status['name']!r} v{status['version']} runs at {url}, "
            f"cluster mode {status.get('cluster_mode')}",
        )
    ]
    host = url.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        findings.append(
            Finding(
                "bind",
                "warn" if settings.lan else "info",
                "the node is bound to loopback: only this machine can reach it"
                + (
                    " although the config says lan = true (it was started with other flags)"
                    if settings.lan
                    else ""
                ),
                "for a cluster, run it with `shoal serve --lan` (or `shoal init --lan`)",
            )
        )
    elif host == "0.0.0.0":
        findings.append(Finding("bind", "ok", "the node listens on every address (LAN mode)"))
    if status.get("duplicate_id_seen_from"):
        findings.append(
            Finding(
                "trust",
                "fail",
                f"another node with this node's ID answers from "
                f"{status['duplicate_id_seen_from']}: a data dir was copied",
                "give the copy its own identity: stop it, delete node_key in its data dir, "
                "restart it",
            )
        )
    return findings


# -- peers: mDNS, reachability, trust ----------------------------------------------------


def _mdns(status: dict[str, Any] | None, browse_s: float) -> tuple[list[Advert], list[Finding]]:
    own = [instance_name(status["name"], status["node_id"])] if status else []
    try:
        adverts = browse(browse_s, also=own)
    except OSError as exc:
        return [], [
            Finding(
                "mdns",
                "fail",
                f"mDNS cannot run on this machine: {exc}",
                "check that a network interface with multicast is up; static peers "
                "(`shoal join URL`) still work",
            )
        ]
    findings = []
    own_id = status["node_id"] if status else None
    others = [a for a in adverts if a.node_id != own_id]
    if own_id is not None:
        if any(a.node_id == own_id for a in adverts):
            findings.append(Finding("mdns", "ok", "this node's mDNS advert is seen"))
        else:
            findings.append(
                Finding(
                    "mdns",
                    "fail",
                    f"this node's own mDNS advert was not seen within {browse_s:g} s",
                    "multicast is blocked on this machine (a firewall on UDP 5353, or an "
                    "interface without MULTICAST); peers will not find it by mDNS. "
                    "`shoal join URL` or `peers = [...]` in the config still work",
                )
            )
    if others:
        names = ", ".join(f"{a.name} ({a.url})" for a in others)
        findings.append(Finding("mdns", "ok", f"{len(others)} other node(s) on mDNS: {names}"))
    else:
        findings.append(
            Finding(
                "mdns",
                "warn",
                "no other Shoal node is seen on mDNS",
                "on the other machines run `shoal serve --lan`; they must be on this "
                "subnet, with UDP 5353 open. Else `shoal peers --scan --save` or "
                "`shoal join URL`",
            )
        )
    for advert in others:
        version = advert.properties.get("v")
        if version != str(PROTOCOL_VERSION):
            findings.append(
                Finding(
                    "version",
                    "fail",
                    f"{advert.name} speaks protocol v{version}, this node v{PROTOCOL_VERSION}"
                    ": they cannot exchange state",
                    "upgrade Shoal on the older one",
                )
            )
    return adverts, findings


def instance_name(node_name: str, node_id: str) -> str:
    """The mDNS instance a node advertises (as `shoal.mesh.mdns.MdnsDiscovery` names it)."""
    from shoal.mesh.mdns import SERVICE_TYPE

    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in node_name)[:40]
    return f"{safe_name}-{node_id[:8]}.{SERVICE_TYPE}"


def browse(seconds: float, also: Iterable[str] = ()) -> list[Advert]:
    """Listen for `_shoal._tcp.local.` for `seconds`, then resolve what was heard and the
    instances in `also` (asked for by name: an answer to the browse may be missed)."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    from shoal.mesh.mdns import SERVICE_TYPE

    zc = Zeroconf(ip_version=IPVersion.V4Only)
    heard: set[str] = set()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            heard.add(name)

    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        time.sleep(seconds)
        browser.cancel()
        adverts = []
        for name in sorted(heard | set(also)):
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
            if info is None:
                continue
            properties = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            addresses = info.parsed_addresses(IPVersion.V4Only)
            if not addresses:
                continue
            instance = name.removesuffix("." + SERVICE_TYPE)
            adverts.append(Advert(instance, f"http://{addresses[0]}:{info.port}", properties))
        return adverts
    finally:
        zc.close()


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """GET url/healthz: a Shoal node, something else, or why nothing answered."""
    request = urllib.request.Request(url.rstrip("/") + protocol.HEALTHZ_PATH)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            shoal = response.headers.get(protocol.SERVED_BY_HEADER) is not None
            return Probe(url, "shoal" if shoal else "other", response.headers.get("Server", ""))
    except urllib.error.HTTPError as exc:
        with exc:
            shoal = exc.headers.get(protocol.SERVED_BY_HEADER) is not None
            return Probe(url, "shoal" if shoal else "other", f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return Probe(url, "refused")
        if isinstance(reason, TimeoutError | socket.timeout):
            return Probe(url, "timeout")
        return Probe(url, "unreachable", str(reason))


def unreachable(who: str, result: Probe) -> Finding:
    """The finding for a node that cannot be reached at `result.url` (reference 002's
    "found but unreachable")."""
    port = result.url.rsplit(":", 1)[-1]
    match result.outcome:
        case "refused":
            return Finding(
                "peers",
                "fail",
                f"{who} at {result.url} refuses connections: that machine is up but no node "
                "listens on that address. Its node is stopped, or bound to loopback only "
                "(the default)",
                "on that machine run `shoal serve --lan` (or `shoal init --lan`, then "
                "`shoal serve`)",
            )
        case "timeout":
            return Finding(
                "peers",
                "fail",
                f"{who} at {result.url} does not answer within {PROBE_TIMEOUT_S:g} s",
                f"that machine is off, or its firewall drops TCP {port}: open TCP {port} "
                "(and the peer port beside it) there (`shoal doctor` on it says how)",
            )
        case "other":
            return Finding(
                "peers",
                "fail",
                f"{who}: what answers at {result.url} is not a Shoal node",
                "check the address and port (a Shoal node answers /healthz with "
                f"{protocol.SERVED_BY_HEADER})",
            )
        case _:
            return Finding(
                "peers",
                "fail",
                f"{who} at {result.url} cannot be reached: {result.detail}",
                "check that both machines are on the same network (no route to it)",
            )


def _peers(
    settings: settings_mod.Settings,
    status: dict[str, Any] | None,
    peers: list[dict[str, Any]],
    adverts: list[Advert],
) -> list[Finding]:
    """Every node this one knows of, by any means, and whether it can be reached."""
    own_id = status["node_id"] if status else None
    known: dict[str, str] = {}  # url -> who
    for peer in peers:
        if peer["health"] != "healthy" and peer.get("address"):
            known[peer["address"]] = f"peer {peer['name'] or peer['short_id']}"
    for url in settings.peers:
        known.setdefault(url, "configured peer")
    for advert in adverts:
        if advert.node_id != own_id:
            known.setdefault(advert.url, f"{advert.name} (seen on mDNS)")
    healthy = {p["address"] for p in peers if p["health"] == "healthy"}
    to_probe = [url for url in known if url not in healthy]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(probe, to_probe))
    findings = [unreachable(known[r.url], r) for r in results if r.outcome != "shoal"]
    for p in peers:
        if p["health"] == "healthy":
            findings.append(
                Finding("peers", "ok", f"peer {p['name']} at {p['address']} is healthy")
            )
        elif p["address"] not in {r.url for r in results if r.outcome != "shoal"}:
            findings.append(
                Finding(
                    "peers",
                    "warn",
                    f"peer {p['name'] or p['short_id']} is {p['health']} "
                    f"({p['state']}) though it answers at {p['address']}",
                    "it should recover within seconds; if not, check trust (`shoal pair "
                    "list`) and its peer port (TLS, the API port + 1 by default)",
                )
            )
    return findings


def _trust(
    settings: settings_mod.Settings,
    own_id: str | None,
    adverts: list[Advert],
    pairs: list[dict[str, Any]],
) -> list[Finding]:
    findings = []
    secret = secret_mod.read_secret(settings.data_dir)
    ours = secret_fingerprint(secret) if secret else None
    for advert in adverts:
        theirs, mode = advert.properties.get("fp"), advert.properties.get("m")
        if ours is None or advert.node_id == own_id:
            continue
        if theirs is not None and theirs != ours:
            findings.append(
                Finding(
                    "trust",
                    "fail",
                    f"{advert.name} uses another cluster secret (fingerprint {theirs}, this "
                    f"node's {ours}): the two will never admit each other",
                    "give both the same secret: `shoal token show` on a node of the cluster, "
                    f"then `shoal join {advert.url} --token -` on the other and restart it",
                )
            )
        elif theirs is None and mode == "pairing":
            findings.append(
                Finding(
                    "trust",
                    "warn",
                    f"{advert.name} has no cluster secret (pairing mode), this node has one",
                    f"on {advert.name}: `shoal join <this node's URL> --token -` with the "
                    "output of `shoal token show` here, or pair (`shoal pair list`)",
                )
            )
    for node in pairs:
        if node["state"] == "pending":
            findings.append(
                Finding(
                    "trust",
                    "warn",
                    f"{node['name']} ({node['short_id']}) at {node['address']} asks to pair, "
                    f"confirmation code {node['code']}",
                    f"check that {node['name']} shows the same code, then "
                    f"`shoal pair accept {node['short_id']}` (or `decline`)",
                )
            )
    return findings


# -- backends, disk, clocks and versions ---------------------------------------------------


def _backends(status: dict[str, Any], peers: list[dict[str, Any]]) -> list[Finding]:
    findings = []
    for b in status["backends"]:
        where = f"backend {b['name']} ({b['location']})"
        if b["health"] == "healthy":
            findings.append(Finding("backends", "ok", f"{where} is healthy"))
        elif b["health"] == "starting":
            findings.append(Finding("backends", "info", f"{where} is starting"))
        else:
            reason = f": {b['reason']}" if b["reason"] else ""
            findings.append(
                Finding(
                    "backends",
                    "fail",
                    f"{where} is {b['health']}{reason}",
                    f"start the server at {b['location']}, or remove it from the config; "
                    "`shoal status` shows why it failed",
                )
            )
    if not status["backends"]:
        peer_models = any(p["models"] for p in peers if p["health"] == "healthy")
        if peer_models:
            findings.append(
                Finding("backends", "info", "no backend here: requests go to the peers")
            )
        else:
            findings.append(
                Finding(
                    "backends",
                    "fail",
                    "this node has no backend and no peer serves a model: it can answer no request",
                    "enable the embedded engine (drop --no-embedded, or engine.enabled = "
                    "true), start a local server (Ollama, llama-server), add [[backends]], "
                    "or `shoal models pull REF`",
                )
            )
    return findings


def disk(settings: settings_mod.Settings) -> Finding:
    store = store_dir(settings.models)
    existing = next((p for p in (store, *store.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    text = f"{free / 1e9:.1f} GB free for the model store ({store})"
    fix = "free some space, or set models.store to a larger disk"
    if free < DISK_FAIL_BYTES:
        return Finding("disk", "fail", text + ": not enough for a model", fix)
    if free < DISK_WARN_BYTES:
        return Finding("disk", "warn", text + ": room for a small model only", fix)
    return Finding("disk", "ok", text)


def _skew(peers: list[dict[str, Any]]) -> list[Finding]:
    findings = []
    for p in peers:
        if p.get("version") and p["version"] != __version__:
            findings.append(
                Finding(
                    "version",
                    "warn",
                    f"peer {p['name']} runs Shoal {p['version']}, this node {__version__}",
                    "upgrade the older one, so every node behaves the same",
                )
            )
        offset = p.get("clock_offset_s")
        if offset is not None:
            findings.append(clock(p["name"], offset))
    return findings


def clock(name: str, offset_s: float) -> Finding:
    ahead = f"{abs(offset_s):.1f} s {'ahead of' if offset_s > 0 else 'behind'} this one"
    fix = "turn on time sync on both machines (`timedatectl set-ntp true`, or chrony)"
    if abs(offset_s) >= SKEW_FAIL_S:
        return Finding("clock", "fail", f"{name}'s clock is {ahead}: TLS may fail", fix)
    if abs(offset_s) >= SKEW_WARN_S:
        return Finding("clock", "warn", f"{name}'s clock is {ahead}", fix)
    return Finding("clock", "ok", f"{name}'s clock is within {SKEW_WARN_S:g} s of this one")


# -- firewall --------------------------------------------------------------------------


def _firewall(settings: settings_mod.Settings) -> list[Finding]:
    ports = [settings.port] + ([p] if (p := peer_port(settings)) else [])
    found = firewall.hints(ports)
    if not found:
        return [Finding("firewall", "ok", "no active host firewall found")]
    return [Finding("firewall", "warn" if h.blocking else "ok", h.summary, h.fix) for h in found]


# -- output ------------------------------------------------------------------------------


def _get(url: str, path: str) -> Any:
    try:
        return client.get_json(url, path, timeout=5.0)
    except (client.NodeUnreachable, client.NodeRefused, ValueError):
        return None


_MARKS = {
    "ok": "[green]✔[/green]",
    "info": "[blue]·[/blue]",
    "warn": "[yellow]![/yellow]",
    "fail": "[red]✘[/red]",
}


def _report(findings: Iterable[Finding], as_json: bool) -> None:
    findings = list(findings)
    problems = sum(f.level == "fail" for f in findings)
    if as_json:
        document = {
            "ok": problems == 0,
            "problems": problems,
            "checks": [asdict(f) for f in findings],
        }
        out.print_json(json.dumps(document))
        return
    for f in findings:  # peers' names and addresses are theirs: never markup
        out.print(f"{_MARKS[f.level]} {f.check:<9} {escape(f.summary)}", highlight=False)
        if f.fix and f.level != "ok":
            out.print(f"            [dim]→[/dim] {escape(f.fix)}", highlight=False)
    warnings = sum(f.level == "warn" for f in findings)
    out.print(
        f"\n{problems} problem(s), {warnings} warning(s)"
        if problems or warnings
        else "\nno problem found",
        highlight=False,
    )
