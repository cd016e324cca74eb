"""The admission handshake between two nodes: pure messages, proofs and checks.

Theory of operation (docs/protocol.md has the wire format). The initiator A sends
`hello` (its public key and a fresh nonce). The responder B answers with its public
key, a fresh nonce of its own, and a signature (and, in secret mode, an HMAC proof of
the cluster secret) over the transcript

    T = "shoal-handshake-v1" | mode | pk_A | pk_B | nonce_A | nonce_B

A checks both, then sends `confirm`: its own signature and proof over T. B accepts a
confirm only for a nonce it issued, once, within NONCE_TTL_S: a replayed handshake
fails. Both proofs are bound to both keys and both nonces, so a proof cannot be reused
for another pair of nodes or another session; the secret itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal.mesh.identity import node_id_of

DOMAIN = b"shoal-handshake-v1"
NONCE_BYTES = 32
NONCE_TTL_S = 30.0  # a confirm must follow its hello within this time
CONFIRMATION_DIGITS = 6
MAX_OPEN_HANDSHAKES = 256


class HandshakeError(ValueError):
    """The other side failed a check; `reason` says which, for both sides' logs."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def transcript(mode: str, pk_a: bytes, pk_b: bytes, nonce_a: bytes, nonce_b: bytes) -> bytes:
    for value, size in ((pk_a, 32), (pk_b, 32), (nonce_a, NONCE_BYTES), (nonce_b, NONCE_BYTES)):
        if len(value) != size:
            raise HandshakeError("malformed handshake: wrong key or nonce length")
    return b"|".join((DOMAIN, mode.encode(), pk_a, pk_b, nonce_a, nonce_b))


def secret_proof(secret: str, role: bytes, transcript_bytes: bytes) -> bytes:
    return hmac.new(secret.encode(), role + b"|" + transcript_bytes, hashlib.sha256).digest()


def check_secret_proof(secret: str, role: bytes, transcript_bytes: bytes, proof: bytes) -> None:
    if not hmac.compare_digest(secret_proof(secret, role, transcript_bytes), proof):
        raise HandshakeError("cluster secret mismatch")


def check_signature(public_key: bytes, role: bytes, transcript_bytes: bytes, sig: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, role + b"|" + transcript_bytes)
    except (InvalidSignature, ValueError):
        raise HandshakeError("signature does not match the node key") from None


def check_claimed_id(node_id: str, public_key: bytes) -> None:
    """A node ID is the hash of its key: a different key for a known ID cannot pass."""
    if node_id_of(public_key) != node_id:
        raise HandshakeError("node ID does not match its public key")


def confirmation_code(pk_a: bytes, pk_b: bytes) -> str:
    """Six digits both sides show; equal codes mean no one sits in between."""
    digest = hashlib.sha256(b"shoal-pairing-code|" + b"|".join(sorted((pk_a, pk_b)))).digest()
    number = int.from_bytes(digest[:8], "big") % 10**CONFIRMATION_DIGITS
    return f"{number:0{CONFIRMATION_DIGITS}d}"


def secret_fingerprint(secret: str) -> str:
    """What an advert may say about the secret: enough to tell clusters apart, no more."""
    return hashlib.sha256(b"shoal-cluster-fingerprint|" + secret.encode()).hexdigest()[:8]


@dataclass
class NonceBook:
    """Nonces this node issued as responder, each good for one confirm, for a while."""

    issued: dict[bytes, tuple[float, bytes, bytes]]  # nonce -> (expiry, pk_a, nonce_a)

    @classmethod
    def empty(cls) -> NonceBook:
        return cls({})

    def issue(self, now: float, pk_a: bytes, nonce_a: bytes) -> bytes:
        self._expire(now)
        if len(self.issued) >= MAX_OPEN_HANDSHAKES:  # a flood of hellos: drop the oldest
            del self.issued[min(self.issued, key=lambda n: self.issued[n][0])]
        nonce = new_nonce()
        self.issued[nonce] = (now + NONCE_TTL_S, pk_a, nonce_a)
        return nonce

    def take(self, now: float, nonce_b: bytes) -> tuple[bytes, bytes]:
        """The (pk_a, nonce_a) a confirm for `nonce_b` must match; usable once."""
        self._expire(now)
        entry = self.issued.pop(nonce_b, None)
        if entry is None:
            raise HandshakeError("unknown, expired or replayed handshake")
        return entry[1], entry[2]

    def _expire(self, now: float) -> None:
        for nonce in [n for n, (expiry, _, _) in self.issued.items() if expiry <= now]:
            del self.issued[nonce]
