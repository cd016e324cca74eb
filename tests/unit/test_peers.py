"""`Peers` with a fake link: the table's inputs, what it publishes, and forgetting.

The exchange is replaced by a function the test controls; no socket is opened. The
in-process cluster (tests/inprocess) runs the same class over real mutual TLS.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from shoal.events import Event, EventBus, PeerJoined, PeerRemoved, PeerStateChanged, PeerSuspect
from shoal.mesh.membership import PeerState
from shoal.mesh.peers import Peers
from shoal.mesh.state import Message, NodeState, Seen, Unchanged, decode, decode_message
from shoal.settings import LimitSettings, MeshSettings

ME, PEER, OTHER = "0" * 64, "a" * 64, "b" * 64


class Dialer:
    def peer_url(self, node_id: str, host: str) -> str:
        return f"https://{host}:11451"

    def client_context(self, node_id: str) -> ssl.SSLContext:
        return ssl.create_default_context()


def state(node_id: str, seq: int = 1, name: str = "peer") -> NodeState:
    return NodeState(node_id, name, "0", 11450, seq, 1.0)


@pytest.fixture
def recorded() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(Event, events.append)
    return bus, events


def make(bus: EventBus) -> Peers:
    return Peers(ME, lambda: state(ME), Dialer(), bus, MeshSettings(), LimitSettings())


async def test_a_peer_that_sends_its_state_joins_and_newer_states_are_kept(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    bus, events = recorded
    peers = make(bus)
    peers.received(state(PEER, seq=2), "http://10.0.0.2:11450")
    peers.received(state(PEER, seq=1), "http://10.0.0.2:11450")  # older: dropped
    (peer,) = peers.routable()
    assert (peer.view.state, peer.state) == (PeerState.ALIVE, state(PEER, seq=2))
    kinds = [type(e) for e in events]
    assert kinds == [PeerStateChanged, PeerJoined]


async def test_a_late_older_snapshot_is_no_restart_a_new_boot_is(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    """A heartbeat's answer that arrives after a push carries a lower seq and uptime:
    older, not a restart. A new boot ID is a restart, whatever its seq."""
    bus, _ = recorded
    peers = make(bus)
    newer = NodeState(PEER, "peer", "0", 11450, 9, 30.0, boot="aaaa1111")
    peers.received(newer, "http://10.0.0.2:11450")
    peers.received(NodeState(PEER, "peer", "0", 11450, 8, 29.5, boot="aaaa1111"), "x")
    assert peers.routable()[0].state == newer
    restarted = NodeState(PEER, "peer", "0", 11450, 1, 0.5, boot="bbbb2222")
    peers.received(restarted, "http://10.0.0.2:11450")
    assert peers.routable()[0].state == restarted


async def test_forgetting_a_peer_with_no_link_works_and_says_why(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    """Regression: `forget` raised UnboundLocalError when the peer had no open link."""
    bus, events = recorded
    peers = make(bus)
    peers.received(state(PEER), "http://10.0.0.2:11450")
    peers.forget(PEER)
    assert peers.peers() == []
    assert events[-1] == PeerRemoved(PEER, "peer", "untrusted")
    peers.forget(PEER)  # twice, and never known: nothing more to say
    peers.forget(OTHER)
    assert sum(isinstance(e, PeerRemoved) for e in events) == 1
    await peers.aclose()


async def test_forgetting_closes_the_peers_links(recorded: tuple[EventBus, list[Event]]) -> None:
    bus, _ = recorded
    peers = make(bus)
    peers.received(state(PEER), "http://10.0.0.2:11450")
    link = peers.link(PEER)
    assert peers.link(PEER) is link  # one link per peer and address
    peers.forget(PEER)
    await peers.aclose()
    assert link._transport._session is None or link._transport._session.closed
    with pytest.raises(KeyError):
        peers.link(PEER)


async def test_a_beat_answered_by_another_node_is_a_miss_and_admits_nobody(
    recorded: tuple[EventBus, list[Event]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus, events = recorded
    peers = make(bus)
    peers.received(state(PEER), "http://10.0.0.2:11450")

    async def impostor(peer_id: str) -> NodeState:
        return state(OTHER, name="impostor")

    monkeypatch.setattr(peers, "_exchange", impostor)
    await peers._beat(PEER)
    assert [p.view.peer_id for p in peers.peers()] == [PEER]  # the other is not added
    assert events[-1] == PeerSuspect(PEER, "peer")


async def test_a_failed_beat_for_a_peer_forgotten_meanwhile_is_harmless(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    bus, _ = recorded
    peers = make(bus)
    await peers._beat(PEER)  # not in the table: the link cannot be made (KeyError)
    assert peers.peers() == []


def test_the_liveness_timers_come_from_the_settings() -> None:
    settings = MeshSettings(new_interval_s=1.5, misses_to_remove=5)
    peers = Peers(ME, lambda: state(ME), Dialer(), EventBus(), settings, LimitSettings())
    timing = peers.membership.timing
    assert (timing.new_interval_s, timing.misses_to_remove) == (1.5, 5)
    assert MeshSettings().timing() == type(timing)()  # the defaults are Timing's own


async def test_a_peer_joining_pushes_nothing_its_introduction_rides_the_next_beats(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    """N nodes starting together: a push per join was O(N²) pushes per node."""
    bus, _ = recorded
    peers = make(bus)
    peers.received(state(PEER), "http://10.0.0.2:11450")
    assert not peers._push.is_set()
    assert [i.node_id for i in peers.introductions()] == [PEER]  # in our next snapshot


async def test_peer_links_keep_idle_connections_past_the_longest_heartbeat() -> None:
    # A beat every 30 s (long-stable peers) must reuse the pooled mTLS connection, not
    # pay a TLS handshake each time; and the connection must be dropped before the peer's
    # server-side idle timeout closes it under us.
    from shoal.mesh.link import PeerLink

    limits = LimitSettings()
    link = PeerLink("https://10.0.0.1:11451", limits, ssl.create_default_context())
    try:
        keepalive = link._transport._client().connector._keepalive_timeout  # type: ignore[union-attr]
        assert isinstance(keepalive, float)
        assert MeshSettings().stable_interval_s < keepalive < limits.idle_timeout_s
    finally:
        await link.aclose()


def test_api_addresses_are_normalised_the_same_when_memoized() -> None:
    from shoal.mesh.state import api_address

    for _ in range(2):  # the second call comes from the cache
        assert api_address("http://10.0.0.1:11450/") == "http://10.0.0.1:11450"
        assert api_address("http://[::1]:11450") == "http://[::1]:11450"
        assert api_address("http://host:11450") is None
        assert api_address(["not", "a", "string"]) is None


# -- the exchange: whole snapshots once, `Unchanged` after -----------------------------


class Own:
    """A node's own snapshot, as `OwnState` makes it: a boot ID, `seq` grows on change."""

    def __init__(self, node_id: str, boot: str = "boot0001") -> None:
        self.node_id, self.boot, self.seq, self.uptime = node_id, boot, 1, 0.0

    def snapshot(self) -> NodeState:
        self.uptime += 1.0
        return NodeState(self.node_id, "n", "0", 11450, self.seq, self.uptime, boot=self.boot)


class Wire:
    """A link that hands our message to the other `Peers`' `answer`, and keeps both."""

    def __init__(self, remote: Peers) -> None:
        self.remote = remote
        self.sent: list[Message] = []
        self.answers: list[Message] = []

    async def exchange(self, ours: bytes, timeout_s: float) -> Message:
        self.sent.append(decode_message(ours))
        answer = decode_message(self.remote.answer(self.sent[-1], "10.0.0.9"))
        self.answers.append(answer)
        return answer


def pair(bus: EventBus) -> tuple[Peers, Own, Peers, Own, Wire]:
    """Node ME and node PEER, where ME beats PEER over a `Wire`."""
    me, peer = Own(ME), Own(PEER, "boot0002")
    a = Peers(ME, me.snapshot, Dialer(), bus, MeshSettings(), LimitSettings())
    b = Peers(PEER, peer.snapshot, Dialer(), EventBus(), MeshSettings(), LimitSettings())
    a.sighted(PEER, "http://10.0.0.2:11450", "mdns")
    wire = Wire(b)
    a.link = lambda peer_id: wire  # type: ignore[assignment,method-assign,return-value]
    return a, me, b, peer, wire


async def test_an_idle_pair_exchanges_whole_snapshots_once_then_only_unchanged(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    bus, events = recorded
    a, _, b, _, wire = pair(bus)
    for _ in range(3):
        await a._beat(PEER)
    assert [type(m.state) for m in wire.sent] == [NodeState, Unchanged, Unchanged]
    assert [type(m.state) for m in wire.answers] == [NodeState, Unchanged, Unchanged]
    # Each side learnt the other from the first exchange and says so after it.
    assert wire.sent[0].have is None and wire.sent[1].have == Seen("boot0002", 1)
    assert wire.answers[0].have == Seen("boot0001", 1)
    assert sum(isinstance(e, PeerStateChanged) for e in events) == 1
    # Uptime and clock still arrive with every beat; both see the other alive.
    (seen_by_a,) = a.routable()
    assert seen_by_a.state is not None and seen_by_a.state.uptime_s == 3.0
    assert seen_by_a.clock_offset_s is None  # (this fake sends no clock)
    assert [p.view.peer_id for p in b.routable()] == [ME]
    assert b.membership.view(ME).last_seen is not None  # type: ignore[union-attr]


async def test_a_changed_snapshot_goes_whole_and_only_to_peers_without_it(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    bus, _ = recorded
    a, me, b, peer, wire = pair(bus)
    await a._beat(PEER)
    me.seq, peer.seq = 2, 2
    await a._beat(PEER)
    assert [type(m.state) for m in wire.sent] == [NodeState, NodeState]
    assert [type(m.state) for m in wire.answers] == [NodeState, NodeState]
    assert b.peers()[0].state.seq == 2  # type: ignore[union-attr]
    assert a.peers()[0].state.seq == 2  # type: ignore[union-attr]
    # A push reaches only the peers that do not hold our newest snapshot yet.
    pushes = asyncio.create_task(a._pushes())
    a.changed()
    await asyncio.sleep(0.05)
    assert len(wire.sent) == 2  # PEER holds seq 2 already
    me.seq = 3
    a.changed()
    await asyncio.sleep(0.3)  # past push_min_interval_s
    pushes.cancel()
    assert len(wire.sent) == 3 and wire.sent[-1].state.seq == 3


async def test_a_peer_that_lost_our_snapshot_gets_it_whole_in_the_same_beat(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    """It restarted (a new process holds nothing of ours): our `Unchanged` is answered
    with `have` None, and the whole snapshot follows at once."""
    bus, _ = recorded
    a, _, _, _, wire = pair(bus)
    await a._beat(PEER)
    restarted = Own(PEER, "boot0003")
    wire.remote = Peers(
        PEER, restarted.snapshot, Dialer(), EventBus(), MeshSettings(), LimitSettings()
    )
    await a._beat(PEER)
    assert [type(m.state) for m in wire.sent] == [NodeState, Unchanged, NodeState]
    assert wire.answers[-1].have == Seen("boot0001", 1)
    assert a.peers()[0].state.boot == "boot0003"  # type: ignore[union-attr]
    assert a.routable()[0].view.state is PeerState.ALIVE


async def test_an_unchanged_we_cannot_place_is_a_miss_not_a_state(
    recorded: tuple[EventBus, list[Event]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus, _ = recorded
    peers = make(bus)
    peers.received(NodeState(PEER, "peer", "0", 11450, 1, 1.0, boot="aaaa1111"), "x")

    async def liar(peer_id: str) -> Unchanged:
        return Unchanged(PEER, 7, "bbbb2222", 2.0)

    monkeypatch.setattr(peers, "_exchange", liar)
    await peers._beat(PEER)
    assert peers.peers()[0].view.state is PeerState.SUSPECT


async def test_an_older_node_always_gets_and_gives_whole_snapshots() -> None:
    """A node from before `have`: it answers whole snapshots and never says what it
    holds, so we never send it `Unchanged`; what we send it its decoder reads."""
    peers = Peers(ME, Own(ME).snapshot, Dialer(), EventBus(), MeshSettings(), LimitSettings())
    peers.sighted(PEER, "http://10.0.0.2:11450", "mdns")
    sent: list[bytes] = []

    class OldLink:
        async def exchange(self, ours: bytes, timeout_s: float) -> Message:
            sent.append(ours)
            decode(ours)  # what an older node does with it: no error
            return decode_message(state(PEER).encode())

    peers.link = lambda peer_id: OldLink()  # type: ignore[assignment,method-assign,return-value]
    for _ in range(3):
        await peers._beat(PEER)
    assert all(decode_message(raw).state.__class__ is NodeState for raw in sent)
    # And its requests (no `have`) are answered whole.
    answer = decode_message(peers.answer(decode_message(state(PEER).encode()), "10.0.0.2"))
    assert isinstance(answer.state, NodeState) and answer.have is None


async def test_our_snapshot_is_encoded_once_per_seq(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.mesh import peers as peers_module

    calls: list[int] = []
    real = peers_module.encode_body

    def counted(s: NodeState) -> bytes:
        calls.append(s.seq)
        return real(s)

    monkeypatch.setattr(peers_module, "encode_body", counted)
    peers = Peers(ME, Own(ME).snapshot, Dialer(), EventBus(), MeshSettings(), LimitSettings())
    for peer_id in (PEER, OTHER):
        peers.answer(decode_message(state(peer_id).encode()), "10.0.0.2")
    assert calls == [1]
