"""Client access on a real `shoal serve`: the Host allowlist, header limits, API keys made
with the real `shoal keys`, and that no key ever reaches the log or a response.

Every address a test process can send from on this machine (127.0.0.2 included) is
loopback, so a client *on the network* needs a real LAN: the last test builds one out
of network namespaces (tests/netns/lan.py; root only, skipped elsewhere) and checks
"no key → 401, valid key → 200, revoked key → 401, rebinding Host → 403" from a
second host. tests/unit/test_access.py covers the same rules everywhere, with an
injected loopback predicate.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import shoal.api.app
import shoal.node
from tests.fakes import FakeServer
from tests.netns.lan import Host, Lan, netns_available
from tests.support import NodeProcess, clean_env, http, start_node, wait_for

MODEL = "fake-model"

# Until api/app.py and node.py use shoal.api.access, these tests have nothing to test.
_APP_WIRED = "access_middleware" in Path(shoal.api.app.__file__).read_text()
_LIMITS_WIRED = "HEADER_LIMITS" in Path(shoal.node.__file__).read_text()
pytestmark = pytest.mark.skipif(not _APP_WIRED, reason="access middleware not wired in yet")


def shoal(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        capture_output=True,
        text=True,
        env={**clean_env(home), "COLUMNS": "200"},
        timeout=60,
    )


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer([MODEL]).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def node(fake: FakeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node in pairing mode (not open): clients on the network would need a key."""
    running = start_node(
        tmp_path_factory.mktemp("access-node"),
        "--no-embedded",
        "--backend",
        fake.url,
        "--log-level",
        "debug",  # the most the log ever says: still no key in it
        wait_backend=f"openai@127.0.0.1:{fake.port}",
        env={"SHOAL_CLUSTER__MODE": "pairing"},
    )
    yield running
    running.stop()


def chat_body() -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_loopback_clients_need_no_key(node: NodeProcess) -> None:
    status, _, body = http("POST", node.url + "/v1/chat/completions", chat_body())
    assert status == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "hello from fake"
    status, _, body = http("GET", node.url + "/shoal/v1/status")
    assert status == 200


@pytest.mark.parametrize("path", ["/v1/models", "/healthz", "/shoal/v1/status"])
def test_a_dns_rebinding_host_is_refused(node: NodeProcess, path: str) -> None:
    port = node.url.rsplit(":", 1)[1]
    status, headers, body = http("GET", node.url + path, headers={"Host": f"evil.example:{port}"})
    assert status == 403
    assert headers["Content-Type"].startswith("application/json")
    error = orjson.loads(body)["error"]
    assert error["code"] == "host_not_allowed" and error["type"] == "permission_error"
    # The same request naming this machine is served.
    assert http("GET", node.url + path, headers={"Host": f"localhost:{port}"})[0] == 200


def test_a_foreign_web_page_cannot_drive_the_keyless_loopback_api(node: NodeProcess) -> None:
    """A page on any site can make the browser POST here (a "simple" request needs no
    preflight); its Origin gives it away."""
    status, _, body = http(
        "POST",
        node.url + "/shoal/v1/peers",
        b'{"url": "http://evil.example:11450"}',
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == "origin_not_allowed"


@pytest.mark.skipif(not _LIMITS_WIRED, reason="HEADER_LIMITS not passed to AppRunner yet")
def test_header_limits_hold_on_a_real_node(node: NodeProcess) -> None:
    from shoal.api.access import HEADER_LIMITS

    port = int(node.url.rsplit(":", 1)[1])

    def get(*headers: str) -> int:
        lines = ["GET /healthz HTTP/1.1", "Host: localhost", *headers, "Connection: close"]
        return status_of(raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode()))

    assert get("X-A: 1") == 200
    assert get("X-Big: " + "b" * (HEADER_LIMITS["max_field_size"] + 1)) == 400
    assert get(*(f"X-{i}: 1" for i in range(HEADER_LIMITS["max_headers"]))) == 400
    long_target = "/healthz?" + "a" * HEADER_LIMITS["max_line_size"]
    line = f"GET {long_target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert status_of(raw(port, line.encode())) == 400


def test_an_api_key_appears_in_no_log_line_file_or_response(
    node: NodeProcess, tmp_path: Path
) -> None:
    created = shoal(tmp_path, "keys", "create", "e2e", "--data-dir", str(node.data_dir))
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("shoal-sk-")
    tail = secret[len("shoal-sk-") :]
    bearer = {"Authorization": f"Bearer {secret}"}
    port = int(node.url.rsplit(":", 1)[1])

    for method, path, body, extra in [
        ("POST", "/v1/chat/completions", chat_body(), {}),
        ("GET", "/v1/models", None, {}),
        ("GET", "/shoal/v1/status", None, {}),
        ("GET", "/shoal/v1/peers", None, {}),
        ("GET", "/nowhere", None, {}),
        ("POST", "/v1/chat/completions", b"{not json", {}),
        ("GET", "/v1/models", None, {"Host": "evil.example"}),
        ("GET", "/v1/models", None, {"Origin": "https://evil.example"}),
    ]:
        status, headers, answer = http(method, node.url + path, body, {**bearer, **extra})
        assert status in (200, 400, 403, 404), (path, status)
        assert tail not in json.dumps(headers) and tail.encode() not in answer, path
    # A client that puts its key in a field may see it quoted back to itself (an unknown
    # model is named in the 404), but the log must not keep it.
    http("POST", node.url + "/v1/chat/completions", orjson.dumps({"model": secret}), bearer)
    # Malformed requests carrying the key: aiohttp's parser error quotes the header; the
    # node's JSON 400 and its log line use messages of its own, which quote nothing.
    for header in (f"Bearer {secret}\x01", f"Bearer {secret}" + "A" * 9000):
        request = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: {header}\r\n\r\n"
        answer = raw(port, request.encode())
        assert status_of(answer) == 400 and tail.encode() not in answer

    # What the operator can look at.
    listed = shoal(tmp_path, "keys", "list", "--json", "--data-dir", str(node.data_dir))
    status = shoal(tmp_path, "status", "--json", "--url", node.url)
    assert listed.returncode == 0 and status.returncode == 0
    files = b"".join(p.read_bytes() for p in node.data_dir.rglob("*") if p.is_file())

    # The log has caught up with the requests above (the malformed ones came last) before
    # it is searched: the refusals were logged, and redacted.
    wait_for(lambda: "malformed HTTP request" in node.log(), 10, "the refusals in the log")
    for text in (listed.stdout, listed.stderr, status.stdout, node.log()):
        assert tail not in text
    assert tail.encode() not in files


# -- a client on a real LAN -------------------------------------------------------------

NETNS_AGENT = Path(__file__).parent.parent / "netns" / "agent.py"


class Agent:
    """tests/netns/agent.py inside a namespace: an HTTP client on the LAN."""

    def __init__(self, lan: Lan, host: Host) -> None:
        self.process = lan.run(host, [sys.executable, str(NETNS_AGENT)], pipes=True)

    def call(self, url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {"method": "GET", "url": url, "headers": headers or {}, "timeout": 5}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def status(self, url: str, headers: dict[str, str] | None = None) -> int | None:
        status = self.call(url, headers).get("status")
        return status if isinstance(status, int) else None

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def error_code(self, url: str, headers: dict[str, str] | None = None) -> object:
        answer = self.call(url, headers)
        return json.loads(str(answer["body"]))["error"]["code"]


@pytest.mark.netns
def test_a_lan_client_needs_a_valid_unrevoked_key(tmp_path: Path) -> None:
    reason = netns_available()
    if reason is not None:
        if os.environ.get("SHOAL_REQUIRE_NETNS"):
            pytest.fail(f"network namespace tests cannot run: {reason}")
        pytest.skip(reason)
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PYTHONUNBUFFERED": "1",
        "SHOAL_MESH__MDNS": "false",
    }
    command = [
        sys.executable, "-m", "shoal", "serve", "--lan", "--port", "11450",
        "--data-dir", str(tmp_path / "data"), "--no-detect", "--no-embedded",
        "--log-level", "debug",
    ]  # fmt: skip
    log_path = tmp_path / "node.log"
    with Lan() as lan:
        node_host, client_host = lan.add_host("node"), lan.add_host("client")
        node = lan.run(node_host, command, env=env, log=log_path)
        agent = Agent(lan, client_host)
        try:
            secret = check_lan_access(lan, node, node_host, agent, tmp_path)
        finally:
            agent.close()
            lan.stop(node, agent.process)
    assert secret[len("shoal-sk-") :] not in log_path.read_text(errors="replace")


def check_lan_access(
    lan: Lan, node: subprocess.Popen[bytes], node_host: Host, agent: Agent, home: Path
) -> str:
    """The checks, from the client host; returns the key it made (revoked by the end)."""
    base = f"http://{node_host.ip}:11450"

    def up() -> bool:
        assert node.poll() is None, (home / "node.log").read_text()
        return agent.status(base + "/healthz") == 200  # exempt from keys, not from Host

    wait_for(up, 30, "the node to come up on the LAN", interval=0.2)

    models = base + "/v1/models"
    assert agent.status(models) == 401
    assert agent.error_code(models) == "invalid_api_key"
    assert agent.status(base + "/shoal/v1/status") == 401

    data_dir = str(home / "data")
    created = shoal(home, "keys", "create", "lan-client", "--data-dir", data_dir)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    bearer = {"Authorization": f"Bearer {secret}"}
    assert agent.status(models, bearer) == 200
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert agent.status(models, {"Authorization": f"Bearer {wrong}"}) == 401
    # A rebound name is refused whatever key comes with it.
    rebound = {**bearer, "Host": "evil.example:11450"}
    assert agent.status(models, rebound) == 403
    assert agent.error_code(models, rebound) == "host_not_allowed"

    # Revoked with the CLI while the node serves: refused on the very next request.
    revoked = shoal(home, "keys", "revoke", "lan-client", "--data-dir", data_dir)
    assert revoked.returncode == 0, revoked.stderr
    assert agent.status(models, bearer) == 401

    # On the node's own machine, loopback needs no key.
    local = lan.exec(node_host, [sys.executable, "-c", (
        "import urllib.request as u;"
        "print(u.urlopen('http://127.0.0.1:11450/v1/models', timeout=5).status)"
    )])  # fmt: skip
    assert local.stdout.strip() == "200"
    return secret
