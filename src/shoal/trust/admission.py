"""Admission: the one place where a node becomes trusted, or stops being trusted.

Theory of operation: every way of meeting a node ends here. Discovery (mDNS, the subnet
scan) reports a sighting; the operator joins an address, lists static peers, or accepts,
declines, unpairs or forgets a node; another node runs the handshake with us. For each,
admission runs or answers the handshake (`Trust`), and when a node's trust state
changes it does two things: it tells the roster (`Peers`) — a node now paired goes into
the peer table, a node no longer paired leaves it and its links close — and it publishes
`TrustChanged` for everyone else (the composition root rebuilds the peer TLS listener
when a node loses trust, and logs).

Heartbeats never admit: the peer table holds paired nodes only, and a sighting of a
node that is pending or unpaired changes nothing (the operator decides). A sighting of
an unknown node starts one handshake in the background; a failed one is not retried
for that node before its backoff has passed, so a chatty advert cannot cause a storm.

When we answer a handshake (the other node initiated), we do not contact the node
ourselves: it sends its state right after, which puts it in our table. That keeps
first contact to one state exchange.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from shoal.backends.http import PROBE_ERRORS
from shoal.backoff import Backoff
from shoal.errors import NotFound
from shoal.events import EventBus, TrustChanged
from shoal.mesh.membership import Source
from shoal.mesh.state import ProtocolError
from shoal.trust.handshake import HandshakeError
from shoal.trust.service import Met, Trust
from shoal.trust.store import TrustedNode, TrustState

log = logging.getLogger(__name__)

PairAction = Literal["accept", "decline", "unpair", "forget"]
PAIR_ACTIONS: tuple[PairAction, ...] = ("accept", "decline", "unpair", "forget")

#: Static peers that do not answer yet are retried at 1, 2, 4 … s, at most every 30 s.
STATIC_RETRY = Backoff(1.0, 30.0)
#: A node whose handshake failed is not met again on a mere sighting before this.
SIGHTING_RETRY = Backoff(5.0, 300.0)
_MAX_BACKGROUND_MEETINGS = 16  # handshakes started by sightings, at once
_EXCHANGE_ERRORS: tuple[type[BaseException], ...] = (*PROBE_ERRORS, ProtocolError)


class Roster(Protocol):
    """What admission tells the peer table (implemented by `shoal.mesh.peers.Peers`)."""

    def sighted(self, peer_id: str, address: str, source: Source) -> None: ...
    def withdrawn(self, peer_id: str) -> None: ...
    def forget(self, peer_id: str) -> None: ...


class Admission:
    def __init__(
        self,
        trust: Trust,
        roster: Roster,
        bus: EventBus,
        *,
        static: Iterable[str] = (),
        timeout_s: float,
    ) -> None:
        self.trust = trust
        self._roster = roster
        self._bus = bus
        self._static = tuple(sorted(set(static)))
        self._timeout_s = timeout_s
        self._meetings: asyncio.Queue[tuple[str, str, Source]] = asyncio.Queue(
            _MAX_BACKGROUND_MEETINGS
        )
        self._meeting: set[str] = set()  # node IDs with a handshake queued or running
        self._failed: dict[str, tuple[int, float]] = {}  # node ID -> (failures, retry at)

    # -- queries -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.trust.identity.node_id

    def pairs(self) -> list[TrustedNode]:
        """Every node met, for the operator (the store is re-read if edited by hand)."""
        self.trust.store.reload()
        self.trust.refresh_mode()
        return self.trust.store.nodes()

    # -- meeting a node ------------------------------------------------------------------

    async def meet(
        self, address: str, source: Source, timeout_s: float | None = None
    ) -> TrustedNode | None:
        """Run the handshake with the node at an API address.

        Returns its trust entry (paired or pending; this node's own for our own
        address), or None when no Shoal node answered or the handshake failed.
        """
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                met = await self.trust.admit(address)
        except HandshakeError as exc:
            log.warning("cannot join the node at %s: %s", address, exc)
            return None
        except _EXCHANGE_ERRORS as exc:
            log.debug("no Shoal node at %s (%s)", address, type(exc).__name__)
            return None
        node = met.node
        if node.node_id == self.node_id:
            return node
        self._failed.pop(node.node_id, None)
        self._changed(met, address, source, contact=True)
        return node

    def sighted(self, node_id: str, address: str, source: Source) -> None:
        """Discovery saw a node: a paired one goes to the roster, an unknown one is met."""
        if node_id == self.node_id:
            return
        state = self.trust.store.state(node_id)
        if state is TrustState.PAIRED:
            self._roster.sighted(node_id, address, source)
            return
        if state is not None or node_id in self._meeting:
            return  # pending or unpaired: the operator decides, not an advert
        _, retry_at = self._failed.get(node_id, (0, 0.0))
        if time.monotonic() < retry_at:
            return
        try:
            self._meetings.put_nowait((node_id, address, source))
        except asyncio.QueueFull:
            return  # a flood of adverts: the next sighting tries again
        self._meeting.add(node_id)

    def gone(self, node_id: str) -> None:
        """Discovery saw a node's advert withdrawn (an mDNS goodbye). As unauthenticated
        as any advert: the roster checks the node, it does not drop it (a node leaving
        says so itself, over mutual TLS)."""
        if self.trust.store.state(node_id) is TrustState.PAIRED:
            self._roster.withdrawn(node_id)

    # -- the handshake, as responder -----------------------------------------------------

    def hello(self, doc: dict[str, Any], remote_ip: str) -> dict[str, Any]:
        return self.trust.hello(doc, remote_ip)

    def confirm(self, doc: dict[str, Any], remote_ip: str) -> Met:
        met = self.trust.confirm(doc, remote_ip)
        # The initiator sends its state next: no need to contact it ourselves.
        self._changed(met, met.node.address, "peer", contact=False)
        return met

    # -- the operator's decisions --------------------------------------------------------

    def decide(self, key: str, action: PairAction) -> TrustedNode:
        """`shoal pair accept|decline|unpair|forget KEY`, applied live."""
        self.trust.store.reload()
        node = self.trust.store.find(key)
        if node is None:
            raise NotFound(f"no single known node matches {key!r}")
        previous = node.state
        if action == "accept":
            self.trust.accept(node)
            self._changed(Met(node, previous), node.address, "join", contact=True)
        else:
            self.trust.revoke(node, forget=action == "forget")
            state = None if action == "forget" else TrustState.UNPAIRED
            self._roster.forget(node.node_id)
            self._bus.publish(TrustChanged(node.node_id, node.name, node.address, previous, state))
        return node

    # -- both --------------------------------------------------------------------------

    def _changed(self, met: Met, address: str, source: Source, *, contact: bool) -> None:
        node = met.node
        if node.state is TrustState.PAIRED and contact and address:
            self._roster.sighted(node.node_id, address, source)
        if met.changed:
            self._bus.publish(
                TrustChanged(node.node_id, node.name, address, met.previous, node.state)
            )
        for gone in met.dropped:  # pending requests that made way for this one
            self._bus.publish(TrustChanged(gone.node_id, gone.name, gone.address, gone.state, None))

    # -- tasks ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Find the static peers, and meet the unknown nodes discovery reports."""
        async with asyncio.TaskGroup() as group:
            if self._static:
                group.create_task(self._find_static())
            while True:
                node_id, address, source = await self._meetings.get()
                group.create_task(self._meet_sighted(node_id, address, source))

    async def _meet_sighted(self, node_id: str, address: str, source: Source) -> None:
        try:
            node = await self.meet(address, source)
        finally:
            self._meeting.discard(node_id)
        if node is None or node.node_id != node_id:
            failures = self._failed.get(node_id, (0, 0.0))[0] + 1
            retry_at = time.monotonic() + SIGHTING_RETRY.delay(failures)
            self._failed[node_id] = (failures, retry_at)

    async def _find_static(self) -> None:
        """Meet the node behind each configured address; retry until it answers."""
        pending, failures = list(self._static), 0
        while pending:
            found = await asyncio.gather(*(self.meet(url, "static") for url in pending))
            pending = [url for url, node in zip(pending, found, strict=True) if node is None]
            if pending:
                failures += 1
                await asyncio.sleep(STATIC_RETRY.delay(failures))
