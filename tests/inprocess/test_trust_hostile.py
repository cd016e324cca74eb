"""Strangers against admission, over real HTTP on loopback (issue 9, items 4 and 5).

A stranger is given its own loopback address (127.0.0.x: the whole /8 reaches the
node), so that what the node keeps per source address can be seen apart from the real
nodes of the cluster on 127.0.0.1.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from shoal.mesh import identity
from shoal.protocol import CONFIRM_PATH, HELLO_PATH
from shoal.trust import certs, handshake
from shoal.trust.handshake import HandshakeError
from shoal.trust.pending import NEW_PER_MINUTE
from shoal.trust.store import TrustState
from shoal.trust.strikes import FREE_TRIES, REFILL_S
from tests.cluster import cluster

PENDING = TrustState.PENDING


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Stranger:
    """A node made up on the spot, at loopback address `ip`, running the handshake by
    hand; a fresh identity for each `identity` number."""

    def __init__(self, home: Path, ip: str) -> None:
        self.home, self.ip = home, ip

    @asynccontextmanager
    async def session(self) -> AsyncIterator[aiohttp.ClientSession]:
        connector = aiohttp.TCPConnector(local_addr=(self.ip, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield session

    async def handshake(
        self, url: str, mode: handshake.Mode, number: int = 0, secret: str | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Hello then confirm; the last answer (status, JSON, headers)."""
        home = self.home / f"{self.ip}-{number}"
        me = identity.load_or_create(home)
        nonce_a = handshake.new_nonce()
        share = handshake.key_share(secret, me.public_key, nonce_a) if secret else None
        hello = handshake.Hello(
            v=2, mode=mode, node_id=me.node_id, name=f"stranger-{number}",
            public_key=me.public_key, cert=certs.load_or_create_cert(me, home).decode(),
            api_port=11450, peer_port=11451, nonce=nonce_a,
            pake=share.public if share else None,
        )  # fmt: skip
        async with self.session() as session:
            status, reply, headers = await _post(session, url + HELLO_PATH, hello.wire())
            if status != 200:
                return status, reply, headers
            parsed = handshake.parse(handshake.HelloReply, reply)
            shares = (share.public, parsed.pake or b"") if share else None
            t = handshake.transcript(
                mode, me.public_key, parsed.public_key, nonce_a, parsed.nonce, shares
            )
            proof = None
            if share is not None:
                key = handshake.session_key(share, parsed.pake or b"", nonce_a, initiator=True)
                proof = b64(handshake.key_proof(key, b"initiator", t))
            confirm = {"nonce": reply["nonce"], "signature": b64(me.sign(b"initiator|" + t))}
            if proof:
                confirm["proof"] = proof
            return await _post(session, url + CONFIRM_PATH, confirm)


async def _post(
    session: aiohttp.ClientSession, url: str, doc: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(url, data=orjson.dumps(doc)) as response:
        return response.status, dict(await response.json()), dict(response.headers)


def pending_from(node: Any, ip: str) -> list[str]:
    return [
        n.node_id
        for n in node.node.trust.store.nodes()
        if n.state is PENDING and f"//{ip}:" in n.address
    ]


# -- item 5: guessing the cluster secret ------------------------------------------------


async def test_wrong_secrets_from_an_address_run_out_and_get_429(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="secret") as (a, b):
        stranger = Stranger(tmp_path, "127.0.0.2")
        wrong = "shoal-ct-" + "a" * 32
        for i in range(FREE_TRIES):
            status, body, _ = await stranger.handshake(a.url, "secret", i, secret=wrong)
            assert status == 403 and "cluster secret mismatch" in body["error"]["message"]
        status, body, headers = await stranger.handshake(a.url, "secret", 9, secret=wrong)
        assert status == 429, body
        assert body["error"] == {
            "message": body["error"]["message"], "type": "rate_limit_error", "param": None,
            "code": "busy",
        }  # fmt: skip
        assert "too many wrong cluster secrets" in body["error"]["message"]
        assert 1 <= int(headers["Retry-After"]) <= REFILL_S
        # A real node, from another address, still joins; and the stranger's refusals
        # were not one log line each (bounded by its tries).
        met = await b.node.admission.meet(a.url, "join")
        assert met is not None and met.state is TrustState.PAIRED


async def test_a_node_with_another_secret_gets_a_few_proofs_then_none(tmp_path: Path) -> None:
    """A node advertising itself (mDNS) is dialled: each dial gives it one proof, one
    guess. The dialler stops sending proofs to an address that never proves back."""
    async with cluster(tmp_path, 1, mode="secret") as (a,):
        received: list[dict[str, Any]] = []
        async with _other_cluster_node(tmp_path / "other", "127.0.0.3", received) as url:
            outcomes = []
            for _ in range(FREE_TRIES + 3):
                try:
                    await a.node.trust.admit(url)
                except HandshakeError as exc:
                    outcomes.append(str(exc))
            assert len(received) == FREE_TRIES  # proofs that left this node
            assert all("cluster secret mismatch" in o for o in outcomes[:FREE_TRIES])
            assert all("too many failed secret handshakes with 127.0.0.3" in o
                       for o in outcomes[FREE_TRIES:])  # fmt: skip


@asynccontextmanager
async def _other_cluster_node(
    home: Path, ip: str, confirms: list[dict[str, Any]]
) -> AsyncIterator[str]:
    """A responder on `ip` with a secret of its own, keeping every confirm it receives."""
    from shoal.mesh import identity as identity_mod
    from shoal.settings import Settings
    from shoal.trust import secret as secret_mod
    from shoal.trust.service import Trust

    secret_mod.write_secret(home, secret_mod.new_secret())
    trust = Trust(
        identity_mod.load_or_create(home),
        Settings(data_dir=home, cluster={"mode": "secret"}),
        peer_port=11451,
    )

    async def hello(request: web.Request) -> web.Response:
        return web.json_response(trust.hello(await request.json(), request.remote or ""))

    async def confirm(request: web.Request) -> web.Response:
        document = await request.json()
        confirms.append(document)
        try:
            trust.confirm(document, request.remote or "")
        except HandshakeError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=403)
        return web.json_response({"trust": "paired", "code": "000000"})

    async for url in _serve(ip, {HELLO_PATH: hello, CONFIRM_PATH: confirm}):
        yield url


async def _serve(ip: str, routes: dict[str, Any]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind((ip, 0))
        port = probe.getsockname()[1]
    site = web.TCPSite(runner, ip, port)
    await site.start()
    try:
        yield f"http://{ip}:{port}"
    finally:
        await runner.cleanup()


# -- the handshake's version ------------------------------------------------------------


async def test_an_older_node_saying_hello_is_told_why(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1, mode="pairing") as (a,):
        stranger = Stranger(tmp_path, "127.0.0.4")
        me = identity.load_or_create(tmp_path / "old")
        old_hello = {  # handshake protocol 1: no "v"
            "mode": "pairing", "node_id": me.node_id, "name": "old",
            "public_key": b64(me.public_key),
            "cert": certs.load_or_create_cert(me, tmp_path / "old").decode(),
            "api_port": 11450, "peer_port": 11451, "nonce": b64(b"n" * 32),
        }  # fmt: skip
        async with stranger.session() as session:
            status, body, _ = await _post(session, a.url + HELLO_PATH, old_hello)
        assert status == 403
        assert body["error"]["message"] == (
            "handshake refused: hello in handshake protocol 1; this node speaks 2: "
            "run the same Shoal version on both nodes"
        )
        assert a.node.trust.open_handshakes() == 0


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        # An older node with strict schemas refuses our `v`.
        (
            403,
            {
                "error": {
                    "message": "handshake refused: malformed hello: 'v': Extra inputs "
                    "are not permitted",
                    "type": "permission_error",
                    "param": None,
                    "code": "forbidden",
                }
            },
        ),
        # One older still ignores it, and answers in its own protocol (no `v`).
        (200, {"mode": "pairing", "node_id": "ab" * 32, "name": "old", "nonce": "x"}),
    ],
)
async def test_saying_hello_to_an_older_node_says_why_it_failed(
    tmp_path: Path, status: int, answer: dict[str, Any]
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response(answer, status=status)

    async with cluster(tmp_path, 1, mode="pairing") as (a,):
        async for url in _serve("127.0.0.5", {HELLO_PATH: hello}):
            with pytest.raises(HandshakeError, match=r"handshake protocol (\(1\)|1); this node"):
                await a.node.trust.admit(url)
            assert await a.node.admission.meet(url, "join") is None  # logged, not raised


# -- item 4: a flood of pairing requests ------------------------------------------------


async def test_a_flood_of_identities_from_one_address_holds_one_place(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="pairing") as (a, b):
        stranger = Stranger(tmp_path, "127.0.0.6")
        statuses = [(await stranger.handshake(a.url, "pairing", i))[0] for i in range(25)]
        assert statuses[:NEW_PER_MINUTE] == [200] * NEW_PER_MINUTE
        assert set(statuses[NEW_PER_MINUTE:]) == {429}  # too fast: wait a minute
        assert len(pending_from(a, "127.0.0.6")) == 1  # each new identity replaced the last
        # A real node asking during the flood waits too, to be accepted.
        met = await b.node.admission.meet(a.url, "join")
        assert met is not None and met.state is PENDING
        assert a.node.trust.store.state(b.node_id) is PENDING


async def test_a_flood_from_many_addresses_still_lets_a_real_node_ask(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2, mode="pairing") as (a, b):
        for i in range(40):  # more addresses than the list has places
            stranger = Stranger(tmp_path, f"127.0.1.{i + 1}")
            assert (await stranger.handshake(a.url, "pairing", i))[0] == 200
        store = a.node.trust.store
        assert len([n for n in store.nodes() if n.state is PENDING]) == 32
        met = await b.node.admission.meet(a.url, "join")
        assert met is not None and met.state is PENDING
        assert store.state(b.node_id) is PENDING
        # The 31 addresses that hold the other places, asking again with fresh
        # identities, cannot push it out: each takes only its own place again.
        for i in range(62):
            stranger = Stranger(tmp_path, f"127.0.1.{i % 31 + 10}")
            assert (await stranger.handshake(a.url, "pairing", 100 + i))[0] == 200
        assert store.state(b.node_id) is PENDING
        assert len([n for n in store.nodes() if n.state is PENDING]) == 32
