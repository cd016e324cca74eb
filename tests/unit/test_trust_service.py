"""`Trust`: the mode held as state, the handshake's refusals, revoking. No network."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from shoal.mesh import identity
from shoal.settings import Settings
from shoal.trust import handshake
from shoal.trust import secret as secret_mod
from shoal.trust.handshake import HandshakeError
from shoal.trust.service import Trust


def trust_in(home: Path, **settings: Any) -> Trust:
    config = Settings(data_dir=home, **settings)
    return Trust(identity.load_or_create(home), config, peer_port=0)


def hello_from(trust: Trust, name: str = "other") -> dict[str, object]:
    """A well-formed hello as `trust`'s node would send it."""
    secret = trust.secret()
    share = handshake.key_share(secret, trust.identity.public_key, b"n" * 32) if secret else None
    return handshake.Hello(
        v=handshake.VERSION,
        mode=trust.mode,
        node_id=trust.identity.node_id,
        name=name,
        public_key=trust.identity.public_key,
        cert=trust.cert.decode(),
        api_port=11450,
        peer_port=11451,
        nonce=b"n" * 32,
        pake=share.public if share else None,
    ).wire()


def test_the_mode_follows_config_then_the_secret_then_the_bind_address(tmp_path: Path) -> None:
    assert trust_in(tmp_path / "a").mode == "open"  # loopback: nothing else can reach it
    assert trust_in(tmp_path / "b", lan=True).mode == "pairing"
    assert trust_in(tmp_path / "c", lan=True, cluster={"mode": "open"}).mode == "open"
    secret_mod.write_secret(tmp_path / "d", secret_mod.new_secret())
    assert trust_in(tmp_path / "d", lan=True).mode == "secret"


def test_the_mode_is_state_read_again_only_when_refreshed(tmp_path: Path) -> None:
    trust = trust_in(tmp_path, lan=True)
    assert trust.mode == "pairing"
    secret_mod.write_secret(tmp_path, secret_mod.new_secret())  # `shoal token create`
    assert trust.mode == "pairing"  # the request path reads no file
    assert trust.refresh_mode() == "secret"
    assert trust.mode == "secret"
    assert trust.advert()["m"] == "secret"
    assert len(trust.advert()["fp"]) == 8


def test_a_hello_in_another_mode_is_refused_with_the_reason(tmp_path: Path) -> None:
    trust = trust_in(tmp_path / "a", lan=True)
    other = trust_in(tmp_path / "b", lan=True, cluster={"mode": "open"})
    with pytest.raises(HandshakeError, match="cluster mode mismatch"):
        trust.hello(hello_from(other), "192.0.2.1")


def test_a_hello_from_our_own_key_is_a_copied_data_dir(tmp_path: Path) -> None:
    trust = trust_in(tmp_path)

    with pytest.raises(HandshakeError, match="copied data dir"):
        trust.hello(hello_from(trust, name="the copy"), "192.0.2.1")
    assert trust.duplicate_seen_at == "the copy"


def test_a_confirm_for_no_hello_is_refused(tmp_path: Path) -> None:

    trust = trust_in(tmp_path)
    confirm = {
        "nonce": base64.b64encode(b"x" * 32).decode(),
        "signature": base64.b64encode(b"s" * 64).decode(),
    }
    with pytest.raises(HandshakeError, match="unknown, expired or replayed"):
        trust.confirm(confirm, "127.0.0.1")
