"""CPace over X25519 with SHA-512 (draft-irtf-cfrg-cpace, CPACE-X25519-SHA512): the
password-authenticated key exchange that secret mode runs on the cluster secret.

Theory of operation. Both sides hash the secret (PRS), a channel identifier (CI) and a
session ID (sid) to a point g of Curve25519 (Elligator 2), pick a random scalar y and
send Y = X25519(y, g). Each then computes K = X25519(y, Y_other) and the session key
ISK = SHA-512(lv_cat("CPace255_ISK", sid, K) || lv_cat(Ya, "") || lv_cat(Yb, "")).
The keys agree only when both used the same secret. Someone without it, even one who
takes part, can test one guess of the secret per exchange and no more: Y is a uniform
point whatever the secret, and K for any other guess is a Diffie-Hellman problem. An
eavesdropper can test none. The caller proves the key (a MAC under ISK): that proof is
the whole of what the secret protects.

The scalar multiplications are OpenSSL's X25519 (`cryptography`), constant-time, and
refusing a low-order point (the result would be the neutral element: CPace's abort).
Only the map to the curve is computed here, in Python integers, after the draft's
reference code: no loop, a blinded inverse, a fixed exponent for the Legendre symbol,
and one select on it. Python's integers are not constant-time, but what is left varies
by nanoseconds in a request of about a millisecond. Checked against the draft's test
vectors (test_trust_pake.py).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

SHARE_BYTES = 32  # a u-coordinate of Curve25519, little-endian
KEY_BYTES = 64  # ISK: a SHA-512
_DSI = b"CPace255"
_DSI_ISK = b"CPace255_ISK"
_HASH_BLOCK = 128  # SHA-512's input block: the zero padding fills the first one
_P = 2**255 - 19
_A = 486662  # Curve25519: v^2 = u^3 + A u^2 + u
_Z = 2  # the non-square Elligator 2 uses for this field
_HALF_A = _A * pow(2, _P - 2, _P) % _P


class PakeError(ValueError):
    """The other side's key share is not usable (a low-order point)."""


def prepend_len(data: bytes) -> bytes:
    """`data` with its length before it, in LEB128."""
    length, prefix = len(data), bytearray()
    while True:
        prefix.append((length & 0x7F) | (0x80 if length >= 0x80 else 0))
        length >>= 7
        if not length:
            return bytes(prefix) + data


def lv_cat(*parts: bytes) -> bytes:
    return b"".join(prepend_len(p) for p in parts)


def generator_string(prs: bytes, ci: bytes, sid: bytes) -> bytes:
    zpad = max(0, _HASH_BLOCK - 1 - len(prepend_len(prs)) - len(prepend_len(_DSI)))
    return lv_cat(_DSI, prs, bytes(zpad), ci, sid)


def _inverse(x: int) -> int:
    """1/x mod p, blinded: the extended Euclid behind pow(.., -1, ..) takes a time that
    depends on its input, and here that input is x times a fresh random factor."""
    blind = secrets.randbelow(_P - 1) + 1
    return pow(x * blind % _P, -1, _P) * blind % _P


def _elligator2(r: int) -> int:
    """The u-coordinate of a point of Curve25519 for the field element r (the draft's
    reference `elligator2`): a blinded inverse, and Euler's criterion (a fixed exponent,
    so its time does not tell which of the two candidates is taken)."""
    v = -_A * _inverse(1 + _Z * r * r) % _P
    legendre = pow((v * v * v + _A * v * v + v) % _P, (_P - 1) // 2, _P)
    epsilon = legendre - _P if legendre > 1 else legendre  # -1, 0 or 1
    return (epsilon * v - (1 - epsilon) * _HALF_A) % _P


def generator(prs: bytes, ci: bytes, sid: bytes) -> bytes:
    """g = calculate_generator(SHA-512, PRS, CI, sid), encoded as a u-coordinate."""
    digest = hashlib.sha512(generator_string(prs, ci, sid)).digest()[:SHARE_BYTES]
    r = int.from_bytes(digest, "little") & ((1 << 255) - 1)  # decodeUCoordinate
    return _elligator2(r).to_bytes(SHARE_BYTES, "little")


def _x25519(scalar: bytes, point: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(scalar).exchange(
            X25519PublicKey.from_public_bytes(point)
        )
    except ValueError:  # OpenSSL refuses a result of all zeros: a low-order point
        raise PakeError("the key share is a low-order point") from None


@dataclass(frozen=True, slots=True)
class KeyShare:
    """One side's part of an exchange: the secret scalar, and the share Y it sends."""

    scalar: bytes
    public: bytes

    def __repr__(self) -> str:  # the scalar is a secret
        return f"KeyShare(public={self.public.hex()})"


def key_share(prs: bytes, ci: bytes, sid: bytes, scalar: bytes | None = None) -> KeyShare:
    """A fresh share for the session (`scalar` given only by tests, to match vectors)."""
    y = scalar if scalar is not None else secrets.token_bytes(SHARE_BYTES)
    return KeyShare(y, _x25519(y, generator(prs, ci, sid)))


def session_key(ours: KeyShare, theirs: bytes, sid: bytes, *, initiator: bool) -> bytes:
    """ISK, for the initiator/responder ordering; PakeError for an unusable share."""
    k = _x25519(ours.scalar, theirs)
    ya, yb = (ours.public, theirs) if initiator else (theirs, ours.public)
    return hashlib.sha512(lv_cat(_DSI_ISK, sid, k) + lv_cat(ya, b"") + lv_cat(yb, b"")).digest()
