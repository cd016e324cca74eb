"""The trust store: which nodes this node admits, kept in the data dir.

Theory of operation: a node we have completed a handshake with is *pending*, *paired*
or *unpaired*. In open and secret modes a completed handshake pairs at once; in pairing
mode the node stays pending until the operator accepts it (`shoal pair accept`). Only
paired nodes exchange state, inference or files. Declining or unpairing makes a node
*unpaired*: it is ignored until re-paired; `forget` drops it entirely. The pending list
is capped, and new pending entries are rate-limited, so a stranger on the LAN cannot
fill it. Every entry pins the node's public key (the node ID is its hash).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from shoal.errors import ConfigError
from shoal.mesh.identity import short_id

STORE_FILE = "trust.json"
MAX_PENDING = 32
NEW_PENDING_PER_MINUTE = 10


class TrustState(StrEnum):
    PENDING = "pending"
    PAIRED = "paired"
    UNPAIRED = "unpaired"


@dataclass
class TrustedNode:
    node_id: str
    public_key: str  # hex, 32 bytes raw Ed25519
    state: TrustState
    name: str = ""
    address: str = ""
    code: str = ""  # the confirmation code both sides show
    first_seen: float = 0.0
    cert: str = ""  # its TLS certificate (PEM), made from the same key
    peer_port: int = 0

    @property
    def short_id(self) -> str:
        return short_id(self.node_id)


class PendingFull(Exception):
    """Too many pending nodes, or too many new ones too fast: try again later."""


class TrustStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._nodes: dict[str, TrustedNode] = {}
        self._recent_pending: list[float] = []
        self._mtime = 0.0
        self.reload()

    # -- reading ------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the file if it changed (the CLI edits it while the node runs)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._mtime:
            return False
        try:
            document = json.loads(self.path.read_text())
            nodes = {
                n["node_id"]: TrustedNode(**{**n, "state": TrustState(n["state"])})
                for n in document["nodes"]
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path} is not a valid trust store: {exc}") from None
        self._nodes, self._mtime = nodes, mtime
        return True

    def get(self, node_id: str) -> TrustedNode | None:
        return self._nodes.get(node_id)

    def state(self, node_id: str) -> TrustState | None:
        node = self._nodes.get(node_id)
        return node.state if node else None

    def nodes(self) -> list[TrustedNode]:
        return sorted(self._nodes.values(), key=lambda n: n.first_seen)

    def paired(self) -> list[TrustedNode]:
        return [n for n in self._nodes.values() if n.state is TrustState.PAIRED]

    def find(self, key: str) -> TrustedNode | None:
        """By full ID, ID prefix (8+ characters) or name; None unless exactly one fits."""
        exact = [n for n in self._nodes.values() if key in (n.node_id, n.name)]
        if len(exact) == 1:
            return exact[0]
        fits = [n for n in self._nodes.values() if len(key) >= 8 and n.node_id.startswith(key)]
        return fits[0] if len(fits) == 1 else None

    # -- changing -----------------------------------------------------------------------

    def met(
        self,
        node_id: str,
        public_key: bytes,
        *,
        paired: bool,
        name: str,
        address: str,
        code: str,
        cert: str,
        peer_port: int,
    ) -> TrustedNode:
        """A handshake completed with this node; returns its (new) entry."""
        node = self._nodes.get(node_id)
        if node is None:
            if not paired:
                self._admit_pending(time.time())
            node = TrustedNode(
                node_id,
                public_key.hex(),
                TrustState.PAIRED if paired else TrustState.PENDING,
                first_seen=time.time(),
            )
            self._nodes[node_id] = node
        elif paired and node.state is TrustState.PENDING:
            node.state = TrustState.PAIRED
        node.name, node.address, node.code = name, address, code
        node.cert, node.peer_port = cert, peer_port
        self.save()
        return node

    def set_state(self, node_id: str, state: TrustState) -> None:
        self._nodes[node_id].state = state
        self.save()

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        self.save()

    def _admit_pending(self, now: float) -> None:
        pending = sum(n.state is TrustState.PENDING for n in self._nodes.values())
        self._recent_pending = [t for t in self._recent_pending if t > now - 60]
        if pending >= MAX_PENDING or len(self._recent_pending) >= NEW_PENDING_PER_MINUTE:
            raise PendingFull("too many pending pairing requests; try again later")
        self._recent_pending.append(now)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"nodes": [asdict(n) for n in self.nodes()]}
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".trust-")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
        os.chmod(temp, 0o600)
        os.replace(temp, self.path)
        self._mtime = self.path.stat().st_mtime
