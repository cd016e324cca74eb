"""`Peers` with a fake link: the table's inputs, what it publishes, and forgetting.

The exchange is replaced by a function the test controls; no socket is opened. The
in-process cluster (tests/inprocess) runs the same class over real mutual TLS.
"""

from __future__ import annotations

import ssl

import pytest

from shoal.events import Event, EventBus, PeerJoined, PeerRemoved, PeerStateChanged, PeerSuspect
from shoal.mesh.membership import PeerState
from shoal.mesh.peers import Peers
from shoal.mesh.state import NodeState
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


async def test_a_peer_joining_pushes_our_state_so_the_others_hear_of_it(
    recorded: tuple[EventBus, list[Event]],
) -> None:
    bus, _ = recorded
    peers = make(bus)
    assert not peers._push.is_set()
    peers.received(state(PEER), "http://10.0.0.2:11450")  # joined: introduced to the rest
    assert peers._push.is_set()
    peers._push.clear()
    peers.received(state(PEER, seq=2), "http://10.0.0.2:11450")  # a beat: nothing new
    assert not peers._push.is_set()


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
