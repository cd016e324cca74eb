"""TLS between nodes: certificates made from the node keys, pinned by fingerprint.

Every node has a self-signed X.509 certificate for its Ed25519 key. Peer traffic runs
over mutual TLS 1.3 on the peer port: the server requires a client certificate and
trusts exactly the certificates of paired nodes (loaded as trust anchors with
VERIFY_X509_PARTIAL_CHAIN, no hostname check); a client trusts exactly the one
certificate of the node it dials. Python's `ssl` has no verify callback, so pinning is
done by what each context trusts: admitting a node adds its certificate to the live
server context; revoking one needs a fresh context (the peer listener is restarted and
the node's live connections are closed).
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from shoal.mesh.identity import Identity

CERT_FILE = "node.crt"
VALIDITY = datetime.timedelta(days=3650)  # the key is the identity; the dates carry no trust


def load_or_create_cert(identity: Identity, data_dir: Path) -> bytes:
    """The node's certificate (PEM), made once from its key."""
    path = data_dir / CERT_FILE
    if path.is_file():
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        public = cert.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public == identity.public_key:
            return pem
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(identity.private_key, algorithm=None)
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(pem)
    return pem


def public_key_of_cert(pem_or_der: bytes) -> bytes:
    if pem_or_der.startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(pem_or_der)
    else:
        cert = x509.load_der_x509_certificate(pem_or_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _with_own_cert(context: ssl.SSLContext, identity: Identity, cert_pem: bytes) -> None:
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # load_cert_chain reads files only: write both to a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="shoal-tls-") as directory:
        cert_path, key_path = Path(directory) / "c.pem", Path(directory) / "k.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)


def _pinned(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def server_context(identity: Identity, cert_pem: bytes, trusted: list[bytes]) -> ssl.SSLContext:
    """For the peer listener: our certificate; clients must present a paired node's."""
    context = _pinned(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _with_own_cert(context, identity, cert_pem)
    for pem in trusted:
        context.load_verify_locations(cadata=pem.decode())
    return context


def client_context(identity: Identity, cert_pem: bytes, peer_cert: bytes) -> ssl.SSLContext:
    """For dialing one peer: we present our certificate and trust only theirs."""
    context = _pinned(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    _with_own_cert(context, identity, cert_pem)
    context.load_verify_locations(cadata=peer_cert.decode())
    return context
