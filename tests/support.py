"""Running real Shoal nodes and real servers for tests, and waiting for conditions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_CLIENTS: list[Any] = []  # openai SDK clients made by a test, closed after it


def openai_client(url: str, api_key: str = "x") -> Any:
    """An `openai.OpenAI` client for the node at `url`, closed when the test ends
    (an unclosed client's sockets warn when collected, and warnings are errors here)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
    _CLIENTS.append(client)
    return client


def close_openai_clients() -> None:
    while _CLIENTS:
        _CLIENTS.pop().close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (OSError, ValueError, KeyError) as exc:  # not up yet
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what} (last error {last_error!r})"
    )


def get_json(url: str, timeout: float = 5.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        exc.close()  # an error response holds its socket open until closed
        raise


def clean_env(home: Path) -> dict[str, str]:
    """An environment that reads no user config and no SHOAL_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["XDG_DATA_HOME"] = str(home / "data")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class NodeProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/shoal/v1/status"))

    def backend(self, name: str) -> dict[str, Any]:
        return next(b for b in self.status()["backends"] if b["name"] == name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_node(
    home: Path,
    *args: str,
    wait_backend: str | None = "embedded",
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> NodeProcess:
    """`shoal serve` in a subprocess on a free loopback port, with detection off."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    data_dir = home / "data"
    log_path = home / "node.log"
    command = [
        sys.executable, "-m", "shoal", "serve",
        "--port", str(port), "--data-dir", str(data_dir), "--no-detect", *args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**clean_env(home), **(env or {})}
        )
    node = NodeProcess(f"http://127.0.0.1:{port}", process, log_path, data_dir)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"shoal serve exited {process.returncode}:\n{node.log()}")
        status = node.status()
        if wait_backend is None:
            return True
        return any(
            b["name"] == wait_backend and b["health"] == "healthy" for b in status["backends"]
        )

    try:
        wait_for(ready, 90, f"node at {node.url} with backend {wait_backend} healthy")
    except BaseException:
        node.stop()
        raise
    return node


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request; returns status, headers and body, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()
