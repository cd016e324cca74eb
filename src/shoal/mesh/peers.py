"""The peer table and the tasks that keep it true: heartbeats and pushes.

Theory of operation: the table holds paired nodes only. Admission
(`shoal.trust.admission`) puts a node in (`sighted`) when it becomes trusted or when
discovery sees a trusted node again, and takes it out (`forget`) when it loses trust; a
paired peer that sends us its state (`received`) is in the table from then on. A
heartbeat is a state exchange over mutual TLS: we POST our snapshot and get the peer's
back, so both sides learn each other from one request (and one beat per pair and
interval is enough: `Membership.heard_from`). Each side says which snapshot of the other
it holds (`Message.have`), and a snapshot the other already holds is sent as
`Unchanged`: an idle mesh exchanges a hundred-odd bytes a beat, and each snapshot is
encoded once per `seq`, however many peers it goes to. `Membership` decides who is due
and when a peer is suspect or removed; this module only does the I/O, keeps the newest
snapshot of every peer, and publishes what changed (`PeerJoined`, `PeerSuspect`,
`PeerRecovered`, `PeerRemoved`, `PeerAddressChanged`, `PeerStateChanged`). When this
node's state changes (models, load), `changed()` pushes it to every live peer that does
not hold it yet, rather than on the next beat. Our snapshot introduces our live peers to
each other (`introductions()`, `shoal.mesh.introductions`); a peer joining changes it,
but is not pushed: the others hear of it on their next beat (on a LAN, mDNS has told
them already), so N nodes starting together cost no storm of N² pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urlsplit

from shoal.backends.http import PROBE_ERRORS
from shoal.events import (
    EventBus,
    HeartbeatAnswered,
    PeerAddressChanged,
    PeerEvent,
    PeerJoined,
    PeerRecovered,
    PeerRemoved,
    PeerStateChanged,
    PeerSuspect,
)
from shoal.mesh.link import PeerLink
from shoal.mesh.membership import Event, Membership, PeerState, PeerView, Source
from shoal.mesh.state import (
    MAX_INTRODUCTIONS,
    Introduction,
    Message,
    NodeState,
    ProtocolError,
    Seen,
    Unchanged,
    api_address,
    encode_body,
    encode_unchanged,
    with_times,
)
from shoal.settings import LimitSettings, MeshSettings
from shoal.trust.handshake import HandshakeError

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT_S = 0.8  # a clean shutdown must be seen by peers within 1 s
#: A mesh larger than MAX_INTRODUCTIONS is introduced in turns, a turn this long: each
#: turn is a new snapshot (one whole snapshot per peer), so not one per beat.
INTRODUCTION_TURN_S = 30.0
_EXCHANGE_ERRORS: tuple[type[BaseException], ...] = (*PROBE_ERRORS, ProtocolError, HandshakeError)
# KeyError: the peer left the table (forgotten) while its beat was due.
_BEAT_ERRORS: tuple[type[BaseException], ...] = (*_EXCHANGE_ERRORS, KeyError)


class Dialer(Protocol):
    """How to reach a paired peer over mutual TLS (implemented by `Trust`)."""

    def peer_url(self, node_id: str, host: str) -> str: ...
    def client_context(self, node_id: str) -> ssl.SSLContext: ...


@dataclass(frozen=True, slots=True)
class Peer:
    view: PeerView
    state: NodeState | None
    # Its wall clock minus ours, in seconds, as its last snapshot arrived (None: it does
    # not send its clock).
    clock_offset_s: float | None = None

    @property
    def name(self) -> str:
        return self.state.name if self.state else self.view.peer_id[:12]


@dataclass(frozen=True, slots=True)
class Holder:
    """A peer as routing sees it: its last snapshot and its liveness."""

    peer_id: str
    state: NodeState
    liveness: PeerState


class Peers:
    def __init__(
        self,
        self_id: str,
        snapshot: Callable[[], NodeState],
        dialer: Dialer,
        bus: EventBus,
        settings: MeshSettings,
        limits: LimitSettings,
    ) -> None:
        self.self_id = self_id
        self._snapshot = snapshot
        self._dialer = dialer
        self._bus = bus
        self._settings = settings
        self._limits = limits
        self.membership = Membership(self_id, settings.timing())
        self._states: dict[str, NodeState] = {}
        self._clock_offsets: dict[str, float] = {}  # by peer id, see `Peer.clock_offset_s`
        self._links: dict[tuple[str, str], PeerLink] = {}  # by (peer id, TLS URL)
        self._wake = asyncio.Event()
        self._push = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self._leaving = False
        self._exchanging = 0  # state exchanges in flight
        self._quiet = asyncio.Event()  # set while none is
        self._quiet.set()
        self._introduced_from = 0  # where the current turn of introductions starts
        self._turn_started = float("-inf")
        # Bumped whenever who is alive, or where, may have changed: introductions are
        # recomputed only then (an O(N) walk per snapshot was a large mesh's idle cost).
        self._roster_version = 0
        self._introduced: tuple[int, tuple[Introduction, ...]] = (-1, ())
        # Which of our snapshots each peer holds, as its last message said (None: none,
        # or an older node that does not say: it always gets whole snapshots).
        self._acked: dict[str, Seen | None] = {}
        self._body: tuple[int, bytes] = (-1, b"")  # our snapshot encoded, for its seq

    # -- what the rest of the node sees ---------------------------------------------

    def peers(self) -> list[Peer]:
        return [
            Peer(view, self._states.get(view.peer_id), self._clock_offsets.get(view.peer_id))
            for view in self.membership.views()
        ]

    def holders(self) -> Iterator[Holder]:
        """Every peer with a snapshot, as routing reads it: no view is built (this is
        the request path, once per peer per request)."""
        liveness = self.membership.liveness
        for peer_id, state in self._states.items():
            if (known := liveness(peer_id)) is not None:
                yield Holder(peer_id, state, known)

    def routable(self) -> list[Peer]:
        """Peers with a snapshot that are alive, then suspect ones (pushes and goodbyes go
        to both; routing tries only alive ones, see `shoal.routing.rank`)."""
        order = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1}
        usable = [p for p in self.peers() if p.state is not None and p.view.state in order]
        return sorted(usable, key=lambda p: order[p.view.state])

    def introductions(self, now: float | None = None) -> tuple[Introduction, ...]:
        """Whom we know, for our snapshot: the alive peers, each at the API address we
        reach it at (an IP literal: a name may resolve otherwise elsewhere). At most
        MAX_INTRODUCTIONS at a time; a larger mesh is introduced in turns of
        INTRODUCTION_TURN_S."""
        now = time.monotonic() if now is None else now
        version, known = self._introduced
        if version != self._roster_version:
            known = tuple(
                Introduction(view.peer_id, address)
                for view in self.membership.views()
                if view.state is PeerState.ALIVE and (address := api_address(view.address))
            )
            self._introduced = (self._roster_version, known)
        if len(known) <= MAX_INTRODUCTIONS:
            return known
        if now - self._turn_started >= INTRODUCTION_TURN_S:
            self._turn_started = now
            self._introduced_from += MAX_INTRODUCTIONS
        start = self._introduced_from % len(known)
        return (known + known)[start : start + MAX_INTRODUCTIONS]

    def link(self, peer_id: str) -> PeerLink:
        """The mTLS link to a paired peer, at the address it was last seen at."""
        view = self.membership.view(peer_id)
        if view is None:
            raise KeyError(peer_id)
        url = self._dialer.peer_url(peer_id, urlsplit(view.address).hostname or "")
        link = self._links.get((peer_id, url))
        if link is None:
            link = PeerLink(url, self._limits, self._dialer.client_context(peer_id))
            self._links[(peer_id, url)] = link
        return link

    # -- inputs ---------------------------------------------------------------------

    def sighted(self, peer_id: str, address: str, source: Source) -> None:
        """A paired node was seen at `address` (or just became paired): check it soon."""
        self._apply(self.membership.sighted(peer_id, address, time.monotonic(), source))
        self._wake.set()

    def received(self, state: NodeState | Unchanged, address: str) -> None:
        """A paired peer sent us its snapshot (its heartbeat or a push), or said it is
        unchanged (ignored unless we hold the one it means)."""
        now = time.monotonic()
        if not self.membership.accepts_snapshot(state.node_id, now):
            return  # sent before its goodbye, arriving after it
        if isinstance(state, Unchanged):
            if not self._refresh(state):
                return  # not one we hold: our answer's `have` makes it send the whole
        else:
            self._apply(self.membership.sighted(state.node_id, address, now, "peer"))
            self._keep(state)
        self._apply(self.membership.heard_from(state.node_id, now))

    def answer(self, message: Message, remote_ip: str) -> bytes:
        """A peer's side of a state exchange (checked to be its own by the caller): take
        it, and say ours: `Unchanged` if it holds our current snapshot."""
        peer_id = message.node_id
        held = self._states.get(peer_id)
        port = message.state.api_port if isinstance(message.state, NodeState) else None
        if port is None and held is not None:
            port = held.api_port
        host = f"[{remote_ip}]" if ":" in remote_ip else remote_ip
        self.received(message.state, f"http://{host}:{port or 0}")
        self._acked[peer_id] = message.have
        ours = self._snapshot()
        brief = ours.seen is not None and message.have == ours.seen
        return self._encode(ours, brief=brief, have=self._seen(peer_id))

    def goodbye(self, peer_id: str) -> None:
        """The peer itself said it leaves (over mutual TLS): removed at once."""
        self._apply(self.membership.goodbye(peer_id, time.monotonic()))

    def withdrawn(self, peer_id: str) -> None:
        """Discovery saw its advert withdrawn, which anyone can forge: heartbeat it now."""
        self._apply(self.membership.withdrawn(peer_id, time.monotonic()))
        self._wake.set()

    def forget(self, peer_id: str) -> None:
        """It lost our trust: out of the table, its links closed."""
        view = self.membership.view(peer_id)
        if view is not None and view.state in (PeerState.ALIVE, PeerState.SUSPECT):
            self._bus.publish(PeerRemoved(peer_id, self._name(peer_id), "untrusted"))
        self.membership.forget(peer_id)
        self._roster_version += 1
        self._states.pop(peer_id, None)
        self._acked.pop(peer_id, None)
        self._close_links(peer_id)

    def _close_links(self, peer_id: str) -> None:
        """Close the peer's pooled connections: requests in flight on them fail at once
        (and are retried elsewhere if nothing reached the client yet), rather than wait
        out the read timeout on a peer that no longer answers."""
        reason = f"lost the peer {self._name(peer_id)} (it stopped answering or left)"
        for key in [k for k in self._links if k[0] == peer_id]:
            link = self._links.pop(key)
            link.abort(reason)
            task = asyncio.ensure_future(link.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def request_failed(self, peer_id: str) -> None:
        self._apply(self.membership.request_failed(peer_id, time.monotonic()))
        self._wake.set()

    def changed(self) -> None:
        """This node's state changed: push it to the peers soon."""
        self._push.set()

    def _keep(self, state: NodeState) -> None:
        if state.clock is not None:  # measured on every snapshot, changed or not
            self._clock_offsets[state.node_id] = state.clock - time.time()
        old = self._states.get(state.node_id)
        # A restart begins `seq` again. With boot IDs on both, only a new one says so: a
        # late answer (a heartbeat's, after a push) has a lower uptime but is older.
        if old is not None and old.boot is not None and state.boot is not None:
            restarted = state.boot != old.boot
        else:
            restarted = old is not None and state.uptime_s < old.uptime_s
        if old is None or state.seq > old.seq or restarted:
            self._states[state.node_id] = state
            self._bus.publish(PeerStateChanged(state.node_id, state.name, state))
        elif state.seq == old.seq and state.uptime_s > old.uptime_s:
            self._states[state.node_id] = state  # the same state, its uptime newer

    def _refresh(self, unchanged: Unchanged) -> bool:
        """The peer's state is one we hold (or older than it): keep its new uptime and
        clock. False if we hold none of that boot."""
        old = self._states.get(unchanged.node_id)
        if old is None or old.boot != unchanged.boot or old.seq < unchanged.seq:
            return False
        if unchanged.clock is not None:
            self._clock_offsets[unchanged.node_id] = unchanged.clock - time.time()
        if old.seq == unchanged.seq and unchanged.uptime_s > old.uptime_s:
            self._states[unchanged.node_id] = replace(old, uptime_s=unchanged.uptime_s)
        return True

    def _seen(self, peer_id: str) -> Seen | None:
        """Which snapshot of the peer we hold, as our messages say."""
        state = self._states.get(peer_id)
        return None if state is None else state.seen

    def _encode(self, ours: NodeState, *, brief: bool, have: Seen | None) -> bytes:
        """Our side of an exchange: our snapshot, whole (encoded once per seq) or
        `Unchanged`, with its times and what we hold of the peer's."""
        if brief:
            body = encode_unchanged(ours)
        else:
            if self._body[0] != ours.seq:
                self._body = (ours.seq, encode_body(ours))
            body = self._body[1]
        return with_times(body, ours.uptime_s, ours.clock, have)

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            self._roster_version += 1  # whom we introduce may have changed
            self._bus.publish(self._typed(event))
            if event.kind in ("suspect", "removed", "left"):
                self._close_links(event.peer_id)
                self._acked.pop(event.peer_id, None)

    def _typed(self, event: Event) -> PeerEvent:
        peer_id, name = event.peer_id, self._name(event.peer_id)
        view = self.membership.view(peer_id)
        address = view.address if view else ""
        match event.kind:
            case "joined":
                return PeerJoined(peer_id, name, address)
            case "recovered":
                return PeerRecovered(peer_id, name)
            case "suspect":
                return PeerSuspect(peer_id, name)
            case "removed":
                return PeerRemoved(peer_id, name, "missed")
            case "left":
                return PeerRemoved(peer_id, name, "left")
            case "address_changed":
                return PeerAddressChanged(peer_id, name, address)

    def _name(self, peer_id: str) -> str:
        state = self._states.get(peer_id)
        return state.name if state else peer_id[:12]

    # -- tasks ----------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats())
            group.create_task(self._pushes())

    async def _heartbeats(self) -> None:
        while True:
            due = self.membership.due(time.monotonic())
            if due:
                await asyncio.gather(*(self._beat(peer_id) for peer_id in due))
            next_due = self.membership.next_due()
            sleep = 60.0 if next_due is None else max(0.01, next_due - time.monotonic())
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the wait ends, and the node would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wake.wait()

    async def _beat(self, peer_id: str) -> None:
        """One state exchange (a heartbeat or a push); its result goes to `Membership`."""
        if self._leaving:
            return  # a state sent after our goodbye would bring us back into their table
        self._exchanging += 1
        self._quiet.clear()
        try:
            await self._beat_once(peer_id)
        finally:
            self._exchanging -= 1
            if not self._exchanging:
                self._quiet.set()

    async def _beat_once(self, peer_id: str) -> None:
        sent = time.monotonic()
        try:
            state = await self._exchange(peer_id)
            if state.node_id != peer_id:  # cannot pass the pinned TLS; refuse it anyway
                raise ProtocolError("answered by another node")
            if isinstance(state, Unchanged) and not self._refresh(state):
                raise ProtocolError("unchanged from a state we do not hold")
        except _BEAT_ERRORS:
            self._apply(self.membership.heartbeat_failed(peer_id, time.monotonic()))
            return
        now = time.monotonic()
        if self._bus.wants(HeartbeatAnswered):
            self._bus.publish(HeartbeatAnswered(peer_id, now - sent))
        if isinstance(state, NodeState):
            self._keep(state)
        self._apply(self.membership.heartbeat_succeeded(peer_id, now))

    async def _exchange(self, peer_id: str) -> NodeState | Unchanged:
        timeout = self._settings.heartbeat_timeout_s
        link = self.link(peer_id)
        ours = self._snapshot()
        brief = ours.seen is not None and self._acked.get(peer_id) == ours.seen
        have = self._seen(peer_id)
        reply = await link.exchange(self._encode(ours, brief=brief, have=have), timeout)
        if brief and reply.have != ours.seen:  # it lost ours (restarted): the whole, now
            reply = await link.exchange(self._encode(ours, brief=False, have=have), timeout)
        self._acked[peer_id] = reply.have
        return reply.state

    async def _pushes(self) -> None:
        while True:
            await self._push.wait()
            self._push.clear()
            current = self._snapshot().seen
            stale = [
                p.view.peer_id
                for p in self.routable()
                if current is None or self._acked.get(p.view.peer_id) != current
            ]
            await asyncio.gather(*(self._beat(peer_id) for peer_id in stale))
            await asyncio.sleep(self._settings.push_min_interval_s)

    async def leave(self) -> None:
        """Start no more exchanges, let those in flight end (within the heartbeat
        timeout), then say goodbye: nothing we send can arrive after it."""
        self._leaving = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.heartbeat_timeout_s):
                await self._quiet.wait()
        await self.say_goodbye()

    async def say_goodbye(self) -> None:
        """Tell every live peer we are leaving, within GOODBYE_TIMEOUT_S."""
        alive = [p.view.peer_id for p in self.routable()]
        await asyncio.gather(
            *(self.link(p).goodbye(self.self_id, GOODBYE_TIMEOUT_S) for p in alive),
            return_exceptions=True,
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self._links.values()), *self._closing)
