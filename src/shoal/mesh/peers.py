"""The peer table and the tasks that keep it true: heartbeats, pushes, static peers.

Theory of operation: every way of finding a peer (mDNS, static addresses, a subnet
scan, `shoal join`, a peer that contacted us) ends in `Membership.sighted` with the
peer's node ID and API address. Nothing is exchanged with a node before it is paired:
an unpaired node gets the admission handshake first (`Trust.admit`), and in pairing
mode stays out of the table until both operators accept. A heartbeat is a state
exchange over mutual TLS: we POST our snapshot and
get the peer's back, so both sides learn each other from one request. `Membership`
decides who is due and when a peer is suspect or removed; this module only does the
I/O and keeps the newest snapshot of every peer. When this node's state changes
(models, load), it is pushed to every live peer at once rather than on the next beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shoal.backends.http import PROBE_ERRORS
from shoal.mesh.link import PeerLink
from shoal.mesh.membership import Event, Membership, PeerState, PeerView, Timing
from shoal.mesh.state import NodeState, ProtocolError
from shoal.settings import LimitSettings, MeshSettings
from shoal.trust.handshake import HandshakeError
from shoal.trust.service import Trust
from shoal.trust.store import TrustedNode, TrustState

log = logging.getLogger(__name__)

STATIC_RETRY_FIRST_S = 1.0
STATIC_RETRY_MAX_S = 30.0
GOODBYE_TIMEOUT_S = 0.8  # a clean shutdown must be seen by peers within 1 s
_EXCHANGE_ERRORS: tuple[type[BaseException], ...] = (*PROBE_ERRORS, ProtocolError)


@dataclass(frozen=True, slots=True)
class Peer:
    view: PeerView
    state: NodeState | None


class Peers:
    def __init__(
        self,
        self_id: str,
        snapshot: Callable[[], NodeState],
        trust: Trust,
        settings: MeshSettings,
        limits: LimitSettings,
        static: Iterable[str] = (),
    ) -> None:
        self.self_id = self_id
        self.trust = trust
        self._snapshot = snapshot
        self._settings = settings
        self._limits = limits
        self._static = tuple(static)
        self.membership = Membership(
            self_id,
            Timing(
                new_interval_s=settings.new_interval_s,
                established_interval_s=settings.established_interval_s,
                stable_interval_s=settings.stable_interval_s,
                misses_to_remove=settings.misses_to_remove,
                suspect_retry_s=settings.suspect_retry_s,
            ),
        )
        self._states: dict[str, NodeState] = {}
        self._links: dict[tuple[str, str], PeerLink] = {}  # by (peer id, TLS URL)
        # Requests open from this node to each peer: its last snapshot does not count them.
        self.sent: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._push = asyncio.Event()
        self.first_peer = asyncio.Event()
        self._closing: list[asyncio.Future[None]] = []

    # -- what the rest of the node sees ---------------------------------------------

    def peers(self) -> list[Peer]:
        return [Peer(view, self._states.get(view.peer_id)) for view in self.membership.views()]

    def routable(self) -> list[Peer]:
        """Alive peers first; suspect ones after, as a last resort."""
        order = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1}
        usable = [p for p in self.peers() if p.state is not None and p.view.state in order]
        return sorted(usable, key=lambda p: order[p.view.state])

    def link(self, peer_id: str) -> PeerLink:
        """The mTLS link to a paired peer, at the address it was last seen at."""
        view = self.membership.view(peer_id)
        if view is None:
            raise KeyError(peer_id)
        url = self.trust.peer_url(peer_id, urlsplit(view.address).hostname or "")
        link = self._links.get((peer_id, url))
        if link is None:
            link = PeerLink(url, self._limits, self.trust.client_context(peer_id))
            self._links[(peer_id, url)] = link
        return link

    # -- inputs ---------------------------------------------------------------------

    def sighted(self, peer_id: str, address: str, source: str) -> None:
        view = self.membership.view(peer_id)
        if (
            view is not None
            and view.address != address
            and view.state is PeerState.ALIVE
            and source in ("mdns", "scan")
        ):
            # An advert is a hint: anyone can claim a live peer's ID at another address.
            # While the peer answers where it is, such a claim is ignored (the claimant
            # could not pass the pinned TLS anyway, but switching would cut us off).
            log.debug("ignoring %s sighting of live peer %s at %s", source, peer_id[:12], address)
            return
        self._apply(self.membership.sighted(peer_id, address, time.monotonic(), source))
        self._wake.set()

    def received(self, state: NodeState, address: str) -> None:
        """A peer sent us its snapshot (its heartbeat or a push)."""
        self._learn(state, address, "peer")

    def goodbye(self, peer_id: str) -> None:
        self._apply(self.membership.goodbye(peer_id, time.monotonic()))

    def forget(self, peer_id: str) -> None:
        """It lost our trust: out of the table, its links closed."""
        self.membership.forget(peer_id)
        self._states.pop(peer_id, None)
        for key in [k for k in self._links if k[0] == peer_id]:
            link = self._links.pop(key)
            self._closing = [f for f in self._closing if not f.done()]
        self._closing.append(asyncio.ensure_future(link.aclose()))

    def request_failed(self, peer_id: str) -> None:
        self._apply(self.membership.request_failed(peer_id, time.monotonic()))
        self._wake.set()

    def changed(self) -> None:
        """This node's state changed: push it to the peers soon."""
        self._push.set()

    async def probe(
        self, address: str, source: str, timeout_s: float | None = None
    ) -> TrustedNode | None:
        """Meet the node at an API address we have no node ID for yet.

        Runs the admission handshake; if that pairs us, exchanges states too. Returns
        the node's trust entry (paired or pending), or None when no Shoal node answered
        or the handshake failed.
        """
        try:
            node = await asyncio.wait_for(
                self.trust.admit(address),
                timeout_s or self._settings.heartbeat_timeout_s,
            )
        except HandshakeError as exc:
            log.warning("cannot join the node at %s: %s", address, exc)
            return None
        except _EXCHANGE_ERRORS as exc:
            log.debug("no Shoal node at %s (%s)", address, type(exc).__name__)
            return None
        if node.node_id == self.self_id:
            return node
        if node.state is TrustState.PAIRED:
            self.sighted(node.node_id, address, source)
            await self._beat(node.node_id)
        return node

    def _learn(self, state: NodeState, address: str, source: str) -> None:
        now = time.monotonic()
        self._apply(self.membership.sighted(state.node_id, address, now, source))
        self._keep(state)
        self._apply(self.membership.heartbeat_succeeded(state.node_id, now))

    def _keep(self, state: NodeState) -> None:
        old = self._states.get(state.node_id)
        restarted = old is not None and state.uptime_s < old.uptime_s
        if old is None or state.seq > old.seq or restarted:
            self._states[state.node_id] = state

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            state = self._states.get(event.peer_id)
            name = state.name if state else event.peer_id[:12]
            log.info("peer %s (%s): %s", name, event.peer_id[:12], event.kind)
            if event.kind == "joined":
                self.first_peer.set()

    # -- tasks ----------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats())
            group.create_task(self._pushes())
            if self._static:
                group.create_task(self._find_static())

    async def _heartbeats(self) -> None:
        while True:
            due = self.membership.due(time.monotonic())
            if due:
                await asyncio.gather(*(self._beat(peer_id) for peer_id in due))
            next_due = self.membership.next_due()
            sleep = 60.0 if next_due is None else max(0.01, next_due - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _beat(self, peer_id: str) -> None:
        view = self.membership.view(peer_id)
        if view is None:
            return
        if not await self._paired(peer_id, view.address):
            self._apply(self.membership.heartbeat_failed(peer_id, time.monotonic()))
            return
        try:
            state = await self.link(peer_id).exchange(
                self._snapshot(), self._settings.heartbeat_timeout_s
            )
        except _EXCHANGE_ERRORS:
            self._apply(self.membership.heartbeat_failed(peer_id, time.monotonic()))
            return
        if state.node_id != peer_id:  # another node answers at that address now
            self._apply(self.membership.heartbeat_failed(peer_id, time.monotonic()))
            if state.node_id != self.self_id:
                self._learn(state, view.address, "peer")
            return
        self._keep(state)
        self._apply(self.membership.heartbeat_succeeded(peer_id, time.monotonic()))

    async def _paired(self, peer_id: str, address: str) -> bool:
        """Whether we may talk to it; meets it first if we have not yet."""
        if self.trust.is_paired(peer_id):
            return True
        if self.trust.store.get(peer_id) is not None:
            return False  # pending or unpaired: the operator decides, not a heartbeat
        node = await self.probe(address, "peer")
        return node is not None and node.node_id == peer_id and self.trust.is_paired(peer_id)

    async def _pushes(self) -> None:
        while True:
            await self._push.wait()
            self._push.clear()
            alive = [p.view.peer_id for p in self.routable()]
            await asyncio.gather(*(self._beat(peer_id) for peer_id in alive))
            await asyncio.sleep(self._settings.push_min_interval_s)

    async def _find_static(self) -> None:
        """Find the node behind each configured address; retry until it answers."""
        pending, delay = sorted(set(self._static)), STATIC_RETRY_FIRST_S
        while pending:
            found = await asyncio.gather(*(self.probe(url, "static") for url in pending))
            pending = [url for url, state in zip(pending, found, strict=True) if state is None]
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, STATIC_RETRY_MAX_S)

    async def say_goodbye(self) -> None:
        """Tell every live peer we are leaving, within GOODBYE_TIMEOUT_S."""
        alive = [p.view.peer_id for p in self.routable()]
        await asyncio.gather(
            *(self.link(p).goodbye(self.self_id, GOODBYE_TIMEOUT_S) for p in alive),
            return_exceptions=True,
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self._links.values()), *self._closing)
