"""Real Shoal nodes on a `Lan`, and the agents that talk to them from inside it.

Shared by the namespace suites (mesh, broken links, hostile LAN):

    cluster = Cluster(lan, client_host, Agent(lan, client_host), {"n1": Node(...)})
    cluster.start(cluster.nodes["n1"])          # `shoal serve --lan` in n1's namespace
    cluster.health("n3", "n1")                  # "healthy", "degraded", "unreachable"
    wait_until(lambda: ..., 30, "what we wait for")

A node gets its cluster secret (if any) and an API key for the cluster's agent written
into its data dir before it starts, as `shoal join --token` and `shoal keys create`
would. Node processes are the Lan's: killed with it, whatever happens.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal.trust.keys import KeyStore
from shoal.trust.secret import write_secret
from tests.netns.lan import Host, Lan, netns_available

T = TypeVar("T")

PORT = 11450
HERE = Path(__file__).resolve().parent


def require_netns() -> None:
    """Skip (or, in CI, fail) where network namespaces cannot be built."""
    reason = netns_available()
    if reason is not None:
        if os.environ.get("SHOAL_REQUIRE_NETNS"):  # CI: a skip here would hide a failure
            pytest.fail(f"network namespace tests cannot run: {reason}")
        pytest.skip(reason)


def wait_until(
    condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1
) -> float:
    """Poll `condition` until it is truthy; return when it became so (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def spread(values: Sequence[float]) -> str:
    """`p50 … max …` of some durations in seconds, in ms, for the printed figures."""
    if not values:
        return "no samples"
    return f"p50 {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


class Agent:
    """tests/netns/agent.py inside a namespace: our HTTP client on the LAN."""

    def __init__(self, lan: Lan, host: Host) -> None:
        self.host = host
        self.process = lan.run(host, [sys.executable, str(HERE / "agent.py")], pipes=True)
        self.api_keys: dict[str, str] = {}  # node URL -> the API key it gave this client
        self._waiting = 0  # requests sent whose answer is not read yet

    def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
        **extra: Any,
    ) -> dict[str, Any]:
        """One call as the agent takes it, with this client's key for `url`'s node."""
        key = next((k for base, k in self.api_keys.items() if url.startswith(base + "/")), None)
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        request = {"method": method, "url": url, "headers": headers, "timeout": timeout, **extra}
        if body is not None:
            request["body"] = body if isinstance(body, str) else json.dumps(body)
            request["headers"] = {"Content-Type": "application/json", **headers}
        return request

    def send(self, request: dict[str, Any]) -> None:
        """Hand the agent a call or a batch; `receive()` gets the answer later."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        self._waiting += 1

    def ready(self) -> bool:
        """Whether an answer is waiting to be received."""
        assert self.process.stdout is not None
        return bool(select.select([self.process.stdout], [], [], 0)[0])

    def receive(self, timeout: float = 120) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the agent on {self.host.name} said nothing in {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the agent on {self.host.name} exited")
        self._waiting -= 1
        return dict(json.loads(line))

    def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
        **extra: Any,
    ) -> dict[str, Any]:
        assert not self._waiting, "a batch is still out: receive() it first"
        self.send(self.request(method, url, body, headers, timeout, **extra))
        return self.receive(timeout + 30)

    def json(self, url: str) -> Any:
        answer = self.call("GET", url, timeout=5)
        if answer.get("status") != 200:
            return None
        return json.loads(answer["body"])

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Node:
    name: str
    host: Host
    home: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    secret: str | None = None  # the cluster secret written to its data dir; None: none
    config: str = ""  # TOML for --config, when not empty
    fd_limit: int | None = None  # soft and hard RLIMIT_NOFILE, as a service manager sets
    program: tuple[str, ...] = ("-m", "shoal")  # after the interpreter: another wrapper
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{PORT}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "node.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the node process (it is the Popen's pid: `ip netns exec`
        and `prlimit` exec what they run)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        assert self.process is not None
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def fd_limits(self) -> tuple[int, int]:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError("no open file limit")

    def log_bytes(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    lan: Lan
    agent_host: Host
    agent: Agent
    nodes: dict[str, Node]
    figures: dict[str, str] = field(default_factory=dict)

    def start(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        # The same place `shoal join --token` puts it: nodes with the same secret admit
        # each other by challenge-response.
        if node.secret is not None:
            write_secret(node.data_dir, node.secret)
        # The client is on the LAN: it needs an API key from each node (`shoal keys create`).
        if node.url not in self.agent.api_keys:
            keys = KeyStore.in_data_dir(node.data_dir)
            self.agent.api_keys[node.url] = keys.create("netns-agent")[1]
        env = {
            "XDG_CONFIG_HOME": str(node.home / "config"),
            "PYTHONUNBUFFERED": "1",
            **node.env,
        }
        command = [
            sys.executable, *node.program, "serve", "--lan", "--port", str(PORT),
            "--name", node.name, "--data-dir", str(node.data_dir), "--no-detect",
            *node.args,
        ]  # fmt: skip
        if node.config:
            config = node.home / "config.toml"
            config.write_text(node.config)
            command += ["--config", str(config)]
        if node.fd_limit is not None:
            command = ["prlimit", f"--nofile={node.fd_limit}:{node.fd_limit}", "--", *command]
        node.started = time.monotonic()
        node.process = self.lan.run(node.host, command, env=env, log=node.log)

    def node_url(self, name: str) -> str:
        return self.nodes[name].url

    def peers_of(self, name: str) -> dict[str, dict[str, Any]]:
        document = self.agent.json(self.nodes[name].url + "/shoal/v1/peers")
        return {p["name"]: p for p in (document or {"peers": []})["peers"]}

    def health(self, viewer: str, peer: str) -> str | None:
        found = self.peers_of(viewer).get(peer)
        return None if found is None else str(found["health"])

    def sees_all_healthy(self, viewer: str, others: Sequence[str]) -> bool:
        peers = self.peers_of(viewer)
        return all(peers.get(o, {}).get("health") == "healthy" for o in others)

    def models_at(self, name: str) -> set[str]:
        document = self.agent.json(self.nodes[name].url + "/v1/models") or {"data": []}
        return {m["id"] for m in document["data"]}

    def chat(
        self,
        name: str,
        model: str,
        headers: dict[str, str] | None = None,
        content: str = "hi",
        timeout: float = 30,
    ) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        url = self.nodes[name].url + "/v1/chat/completions"
        return self.agent.call("POST", url, body, headers, timeout=timeout)

    def measured(self, what: str, seconds: float) -> None:
        """Keep a duration among the figures printed at the end."""
        self.figures[what] = f"{seconds:.2f} s"

    def report(self, tail_chars: int = 3000) -> None:
        """Print the figures measured and the tail of every node's log."""
        print("\nmeasured on the namespace LAN:")
        for key, value in self.figures.items():
            print(f"  {key}: {value}")
        for node in self.nodes.values():
            print(f"--- {node.name} log (tail) ---\n{node.log_text()[-tail_chars:]}")


def start_backend(lan: Lan, host: Host, port: int, models: Sequence[str]) -> None:
    """tests/netns/backend.py on `host`'s loopback, serving `models`; returns once it
    listens (killed with the Lan)."""
    argv = [sys.executable, str(HERE / "backend.py"), "--port", str(port)]
    for model in models:
        argv += ["--model", model]
    process = lan.run(host, argv, pipes=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline().strip() if ready else b""
    for pipe in (process.stdin, process.stdout):  # it says nothing more
        if pipe is not None:
            pipe.close()
    if line != b"ready":
        raise AssertionError(f"the fake backend on {host.name} said {line!r}, not ready")
