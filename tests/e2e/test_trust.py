"""Admission between nodes on loopback: secret mode, pairing, replay, unpairing.

Every node-to-node call runs over mutual TLS on the peer port; these tests check that
only nodes that passed the handshake (and, in pairing mode, were accepted on both
sides) exchange state or inference, and that the attacks in issue 4 fail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from shoal.mesh import identity
from shoal.trust import certs, handshake
from shoal.trust.secret import new_secret, write_secret
from tests.fakes import FakeServer
from tests.support import (
    NodeProcess,
    free_port,
    get_json,
    http,
    openai_client,
    start_node,
    wait_for,
)


def _peers(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in get_json(node.url + "/shoal/v1/peers")["peers"]}


def _pairs(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in get_json(node.url + "/shoal/v1/pairs")["nodes"]}


def _models(node: NodeProcess) -> set[str]:
    return {m["id"] for m in get_json(node.url + "/v1/models")["data"]}


def _peer_state(node: NodeProcess, node_id: str) -> str | None:
    """Where `node_id` stands in `node`'s peer table (joining, alive, ...), if it is there."""
    peers = get_json(node.url + "/shoal/v1/peers")["peers"]
    return next((p["state"] for p in peers if p["node_id"] == node_id), None)


def _join(node: NodeProcess, other: NodeProcess) -> dict[str, Any]:
    """`shoal join`, through the node's API: a handshake with `other`, run to the end."""
    status, _, body = http(
        "POST", node.url + "/shoal/v1/peers", orjson.dumps({"url": other.url}),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, body
    return dict(orjson.loads(body))


class Pair:
    """Two nodes (a, b) that know each other's address; b holds model "far"."""

    def __init__(
        self,
        home: Path,
        mode: str,
        secrets: tuple[str | None, str | None],
        env: dict[str, str] | None = None,
    ) -> None:
        self.fake = FakeServer(["far"]).start()
        ports = {"a": free_port(), "b": free_port()}
        self.nodes: dict[str, NodeProcess] = {}
        for name, secret in zip(("a", "b"), secrets, strict=True):
            other = ports["b" if name == "a" else "a"]
            if secret:
                write_secret(home / name / "data", secret)
            args = ["--no-embedded", "--name", name]
            if name == "b":
                args += ["--backend", self.fake.url]
            self.nodes[name] = start_node(
                home / name, *args, port=ports[name], wait_backend=None,
                env={"SHOAL_CLUSTER__MODE": mode,
                     "SHOAL_PEERS": json.dumps([f"http://127.0.0.1:{other}"]), **(env or {})},
            )  # fmt: skip

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.fake.close()


@pytest.fixture
def built(tmp_path: Path) -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for pair in made:
        pair.close()


def test_same_secret_pairs_and_routes(tmp_path: Path, built: list[Pair]) -> None:
    secret = new_secret()
    pair = Pair(tmp_path, "secret", (secret, secret))
    built.append(pair)
    a = pair.nodes["a"]
    wait_for(lambda: "far" in _models(a), 20, "a to list b's model")
    status, headers, _ = http(
        "POST", a.url + "/v1/chat/completions",
        orjson.dumps({"model": "far", "messages": [{"role": "user", "content": "hi"}]}),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert (status, headers["X-Shoal-Served-By"]) == (200, "b")
    assert _pairs(a)["b"]["state"] == "paired"
    # The secret is nowhere in what the nodes say or log.
    for node in pair.nodes.values():
        assert secret not in node.log()
        assert secret not in json.dumps(node.status())
        assert secret not in json.dumps(get_json(node.url + "/shoal/v1/peers"))


def test_wrong_secret_is_rejected_at_the_handshake(tmp_path: Path, built: list[Pair]) -> None:
    pair = Pair(tmp_path, "secret", (new_secret(), new_secret()))
    built.append(pair)
    a, b = pair.nodes["a"], pair.nodes["b"]
    wait_for(lambda: "cluster secret mismatch" in a.log(), 20, "a to report the mismatch")
    wait_for(lambda: "cluster secret mismatch" in b.log(), 20, "b to report the mismatch")
    assert _peers(a) == {} and _pairs(a) == {}
    assert "far" not in _models(a)


def test_pairing_needs_both_sides_then_unpair_cuts_a_live_stream(
    tmp_path: Path, built: list[Pair]
) -> None:
    # Short heartbeat intervals: a node that fails three is out of the table in ~1 s.
    pair = Pair(tmp_path, "pairing", (None, None), env={"SHOAL_MESH__NEW_INTERVAL_S": "0.3"})
    built.append(pair)
    a, b = pair.nodes["a"], pair.nodes["b"]
    wait_for(lambda: "b" in _pairs(a) and "a" in _pairs(b), 20, "both to see a pending node")
    a_view, b_view = _pairs(a)["b"], _pairs(b)["a"]
    assert a_view["state"] == b_view["state"] == "pending"
    assert a_view["code"] == b_view["code"]  # the same confirmation code on both sides
    # While pending, meeting again (what discovery and static peers do) runs the whole
    # handshake, each way, and ends in "pending": nothing may pass.
    for here, there in ((a, b), (b, a)):
        assert _join(here, there)["trust"] == "pending"
    assert "far" not in _models(a) and _peers(a) == {} and _peers(b) == {}

    status, _, _ = http("POST", a.url + f"/shoal/v1/pairs/{a_view['short_id']}/accept", b"{}")
    assert status == 200
    # One side is not enough: a heartbeats b, b's TLS refuses a's key, and after enough
    # refusals b drops out of a's table (it was put in "joining" before accept answered).
    wait_for(
        lambda: _peer_state(a, a_view["node_id"]) == "removed", 20, "b to refuse a's heartbeats"
    )
    assert "far" not in _models(a)
    assert _pairs(b)["a"]["state"] == "pending"
    http("POST", b.url + f"/shoal/v1/pairs/{b_view['node_id']}/accept", b"{}")
    wait_for(lambda: "far" in _models(a), 20, "a to list b's model after both accepted")

    pair.fake.chunk_gap_s = 0.2
    pair.fake.words = tuple(f" w{i}" for i in range(50))
    client = openai_client(a.url)
    stream = client.chat.completions.create(
        model="far", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = 0
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:
            received += 1
            if received == 3:  # b stops trusting a mid-stream
                http("POST", b.url + f"/shoal/v1/pairs/{b_view['node_id']}/unpair", b"{}")
    assert received < 50 and time.monotonic() - started < 5
    assert _pairs(b)["a"]["state"] == "unpaired"
    wait_for(lambda: "far" not in _models(a), 20, "a to stop listing b's model")


def test_replayed_and_forged_handshakes_fail(tmp_path: Path) -> None:
    secret = new_secret()
    write_secret(tmp_path / "b" / "data", secret)
    b = start_node(
        tmp_path / "b", "--no-embedded", wait_backend=None,
        env={"SHOAL_CLUSTER__MODE": "secret"},
    )  # fmt: skip
    try:
        asyncio.run(_attack(b.url, secret, tmp_path))
        assert "replayed" in b.log()
    finally:
        b.stop()


async def _attack(url: str, secret: str, home: Path) -> None:
    me = identity.load_or_create(home / "attacker")
    cert = certs.load_or_create_cert(me, home / "attacker")
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    async with aiohttp.ClientSession() as session:

        async def post(path: str, doc: dict[str, Any]) -> tuple[int, Any]:
            async with session.post(url + path, data=orjson.dumps(doc)) as response:
                return response.status, orjson.loads(await response.read())

        async def run(guess: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
            """Hello with a key share made from `guess`; the hello and the confirm to send."""
            nonce_a = handshake.new_nonce()
            share = handshake.key_share(guess, me.public_key, nonce_a)
            hello = {"v": 2, "mode": "secret", "node_id": me.node_id, "name": "x",
                     "api_port": 1, "public_key": b64(me.public_key), "cert": cert.decode(),
                     "peer_port": 1, "nonce": b64(nonce_a), "pake": b64(share.public)}  # fmt: skip
            status, reply = await post("/shoal/v1/trust/hello", hello)
            assert status == 200 and "proof" not in reply  # nothing to guess offline on
            pk_b, nonce_b = base64.b64decode(reply["public_key"]), base64.b64decode(reply["nonce"])
            share_b = base64.b64decode(reply["pake"])
            t = handshake.transcript(
                "secret", me.public_key, pk_b, nonce_a, nonce_b, (share.public, share_b)
            )
            key = handshake.session_key(share, share_b, nonce_a, initiator=True)
            confirm = {"nonce": reply["nonce"], "signature": b64(me.sign(b"initiator|" + t)),
                       "proof": b64(handshake.key_proof(key, b"initiator", t))}  # fmt: skip
            return hello, confirm, handshake.key_proof(key, b"responder", t)

        hello, confirm, their_proof = await run(secret)
        status, answer = await post("/shoal/v1/trust/confirm", confirm)
        assert status == 200 and base64.b64decode(answer["proof"]) == their_proof
        # The same confirm again: refused.
        status, error = await post("/shoal/v1/trust/confirm", confirm)
        assert status == 403 and "replayed" in error["error"]["message"]
        # A hello claiming someone else's ID with our key: refused.
        forged = {**hello, "node_id": "ab" * 32}
        status, error = await post("/shoal/v1/trust/hello", forged)
        assert status == 403 and "does not match" in error["error"]["message"]
        # A proof made with the wrong secret: refused, and nothing paired.
        _, wrong, _ = await run(new_secret())
        status, error = await post("/shoal/v1/trust/confirm", wrong)
        assert status == 403 and "secret mismatch" in error["error"]["message"]


def test_node_calls_on_the_api_port_are_refused(tmp_path: Path) -> None:
    node = start_node(tmp_path, "--no-embedded", wait_backend=None)
    try:
        status, _, raw = http("POST", node.url + "/shoal/v1/mesh/goodbye", b"{}")
        assert status == 403
        assert "peer port" in orjson.loads(raw)["error"]["message"]
    finally:
        node.stop()


def test_a_copied_data_dir_is_detected(tmp_path: Path) -> None:
    import shutil

    first = start_node(tmp_path / "one", "--no-embedded", "--name", "one", wait_backend=None)
    first.stop()
    shutil.copytree(tmp_path / "one" / "data", tmp_path / "two" / "data")
    port_one, port_two = free_port(), free_port()
    nodes = [
        start_node(
            tmp_path / name,
            "--no-embedded",
            "--name",
            name,
            port=port,
            wait_backend=None,
            env={"SHOAL_PEERS": json.dumps([f"http://127.0.0.1:{other}"])},
        )
        for name, port, other in (("one", port_one, port_two), ("two", port_two, port_one))
    ]
    try:
        wait_for(lambda: any("copied data dir" in n.log() for n in nodes), 20, "the copy reported")
        assert any(n.status()["duplicate_id_seen_from"] for n in nodes)
        assert all(_peers(n) == {} for n in nodes)  # neither trusts the other
    finally:
        for node in nodes:
            node.stop()
