"""Client access on a real `shoal serve`: the Host allowlist, header limits, API keys made
with the real `shoal keys`, and that no key ever reaches the log or a response.

A client that is *not* on loopback cannot be made here: every address a test process
can send from on this machine (127.0.0.2 included) is loopback, and a real LAN needs
network namespaces. "LAN client without key → 401, revoked key → 401" is therefore
tested in tests/unit/test_access.py, on a real aiohttp server whose loopback predicate
is injected; tests/netns is where a LAN client can exercise it end to end.
"""

from __future__ import annotations

import json
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
from tests.support import NodeProcess, clean_env, http, start_node

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
    # Malformed requests carrying the key: aiohttp logs these with the header quoted.
    # (Its plain-text 400 quotes it back to the sender, who has it anyway.)
    for header in (f"Bearer {secret}\x01", f"Bearer {secret}" + "A" * 9000):
        request = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: {header}\r\n\r\n"
        assert status_of(raw(port, request.encode())) == 400

    # What the operator can look at.
    listed = shoal(tmp_path, "keys", "list", "--json", "--data-dir", str(node.data_dir))
    status = shoal(tmp_path, "status", "--json", "--url", node.url)
    assert listed.returncode == 0 and status.returncode == 0
    files = b"".join(p.read_bytes() for p in node.data_dir.rglob("*") if p.is_file())

    for text in (listed.stdout, listed.stderr, status.stdout, node.log()):
        assert tail not in text
    assert tail.encode() not in files
    assert "malformed HTTP request" in node.log()  # the refusals were logged, redacted
