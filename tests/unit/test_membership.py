"""`Membership`: the peer table's state machine, driven along explicit timelines.

Every test passes `now` by hand: nothing sleeps and no clock is read.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shoal.mesh.membership import (
    SOURCES,
    Event,
    Health,
    Membership,
    PeerState,
    PeerView,
    Source,
    Timing,
    health_of,
)

A = "http://10.0.0.2:11450"
B = "http://10.0.0.3:11450"


def view(m: Membership, peer_id: str) -> PeerView:
    v = m.view(peer_id)
    assert v is not None
    return v


def alive(m: Membership, peer_id: str, now: float, source: str = "mdns") -> Membership:
    """Sight `peer_id` and answer its first heartbeat, all at `now`."""
    m.sighted(peer_id, A, now, source)
    assert m.due(now) == [peer_id]
    assert m.heartbeat_succeeded(peer_id, now) == [Event("joined", peer_id)]
    return m


def probe(m: Membership, peer_id: str, now: float, *, ok: bool) -> list[Event]:
    """What the driver does: take the due peer, heartbeat it, report the result."""
    assert peer_id in m.due(now)
    if ok:
        return m.heartbeat_succeeded(peer_id, now)
    return m.heartbeat_failed(peer_id, now)


# -- joining ------------------------------------------------------------------------------


def test_a_sighted_peer_is_due_at_once_and_joins_on_its_first_answer() -> None:
    m = Membership("me")
    assert m.sighted("a", A, 10.0, "mdns") == []
    v = view(m, "a")
    assert (v.state, v.health, v.next_due, v.first_seen) == (
        PeerState.JOINING,
        Health.DEGRADED,
        10.0,
        10.0,
    )
    assert m.routable() == []
    assert m.due(10.0) == ["a"]

    assert m.heartbeat_succeeded("a", 10.2) == [Event("joined", "a")]
    v = view(m, "a")
    assert (v.state, v.health, v.last_seen, v.alive_since) == (
        PeerState.ALIVE,
        Health.HEALTHY,
        10.2,
        10.2,
    )
    assert v.interval_s == 5.0
    assert v.next_due == pytest.approx(14.7)  # 5 s, less the lead (a tenth): see below
    assert m.routable() == ["a"]
    assert m.heartbeat_succeeded("a", 15.2) == []  # already alive: no event


def test_a_node_ignores_itself_among_its_peers() -> None:
    m = Membership("me")
    assert m.sighted("me", A, 0.0, "static") == []
    assert m.view("me") is None
    assert m.views() == []
    assert m.next_due() is None


def test_a_joining_peer_that_never_answers_is_removed_silently() -> None:
    m = Membership("me")
    m.sighted("a", A, 0.0, "static")
    assert probe(m, "a", 0.0, ok=False) == []
    assert view(m, "a").next_due == 5.0  # no fast retry for a peer never heard from
    assert probe(m, "a", 5.0, ok=False) == []
    assert probe(m, "a", 10.0, ok=False) == []  # it never joined, so it cannot leave
    v = view(m, "a")
    assert (v.state, v.health, v.misses) == (PeerState.REMOVED, Health.UNREACHABLE, 3)
    assert v.next_due == 12.0  # static: rejoin probes start
    assert m.goodbye("a", 13.0) == []


def test_only_operator_given_addresses_are_reprobed_after_removal() -> None:
    m = Membership("me")
    for peer_id, source in [("a", "peer"), ("b", "scan"), ("c", "static"), ("d", "join")]:
        alive(m, peer_id, 0.0, source=source)
        m.goodbye(peer_id, 1.0)
    assert [v.next_due for v in m.views()] == [None, None, 3.0, 3.0]
    assert view(m, "a").sources == frozenset({"peer"})


# -- adaptive interval --------------------------------------------------------------------


def test_interval_grows_5_15_30_with_uninterrupted_uptime_and_resets_on_a_miss() -> None:
    m = alive(Membership("me", Timing(lead_fraction=0.0)), "a", 0.0)  # the lead: see below
    gaps: dict[float, float] = {}
    now = 0.0
    while now < 700.0:
        due_at = view(m, "a").next_due
        assert due_at is not None
        gaps[now] = due_at - now
        now = due_at
        assert probe(m, "a", now, ok=True) == []
    assert {gap for t, gap in gaps.items() if t < 60.0} == {5.0}
    assert {gap for t, gap in gaps.items() if 60.0 <= t < 600.0} == {15.0}
    assert {gap for t, gap in gaps.items() if t >= 600.0} == {30.0}
    assert 60.0 in gaps and 600.0 in gaps  # the switches land exactly on the thresholds

    assert probe(m, "a", now + 30.0, ok=False) == [Event("suspect", "a")]
    assert m.interval("a", now + 30.0) == 5.0
    assert probe(m, "a", now + 31.0, ok=True) == [Event("recovered", "a")]
    v = view(m, "a")
    assert (v.interval_s, v.alive_since, v.next_due) == (5.0, now + 31.0, now + 36.0)


def test_interval_thresholds() -> None:
    m = alive(Membership("me"), "a", 100.0)
    assert m.interval("a", 159.9) == 5.0
    assert m.interval("a", 160.0) == 15.0
    assert m.interval("a", 699.9) == 15.0
    assert m.interval("a", 700.0) == 30.0
    m.sighted("b", B, 0.0, "mdns")
    assert m.interval("b", 1000.0) == 5.0  # not alive: new
    with pytest.raises(KeyError):
        m.interval("nobody", 0.0)


def test_timing_is_taken_from_the_caller() -> None:
    timing = Timing(
        new_interval_s=1.0, established_after_s=3.0, established_interval_s=2.0, lead_fraction=0
    )
    m = alive(Membership("me", timing), "a", 0.0)
    assert view(m, "a").next_due == 1.0
    assert m.interval("a", 3.0) == 2.0


@pytest.mark.parametrize(
    "bad",
    [
        {"new_interval_s": 0.0},
        {"misses_to_remove": 0},
        {"established_after_s": 700.0},
        {"rejoin_max_s": 1.0},
        {"lead_fraction": 1.0},
    ],
)
def test_nonsense_timing_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"need|must"):
        Timing(**bad)


# -- one heartbeat per pair ---------------------------------------------------------------


def test_a_peers_beat_counts_as_ours_and_puts_ours_a_whole_interval_away() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert view(m, "a").next_due == 4.5  # ours was answered: we lead, a tenth early
    assert m.heard_from("a", 3.0) == []
    assert (view(m, "a").next_due, view(m, "a").last_seen) == (8.0, 3.0)  # a whole interval
    assert m.heard_from("nobody", 3.0) == []


def test_a_peers_beat_recovers_a_suspect_peer_and_leaves_a_probe_in_flight_claimed() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert probe(m, "a", 4.5, ok=False) == [Event("suspect", "a")]
    assert m.due(5.5) == ["a"]  # the fast retry, in flight
    assert m.heard_from("a", 5.6) == [Event("recovered", "a")]
    assert m.due(100.0) == []  # still claimed: never doubled
    assert m.heartbeat_succeeded("a", 5.7) == []  # its result still counts
    assert view(m, "a").next_due == pytest.approx(5.7 + 4.5)


def test_a_removed_peer_comes_back_by_a_sighting_not_by_its_beat_alone() -> None:
    m = alive(Membership("me"), "a", 0.0)
    m.goodbye("a", 1.0)
    assert m.heard_from("a", 5.0) == []
    assert view(m, "a").state is PeerState.REMOVED
    m.sighted("a", A, 5.0, "peer")  # what the driver does first
    assert m.heard_from("a", 5.0) == [Event("joined", "a")]


def test_two_nodes_settle_on_one_exchange_per_interval_and_each_hears_within_one() -> None:
    """Two nodes' tables driven together, both starting a beat at the same moment: after
    the first interval only one of them beats, once per 4.5 s; neither ever goes more
    than an interval without hearing from the other."""
    a, b = Membership("a"), Membership("b")
    a.sighted("b", B, 0.0, "mdns")
    b.sighted("a", A, 0.0, "mdns")
    exchanges: list[tuple[float, str]] = []
    heard = {"a": 0.0, "b": 0.0}
    now = 0.0
    while now < 120.0:
        for me, other, table, remote in (("a", "b", a, b), ("b", "a", b, a)):
            if other in table.due(now):
                exchanges.append((now, me))
                remote.heard_from(me, now + 0.001)  # it receives ours, then answers
                table.heartbeat_succeeded(other, now + 0.002)
                interval = 5.0 if now < 60.0 else 15.0  # established after a minute
                assert now + 0.001 - heard[other] <= interval + 1e-9
                assert now + 0.002 - heard[me] <= interval + 1e-9
                heard[other], heard[me] = now + 0.001, now + 0.002
        due = [d for d in (a.next_due(), b.next_due()) if d is not None]
        now = min(due)
    late = [t for t, _ in exchanges if t > 10.0]
    assert len({who for t, who in exchanges if t > 10.0}) == 1  # one leads
    gaps = {round(later - earlier, 1) for earlier, later in itertools.pairwise(late)}
    assert gaps <= {4.5, 13.5}  # 5 s (then 15 s, after a minute), less the lead


# -- suspect and removed ------------------------------------------------------------------


def test_a_missed_heartbeat_makes_a_peer_suspect_and_an_answer_recovers_it() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert probe(m, "a", 5.0, ok=False) == [Event("suspect", "a")]
    v = view(m, "a")
    assert (v.state, v.health, v.misses, v.alive_since) == (
        PeerState.SUSPECT,
        Health.DEGRADED,
        1,
        None,
    )
    assert v.next_due == 6.0  # suspect_retry_s: confirm or clear fast
    assert m.routable() == []
    assert probe(m, "a", 6.0, ok=True) == [Event("recovered", "a")]
    v = view(m, "a")
    assert (v.state, v.misses, v.last_seen) == (PeerState.ALIVE, 0, 6.0)
    assert m.routable() == ["a"]


def test_three_consecutive_misses_one_retry_apart_remove_a_peer() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert probe(m, "a", 5.0, ok=False) == [Event("suspect", "a")]
    assert view(m, "a").next_due == 6.0
    assert probe(m, "a", 6.0, ok=False) == []
    assert view(m, "a").next_due == 7.0
    assert probe(m, "a", 7.0, ok=False) == [Event("removed", "a")]
    v = view(m, "a")
    assert (v.state, v.health, v.misses, v.next_due) == (
        PeerState.REMOVED,
        Health.UNREACHABLE,
        3,
        9.0,  # rejoin probes start: a partition heals without a new mDNS announcement
    )
    assert m.routable() == []


def test_a_discovered_peer_removed_by_misses_is_reprobed_for_hours_then_waits() -> None:
    timing = Timing()
    m = alive(Membership("me", timing), "a", 0.0, source="mdns")
    for now in (5.0, 6.0, 7.0):
        probe(m, "a", now, ok=False)
    removed_at = 7.0
    now, probes = removed_at, 0
    while (due_at := view(m, "a").next_due) is not None:
        now = due_at
        probe(m, "a", now, ok=False)
        probes += 1
    # The last probe was scheduled within the horizon, at most one backoff before its end.
    horizon = removed_at + timing.rejoin_for_s
    assert horizon - timing.rejoin_max_s <= now <= horizon + timing.rejoin_max_s
    assert probes <= timing.rejoin_for_s / timing.rejoin_max_s + 6
    assert view(m, "a").state is PeerState.REMOVED
    # Seen again: probed at once, and back.
    m.sighted("a", A, now + 100.0, "mdns")
    assert probe(m, "a", now + 100.0, ok=True) == [Event("joined", "a")]


def test_an_introduced_peer_that_never_answered_is_not_reprobed() -> None:
    # The introductions' own bounded backoff decides whether it is tried again.
    m = Membership("me")
    m.sighted("a", A, 0.0, "introduced")
    for now in (0.0, 5.0, 10.0):
        probe(m, "a", now, ok=False)
    v = view(m, "a")
    assert (v.state, v.next_due) == (PeerState.REMOVED, None)
    # Introduced again later: tried at once, and it joins.
    m.sighted("a", A, 60.0, "introduced")
    assert probe(m, "a", 60.0, ok=True) == [Event("joined", "a")]


def test_an_introduced_peer_that_was_alive_is_reprobed_like_a_discovered_one() -> None:
    m = alive(Membership("me"), "a", 0.0, source="introduced")
    for now in (5.0, 6.0, 7.0):
        probe(m, "a", now, ok=False)
    assert view(m, "a").next_due == 9.0  # a partition: rejoin probes, as for mDNS or scan


def test_a_healed_partition_rejoins_on_the_next_probe() -> None:
    m = alive(Membership("me"), "a", 0.0, source="scan")
    for now in (5.0, 6.0, 7.0):
        probe(m, "a", now, ok=False)
    assert view(m, "a").next_due == 9.0
    assert probe(m, "a", 9.0, ok=False) == []
    assert view(m, "a").next_due == 13.0
    assert probe(m, "a", 13.0, ok=True) == [Event("joined", "a")]


def test_misses_must_be_consecutive() -> None:
    m = alive(Membership("me"), "a", 0.0)
    probe(m, "a", 5.0, ok=False)
    probe(m, "a", 6.0, ok=False)
    assert probe(m, "a", 7.0, ok=True) == [Event("recovered", "a")]
    assert probe(m, "a", 12.0, ok=False) == [Event("suspect", "a")]
    assert probe(m, "a", 13.0, ok=False) == []
    assert view(m, "a").state is PeerState.SUSPECT


def test_a_failed_request_makes_a_peer_suspect_at_once_and_due_now() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert m.request_failed("a", 2.0) == [Event("suspect", "a")]
    v = view(m, "a")
    assert (v.state, v.misses, v.next_due) == (PeerState.SUSPECT, 1, 2.0)
    assert m.next_due() == 2.0
    assert m.routable() == []
    # Requests failing together are one observation: no second miss, no second event.
    assert m.request_failed("a", 2.1) == []
    assert view(m, "a").misses == 1
    # Two more missed heartbeats make three.
    assert probe(m, "a", 2.1, ok=False) == []
    assert probe(m, "a", 3.1, ok=False) == [Event("removed", "a")]


def test_a_sighting_cuts_a_suspect_peers_wait_short() -> None:
    m = alive(Membership("me"), "a", 0.0)
    probe(m, "a", 5.0, ok=False)
    assert view(m, "a").next_due == 6.0
    m.sighted("a", A, 5.5, "mdns")
    assert view(m, "a").next_due == 5.5
    m.sighted("a", A, 5.7, "mdns")  # never pushed later
    assert view(m, "a").next_due == 5.5


# -- goodbye and rejoin -------------------------------------------------------------------


def test_goodbye_removes_a_peer_at_once_and_keeps_it_in_the_table() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert m.goodbye("a", 3.0) == [Event("left", "a")]
    v = view(m, "a")
    assert (v.state, v.health, v.next_due) == (PeerState.REMOVED, Health.UNREACHABLE, None)
    assert m.routable() == []
    assert m.goodbye("a", 3.5) == []
    assert m.heartbeat_failed("a", 4.0) == []
    assert m.request_failed("a", 4.0) == []
    assert m.due(100.0) == []


def test_a_withdrawn_advert_removes_nothing_but_makes_the_peer_due_at_once() -> None:
    # An mDNS goodbye is unauthenticated: a stranger can forge one for any node.
    m = alive(Membership("me"), "a", 0.0)
    assert view(m, "a").next_due == 4.5
    assert m.withdrawn("a", 1.0) == []
    assert view(m, "a").state is PeerState.ALIVE and m.routable() == ["a"]
    assert m.due(1.0) == ["a"]
    assert m.heartbeat_succeeded("a", 1.0) == []  # forged: the peer answers, nothing lost
    assert view(m, "a").state is PeerState.ALIVE
    # A real departure without its own goodbye: the check fails, and the misses remove it.
    m.withdrawn("a", 2.0)
    assert probe(m, "a", 2.0, ok=False) == [Event("suspect", "a")]
    assert m.withdrawn("a", 2.1) == [] and m.due(2.1) == ["a"]  # checked again now
    assert m.withdrawn("a", 2.2) == [] and m.due(2.2) == []  # not twice while in flight
    assert m.withdrawn("nobody", 2.2) == []


def test_a_push_sent_before_a_goodbye_is_not_taken_after_it() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert m.accepts_snapshot("a", 4.0)
    assert m.goodbye("a", 5.0) == [Event("left", "a")]
    assert not m.accepts_snapshot("a", 5.1)  # a push that crossed the goodbye
    assert not m.accepts_snapshot("a", 6.9)
    assert m.accepts_snapshot("a", 7.0)  # Timing.left_quiet_s later: a new life
    assert m.accepts_snapshot("stranger", 5.1)
    # Removed by misses, not by its goodbye: its pushes count at once.
    m = alive(Membership("me"), "b", 0.0)
    for t in (5.0, 6.0, 7.0):
        probe(m, "b", t, ok=False)
    assert view(m, "b").state is PeerState.REMOVED and m.accepts_snapshot("b", 7.1)


def test_a_heartbeat_sent_before_a_goodbye_cannot_bring_the_peer_back() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert m.due(5.0) == ["a"]  # heartbeat in flight...
    assert m.goodbye("a", 5.1) == [Event("left", "a")]
    assert m.heartbeat_succeeded("a", 5.2) == []  # ...answered by a node shutting down
    assert view(m, "a").state is PeerState.REMOVED


def test_a_removed_static_peer_is_reprobed_with_capped_backoff_and_rejoins() -> None:
    m = alive(Membership("me"), "a", 0.0, source="static")
    assert m.goodbye("a", 10.0) == [Event("left", "a")]
    gaps = []
    now = 10.0
    for _ in range(8):
        due_at = view(m, "a").next_due
        assert due_at is not None
        gaps.append(due_at - now)
        now = due_at
        assert m.due(now - 0.01) == []
        assert probe(m, "a", now, ok=False) == []
        assert view(m, "a").state is PeerState.REMOVED
    assert gaps == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]

    now += 60.0
    assert probe(m, "a", now, ok=True) == [Event("joined", "a")]
    v = view(m, "a")
    assert (v.state, v.misses, v.interval_s, v.alive_since) == (PeerState.ALIVE, 0, 5.0, now)
    # The backoff starts over for the next absence.
    m.goodbye("a", now + 1.0)
    assert view(m, "a").next_due == now + 3.0


def test_a_peer_added_by_join_is_reprobed_too() -> None:
    m = alive(Membership("me"), "a", 0.0, source="join")
    probe(m, "a", 5.0, ok=False)
    probe(m, "a", 6.0, ok=False)
    assert probe(m, "a", 7.0, ok=False) == [Event("removed", "a")]
    assert view(m, "a").next_due == 9.0


def test_a_removed_mdns_peer_waits_to_be_sighted_again_then_rejoins() -> None:
    m = alive(Membership("me"), "a", 0.0, source="mdns")
    m.sighted("a", A, 1.0, "scan")
    m.goodbye("a", 2.0)
    assert m.next_due() is None
    assert m.due(10_000.0) == []

    assert m.sighted("a", A, 10_000.0, "mdns") == []
    v = view(m, "a")
    assert (v.state, v.misses, v.next_due) == (PeerState.JOINING, 0, 10_000.0)
    assert probe(m, "a", 10_000.0, ok=True) == [Event("joined", "a")]
    assert m.routable() == ["a"]


# -- discovery bookkeeping ----------------------------------------------------------------


def test_sources_accumulate_and_an_address_change_is_reported_and_checked_at_once() -> None:
    m = alive(Membership("me"), "a", 0.0, source="mdns")
    assert m.sighted("a", A, 1.0, "static") == []
    assert view(m, "a").sources == frozenset({"mdns", "static"})
    assert view(m, "a").next_due == 4.5  # same address, alive: nothing to hurry

    assert m.sighted("a", B, 2.0, "static") == [Event("address_changed", "a")]
    v = view(m, "a")
    assert (v.address, v.next_due, v.state) == (B, 2.0, PeerState.ALIVE)
    assert m.sighted("a", B, 2.5, "mdns") == []


@pytest.mark.parametrize("source", ["mdns", "scan", "introduced"])
def test_a_hint_cannot_move_a_live_peer(source: Source) -> None:
    m = alive(Membership("me"), "a", 0.0, source="static")
    assert m.sighted("a", B, 1.0, source) == []
    v = view(m, "a")
    assert (v.address, v.state, v.sources) == (A, PeerState.ALIVE, frozenset({"static"}))


@pytest.mark.parametrize("source", ["static", "join", "peer"])
def test_an_address_the_operator_gave_or_the_peer_used_moves_a_live_peer(
    source: Source,
) -> None:
    m = alive(Membership("me"), "a", 0.0, source="mdns")
    assert m.sighted("a", B, 1.0, source) == [Event("address_changed", "a")]
    assert view(m, "a").address == B


def test_a_hint_moves_a_peer_that_is_not_alive() -> None:
    m = alive(Membership("me"), "a", 0.0, source="mdns")
    m.heartbeat_failed("a", 5.0)  # suspect now
    assert m.sighted("a", B, 6.0, "mdns") == [Event("address_changed", "a")]


def test_an_address_change_releases_a_probe_in_flight_to_the_old_address() -> None:
    m = alive(Membership("me"), "a", 0.0)
    assert m.due(5.0) == ["a"]
    assert m.due(5.0) == []
    m.sighted("a", B, 5.1, "static")
    assert m.due(5.1) == ["a"]


def test_unknown_peers_are_ignored() -> None:
    m = Membership("me")
    assert m.heartbeat_succeeded("x", 0.0) == []
    assert m.heartbeat_failed("x", 0.0) == []
    assert m.request_failed("x", 0.0) == []
    assert m.goodbye("x", 0.0) == []
    m.forget("x")
    assert m.views() == []


def test_forget_drops_a_peer_entirely() -> None:
    m = alive(Membership("me"), "a", 0.0, source="static")
    m.forget("a")
    assert m.view("a") is None
    assert m.heartbeat_succeeded("a", 1.0) == []
    assert m.next_due() is None


def test_health_is_what_users_see() -> None:
    assert [health_of(s) for s in PeerState] == [
        Health.DEGRADED,
        Health.HEALTHY,
        Health.DEGRADED,
        Health.UNREACHABLE,
    ]


# -- timers -------------------------------------------------------------------------------


def test_due_lists_peers_soonest_first_and_hands_each_out_once() -> None:
    m = Membership("me")
    m.sighted("c", A, 3.0, "mdns")
    m.sighted("b", A, 1.0, "mdns")
    m.sighted("a", A, 2.0, "mdns")
    m.sighted("d", A, 2.0, "mdns")
    assert m.due(0.5) == []
    assert m.due(2.0) == ["b", "a", "d"]  # ties by id
    assert m.due(2.0) == []  # in flight until reported
    assert m.due(10.0) == ["c"]
    m.heartbeat_failed("b", 10.0)
    assert m.due(15.0) == ["b"]


def test_next_due_is_the_earliest_time_not_counting_probes_in_flight() -> None:
    m = Membership("me")
    assert m.next_due() is None
    m.sighted("a", A, 4.0, "mdns")
    m.sighted("b", A, 7.0, "mdns")
    assert m.next_due() == 4.0
    assert m.due(4.0) == ["a"]
    assert m.next_due() == 7.0
    m.heartbeat_succeeded("a", 4.5)
    assert m.next_due() == 7.0
    assert m.due(7.0) == ["b"]
    assert m.next_due() == 9.0  # 4.5 + 5 s, less the lead
    assert [v.peer_id for v in m.views()] == ["a", "b"]


# -- properties ---------------------------------------------------------------------------

PEER_IDS = st.sampled_from(["a", "b", "c", "me"])


class MembershipMachine(RuleBasedStateMachine):
    """Random facts in random order, time only moving forward."""

    def __init__(self) -> None:
        super().__init__()
        self.m = Membership("me")
        self.now = 0.0
        self.last_event: dict[str, Event] = {}

    def apply(self, peer_id: str, events: list[Event], before: PeerView | None) -> None:
        after = self.m.view(peer_id)
        for event in events:
            assert event.peer_id == peer_id
            if event.kind == "address_changed":
                assert before is not None and after is not None
                assert before.address != after.address
                continue
            assert self.last_event.get(peer_id) != event, f"repeated {event}"
            self.last_event[peer_id] = event
        moved = before is None or after is None or before.next_due != after.next_due
        if after is not None and after.next_due is not None and moved:
            assert after.next_due >= self.now, "scheduled in the past"

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 30.0, 61.0, 700.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(
        peer_id=PEER_IDS,
        address=st.sampled_from([A, B]),
        source=st.sampled_from(sorted(SOURCES)),
    )
    def sighted(self, peer_id: str, address: str, source: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.sighted(peer_id, address, self.now, source), before)

    @rule(peer_id=PEER_IDS)
    def heartbeat_succeeded(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.heartbeat_succeeded(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def heard_from(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.heard_from(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def heartbeat_failed(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.heartbeat_failed(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def request_failed(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.request_failed(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def goodbye(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.goodbye(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def withdrawn(self, peer_id: str) -> None:
        before = self.m.view(peer_id)
        self.apply(peer_id, self.m.withdrawn(peer_id, self.now), before)

    @rule(peer_id=PEER_IDS)
    def forget(self, peer_id: str) -> None:
        self.m.forget(peer_id)
        self.last_event.pop(peer_id, None)  # a forgotten peer's story is over

    @rule()
    def due(self) -> None:
        taken = self.m.due(self.now)
        due_times = [view(self.m, peer_id).next_due or 0.0 for peer_id in taken]
        assert all(view(self.m, peer_id).next_due is not None for peer_id in taken)
        assert all(t <= self.now for t in due_times)
        assert due_times == sorted(due_times)
        assert self.m.due(self.now) == []  # handed out once

    @invariant()
    def table_is_consistent(self) -> None:
        assert self.m.view("me") is None
        for v in self.m.views():
            assert v.health is health_of(v.state)
            if v.state is PeerState.ALIVE:
                assert v.misses == 0, "alive with misses"
                assert v.alive_since is not None
            else:
                assert v.alive_since is None
            if v.state is not PeerState.REMOVED:
                assert v.next_due is not None
        assert self.m.routable() == [
            v.peer_id for v in self.m.views() if v.state is PeerState.ALIVE
        ]


TestMembershipMachine = MembershipMachine.TestCase
TestMembershipMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
