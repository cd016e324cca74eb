"""`shoal demo`: a small cluster on this machine, to see routing in seconds.

Three `shoal serve` processes on loopback ports, each with its own data dir, config
and model store in one temporary folder, admitted to each other by a cluster secret
made for the demo. The first runs the embedded engine (the packaged SmolLM2 and
MiniLM); the others hold no model, so a request sent to them is served by the first.
Ctrl-C (or SIGTERM) stops every node and removes the folder; each node also dies with
the demo (PR_SET_PDEATHSIG on Linux), so nothing outlives it even if it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from shoal import protocol
from shoal.cli.common import err, fail, out
from shoal.trust.secret import new_secret, write_secret

DEFAULT_BASE_PORT = 11470  # beside, not on, a real node's 11450
NODE_NAMES = ("demo-1", "demo-2", "demo-3")
READY_TIMEOUT_S = 120.0  # the engine's first load, on a busy 2-core machine
STOP_GRACE_S = 10.0  # a node stops its engine and says goodbye within a few seconds
CHAT_MODEL = "SmolLM2-135M-Instruct"

_PR_SET_PDEATHSIG = 1
_PRCTL: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:  # in the child, between fork and exec
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class DemoNode:
    name: str
    port: int
    home: Path
    embedded: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "node.log"


def demo(
    port: Annotated[
        int,
        typer.Option(help="The first node's port; the others take the next ones. 0: free ports."),
    ] = DEFAULT_BASE_PORT,
) -> None:
    """Start a 3-node cluster on this machine (one with a real model); Ctrl-C stops it."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    folder = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    nodes: list[DemoNode] = []
    try:
        ports = _ports(port, len(NODE_NAMES))
        nodes = [
            DemoNode(name, p, folder / name, embedded=(i == 0))
            for i, (name, p) in enumerate(zip(NODE_NAMES, ports, strict=True))
        ]
        secret = new_secret()  # only in the nodes' data dirs, which go with the folder
        for node in nodes:
            _start(node, secret, [n.url for n in nodes if n is not node])
        with out.status("starting 3 nodes and the embedded engine…"):
            _wait_ready(nodes, stop)
        if not stop.is_set():
            _explain(nodes, folder)
            while not stop.is_set():
                if (dead := next((n for n in nodes if _exited(n)), None)) is not None:
                    err.print(
                        f"[red]{dead.name} stopped unexpectedly[/red]; its log:", highlight=False
                    )
                    err.print(escape(_tail(dead)), highlight=False)
                    raise typer.Exit(1)
                stop.wait(0.5)
    finally:
        out.print("stopping the demo…", highlight=False)
        _stop_all(nodes)
        shutil.rmtree(folder, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        out.print(f"stopped; removed {escape(str(folder))}", highlight=False)


def _ports(base: int, count: int) -> list[int]:
    if base == 0:
        return [_free_port() for _ in range(count)]
    ports = list(range(base, base + count))
    for p in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", p))
            except OSError:
                raise fail(f"port {p} is taken: `shoal demo --port N` (or 0 for any)", 1) from None
    return ports


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(node: DemoNode, secret: str, peers: list[str]) -> None:
    data = node.home / "data"
    write_secret(data, secret)  # secret mode: they admit each other by the handshake
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update(
        XDG_CONFIG_HOME=str(node.home / "config"),  # no user config is read
        XDG_DATA_HOME=str(node.home / "share"),
        PYTHONUNBUFFERED="1",
        SHOAL_PEERS=json.dumps(peers),
        SHOAL_MODELS__STORE=str(node.home / "store"),  # the user's models stay out of it
        SHOAL_MODELS__FOLDERS="[]",
        SHOAL_MODELS__ADOPT_OLLAMA="false",
        SHOAL_MODELS__ADOPT_LMSTUDIO="false",
        HF_HUB_OFFLINE="1",
    )
    command = [
        sys.executable,
        "-m",
        "shoal",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(node.port),
        "--data-dir",
        str(data),
        "--name",
        node.name,
        "--no-detect",
        "--no-lan",
        *([] if node.embedded else ["--no-embedded"]),
    ]
    node.home.mkdir(parents=True, exist_ok=True)
    with node.log.open("wb") as log:
        node.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        exc.close()
        return None
    except (OSError, ValueError):
        return None


def _ready(node: DemoNode, peers: int) -> bool:
    status = _get(node.url + protocol.STATUS_PATH)
    if status is None:
        return False
    if node.embedded and not any(
        b["name"] == "embedded" and b["health"] == "healthy" for b in status["backends"]
    ):
        return False
    listed = _get(node.url + protocol.PEERS_PATH) or {"peers": []}
    return bool(sum(p["health"] == "healthy" for p in listed["peers"]) >= peers)


def _wait_ready(nodes: list[DemoNode], stop: threading.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set():
        if (dead := next((n for n in nodes if _exited(n)), None)) is not None:
            raise fail(f"{dead.name} exited at start; its log:\n{_tail(dead)}", 1)
        if all(_ready(n, len(nodes) - 1) for n in nodes):
            return
        if time.monotonic() > deadline:
            raise fail(f"the demo cluster was not ready within {READY_TIMEOUT_S:.0f} s", 1)
        stop.wait(0.2)


def _exited(node: DemoNode) -> bool:
    return node.process is not None and node.process.poll() is not None


def _tail(node: DemoNode, chars: int = 2000) -> str:
    try:
        return node.log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _explain(nodes: list[DemoNode], folder: Path) -> None:
    table = Table("node", "API", "models")
    for node in nodes:
        held = (
            "SmolLM2-135M-Instruct (chat), all-MiniLM-L6-v2 (embeddings)"
            if node.embedded
            else "none: forwards to demo-1"
        )
        table.add_row(node.name, node.url + "/v1", held)
    out.print(table)
    last = nodes[-1]
    body = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
    out.print(
        f"""[bold]Send a request to {last.name}[/bold] (it has no model: demo-1 serves it, \
see the X-Shoal-Served-By header):

  curl -i {last.url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'

[bold]Or with the openai SDK:[/bold]

  from openai import OpenAI
  client = OpenAI(base_url="{last.url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="{CHAT_MODEL}", messages=[{{"role": "user", "content": "hi"}}])
  print(reply.choices[0].message.content)

[bold]The dashboard:[/bold] {nodes[0].url}/  (every node serves one)
[bold]The cluster as a node sees it:[/bold] shoal peers --url {last.url}

Nodes' logs and data: {folder} (removed when the demo stops)
[bold]Ctrl-C stops everything.[/bold]""",
        highlight=False,
        soft_wrap=True,
        markup=True,
    )
    out.print("demo ready", highlight=False)  # the line scripts and tests wait for


def _stop_all(nodes: list[DemoNode]) -> None:
    """SIGTERM every node's process group, SIGKILL what is left after the grace."""
    running = [n.process for n in nodes if n.process is not None and n.process.poll() is None]
    for process in running:
        _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    for node in nodes:  # a child the node left behind, in the node's group
        if node.process is not None:
            _signal_group(node.process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
