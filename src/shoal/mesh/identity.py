"""The node's identity: an Ed25519 key pair made on first start, kept in the data dir.

The node ID is the SHA-256 of the raw public key, in hex. It is what peers pin, so it
survives IP changes, renames and restarts; the short form (`SHOAL-7Q2K-…`) is for
people. The private key file is created with mode 0600 and never leaves this machine.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.errors import ConfigError
from shoal.private_files import PRIVATE_DIR, PRIVATE_FILE, tighten

KEY_FILE = "node.key"


def node_id_of(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def short_id(node_id: str) -> str:
    """`SHOAL-XXXX-XXXX-XXXX`: 60 bits of the ID in base32, for people to read out."""
    digits = base64.b32encode(bytes.fromhex(node_id)[:10]).decode()[:12]
    return "SHOAL-" + "-".join(digits[i : i + 4] for i in range(0, 12, 4))


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey
    public_key: bytes  # raw, 32 bytes

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @property
    def short_id(self) -> str:
        return short_id(self.node_id)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def load_or_create(data_dir: Path) -> Identity:
    path = data_dir / KEY_FILE
    if tighten(path, PRIVATE_FILE):  # what a copy or an editor loosened, with a warning
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"{path} is not a valid node key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a key that is not Ed25519")
    else:
        data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two nodes started on one data dir at once must not both write a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return Identity(key, public)
