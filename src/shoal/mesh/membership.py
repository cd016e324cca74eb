"""The peer table as a state machine: who is in the mesh, how healthy, when to check next.

Theory of operation
-------------------
`Membership` does no I/O and reads no clock. A driver feeds it what happened —
discovery sighted a peer, a heartbeat answered or failed, a request could not connect,
a peer said goodbye — each with `now` (monotonic seconds), and gets back the
`Event`s those facts caused. The driver asks `due(now)` which peers to heartbeat and
sleeps until `next_due()`, like aioquic's `get_timer()`.

             sighted                  answered
    (new) ──────────► JOINING ─────────────────► ALIVE ◄─────┐
                         │ 3 misses        missed │          │ answered
                         ▼                        ▼          │
                      REMOVED ◄─── 3 misses ─── SUSPECT ─────┘
                         │  ◄───── goodbye (its own, over mTLS), from any state
                         ├── sighted again ──────────► JOINING
                         └── rejoin probe answered ──► ALIVE

Heartbeats come every 5 s for a new peer, 15 s once it has been alive a minute without a
miss, 30 s after ten minutes. A heartbeat is an exchange both ways, so one per pair of
peers per interval is enough: a peer's own beat reaching us (`heard_from`) counts as
ours, and puts our next one a whole interval away, while a node whose beat was answered
beats again a little early (`Timing.lead_fraction`). The one that beat last keeps the
lead, the other only answers; neither waits longer than an interval to hear from the
other, as when both beat. A miss makes an alive peer SUSPECT and it is checked
again after one second, so a blip clears fast and a death is confirmed fast. A removed
peer stays in the table and is re-probed with exponential backoff: forever if the
operator gave its address (static config or `shoal join`); for `rejoin_for_s` if it was
removed by missed heartbeats (a pulled cable or a partition: mDNS sends nothing new for
records it still caches, so waiting for a sighting would never heal the mesh). A peer
that said goodbye and was only found by discovery waits to be sighted again: it
announces itself when it starts. A peer known only by introduction that never answered
is not re-probed either: the introductions' own bounded backoff decides whether it is
tried again, so a bad introduction cannot cost six hours of probes.

Discovery is a hint: anyone on the LAN can advertise a live peer's ID at another
address, or withdraw its advert (an mDNS goodbye, unauthenticated like every mDNS
packet). A withdrawal therefore removes nothing: it makes the peer due for a heartbeat
at once (`withdrawn`), which a live peer answers and a gone one fails; only the peer's
own goodbye, over mutual TLS, removes it at once. While a peer answers where it is, an
mDNS or scan sighting elsewhere is ignored (the claimant could not pass the pinned TLS
anyway, but switching would cut us off); an address the operator gave (static, join)
or the peer itself used is followed.

Events report membership as a consumer sees it: `joined` opens a peer's story, and
`removed` or `left` closes it. A peer that never answered cannot leave, so a JOINING
peer that is removed or says goodbye emits nothing.

`due(now)` hands each due peer out once: it is not due again until the driver reports
that heartbeat's result (`heartbeat_succeeded` or `heartbeat_failed`), so a probe in
flight is never doubled and `next_due()` never points at one. The driver must always
report, a timeout being a failure. A heartbeat sent before a goodbye that answers after
it is stale and ignored: only a probe handed out while the peer was removed can bring it
back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal, get_args

from shoal.backoff import Backoff

#: Where sightings come from. mDNS adverts, scan hits and peers contacting us recur on
#: their own; a static peer or a `shoal join` is an address the operator vouched for;
#: "introduced": a paired peer's snapshot said where it reaches the node
#: (`shoal.mesh.introductions`).
Source = Literal["mdns", "static", "scan", "join", "peer", "introduced"]
SOURCES: Final = frozenset(get_args(Source))
#: Sources whose address is worth re-probing after removal: nothing else will bring the
#: peer back (no re-announce), and the operator asked for it.
_REJOIN_PROBED_SOURCES: Final[frozenset[Source]] = frozenset({"static", "join"})
#: Sources that are only hints: they cannot move a live peer to another address.
_HINT_SOURCES: Final[frozenset[Source]] = frozenset({"mdns", "scan", "introduced"})


class PeerState(StrEnum):
    JOINING = "joining"  # sighted, not yet answered a heartbeat
    ALIVE = "alive"
    SUSPECT = "suspect"  # missed a heartbeat or a request could not connect
    REMOVED = "removed"  # gone (misses or goodbye); kept so it can come back


class Health(StrEnum):
    """What a user sees of a peer's state."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNREACHABLE = "unreachable"


_HEALTH: Final = {
    PeerState.JOINING: Health.DEGRADED,
    PeerState.ALIVE: Health.HEALTHY,
    PeerState.SUSPECT: Health.DEGRADED,
    PeerState.REMOVED: Health.UNREACHABLE,
}


def health_of(state: PeerState) -> Health:
    return _HEALTH[state]


@dataclass(frozen=True)
class Timing:
    """Liveness timers (DESIGN.md §3), in seconds."""

    # New or unstable peers: a fresh peer's first minute is when it is most likely to
    # drop (still starting, wrong address), so look often.
    new_interval_s: float = 5.0
    established_interval_s: float = 15.0
    # Long-stable clusters: a 30 s heartbeat keeps a 10-node mesh's chatter negligible.
    stable_interval_s: float = 30.0
    established_after_s: float = 60.0  # alive this long without a miss -> 15 s
    stable_after_s: float = 600.0  # alive this long without a miss -> 30 s
    misses_to_remove: int = 3  # consecutive: one lost packet is not a dead node
    # After a miss, check again this soon: confirms a death (3 misses ≈ 2 s after the
    # first) or clears a blip before routing notices.
    suspect_retry_s: float = 1.0
    # A removed peer whose address the operator gave is re-probed at 2, 4, 8 … s, capped
    # so a machine switched back on rejoins within a minute.
    rejoin_first_s: float = 2.0
    rejoin_max_s: float = 60.0
    # A peer removed by missed heartbeats, found by discovery, is re-probed this long (a
    # partition can last a while; after six hours it is more likely gone for good, and a
    # sighting brings it back anyway): at most ~360 probes.
    rejoin_for_s: float = 6 * 3600.0
    # After a peer's goodbye, snapshots it pushed before leaving may still arrive (another
    # connection): for this long they are stale and ignored. A restarted node comes back
    # by its announcement (a sighting) and our probe, never by a push alone this early.
    left_quiet_s: float = 2.0
    # A node whose beat was answered beats again this fraction of an interval early, so
    # its beat reaches the peer before the peer's own falls due (a whole interval after
    # the beat it answered): one exchange per pair per interval, not two. A tenth is
    # far more than a LAN round trip, even on a loaded machine (0.5 s of 5 s).
    lead_fraction: float = 0.1

    def __post_init__(self) -> None:
        positive = (
            self.new_interval_s,
            self.established_interval_s,
            self.stable_interval_s,
            self.suspect_retry_s,
            self.rejoin_first_s,
        )
        if min(positive) <= 0 or self.misses_to_remove < 1:
            raise ValueError("liveness intervals must be > 0 and misses_to_remove >= 1")
        if not 0 <= self.established_after_s <= self.stable_after_s:
            raise ValueError("need 0 <= established_after_s <= stable_after_s")
        if self.rejoin_max_s < self.rejoin_first_s:
            raise ValueError("need rejoin_first_s <= rejoin_max_s")
        if not 0 <= self.lead_fraction < 1:
            raise ValueError("need 0 <= lead_fraction < 1")

    @property
    def rejoin(self) -> Backoff:
        return Backoff(self.rejoin_first_s, self.rejoin_max_s)


EventKind = Literal["joined", "recovered", "suspect", "removed", "left", "address_changed"]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    peer_id: str


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    address: str  # e.g. "http://10.0.0.2:11450"
    state: PeerState
    health: Health
    misses: int  # consecutive failed heartbeats
    first_seen: float
    last_seen: float | None  # last successful heartbeat
    alive_since: float | None  # None unless ALIVE; reset by every miss
    sources: frozenset[Source]
    interval_s: float  # the heartbeat interval as of its last answer (5 s unless ALIVE)
    next_due: float | None  # None: not probed until sighted again


@dataclass(slots=True)
class _Peer:
    peer_id: str
    address: str
    first_seen: float
    interval_s: float
    next_due: float | None
    sources: set[Source] = field(default_factory=set)
    rejoin_failures: int = 0  # rejoin probes failed since it was removed
    removed_at: float | None = None
    left: bool = False  # removed by its own goodbye, not by missed heartbeats
    state: PeerState = PeerState.JOINING
    misses: int = 0
    last_seen: float | None = None
    alive_since: float | None = None
    # The state the peer was in when `due()` handed it out; None: no probe in flight.
    claimed_in: PeerState | None = None


_EVENT_ON_ANSWER: Final[dict[PeerState, EventKind]] = {
    PeerState.JOINING: "joined",
    PeerState.SUSPECT: "recovered",
    PeerState.REMOVED: "joined",
}


class Membership:
    def __init__(self, self_id: str, timing: Timing = Timing()) -> None:
        self.self_id = self_id
        self.timing = timing
        self._peers: dict[str, _Peer] = {}

    # -- facts in, events out ----------------------------------------------------------

    def sighted(self, peer_id: str, address: str, now: float, source: Source) -> list[Event]:
        """Discovery saw `peer_id` at `address`. A new or removed peer is due at once."""
        if peer_id == self.self_id:
            return []  # a node finding itself among its static peers
        peer = self._peers.get(peer_id)
        if peer is None:
            self._peers[peer_id] = _Peer(
                peer_id,
                address,
                first_seen=now,
                interval_s=self.timing.new_interval_s,
                next_due=now,
                sources={source},
            )
            return []
        if address != peer.address and peer.state is PeerState.ALIVE and source in _HINT_SOURCES:
            return []  # a hint cannot move a live peer (see the theory of operation)
        peer.sources.add(source)
        events: list[Event] = []
        if address != peer.address:
            peer.address = address
            peer.claimed_in = None  # a probe in flight went to the old address
            peer.next_due = now
            events.append(Event("address_changed", peer_id))
        if peer.state is PeerState.REMOVED:
            self._rejoin(peer, now)
        elif peer.state is not PeerState.ALIVE:
            # Seen announcing itself: cut a joining or suspect peer's wait short.
            peer.next_due = now if peer.next_due is None else min(peer.next_due, now)
        return events

    def heartbeat_succeeded(self, peer_id: str, now: float) -> list[Event]:
        """The peer answered: ALIVE, misses cleared, next beat one interval away (less
        the lead: see the theory of operation)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return []
        claimed_in, peer.claimed_in = peer.claimed_in, None
        if peer.state is PeerState.REMOVED and claimed_in is not PeerState.REMOVED:
            return []  # stale: sent before it left, not a rejoin probe
        return self._answered(peer, now, 1.0 - self.timing.lead_fraction)

    def heard_from(self, peer_id: str, now: float) -> list[Event]:
        """The peer sent us its state (its heartbeat or a push): as good as an answered
        heartbeat, and our next one is a whole interval away. A probe of ours in flight
        stays in flight (its result is still to be reported)."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.state is PeerState.REMOVED:
            return []  # only a sighting or a rejoin probe brings a removed peer back
        return self._answered(peer, now, 1.0)

    def _answered(self, peer: _Peer, now: float, share: float) -> list[Event]:
        previous = peer.state
        peer.misses = 0
        peer.last_seen = now
        if previous is not PeerState.ALIVE:
            peer.state = PeerState.ALIVE
            peer.alive_since = now
            peer.rejoin_failures = 0
        peer.interval_s = self._interval_of(peer, now)
        peer.next_due = now + peer.interval_s * share
        if previous is PeerState.ALIVE:
            return []
        return [Event(_EVENT_ON_ANSWER[previous], peer.peer_id)]

    def heartbeat_failed(self, peer_id: str, now: float) -> list[Event]:
        """No answer (a timeout included): one more miss; enough of them remove it."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return []
        claimed_in, peer.claimed_in = peer.claimed_in, None
        if peer.state is PeerState.REMOVED:
            if claimed_in is PeerState.REMOVED:
                self._rejoin_probe_failed(peer, now)
            return []
        peer.misses += 1
        if peer.misses >= self.timing.misses_to_remove:
            return self._remove(peer, now, "removed")
        if peer.state is PeerState.JOINING:
            # Never yet heard from: nothing to confirm fast, so no quick retry.
            peer.next_due = now + self.timing.new_interval_s
            return []
        peer.next_due = now + self.timing.suspect_retry_s
        return self._make_suspect(peer)

    def request_failed(self, peer_id: str, now: float) -> list[Event]:
        """A request to the peer could not connect: suspect at once, heartbeat it now.

        On an alive peer this is its first miss. On a peer already suspect it adds no
        miss: requests failing together are one observation, and only heartbeats
        confirm a removal.
        """
        peer = self._peers.get(peer_id)
        if peer is None or peer.state is PeerState.REMOVED:
            return []
        peer.next_due = now
        if peer.state is not PeerState.ALIVE:
            return []
        peer.misses = 1
        return self._make_suspect(peer)

    def goodbye(self, peer_id: str, now: float) -> list[Event]:
        """The peer is shutting down cleanly: removed at once, kept in the table."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.state is PeerState.REMOVED:
            return []
        return self._remove(peer, now, "left")

    def accepts_snapshot(self, peer_id: str, now: float) -> bool:
        """Whether a snapshot the peer pushed (not one we asked for) may count now: not in
        the moments after its own goodbye, when it can only be one sent before it."""
        peer = self._peers.get(peer_id)
        if peer is None or not peer.left or peer.removed_at is None:
            return True
        return (
            peer.state is not PeerState.REMOVED or now - peer.removed_at >= self.timing.left_quiet_s
        )

    def withdrawn(self, peer_id: str, now: float) -> list[Event]:
        """Discovery saw the peer's advert withdrawn (anyone can forge that): check it now."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.state not in (PeerState.ALIVE, PeerState.SUSPECT):
            return []
        if peer.claimed_in is None:  # (a heartbeat in flight will tell anyway)
            peer.next_due = now if peer.next_due is None else min(peer.next_due, now)
        return []

    def forget(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    # -- timers ------------------------------------------------------------------------

    def due(self, now: float) -> list[str]:
        """Peers to heartbeat (or rejoin-probe) now, soonest first.

        Each is handed out once: it is not due again until its result is reported.
        """
        ready = sorted(
            (peer.next_due, peer.peer_id)
            for peer in self._peers.values()
            if peer.claimed_in is None and peer.next_due is not None and peer.next_due <= now
        )
        for _, peer_id in ready:
            peer = self._peers[peer_id]
            peer.claimed_in = peer.state
        return [peer_id for _, peer_id in ready]

    def next_due(self) -> float | None:
        """The earliest time a peer falls due (not counting probes in flight)."""
        return min(
            (
                peer.next_due
                for peer in self._peers.values()
                if peer.claimed_in is None and peer.next_due is not None
            ),
            default=None,
        )

    def interval(self, peer_id: str, now: float) -> float:
        """The heartbeat interval for `peer_id` at `now`. KeyError if unknown."""
        return self._interval_of(self._peers[peer_id], now)

    # -- queries -----------------------------------------------------------------------

    def routable(self) -> list[str]:
        """ALIVE peers. SUSPECT ones are the caller's last resort, never routed here."""
        return sorted(p.peer_id for p in self._peers.values() if p.state is PeerState.ALIVE)

    def view(self, peer_id: str) -> PeerView | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else _view_of(peer)

    def liveness(self, peer_id: str) -> PeerState | None:
        """A peer's state, without a view's copy (the request path asks this of every
        peer holding a model)."""
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.state

    def views(self) -> list[PeerView]:
        return [_view_of(self._peers[peer_id]) for peer_id in sorted(self._peers)]

    # -- transitions -------------------------------------------------------------------

    def _interval_of(self, peer: _Peer, now: float) -> float:
        if peer.state is not PeerState.ALIVE or peer.alive_since is None:
            return self.timing.new_interval_s
        steady_for = now - peer.alive_since
        if steady_for >= self.timing.stable_after_s:
            return self.timing.stable_interval_s
        if steady_for >= self.timing.established_after_s:
            return self.timing.established_interval_s
        return self.timing.new_interval_s

    def _make_suspect(self, peer: _Peer) -> list[Event]:
        peer.interval_s = self.timing.new_interval_s
        if peer.state is PeerState.SUSPECT:
            return []
        peer.state = PeerState.SUSPECT
        peer.alive_since = None
        return [Event("suspect", peer.peer_id)]

    def _remove(self, peer: _Peer, now: float, kind: EventKind) -> list[Event]:
        had_joined = peer.state in (PeerState.ALIVE, PeerState.SUSPECT)
        peer.state = PeerState.REMOVED
        peer.alive_since = None
        peer.interval_s = self.timing.new_interval_s
        peer.rejoin_failures = 0
        peer.removed_at, peer.left = now, kind == "left"
        peer.next_due = self._next_rejoin_probe(peer, now)
        return [Event(kind, peer.peer_id)] if had_joined else []

    def _rejoin(self, peer: _Peer, now: float) -> None:
        peer.state = PeerState.JOINING
        peer.misses = 0
        peer.rejoin_failures = 0
        peer.next_due = now

    def _rejoin_probe_failed(self, peer: _Peer, now: float) -> None:
        peer.misses += 1
        peer.rejoin_failures += 1
        peer.next_due = self._next_rejoin_probe(peer, now)

    def _next_rejoin_probe(self, peer: _Peer, now: float) -> float | None:
        if not self._rejoin_probed(peer, now):
            return None
        return now + self.timing.rejoin.delay(peer.rejoin_failures + 1)

    def _rejoin_probed(self, peer: _Peer, now: float) -> bool:
        if not peer.sources.isdisjoint(_REJOIN_PROBED_SOURCES):
            return True
        if peer.last_seen is None and peer.sources == {"introduced"}:
            return False  # see the theory of operation
        removed_for = now - (now if peer.removed_at is None else peer.removed_at)
        return not peer.left and removed_for < self.timing.rejoin_for_s


def _view_of(peer: _Peer) -> PeerView:
    return PeerView(
        peer_id=peer.peer_id,
        address=peer.address,
        state=peer.state,
        health=health_of(peer.state),
        misses=peer.misses,
        first_seen=peer.first_seen,
        last_seen=peer.last_seen,
        alive_since=peer.alive_since,
        sources=frozenset(peer.sources),
        interval_s=peer.interval_s,
        next_due=peer.next_due,
    )
