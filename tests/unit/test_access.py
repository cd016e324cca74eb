"""`shoal.api.access`: the Host allowlist, client API keys, header limits, log redaction.

Every test here runs a real aiohttp server on loopback, with the real route table
(`shoal.api.app.ROUTES`, every handler replaced by one that answers 200). Clients "on
the network" are simulated with an injectable `is_loopback` predicate: a second loopback
address (127.0.0.2) is still loopback, and a real LAN needs namespaces (tests/netns).
The decision itself is tested as a table in `test_audience.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import LineTooLong
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from multidict import CIMultiDict

from shoal.api.access import (
    HEADER_LIMITS,
    MachineHosts,
    RedactSecrets,
    access_middleware,
    host_of,
    install_log_redaction,
    is_loopback_address,
    peer_port_caller,
    redact,
)
from shoal.api.app import ROUTES, build_app
from shoal.api.audience import Audience, Caller
from shoal.errors import Forbidden
from shoal.mesh import interfaces as interfaces_mod
from shoal.settings import Settings
from shoal.trust.keys import KeyStore

Client = TestClient[web.Request, web.Application]


@pytest.fixture(autouse=True)
def no_outside_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SHOAL_"):
            monkeypatch.delenv(key)


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.in_data_dir(tmp_path)


def lan_settings(tmp_path: Path, **cluster: Any) -> Settings:
    return Settings(lan=True, data_dir=tmp_path, cluster=cluster)


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "path": request.path})


TEST_ROUTES = tuple(dataclasses.replace(route, handler=ok) for route in ROUTES)
PEER_PROOF = "X-Test-Peer-Proof"  # stands in for a paired node's TLS certificate

OWN = {"mybox", "mybox.local", "192.168.1.5", "fe80::1%eth0"}


def mode_of(settings: Settings) -> str:
    """What the trust service would say, short of a cluster secret on disk."""
    return settings.cluster.mode or ("pairing" if settings.lan else "open")


def build(settings: Settings, keys: KeyStore, **options: Any) -> web.Application:
    own: Callable[[], set[str]] = options.pop("own_hosts", lambda: set(OWN))
    is_loopback: Callable[[str | None], bool] = options.pop("is_loopback", is_loopback_address)
    caller_of = options.pop("caller_of", peer_port_caller(lambda transport: None, is_loopback))
    return build_app(
        settings,
        keys=keys,
        own_hosts=own,
        caller_of=caller_of,
        cluster_mode=options.pop("cluster_mode", lambda: mode_of(settings)),
        served_by="test",
        routes=TEST_ROUTES,
    )


@contextlib.asynccontextmanager
async def serve(settings: Settings, keys: KeyStore, **options: Any) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build(settings, keys, **options))) as client:
        yield client


def on_the_lan(remote: str | None) -> bool:
    return False


async def call(
    client: Client, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], bytes]:
    async with client.request(method, path, headers=headers or {}) as response:
        body = await response.read()
        document = orjson.loads(body) if body.startswith(b"{") else {}
        return response.status, document, body


async def raw(port: int, request: bytes) -> bytes:
    """One request on a fresh connection, as bytes; the answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("localhost", "localhost"),
        ("localhost:11450", "localhost"),
        ("LocalHost.:80", "localhost"),
        ("127.0.0.1:11450", "127.0.0.1"),
        ("[::1]:11450", "::1"),
        ("[::1]", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("[::ffff:127.0.0.1]:1", "127.0.0.1"),
        ("[fe80::1%25eth0]:1", "fe80::1"),
        ("MyBox", "mybox"),
        ("my-box.lan:8080", "my-box.lan"),
        (" evil.example ", "evil.example"),
        # Malformed: refused as no host at all.
        ("", None),
        (":11450", None),
        ("::1", None),  # IPv6 must be bracketed
        ("[::1", None),
        ("[127.0.0.1]", None),
        ("[::1]x", None),
        ("host:port", None),
        ("host:123456", None),
        ("host:", None),
        ("user@host", None),
        ("evil.example/path", None),
        ("evil%2eexample", None),
        ("127.0.0.1%eth0", None),
        ("a b", None),
        ("bad..dots", None),
    ],
)
def test_host_of(header: str, host: str | None) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.168.1.20", False),
        ("::ffff:192.168.1.20", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a remote address is never a name
        ("", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_is_loopback_address(remote: str | None, loopback: bool) -> None:
    assert is_loopback_address(remote) is loopback


def test_machine_hosts_has_names_and_addresses_and_follows_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = lan_settings(tmp_path)
    hosts = MachineHosts(settings, extra=["shoal-0123456789ab.local."])()
    hostname = socket.gethostname().lower()
    assert {hostname, hostname.split(".")[0] + ".local", "127.0.0.1"} <= hosts
    assert "shoal-0123456789ab.local" in hosts

    class Address:
        def __init__(self, family: int, address: str) -> None:
            self.family, self.address = family, address

    interfaces = {"eth0": [Address(socket.AF_INET, "10.0.0.5")]}
    monkeypatch.setattr(interfaces_mod.psutil, "net_if_addrs", lambda: interfaces)
    fresh = MachineHosts(settings, ttl_s=0)
    assert "10.0.0.5" in fresh()
    interfaces["eth0"] = [Address(socket.AF_INET6, "fe80::2%eth0")]  # DHCP moved us
    assert "fe80::2" in fresh() and "10.0.0.5" not in fresh()


# -- the Host allowlist -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        None,  # the client's own (127.0.0.1:port)
        "localhost:11450",
        "localhost",
        "127.0.0.1",
        "127.1.2.3:80",
        "[::1]:11450",
        "MyBox:11450",  # this machine's own name and addresses, from own_hosts()
        "mybox.local.",
        "192.168.1.5:11450",
        "[fe80::1]:11450",
        "proxy.example:8443",  # cluster.allowed_hosts
    ],
)
async def test_hosts_naming_this_machine_are_served(
    tmp_path: Path, keys: KeyStore, host: str | None
) -> None:
    settings = lan_settings(tmp_path, allowed_hosts=["Proxy.Example:443"])
    async with serve(settings, keys) as client:
        status, document, _ = await call(
            client, "GET", "/v1/models", {"Host": host} if host else None
        )
    assert status == 200 and document["ok"] is True


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",  # a rebound name: what a DNS-rebinding page sends
        "evil.example:11450",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
        "mybox.evil.example",
        "192.168.1.6",  # another machine
        "0.0.0.0",
        "[::1",  # malformed
        "a b",
    ],
)
@pytest.mark.parametrize("path", ["/v1/models", "/healthz", "/shoal/v1/mesh/state"])
async def test_other_hosts_are_refused_with_403_even_on_exempt_paths(
    tmp_path: Path, keys: KeyStore, host: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(lan_settings(tmp_path, mode="open"), keys) as client:
        method = "POST" if "mesh" in path else "GET"
        status, document, _ = await call(client, method, path, {"Host": host})
    assert status == 403
    assert document["error"]["code"] == "host_not_allowed"
    assert document["error"]["type"] == "permission_error"
    assert "allowed_hosts" in document["error"]["message"]
    assert any("cluster.allowed_hosts" in r.getMessage() for r in caplog.records)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_missing_or_repeated_host_header(tmp_path: Path, keys: KeyStore) -> None:
    """aiohttp's parser refuses some of these itself (400); the middleware refuses the
    rest (403): either way no handler runs."""
    async with serve(lan_settings(tmp_path), keys) as client:
        port = client.port
        assert port is not None
        missing = await raw(port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status_of(missing) in (400, 403)
        twice = await raw(
            port,
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status_of(twice) in (400, 403)
        # HTTP/1.0 may omit Host (browsers never do, so no rebinding is possible).
        assert status_of(await raw(port, b"GET /v1/models HTTP/1.0\r\n\r\n")) == 200


@pytest.mark.parametrize(
    "hosts",
    [(), ("localhost", "evil.example"), ("localhost", "localhost")],
    ids=["none", "two", "same-twice"],
)
async def test_the_middleware_itself_refuses_missing_or_repeated_host(
    tmp_path: Path, keys: KeyStore, hosts: tuple[str, ...]
) -> None:
    headers = CIMultiDict(("Host", host) for host in hosts)
    request = make_mocked_request("GET", "/v1/models", headers=headers, version=HttpVersion11)
    middleware = access_middleware(
        lan_settings(tmp_path),
        keys,
        lambda: set(),
        audience_of=lambda request: Audience.CLIENT,
        caller_of=lambda request: Caller(loopback=True, peer_port=False, peer=None),
        cluster_mode=lambda: "pairing",
    )
    with pytest.raises(Forbidden) as caught:
        await middleware(request, ok)
    assert caught.value.code == "host_not_allowed"


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://localhost:3000", 200),  # a web app on this machine
        ("http://127.0.0.1:11450", 200),
        ("http://[::1]:8080", 200),
        ("https://mybox.local", 200),
        ("https://evil.example", 403),  # any web page: must not drive the keyless API
        ("http://evil.example:11450", 403),
        ("null", 403),  # sandboxed frames and file:// pages
        ("garbage", 403),
    ],
)
async def test_a_browser_origin_must_name_this_machine(
    tmp_path: Path, keys: KeyStore, origin: str, status: int
) -> None:
    async with serve(lan_settings(tmp_path), keys) as client:
        got, document, _ = await call(client, "POST", "/shoal/v1/peers", {"Origin": origin})
    assert got == status
    if status == 403:
        assert document["error"]["code"] == "origin_not_allowed"


# -- client authentication --------------------------------------------------------------


async def test_loopback_clients_need_no_key(tmp_path: Path, keys: KeyStore) -> None:
    keys.create("someone")  # keys exist, but loopback is trusted anyway
    async with serve(lan_settings(tmp_path, mode="secret"), keys) as client:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            status, _, _ = await call(client, method, path)
            assert status == 200


@pytest.mark.parametrize("mode", ["pairing", "secret"])
async def test_lan_clients_need_a_valid_unrevoked_key(
    tmp_path: Path, keys: KeyStore, mode: str
) -> None:
    record, secret = keys.create("laptop")
    async with serve(lan_settings(tmp_path, mode=mode), keys, is_loopback=on_the_lan) as client:
        status, document, _ = await call(client, "GET", "/v1/models")
        assert status == 401
        assert document["error"]["type"] == "authentication_error"
        assert document["error"]["code"] == "invalid_api_key"
        assert "shoal keys create" in document["error"]["message"]

        bearer = {"Authorization": f"Bearer {secret}"}
        assert (await call(client, "POST", "/v1/chat/completions", bearer))[0] == 200
        assert (await call(client, "GET", "/v1/models", {"authorization": f"bearer {secret}"}))[
            0
        ] == 200

        for header in (
            f"Bearer {secret[:-2]}",
            f"Basic {secret}",
            secret,
            "Bearer",
            "Bearer ",
        ):
            status, document, body = await call(
                client, "GET", "/v1/models", {"Authorization": header}
            )
            assert status == 401, header
            assert secret[len("shoal-sk-") :][:8] not in body.decode()  # never echoed

        # Revoked by the CLI (another store on the same file) while serving: refused now.
        assert KeyStore(keys.path).revoke(record.id) == record
        status, document, body = await call(client, "GET", "/v1/models", bearer)
        assert status == 401
        assert document["error"]["message"] == "the API key is not valid (wrong, or revoked)"
        assert secret not in body.decode()


async def test_two_authorization_headers_are_refused(tmp_path: Path, keys: KeyStore) -> None:
    _, secret = keys.create("laptop")
    async with serve(lan_settings(tmp_path), keys, is_loopback=on_the_lan) as client:
        port = client.port
        assert port is not None
        answer = await raw(
            port,
            f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n"
            f"Authorization: Bearer {secret}\r\nConnection: close\r\n\r\n".encode(),
        )
    assert answer.startswith(b"HTTP/1.1 401")
    assert secret.encode() not in answer


async def test_an_open_cluster_needs_no_key(tmp_path: Path, keys: KeyStore) -> None:
    async with serve(lan_settings(tmp_path, mode="open"), keys, is_loopback=on_the_lan) as client:
        assert (await call(client, "GET", "/v1/models"))[0] == 200
    # Not in LAN mode and no mode set: open.
    async with serve(Settings(data_dir=tmp_path), keys, is_loopback=on_the_lan) as client:
        assert (await call(client, "GET", "/v1/models"))[0] == 200


async def test_the_mode_is_read_per_request(tmp_path: Path, keys: KeyStore) -> None:
    mode = ["open"]
    async with serve(
        lan_settings(tmp_path), keys, is_loopback=on_the_lan, cluster_mode=lambda: mode[0]
    ) as client:
        assert (await call(client, "GET", "/v1/models"))[0] == 200
        mode[0] = "secret"
        assert (await call(client, "GET", "/v1/models"))[0] == 401


def test_every_route_declares_an_audience_and_the_node_protocol_is_not_client() -> None:
    audiences = {(r.method, r.path): r.audience for r in ROUTES}
    assert len(audiences) == len(ROUTES), "a route declared twice"
    assert audiences[("GET", "/healthz")] is Audience.PUBLIC
    assert audiences[("POST", "/shoal/v1/trust/hello")] is Audience.PUBLIC
    assert audiences[("POST", "/shoal/v1/mesh/state")] is Audience.PEER
    assert audiences[("POST", "/shoal/v1/peers")] is Audience.LOCAL
    assert audiences[("POST", "/v1/chat/completions")] is Audience.CLIENT


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("HEAD", "/healthz", 200),
        ("GET", "/", 200),  # the dashboard's page and files: no data in them
        ("GET", "/dashboard/app.js", 200),
        ("POST", "/shoal/v1/trust/hello", 200),
        ("POST", "/shoal/v1/trust/confirm", 200),
        # The peer protocol needs a paired node's certificate: not a key, not the LAN.
        ("POST", "/shoal/v1/mesh/state", 403),
        ("POST", "/shoal/v1/mesh/goodbye", 403),
        ("GET", "/shoal/v1/files/" + "ab" * 32, 403),  # model files: paired peers only
        ("HEAD", "/shoal/v1/files/" + "ab" * 32, 403),
        ("GET", "/shoal/v1/files/" + "ab" * 32 + "/manifest", 403),
        ("POST", "/shoal/v1/peer/models/pull", 403),  # a peer's operator: `pull --on`
        # What makes the node contact addresses or changes trust: this machine only.
        ("POST", "/shoal/v1/peers", 403),
        ("POST", "/shoal/v1/peers/scan", 403),
        ("GET", "/shoal/v1/pairs", 403),
        ("POST", "/shoal/v1/pairs/abcdef123456/accept", 403),
        ("GET", "/shoal/v1/models/local", 403),  # paths on this machine's disk
        ("POST", "/shoal/v1/models/load", 403),
        ("POST", "/shoal/v1/models/unload", 403),
        ("POST", "/shoal/v1/models/pull", 403),  # writes to this machine's disk
        # Everything else needs a key, operator views included.
        ("GET", "/shoal/v1/status", 401),
        ("GET", "/shoal/v1/peers", 401),
        ("GET", "/shoal/v1/events", 401),  # the dashboard's live view
        ("GET", "/metrics", 401),  # as status: a Prometheus on the LAN sends a key
        ("GET", "/healthz/x", 401),
        ("GET", "/shoal/v1/mesh", 401),
        ("GET", "/nowhere", 401),  # unknown paths too: no probing without a key
        ("GET", "/shoal/v1/mesh/state", 401),  # a wrong method is not the peer route
        ("GET", "/shoal/v1/mesh/../status", 401),
        ("GET", "/shoal/v1/mesh/%2e%2e/status", 401),
        ("GET", "/shoal/v1/trust/..%2f..%2fstatus", 401),
    ],
)
async def test_what_a_lan_caller_without_a_key_gets_on_every_route(
    tmp_path: Path, keys: KeyStore, method: str, path: str, status: int
) -> None:
    async with serve(lan_settings(tmp_path), keys, is_loopback=on_the_lan) as client:
        got, _, _ = await call(client, method, path)
    assert got == status


def test_the_test_table_covers_every_route() -> None:
    covered = {
        "/healthz", "/shoal/v1/trust/hello", "/shoal/v1/trust/confirm", "/shoal/v1/mesh/state",
        "/shoal/v1/mesh/goodbye", "/shoal/v1/peers", "/shoal/v1/peers/scan", "/shoal/v1/pairs",
        "/shoal/v1/pairs/{node}/{action}", "/shoal/v1/status", "/v1/models",
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
        "/shoal/v1/models/local", "/shoal/v1/models/load", "/shoal/v1/models/unload",
        "/shoal/v1/models/pull", "/shoal/v1/files/{sha256}", "/shoal/v1/files/{sha256}/manifest",
        "/shoal/v1/events", "/", "/dashboard/{asset}", "/shoal/v1/peer/models/pull",
        "/metrics",
    }  # fmt: skip
    assert {r.path for r in ROUTES} == covered


def proven_peer(request: web.Request) -> Caller:
    """A caller that proves a paired node when the test says so, as mTLS would."""
    proof = request.headers.get(PEER_PROOF)
    return Caller(loopback=False, peer_port=proof is not None, peer=proof or None)


async def test_a_proven_peer_needs_no_client_key_but_a_hop_header_proves_nothing(
    tmp_path: Path, keys: KeyStore
) -> None:
    async with serve(lan_settings(tmp_path), keys, caller_of=proven_peer) as client:
        assert (await call(client, "POST", "/v1/chat/completions", {"X-Shoal-Hop": "1"}))[0] == 401
        proof = {PEER_PROOF: "a" * 64}
        assert (await call(client, "POST", "/v1/chat/completions", proof))[0] == 200
        assert (await call(client, "POST", "/shoal/v1/mesh/state", proof))[0] == 200
        # A node is not the operator, even one on this machine.
        assert (await call(client, "POST", "/shoal/v1/peers", proof))[0] == 403
        # On the peer port, a certificate that proves no paired node gets nothing.
        assert (await call(client, "GET", "/healthz", {PEER_PROOF: ""}))[0] == 403


async def test_a_corrupt_key_file_refuses_keys_and_says_why_in_the_log_once(
    tmp_path: Path, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = keys.create("laptop")
    good = keys.path.read_bytes()
    async with serve(lan_settings(tmp_path), keys, is_loopback=on_the_lan) as client:
        keys.path.write_text("{oops")
        bearer = {"Authorization": f"Bearer {secret}"}
        for _ in range(3):
            status, document, _ = await call(client, "GET", "/v1/models", bearer)
            assert status == 500
            assert "cannot check API keys" in document["error"]["message"]
            assert str(keys.path) not in document["error"]["message"]
        logged = [r for r in caplog.records if "cannot check API keys" in r.getMessage()]
        assert len(logged) == 1 and str(keys.path) in logged[0].getMessage()
        keys.path.write_bytes(good)
        assert (await call(client, "GET", "/v1/models", bearer))[0] == 200


# -- header limits and the log ----------------------------------------------------------


@contextlib.asynccontextmanager
async def limited_server(app: web.Application) -> AsyncIterator[int]:
    """`app` behind a runner built as the node builds its own: with HEADER_LIMITS."""
    runner = web.AppRunner(app, access_log=None, **HEADER_LIMITS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def redacted_log() -> Iterator[list[str]]:
    """Every line logged while inside, formatted through a handler with RedactSecrets."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    install_log_redaction(root)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for other in root.handlers:
            for f in [f for f in other.filters if isinstance(f, RedactSecrets)]:
                other.removeFilter(f)


def head(request_line: str, headers: list[str]) -> bytes:
    lines = [request_line, "Host: localhost", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


async def test_header_limits_refuse_oversized_requests(tmp_path: Path, keys: KeyStore) -> None:
    async with limited_server(build(lan_settings(tmp_path), keys)) as port:
        assert status_of(await raw(port, head("GET /v1/models HTTP/1.1", ["X-A: 1"]))) == 200

        url = "/v1/models?q="
        line = HEADER_LIMITS["max_line_size"] - len(url)  # the request target, at most
        assert status_of(await raw(port, head(f"GET {url}{'a' * line} HTTP/1.1", []))) == 200
        too_long = await raw(port, head(f"GET {url}{'a' * (line + 1)} HTTP/1.1", []))
        assert status_of(too_long) == 400

        field = HEADER_LIMITS["max_field_size"]
        fits = await raw(port, head("GET /v1/models HTTP/1.1", [f"X-Big: {'b' * field}"]))
        assert status_of(fits) == 200
        too_big = await raw(port, head("GET /v1/models HTTP/1.1", [f"X-Big: {'b' * (field + 1)}"]))
        assert status_of(too_big) == 400

        count = HEADER_LIMITS["max_headers"]
        # Host and Connection count too.
        enough = [f"X-{i}: 1" for i in range(count - 2)]
        assert status_of(await raw(port, head("GET /v1/models HTTP/1.1", enough))) == 200
        too_many = [f"X-{i}: 1" for i in range(count - 1)]
        assert status_of(await raw(port, head("GET /v1/models HTTP/1.1", too_many))) == 400


async def test_a_key_in_a_malformed_header_is_not_logged(tmp_path: Path, keys: KeyStore) -> None:
    """aiohttp quotes the offending header of a malformed request in its error log: an
    Authorization header too long, or with a control character, would put a key there."""
    _, secret = keys.create("laptop")
    async with limited_server(build(lan_settings(tmp_path), keys)) as port:
        with redacted_log() as lines:
            padded = f"Authorization: Bearer {secret}{'A' * HEADER_LIMITS['max_field_size']}"
            await raw(port, head("GET /v1/models HTTP/1.1", [padded]))
            await raw(
                port, head("GET /v1/models HTTP/1.1", [f"Authorization: Bearer {secret}\x01"])
            )
            # And an ordinary request with the key, valid and then not.
            good = await raw(
                port, head("GET /v1/models HTTP/1.1", [f"Authorization: Bearer {secret}"])
            )
            assert status_of(good) == 200
    text = "\n".join(lines)
    assert "malformed HTTP request" in text  # aiohttp's refusals were logged, redacted
    assert secret not in text and secret[len("shoal-sk-") :] not in text
    assert "Traceback" not in text


def test_redact() -> None:
    key = "shoal-sk-" + "Ab3_-x" * 7
    assert redact(f"got {key}.") == "got shoal-sk-[redacted]."
    assert redact("secret shoal-ct-abcdefghij2345") == "secret shoal-ct-[redacted]"
    assert redact("Authorization: Bearer sk-upstream-123") == "Authorization: Bearer [redacted]"
    assert redact("b'bearer abc\\x01'") == "b'bearer [redacted]\\x01'"
    assert redact("nothing to hide") == "nothing to hide"


def test_the_filter_cleans_messages_arguments_and_tracebacks() -> None:
    key = "shoal-sk-" + "Q" * 43
    log_filter = RedactSecrets()
    formatter = logging.Formatter("%(message)s")

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s used", (key,), None)
    assert log_filter.filter(record)
    assert key not in formatter.format(record)

    try:
        raise ValueError(f"bad {key}")
    except ValueError as exc:
        info = (type(exc), exc, exc.__traceback__)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), info)
    assert log_filter.filter(record)
    text = formatter.format(record)
    assert key not in text and "shoal-sk-[redacted]" in text

    error = LineTooLong(f"Bearer {key}", "8190")
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("10.0.0.7",), (type(error), error, None),
    )  # fmt: skip
    assert log_filter.filter(record)
    text = formatter.format(record)
    assert key not in text and "Bearer" not in text
    assert text.startswith("Error handling request from 10.0.0.7: malformed HTTP request")
    assert record.levelno == logging.INFO


async def test_the_key_a_lan_client_came_in_by_goes_with_its_request(
    tmp_path: Path, keys: KeyStore
) -> None:
    """Its class and weight when requests queue (`shoal.routing.admission`)."""
    from shoal.api.access import API_KEY

    async def who(request: web.Request) -> web.Response:
        key = request.get(API_KEY)
        return web.json_response(None if key is None else {"id": key.id, "weight": key.weight})

    routes = tuple(
        dataclasses.replace(r, handler=who) if r.path == "/v1/chat/completions" else r
        for r in TEST_ROUTES
    )
    settings = lan_settings(tmp_path)
    app = build_app(
        settings, keys=keys, own_hosts=lambda: set(OWN),
        caller_of=peer_port_caller(lambda transport: None, on_the_lan),
        cluster_mode=lambda: mode_of(settings), served_by="test", routes=routes,
    )  # fmt: skip
    record, secret = keys.create("batch-jobs", weight=10)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        status, document, _ = await call(client, "POST", "/v1/chat/completions", headers)
    assert status == 200 and document == {"id": record.id, "weight": 10}
