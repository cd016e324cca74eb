"""The peer table and the tasks that keep it true: heartbeats, pushes, static peers.

Theory of operation: every way of finding a peer (mDNS, static addresses, a subnet
scan, `shoal join`, a peer that contacted us) ends in `Membership.sighted` with the
peer's node ID and address. A heartbeat is a state exchange: we POST our snapshot and
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

from shoal.backends.http import PROBE_ERRORS
from shoal.mesh.link import PeerLink
from shoal.mesh.membership import Event, Membership, PeerState, PeerView, Timing
from shoal.mesh.state import NodeState, ProtocolError
from shoal.settings import LimitSettings, MeshSettings

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
        settings: MeshSettings,
        limits: LimitSettings,
        static: Iterable[str] = (),
    ) -> None:
        self.self_id = self_id
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
        self._links: dict[str, PeerLink] = {}
        # Requests open from this node to each peer: its last snapshot does not count them.
        self.sent: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._push = asyncio.Event()
        self.first_peer = asyncio.Event()

    # -- what the rest of the node sees ---------------------------------------------

    def peers(self) -> list[Peer]:
        return [Peer(view, self._states.get(view.peer_id)) for view in self.membership.views()]

    def routable(self) -> list[Peer]:
        """Alive peers first; suspect ones after, as a last resort."""
        order = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1}
        usable = [p for p in self.peers() if p.state is not None and p.view.state in order]
        return sorted(usable, key=lambda p: order[p.view.state])

    def link(self, address: str) -> PeerLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = PeerLink(address, self._limits)
        return link

    # -- inputs ---------------------------------------------------------------------

    def sighted(self, peer_id: str, address: str, source: str) -> None:
        self._apply(self.membership.sighted(peer_id, address, time.monotonic(), source))
        self._wake.set()

    def received(self, state: NodeState, address: str) -> None:
        """A peer sent us its snapshot (its heartbeat or a push)."""
        self._learn(state, address, "peer")

    def goodbye(self, peer_id: str) -> None:
        self._apply(self.membership.goodbye(peer_id, time.monotonic()))

    def request_failed(self, peer_id: str) -> None:
        self._apply(self.membership.request_failed(peer_id, time.monotonic()))
        self._wake.set()

    def changed(self) -> None:
        """This node's state changed: push it to the peers soon."""
        self._push.set()

    async def probe(
        self, address: str, source: str, timeout_s: float | None = None
    ) -> NodeState | None:
        """Exchange states with an address we have no node ID for yet."""
        link = self._links.get(address) or PeerLink(address, self._limits)
        ours = self._snapshot()
        try:
            state = await link.exchange(ours, timeout_s or self._settings.heartbeat_timeout_s)
        except _EXCHANGE_ERRORS as exc:
            log.debug("no Shoal node at %s (%s)", address, type(exc).__name__)
            if address not in self._links:
                await link.aclose()  # a scan probes hundreds of addresses: keep none of them
            return None
        self._links.setdefault(address, link)
        if state.node_id != self.self_id:
            self._learn(state, address, source)
        elif state.instance != ours.instance:
            log.error("the node at %s presents this node's ID: a copied data dir?", address)
        return state

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
        try:
            state = await self.link(view.address).exchange(
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
        alive = [p.view.address for p in self.routable()]
        await asyncio.gather(
            *(self.link(a).goodbye(self.self_id, GOODBYE_TIMEOUT_S) for a in alive),
            return_exceptions=True,
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self._links.values()))
