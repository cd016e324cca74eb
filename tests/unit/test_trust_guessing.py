"""Guessing the cluster secret (issue 9 item 5), against `Trust` with no network.

Before, a responder answered a stranger's hello with HMAC(secret, transcript): one hello
was enough to test a dictionary offline, and a weak token fell in 1,371 guesses. Now
secret mode runs CPace: nothing a node sends before the other side has proved the
secret depends on it but a key share, which fits every guess alike, and each proof is
keyed by a Diffie-Hellman value no one outside the exchange can compute. So a guess
costs a run of the handshake with a node that knows the secret, and the node counts
each wrong one (`Strikes`): a few free tries, then one a minute per address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import string
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import BusyError
from shoal.mesh import identity
from shoal.settings import Settings
from shoal.trust import handshake, pake
from shoal.trust import secret as secret_mod
from shoal.trust.handshake import HandshakeError
from shoal.trust.service import Trust
from shoal.trust.strikes import FREE_TRIES, REFILL_S

WEAK = "shoal-ct-abc"  # what `shoal join` refuses, and a node still runs with (warned)
DICTIONARY = ["shoal-ct-" + "".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3)]
ATTACKER_IP, OTHER_IP = "192.0.2.66", "192.0.2.7"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def node(home: Path, secret: str) -> Trust:
    secret_mod.write_secret(home, secret)
    settings = Settings(data_dir=home, cluster={"mode": "secret"}, name=home.name)
    trust = Trust(identity.load_or_create(home), settings, peer_port=11451)
    trust.api_port = 11450
    return trust


class Stranger:
    """Runs the initiator's side by hand, committing to one guess of the secret."""

    def __init__(self, home: Path) -> None:
        self.me = identity.load_or_create(home)
        self.cert = node(home, "unused").cert.decode()

    def hello(self, guess: str, nonce_a: bytes) -> tuple[dict[str, Any], pake.KeyShare]:
        share = handshake.key_share(guess, self.me.public_key, nonce_a)
        doc = handshake.Hello(
            v=2, mode="secret", node_id=self.me.node_id, name="stranger",
            public_key=self.me.public_key, cert=self.cert, api_port=11450, peer_port=11451,
            nonce=nonce_a, pake=share.public,
        ).wire()  # fmt: skip
        return doc, share

    def confirm(
        self, reply: dict[str, Any], share: pake.KeyShare, nonce_a: bytes
    ) -> dict[str, Any]:
        parsed = handshake.parse(handshake.HelloReply, reply)
        assert parsed.pake is not None
        t = handshake.transcript(
            "secret", self.me.public_key, parsed.public_key, nonce_a, parsed.nonce,
            (share.public, parsed.pake),
        )  # fmt: skip
        key = handshake.session_key(share, parsed.pake, nonce_a, initiator=True)
        return handshake.Confirm(
            nonce=parsed.nonce,
            signature=self.me.sign(b"initiator|" + t),
            proof=handshake.key_proof(key, b"initiator", t),
        ).wire()


def old_offline_attack(transcript: bytes, role: bytes, proof: bytes) -> str | None:
    """What recovered the token from one hello before: HMAC(guess, role | T) for each
    guess of a dictionary, offline, until one equals the proof seen on the wire."""
    for guess in DICTIONARY:
        if hmac.compare_digest(
            hmac.new(guess.encode(), role + b"|" + transcript, hashlib.sha256).digest(), proof
        ):
            return guess
    return None


def test_the_dictionary_holds_the_secret() -> None:
    assert WEAK in DICTIONARY and len(DICTIONARY) == 26**3


def test_a_hello_reply_carries_nothing_to_test_a_guess_on(tmp_path: Path) -> None:
    responder = node(tmp_path / "r", WEAK)
    stranger = Stranger(tmp_path / "s")
    for guess, right in ((DICTIONARY[0], False), (WEAK, True)):
        nonce_a = handshake.new_nonce()
        hello, share = stranger.hello(guess, nonce_a)
        reply = responder.hello(hello, ATTACKER_IP)
        assert "proof" not in reply  # before: HMAC(secret, T), the whole attack
        parsed = handshake.parse(handshake.HelloReply, reply)
        assert parsed.pake is not None
        # The only secret-dependent value is the responder's key share, and the one key
        # the stranger can derive from it is fixed by the share it committed to before
        # the reply: it matches the responder's exactly when the committed guess was
        # right, and the reply does not say which. Only a proof sent back tells.
        theirs = handshake.session_key(share, parsed.pake, nonce_a, initiator=True)
        [(_, opened)] = [v for k, v in responder._nonces.issued.items() if k == parsed.nonce]
        assert opened.our_share is not None and opened.their_share == share.public
        ours = handshake.session_key(opened.our_share, share.public, nonce_a, initiator=False)
        assert (theirs == ours) is right


def test_an_eavesdropper_on_a_whole_handshake_cannot_test_a_guess(tmp_path: Path) -> None:
    responder = node(tmp_path / "r", WEAK)
    initiator = Stranger(tmp_path / "i")  # an honest node this time: it knows the secret
    nonce_a = handshake.new_nonce()
    hello, share = initiator.hello(WEAK, nonce_a)
    reply = responder.hello(hello, OTHER_IP)
    confirm = initiator.confirm(reply, share, nonce_a)
    met = responder.confirm(confirm, OTHER_IP)
    assert met.proof is not None and met.node.state.value == "paired"
    # All four messages are on the wire. The old attack, aimed at both proofs, finds
    # nothing in the whole dictionary, which holds the secret: the proofs are keyed by
    # the CPace key, not by the secret.
    parsed = handshake.parse(handshake.HelloReply, reply)
    assert parsed.pake is not None
    t = handshake.transcript(
        "secret", initiator.me.public_key, parsed.public_key, nonce_a, parsed.nonce,
        (share.public, parsed.pake),
    )  # fmt: skip
    proof_a = base64.b64decode(confirm["proof"])
    assert old_offline_attack(t, b"initiator", proof_a) is None
    assert old_offline_attack(t, b"responder", met.proof) is None
    # And a guess's generator gives nothing to compare: both shares are points of the
    # curve that fit any guess (the generator itself is never sent).
    for guess in (WEAK, DICTIONARY[1]):
        g = pake.generator(guess.encode(), handshake.pake_channel(initiator.me.public_key), nonce_a)
        assert g not in (share.public, parsed.pake)


def test_each_guess_costs_an_online_try_and_the_tries_run_out(tmp_path: Path) -> None:
    responder = node(tmp_path / "r", WEAK)
    stranger = Stranger(tmp_path / "s")
    tried = 0
    for guess in DICTIONARY[:FREE_TRIES]:
        nonce_a = handshake.new_nonce()
        hello, share = stranger.hello(guess, nonce_a)
        confirm = stranger.confirm(responder.hello(hello, ATTACKER_IP), share, nonce_a)
        with pytest.raises(HandshakeError, match="cluster secret mismatch"):
            responder.confirm(confirm, ATTACKER_IP)
        tried += 1
    assert tried == FREE_TRIES
    # Out of tries: refused before anything is checked, the right guess included, at the
    # hello and at a confirm opened before the tries ran out.
    nonce_a = handshake.new_nonce()
    hello, share = stranger.hello(WEAK, nonce_a)
    with pytest.raises(BusyError, match="too many wrong cluster secrets") as raised:
        responder.hello(hello, ATTACKER_IP)
    assert 0 < raised.value.retry_after <= REFILL_S
    # Another address is served as before, and a right proof pairs it.
    confirm = stranger.confirm(responder.hello(hello, OTHER_IP), share, nonce_a)
    with pytest.raises(BusyError):
        responder.confirm(confirm, ATTACKER_IP)
    nonce_a = handshake.new_nonce()
    hello, share = stranger.hello(WEAK, nonce_a)
    confirm = stranger.confirm(responder.hello(hello, OTHER_IP), share, nonce_a)
    assert responder.confirm(confirm, OTHER_IP).node.state.value == "paired"


def test_confirms_opened_in_a_burst_still_count_one_by_one(tmp_path: Path) -> None:
    """Hellos sent all at once, while the address still had tries, then their confirms:
    only FREE_TRIES proofs are ever checked."""
    responder = node(tmp_path / "r", WEAK)
    stranger = Stranger(tmp_path / "s")
    opened = []
    for guess in DICTIONARY[: 4 * FREE_TRIES]:
        nonce_a = handshake.new_nonce()
        hello, share = stranger.hello(guess, nonce_a)
        opened.append(stranger.confirm(responder.hello(hello, ATTACKER_IP), share, nonce_a))
    outcomes = []
    for confirm in opened:
        try:
            responder.confirm(confirm, ATTACKER_IP)
        except HandshakeError:
            outcomes.append("checked")
        except BusyError:
            outcomes.append("refused")
    assert outcomes.count("checked") == FREE_TRIES


def test_a_low_order_key_share_is_refused(tmp_path: Path) -> None:
    """A share of all zeros would make the key the neutral element, whatever the secret."""
    responder = node(tmp_path / "r", WEAK)
    stranger = Stranger(tmp_path / "s")
    nonce_a, zero = handshake.new_nonce(), bytes(32)
    hello, _ = stranger.hello(WEAK, nonce_a)
    reply = handshake.parse(
        handshake.HelloReply, responder.hello({**hello, "pake": b64(zero)}, ATTACKER_IP)
    )
    assert reply.pake is not None
    t = handshake.transcript(
        "secret", stranger.me.public_key, reply.public_key, nonce_a, reply.nonce,
        (zero, reply.pake),
    )  # fmt: skip
    confirm = {"nonce": b64(reply.nonce), "signature": b64(stranger.me.sign(b"initiator|" + t)),
               "proof": b64(bytes(32))}  # fmt: skip
    with pytest.raises(HandshakeError, match="low-order"):
        responder.confirm(confirm, ATTACKER_IP)
