"""The trust store: which nodes this node admits, kept in the data dir.

Theory of operation: a node we have completed a handshake with is *pending*, *paired*
or *unpaired*. In open and secret modes a completed handshake pairs at once; in pairing
mode the node stays pending until the operator accepts it (`shoal pair accept`). Only
paired nodes exchange state, inference or files. Declining or unpairing makes a node
*unpaired*: it is ignored until re-paired; `forget` drops it entirely. Who may wait in
the pending list is `shoal.trust.pending`'s decision (one request per address, a cap
that a new address always gets under), so a stranger on the LAN cannot keep a real node
out. Every entry pins the node's public key (the node ID is its hash).
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
from shoal.trust.pending import PendingBook, Request

STORE_FILE = "trust.json"
# Hex digits a typed ID prefix needs: 32 bits, too many for another node to share by
# chance or to match cheaply on purpose.
MIN_ID_PREFIX = 8


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


@dataclass(frozen=True, slots=True)
class Meeting:
    """A node's entry after a handshake, and the pending requests that made way for it."""

    node: TrustedNode
    dropped: tuple[TrustedNode, ...] = ()


class TrustStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._nodes: dict[str, TrustedNode] = {}
        self._pending = PendingBook()  # who may wait (kept per process, like a rate)
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
        """The one node `key` names; None if it names none, or several.

        `key` is any form the CLI prints or a person types: the node ID, its short form
        (`SHOAL-XXXX-XXXX-XXXX`, any case, the `SHOAL-` tag and the dashes optional), the
        first MIN_ID_PREFIX or more hex digits of the ID (any case), or the node's name.
        A whole ID outranks a prefix of another node's ID. A name outranks nothing: the
        other node chose it, and a name made to look like another node's ID must not
        capture that ID, so a key that is one node's name and fits another's ID names
        neither. A key written as a whole ID (64 hex digits, or the tagged short form)
        is never read as a name.
        """
        wanted = _Key.parse(key)
        whole = {n.node_id: n for n in self._nodes.values() if wanted.is_id_of(n)}
        named = {n.node_id: n for n in self._nodes.values() if wanted.is_name_of(n)}
        if whole:
            fits = whole | named
        else:
            prefixed = {n.node_id: n for n in self._nodes.values() if wanted.prefixes(n)}
            fits = named | prefixed
        return next(iter(fits.values())) if len(fits) == 1 else None

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
    ) -> Meeting:
        """A handshake completed with this node: its (new) entry, and the pending
        requests dropped to let it wait (PendingFull, changing nothing, if it may not)."""
        now = time.time()
        node = self._nodes.get(node_id)
        dropped: list[TrustedNode] = []
        if not paired and (node is None or node.state is TrustState.PENDING):
            waiting = [
                Request(n.node_id, n.address, n.first_seen)
                for n in self._nodes.values()
                if n.state is TrustState.PENDING and n.node_id != node_id
            ]
            asking = Request(node_id, address, node.first_seen if node else now)
            for request in self._pending.admit(waiting, asking, now, known=node is not None):
                dropped.append(self._nodes.pop(request.node_id))
        if node is None:
            node = TrustedNode(
                node_id,
                public_key.hex(),
                TrustState.PAIRED if paired else TrustState.PENDING,
                first_seen=now,
            )
            self._nodes[node_id] = node
        elif paired and node.state is TrustState.PENDING:
            node.state = TrustState.PAIRED
        node.name, node.address, node.code = name, address, code
        node.cert, node.peer_port = cert, peer_port
        self.save()
        return Meeting(node, tuple(dropped))

    def set_state(self, node_id: str, state: TrustState) -> None:
        self._nodes[node_id].state = state
        self.save()

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"nodes": [asdict(n) for n in self.nodes()]}
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".trust-")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
        os.chmod(temp, 0o600)
        os.replace(temp, self.path)
        self._mtime = self.path.stat().st_mtime


_HEX_DIGITS = frozenset("0123456789abcdef")
_BASE32_DIGITS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
_SHORT_TAG = "SHOAL"
_SHORT_DIGITS = 12  # base32 digits in a short ID: 60 bits, see identity.short_id
_NODE_ID_DIGITS = 64  # hex digits of a SHA-256


def _short_digits(node_id: str) -> str:
    """The 12 base32 digits of a node's short ID, without the tag and the dashes."""
    return short_id(node_id).removeprefix(_SHORT_TAG + "-").replace("-", "")


@dataclass(frozen=True)
class _Key:
    """What a key typed by a person could mean; None for each reading it cannot have."""

    node_id: str | None  # all 64 hex digits, lower case
    short: str | None  # the short ID's 12 base32 digits, upper case
    prefix: str | None  # MIN_ID_PREFIX to 63 hex digits, lower case
    name: str | None  # None when the key is written as a whole ID

    @classmethod
    def parse(cls, key: str) -> _Key:
        text = key.strip()
        if not text:
            return cls(None, None, None, None)
        lower, squeezed = text.lower(), text.upper().replace("-", "")
        is_hex = set(lower) <= _HEX_DIGITS
        if is_hex and len(lower) == _NODE_ID_DIGITS:
            return cls(lower, None, None, None)
        tagged = squeezed.startswith(_SHORT_TAG) and _is_short(squeezed[len(_SHORT_TAG) :])
        if tagged:
            return cls(None, squeezed[len(_SHORT_TAG) :], None, None)
        return cls(
            None,
            squeezed if _is_short(squeezed) else None,
            lower if is_hex and MIN_ID_PREFIX <= len(lower) < _NODE_ID_DIGITS else None,
            text,
        )

    def is_id_of(self, node: TrustedNode) -> bool:
        if self.node_id is not None:
            return node.node_id == self.node_id
        return self.short is not None and _short_digits(node.node_id) == self.short

    def is_name_of(self, node: TrustedNode) -> bool:
        return self.name is not None and node.name == self.name

    def prefixes(self, node: TrustedNode) -> bool:
        return self.prefix is not None and node.node_id.startswith(self.prefix)


def _is_short(digits: str) -> bool:
    return len(digits) == _SHORT_DIGITS and set(digits) <= _BASE32_DIGITS
