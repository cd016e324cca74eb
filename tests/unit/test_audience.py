"""`decide()`: every route of the real route table × every kind of caller × every mode."""

from __future__ import annotations

import itertools

import pytest

from shoal.api.app import ROUTES, Route
from shoal.api.audience import Audience, Caller, Verdict, decide
from shoal.settings import ClusterMode

PEER_ID = "ab" * 32

CALLERS = {
    "operator": Caller(loopback=True, peer_port=False, peer=None),
    "lan client": Caller(loopback=False, peer_port=False, peer=None),
    "paired node": Caller(loopback=False, peer_port=True, peer=PEER_ID),
    "paired node on this machine": Caller(loopback=True, peer_port=True, peer=PEER_ID),
    "unpaired certificate": Caller(loopback=False, peer_port=True, peer=None),
    "unpaired certificate from here": Caller(loopback=True, peer_port=True, peer=None),
}

A, K, N, L, P = (
    Verdict.ALLOW,
    Verdict.NEED_KEY,
    Verdict.NOT_PAIRED,
    Verdict.LOCAL_ONLY,
    Verdict.PEER_ONLY,
)

# What each caller gets, per audience, in a closed cluster (secret or pairing mode).
CLOSED = {
    Audience.PUBLIC: {"operator": A, "lan client": A, "paired node": A,
                      "paired node on this machine": A, "unpaired certificate": N,
                      "unpaired certificate from here": N},
    Audience.CLIENT: {"operator": A, "lan client": K, "paired node": A,
                      "paired node on this machine": A, "unpaired certificate": N,
                      "unpaired certificate from here": N},
    Audience.LOCAL: {"operator": A, "lan client": L, "paired node": L,
                     "paired node on this machine": L, "unpaired certificate": N,
                     "unpaired certificate from here": N},
    Audience.PEER: {"operator": P, "lan client": P, "paired node": A,
                    "paired node on this machine": A, "unpaired certificate": N,
                    "unpaired certificate from here": N},
}  # fmt: skip


def expected(audience: Audience, caller: str, mode: ClusterMode) -> Verdict:
    verdict = CLOSED[audience][caller]
    # An open cluster waives only the client key: never locality, never peer proof.
    return A if mode == "open" and verdict is K else verdict


MODES: tuple[ClusterMode, ...] = ("open", "secret", "pairing")
CASES = [
    pytest.param(route, caller, mode, id=f"{route.method} {route.path} | {caller} | {mode}")
    for route, caller, mode in itertools.product(ROUTES, CALLERS, MODES)
]


@pytest.mark.parametrize(("route", "caller", "mode"), CASES)
def test_decide(route: Route, caller: str, mode: ClusterMode) -> None:
    verdict = decide(route.audience, CALLERS[caller], mode)
    assert verdict is expected(route.audience, caller, mode)


def test_every_audience_is_used_by_some_route() -> None:
    assert {route.audience for route in ROUTES} == set(Audience)
