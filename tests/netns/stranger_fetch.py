"""One GET on a node's mutual-TLS peer port, presenting a real node's own certificate
(from its data dir): what a node that is not paired with the target gets.

    python tests/netns/stranger_fetch.py DATA_DIR URL

Prints one JSON line: {"status", "body"} for an HTTP answer, or {"error"} when the TLS
handshake or the connection is refused. The server's certificate is not checked: the
question is only what the server gives to this client.
"""

from __future__ import annotations

import json
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from shoal.mesh.identity import load_or_create
from shoal.trust.certs import load_or_create_cert


def client_context(data_dir: Path) -> ssl.SSLContext:
    identity = load_or_create(data_dir)
    cert = load_or_create_cert(identity, data_dir)
    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only
        (Path(folder) / "c.pem").write_bytes(cert)
        (Path(folder) / "k.pem").write_bytes(key)
        context.load_cert_chain(Path(folder) / "c.pem", Path(folder) / "k.pem")
    return context


def main() -> None:
    data_dir, url = Path(sys.argv[1]), sys.argv[2]
    answer: dict[str, object]
    try:
        with urllib.request.urlopen(url, context=client_context(data_dir), timeout=10) as response:
            answer = {"status": response.status, "body": response.read().decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        with exc:
            answer = {"status": exc.code, "body": exc.read().decode(errors="replace")}
    except OSError as exc:  # ssl.SSLError, a reset: refused before any HTTP
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
