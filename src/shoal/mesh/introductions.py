"""Introductions: paired peers tell each other whom they know, so the mesh completes.

Theory of operation
-------------------
Discovery can find a mesh piecemeal: with mDNS off, the first node's subnet scan
reaches the others, which then skip their own scan, and two of them never meet. So every
snapshot a node sends (`shoal.mesh.state.NodeState.peers`) lists its live peers with the
API address it reaches each at, and a node that receives one treats each entry it does
not already know as a sighting from a new source, "introduced": it goes to admission
like any other, which runs the handshake itself (the secret is checked, or the node
waits in the pending list for the operator). An introduction is a hint, never trust.

Only paired peers' snapshots reach this module (they arrive over mutual TLS), and what
they may cause is bounded: `Introductions` does no I/O and reads no clock. It drops our
own ID, the introducer's, nodes already alive in our table, and addresses we could not
mean the same thing by: a loopback address only from an introducer that is itself on our
loopback (the same machine), a link-local one only from an introducer on a link-local
address (the same link), never an unspecified, multicast or reserved one. Each
introduced node is then tried at most `max_attempts` times, with backoff between the
attempts, however many peers introduce it and however often; the count starts over only
once the node has been alive in our table. `Introducer` is the thin driver that feeds
it peers' snapshots and hands what it allows to admission.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from shoal.backoff import Backoff
from shoal.events import PeerStateChanged
from shoal.mesh.identity import short_id
from shoal.mesh.membership import PeerState, Source
from shoal.mesh.state import Introduction, NodeState

if TYPE_CHECKING:
    from shoal.mesh.peers import Peers

log = logging.getLogger(__name__)

#: Between two attempts at meeting one introduced node: 10 s, 20 s … up to 5 minutes;
#: introductions come with every heartbeat (5 to 30 s), so the backoff, not their rate,
#: sets the pace.
RETRY: Final = Backoff(10.0, 300.0)
#: Attempts per introduced node before it is left alone (about 5 minutes of trying):
#: one unreachable from here will not become reachable by being dialled for hours, and
#: another introduction or sighting after it has been alive starts over.
MAX_ATTEMPTS: Final = 6
#: Introduced nodes remembered at once; the least recently introduced are dropped.
MAX_TRACKED: Final = 1024


def usable(address: str, introducer_address: str) -> bool:
    """Whether an introduced API address can mean, to us, the node the introducer means."""
    ip = _ip_of(address)
    if ip is None or ip.is_unspecified or ip.is_multicast:
        return False
    introducer = _ip_of(introducer_address)
    if ip.is_loopback:
        return introducer is not None and introducer.is_loopback
    if ip.is_link_local:
        return introducer is not None and introducer.is_link_local
    return not ip.is_reserved  # 240/4 with the broadcast address; IPv6's ::/8 but ::1


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(urlsplit(address).hostname or "")
    except ValueError:
        return None


@dataclass(slots=True)
class _Tried:
    attempts: int
    next_at: float  # no attempt before this
    heard_at: float  # last introduced


class Introductions:
    """Which introduced nodes to meet now (sans-I/O; see the module's docstring)."""

    def __init__(
        self,
        self_id: str,
        *,
        retry: Backoff = RETRY,
        max_attempts: int = MAX_ATTEMPTS,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.self_id = self_id
        self._retry = retry
        self._max_attempts = max_attempts
        self._max_tracked = max_tracked
        self._tried: dict[str, _Tried] = {}

    def heard(
        self,
        introducer_id: str,
        introducer_address: str,
        introductions: Iterable[Introduction],
        now: float,
        *,
        alive: Callable[[str], bool],
    ) -> list[Introduction]:
        """A peer's snapshot introduced these nodes: the ones to try to meet now."""
        meet: list[Introduction] = []
        for intro in introductions:
            node_id = intro.node_id
            if node_id in (self.self_id, introducer_id):
                continue
            if alive(node_id):
                self._tried.pop(node_id, None)  # met: a later loss starts over
                continue
            if not usable(intro.address, introducer_address):
                continue
            tried = self._tried.pop(node_id, None) or _Tried(0, now, now)
            self._tried[node_id] = tried  # re-inserted: the most recently introduced last
            tried.heard_at = now
            if tried.attempts >= self._max_attempts or now < tried.next_at:
                continue
            tried.attempts += 1
            tried.next_at = now + self._retry.delay(tried.attempts)
            meet.append(intro)
        while len(self._tried) > self._max_tracked:
            del self._tried[next(iter(self._tried))]
        return meet

    def attempts(self, node_id: str) -> int:
        """Attempts made at meeting `node_id` since it was last alive here."""
        tried = self._tried.get(node_id)
        return 0 if tried is None else tried.attempts


class Introducer:
    """Feeds the introductions in peers' snapshots (`PeerStateChanged`) to admission."""

    def __init__(
        self,
        peers: Peers,
        sighted: Callable[[str, str, Source], None],
        book: Introductions | None = None,
    ) -> None:
        self._peers = peers
        self._sighted = sighted
        self.book = book or Introductions(peers.self_id)

    def heard(self, event: PeerStateChanged) -> None:
        state = event.state
        if not isinstance(state, NodeState) or not state.peers:
            return
        introducer = self._peers.membership.view(event.peer_id)
        if introducer is None:
            return  # forgotten meanwhile: no longer trusted to introduce anyone
        meet = self.book.heard(
            event.peer_id, introducer.address, state.peers, time.monotonic(), alive=self._alive
        )
        for intro in meet:
            log.info(
                "peer %s introduced %s at %s",
                event.name, short_id(intro.node_id), intro.address,
            )  # fmt: skip
            self._sighted(intro.node_id, intro.address, "introduced")

    def _alive(self, node_id: str) -> bool:
        view = self._peers.membership.view(node_id)
        return view is not None and view.state is PeerState.ALIVE
