"""Introductions: which introduced nodes are worth meeting, and how often (issue 9, 14).

`Introductions` is driven along explicit timelines: nothing sleeps, no clock is read.
`Peers.introductions()` is what a snapshot introduces.
"""

from __future__ import annotations

import ssl

import pytest

from shoal.backoff import Backoff
from shoal.events import EventBus, PeerStateChanged
from shoal.mesh.introductions import MAX_ATTEMPTS, Introducer, Introductions, usable
from shoal.mesh.peers import INTRODUCTION_TURN_S, Peers
from shoal.mesh.state import MAX_INTRODUCTIONS, Introduction, NodeState
from shoal.settings import LimitSettings, MeshSettings

ME, A, C = "0" * 64, "a" * 64, "c" * 64
A_AT = "http://10.0.0.2:11450"
C_AT = "http://10.0.0.3:11450"
NOBODY_ALIVE = {"alive": lambda node_id: False}


def book(**kwargs: object) -> Introductions:
    return Introductions(ME, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "introducer", "ok"),
    [
        ("http://10.0.0.3:11450", A_AT, True),
        ("http://[fd00::3]:11450", A_AT, True),
        ("http://192.168.1.9:11450", "http://[fd00::2]:11450", True),
        # Another machine's loopback is not ours; the same machine's is.
        ("http://127.0.0.1:11450", A_AT, False),
        ("http://127.0.0.1:11450", "http://127.0.0.1:11460", True),
        ("http://[::1]:11450", "http://127.0.0.1:11460", True),
        # Link-local: only when the introducer is on the link too.
        ("http://169.254.3.4:11450", A_AT, False),
        ("http://169.254.3.4:11450", "http://169.254.9.9:11450", True),
        ("http://[fe80::3]:11450", A_AT, False),
        # Never.
        ("http://0.0.0.0:11450", A_AT, False),
        ("http://255.255.255.255:11450", A_AT, False),
        ("http://224.0.0.251:11450", A_AT, False),
        ("http://240.0.0.1:11450", A_AT, False),
        ("http://[::]:11450", A_AT, False),
        ("http://studio.local:11450", A_AT, False),
        # An introducer we reach by name cannot vouch for a loopback address.
        ("http://127.0.0.1:11450", "http://studio.local:11450", False),
    ],
)
def test_only_addresses_that_mean_the_same_here_are_usable(
    address: str, introducer: str, ok: bool
) -> None:
    assert usable(address, introducer) is ok


def test_an_introduced_node_is_met_at_once_then_with_backoff_then_left_alone() -> None:
    introductions = book(retry=Backoff(10.0, 40.0), max_attempts=4)
    c = Introduction(C, C_AT)
    met_at = [
        now
        for now in range(0, 400, 5)  # introduced by a heartbeat every 5 s
        if introductions.heard(A, A_AT, [c], float(now), **NOBODY_ALIVE)
    ]
    assert met_at == [0, 10, 30, 70]  # 10, 20, 40 s apart, then never again
    assert introductions.attempts(C) == 4


def test_many_introducers_do_not_multiply_the_attempts() -> None:
    introductions = book()
    c = Introduction(C, C_AT)
    met = [
        introductions.heard(introducer, A_AT, [c], 0.0, **NOBODY_ALIVE)
        for introducer in ("1" * 64, "2" * 64, "3" * 64)
    ]
    assert met == [[c], [], []]


def test_a_node_alive_here_is_not_met_and_its_count_starts_over() -> None:
    introductions = book(max_attempts=MAX_ATTEMPTS)
    c = Introduction(C, C_AT)
    for now in range(0, 10_000, 5):
        introductions.heard(A, A_AT, [c], float(now), **NOBODY_ALIVE)
    assert introductions.attempts(C) == MAX_ATTEMPTS
    assert introductions.heard(A, A_AT, [c], 10_000.0, alive=lambda n: n == C) == []
    assert introductions.attempts(C) == 0
    # Lost again later: introduced, it is met again.
    assert introductions.heard(A, A_AT, [c], 20_000.0, **NOBODY_ALIVE) == [c]


def test_ourselves_the_introducer_and_unusable_addresses_are_skipped() -> None:
    introductions = book()
    heard = [
        Introduction(ME, C_AT),
        Introduction(A, A_AT),
        Introduction(C, "http://127.0.0.1:11450"),  # A is not on our machine
    ]
    assert introductions.heard(A, A_AT, heard, 0.0, **NOBODY_ALIVE) == []
    assert introductions.attempts(C) == 0


def test_the_book_remembers_a_bounded_number_of_nodes() -> None:
    introductions = book(max_tracked=3)
    ids = [f"{i:064x}" for i in range(1, 6)]
    for i, node_id in enumerate(ids):
        introductions.heard(A, A_AT, [Introduction(node_id, C_AT)], float(i), **NOBODY_ALIVE)
    assert [introductions.attempts(n) for n in ids] == [0, 0, 1, 1, 1]


# -- what a snapshot introduces, and the driver ------------------------------------------


class Dialer:
    def peer_url(self, node_id: str, host: str) -> str:
        return f"https://{host}:11451"

    def client_context(self, node_id: str) -> ssl.SSLContext:
        return ssl.create_default_context()


def state(node_id: str, peers: tuple[Introduction, ...] = ()) -> NodeState:
    return NodeState(node_id, "peer", "0", 11450, 1, 1.0, peers=peers)


def make_peers() -> Peers:
    return Peers(ME, lambda: state(ME), Dialer(), EventBus(), MeshSettings(), LimitSettings())


async def test_a_snapshot_introduces_the_alive_peers_at_their_addresses() -> None:
    peers = make_peers()
    peers.received(state(A), A_AT)
    peers.sighted(C, C_AT, "scan")  # not answered yet: not introduced
    peers.sighted("d" * 64, "http://studio.local:11450", "static")
    peers.received(state("d" * 64), "http://studio.local:11450")  # a name: not introduced
    assert peers.introductions() == (Introduction(A, A_AT),)
    await peers.aclose()


async def test_a_large_mesh_is_introduced_in_turns() -> None:
    peers = make_peers()
    ids = [f"{i:064x}" for i in range(1, MAX_INTRODUCTIONS + 11)]
    for i, node_id in enumerate(ids):
        peers.received(state(node_id), f"http://10.0.{i // 200}.{i % 200 + 1}:11450")
    seen: set[str] = set()
    first = peers.introductions(now=0.0)
    assert peers.introductions(now=INTRODUCTION_TURN_S - 1) == first  # one turn: one snapshot
    for turn in (first, peers.introductions(now=INTRODUCTION_TURN_S)):
        assert len(turn) == MAX_INTRODUCTIONS
        seen.update(i.node_id for i in turn)
    assert seen == set(ids)
    await peers.aclose()


async def test_the_introducer_sights_what_the_book_allows() -> None:
    peers = make_peers()
    peers.received(state(A), A_AT)
    sightings: list[tuple[str, str, str]] = []
    introducer = Introducer(peers, lambda *sighting: sightings.append(sighting))
    c = Introduction(C, C_AT)
    introducer.heard(PeerStateChanged(A, "peer", state(A, (c,))))
    introducer.heard(PeerStateChanged(A, "peer", state(A, (c,))))  # within the backoff
    # An introduction from a node no longer in the table is not taken.
    introducer.heard(PeerStateChanged("e" * 64, "gone", state("e" * 64, (c,))))
    assert sightings == [(C, C_AT, "introduced")]
    await peers.aclose()
