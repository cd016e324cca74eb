"""The admission handshake between two nodes: pure messages, proofs and checks.

Theory of operation (docs/protocol.md has the wire format). The initiator A sends
`hello` (its public key, a fresh nonce and, in secret mode, its CPace key share Ya).
The responder B answers with its public key, a fresh nonce of its own, its key share
Yb, and a signature over the transcript

    T = "shoal-handshake-v2" | mode | pk_A | pk_B | nonce_A | nonce_B [| Ya | Yb]

A checks the signature, then sends `confirm`: its own signature over T and, in secret
mode, its proof, an HMAC of T under the CPace session key. B checks both and answers
with its own proof. The session key depends on the cluster secret, but nothing on the
wire lets anyone test a guess of the secret without a run of the protocol with a node
that knows it (`shoal.trust.pake`), and the initiator proves first, so the responder
counts every wrong guess (`shoal.trust.strikes`). B accepts a confirm only for a nonce
it issued, once, within NONCE_TTL_S: a replayed handshake fails. Signatures and proofs
cover both keys, both nonces and both key shares, so none can be moved to another pair
of nodes or another session; the secret itself never crosses the wire.

Every message, sent or received, goes through a strict schema (`parse`): no unknown
fields, every field typed and bounded, keys, nonces, signatures and proofs of their
exact lengths, the certificate a PEM that parses and holds the sender's key. Whatever a
stranger sends, `parse` answers with the message or a HandshakeError, nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final, Literal, Self, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)

from shoal.mesh.identity import node_id_of
from shoal.mesh.state import checked_name
from shoal.trust import pake

#: The handshake's version, `v` in hello and its reply. 2: CPace in secret mode.
VERSION: Final = 2
DOMAIN = b"shoal-handshake-v2"
NONCE_BYTES = 32
NONCE_TTL_S = 30.0  # a confirm must follow its hello within this time
CONFIRMATION_DIGITS = 6
MAX_OPEN_HANDSHAKES = 256
KEY_BYTES = 32  # a raw Ed25519 public key
SIGNATURE_BYTES = 64  # an Ed25519 signature
PROOF_BYTES = 32  # an HMAC-SHA256
SHARE_BYTES = pake.SHARE_BYTES  # a CPace key share: a Curve25519 u-coordinate
#: A node's self-signed Ed25519 certificate is about 0.6 KiB as PEM; 4 KiB leaves room
#: for a longer subject, and bounds what an open handshake keeps.
MAX_CERT_CHARS = 4096
_PEM_HEADER = "-----BEGIN CERTIFICATE-----"


class HandshakeError(ValueError):
    """The other side failed a check; `reason` says which, for both sides' logs."""


# -- the messages -----------------------------------------------------------------------


def _b64_of(size: int) -> object:
    """A field that is `size` bytes on our side and their base64 on the wire."""
    chars = 4 * ((size + 2) // 3)

    def decode(value: object) -> bytes:
        if isinstance(value, bytes) and len(value) == size:  # built by us, not parsed
            return value
        if not isinstance(value, str) or len(value) != chars:
            raise ValueError(f"must be {size} bytes in base64 ({chars} characters)")
        try:
            data = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("must be base64") from None
        if len(data) != size:
            raise ValueError(f"must be {size} bytes in base64")
        return data

    return BeforeValidator(decode)


_AS_B64 = PlainSerializer(lambda data: base64.b64encode(data).decode(), return_type=str)
PublicKey = Annotated[bytes, _b64_of(KEY_BYTES), _AS_B64]
Nonce = Annotated[bytes, _b64_of(NONCE_BYTES), _AS_B64]
Signature = Annotated[bytes, _b64_of(SIGNATURE_BYTES), _AS_B64]
Proof = Annotated[bytes, _b64_of(PROOF_BYTES), _AS_B64]
Share = Annotated[bytes, _b64_of(SHARE_BYTES), _AS_B64]
NodeId = Annotated[str, StringConstraints(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, StringConstraints(max_length=1024), AfterValidator(checked_name)]
Mode = Literal["open", "secret", "pairing"]


def cert_key(pem: str) -> bytes:
    """The raw Ed25519 key a PEM certificate holds; ValueError for anything else."""
    if not pem.startswith(_PEM_HEADER):
        raise ValueError("certificate must be one PEM certificate")
    try:
        key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    # A stranger's bytes reach a C parser here: whatever it raises (ValueError,
    # UnsupportedAlgorithm, ...) means the same thing to us.
    except Exception:
        raise ValueError("certificate does not parse") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("certificate does not hold an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _parses(pem: str) -> str:
    cert_key(pem)
    return pem


Certificate = Annotated[str, StringConstraints(max_length=MAX_CERT_CHARS), AfterValidator(_parses)]


class _Message(BaseModel):
    # strict: no coercion ("3" is not 3, 1e30 is not a port, true is not 1).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    what: ClassVar[str]

    def wire(self) -> dict[str, object]:
        return self.model_dump()


class _Introduction(_Message):
    """What both hello and its reply say about the sender, checked for consistency."""

    v: Literal[2]
    mode: Mode
    node_id: NodeId
    name: Name
    public_key: PublicKey
    cert: Certificate
    peer_port: Port
    nonce: Nonce
    pake: Share | None = None  # the CPace key share: in secret mode, and only there

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if node_id_of(self.public_key) != self.node_id:
            raise ValueError("node ID does not match its public key")
        if cert_key(self.cert) != self.public_key:
            raise ValueError("certificate does not match the node key")
        if (self.pake is None) == (self.mode == "secret"):
            raise ValueError("a key share ('pake') is sent in secret mode, and only there")
        return self


class Hello(_Introduction):
    what = "hello"
    api_port: Port


class HelloReply(_Introduction):
    what = "hello reply"
    signature: Signature


class Confirm(_Message):
    what = "confirm"
    nonce: Nonce
    signature: Signature
    proof: Proof | None = None  # secret mode only


class ConfirmReply(_Message):
    what = "confirm reply"
    trust: Literal["paired", "pending"]
    code: Annotated[str, StringConstraints(pattern=rf"^[0-9]{{{CONFIRMATION_DIGITS}}}$")]
    proof: Proof | None = None  # secret mode only: the responder's, after the initiator's


M = TypeVar("M", bound=_Message)


def check_version(document: object, what: str) -> None:
    """Refuse, in words, a hello or reply of another handshake version (an older Shoal
    sends no `v`): before the schema, which would only say `'v': Field required`."""
    if not isinstance(document, dict) or document.get("v") == VERSION:
        return
    theirs = document.get("v", 1)
    said = str(theirs) if type(theirs) is int and 0 < theirs < 1000 else "unknown"
    raise HandshakeError(
        f"{what} in handshake protocol {said}; this node speaks {VERSION}: "
        "run the same Shoal version on both nodes"
    )


def older_protocol(refusal: str) -> bool:
    """Whether a refusal of our hello is an older node's strict schema meeting `v`."""
    return "'v': Extra inputs are not permitted" in refusal


def parse(kind: type[M], document: object) -> M:
    """`document` (decoded JSON) as a `kind` message, or HandshakeError saying why not."""
    try:
        return kind.model_validate(document)
    except ValidationError as exc:
        raise HandshakeError(f"malformed {kind.what}: {_reason(exc)}") from None


def _reason(exc: ValidationError) -> str:
    """The first problem, in words fit for a log line: the stranger chose the field
    names, so they are shown escaped (repr) and cut short; values are never shown."""
    error = exc.errors(include_url=False, include_input=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(repr(part)[:40] for part in error["loc"])
    return f"{where}: {message}" if where else message


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def transcript(
    mode: str,
    pk_a: bytes,
    pk_b: bytes,
    nonce_a: bytes,
    nonce_b: bytes,
    shares: tuple[bytes, bytes] | None = None,
) -> bytes:
    """T: what both signatures and both proofs cover. `shares` (Ya, Yb) in secret mode."""
    fields = [(pk_a, 32), (pk_b, 32), (nonce_a, NONCE_BYTES), (nonce_b, NONCE_BYTES)]
    fields += [(share, SHARE_BYTES) for share in shares or ()]
    if any(len(value) != size for value, size in fields):
        raise HandshakeError("malformed handshake: wrong key, nonce or key share length")
    return b"|".join((DOMAIN, mode.encode(), *(value for value, _ in fields)))


def pake_channel(pk_a: bytes) -> bytes:
    """CPace's channel identifier: this protocol and the initiator's key (the only key
    both sides know when the initiator makes its share). Its nonce is CPace's sid."""
    return pake.lv_cat(DOMAIN, pk_a)


def key_share(secret: str, pk_a: bytes, nonce_a: bytes) -> pake.KeyShare:
    """A fresh CPace share on the cluster secret for the handshake A opened with nonce_a."""
    return pake.key_share(secret.encode(), pake_channel(pk_a), nonce_a)


def session_key(ours: pake.KeyShare, theirs: bytes, nonce_a: bytes, *, initiator: bool) -> bytes:
    try:
        return pake.session_key(ours, theirs, nonce_a, initiator=initiator)
    except pake.PakeError as exc:
        raise HandshakeError(f"malformed handshake: {exc}") from None


def key_proof(key: bytes, role: bytes, transcript_bytes: bytes) -> bytes:
    """Proof of the CPace session key (and so of the cluster secret), bound to T."""
    return hmac.new(key, role + b"|" + transcript_bytes, hashlib.sha256).digest()


def check_key_proof(key: bytes, role: bytes, transcript_bytes: bytes, proof: bytes) -> None:
    if not hmac.compare_digest(key_proof(key, role, transcript_bytes), proof):
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


@dataclass(frozen=True, slots=True)
class Opened:
    """What a responder keeps of a hello until its confirm: the validated fields it
    needs, nothing of the document. At most about 4.8 KiB: the certificate (at most
    MAX_CERT_CHARS, ASCII), a name of at most 64 characters (at most 256 bytes), two
    32-byte values, two ints, in secret mode three more 32-byte values (the key shares
    and our scalar), and the objects' overhead (some 0.6 KiB)."""

    public_key: bytes
    nonce: bytes
    name: str
    cert: str
    api_port: int
    peer_port: int
    their_share: bytes | None = None  # Ya, secret mode
    our_share: pake.KeyShare | None = None  # yb and Yb, secret mode

    @classmethod
    def of(cls, hello: Hello, our_share: pake.KeyShare | None = None) -> Opened:
        return cls(
            hello.public_key,
            hello.nonce,
            hello.name,
            hello.cert,
            hello.api_port,
            hello.peer_port,
            hello.pake,
            our_share,
        )

    @property
    def shares(self) -> tuple[bytes, bytes] | None:
        """(Ya, Yb), what the transcript holds of the key exchange; None outside secret mode."""
        if self.their_share is None or self.our_share is None:
            return None
        return self.their_share, self.our_share.public


@dataclass
class NonceBook:
    """Nonces this node issued as responder, each good for one confirm, for a while.

    Bounded: at most MAX_OPEN_HANDSHAKES entries of at most ~4.8 KiB (`Opened`) plus a
    nonce and an expiry each, so about 1.2 MiB however many hellos arrive.
    """

    issued: dict[bytes, tuple[float, Opened]]  # our nonce -> (expiry, the hello)

    @classmethod
    def empty(cls) -> NonceBook:
        return cls({})

    def issue(self, now: float, opened: Opened) -> bytes:
        self._expire(now)
        if len(self.issued) >= MAX_OPEN_HANDSHAKES:  # a flood of hellos: drop the oldest
            del self.issued[min(self.issued, key=lambda n: self.issued[n][0])]
        nonce = new_nonce()
        self.issued[nonce] = (now + NONCE_TTL_S, opened)
        return nonce

    def take(self, now: float, nonce_b: bytes) -> Opened:
        """The hello a confirm for `nonce_b` answers; usable once."""
        self._expire(now)
        entry = self.issued.pop(nonce_b, None)
        if entry is None:
            raise HandshakeError("unknown, expired or replayed handshake")
        return entry[1]

    def _expire(self, now: float) -> None:
        for nonce in [n for n, (expiry, _) in self.issued.items() if expiry <= now]:
            del self.issued[nonce]
