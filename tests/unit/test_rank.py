"""`shoal.routing.rank`: candidate order per strategy, alias resolution, and the
routing headers (hop marker, pins, local-only) with the filter they imply."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import cast, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from shoal.routing.rank import (
    HOP_HEADER,
    LOCAL_ONLY_HEADER,
    NODE_HEADER,
    Candidate,
    HopPolicy,
    Strategy,
    allowed,
    hop_policy,
    rank,
    resolve_model,
)

STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
SELF_ID = "5e1f" * 16
SELF_NAME = "desk"
PEER_A = "a0a0a0a0" + "1" * 56
PEER_B = "b0b0b0b0" + "2" * 56
PEER_C = "b0b0b0b0" + "3" * 56  # shares its first 8 characters with PEER_B
NAMES = {PEER_A: "kitchen", PEER_B: "attic", PEER_C: "garage"}


def cand(
    key: str,
    *,
    local: bool = False,
    loaded: bool = True,
    in_flight: int = 0,
    capacity: int = 1,
    hw: float = 0.0,
    healthy: bool = True,
    node: str | None = None,
    queued: int = 0,
    wait_s: float = 0.0,
) -> Candidate:
    return Candidate(
        key=key,
        node_id=node or (SELF_ID if local else key),
        local=local,
        loaded=loaded,
        in_flight=in_flight,
        capacity=capacity,
        hardware_score=hw,
        healthy=healthy,
        queued=queued,
        wait_s=wait_s,
    )


def ranked(
    candidates: list[Candidate],
    strategy: Strategy = "local_spillover",
    *,
    local_in_flight: int = 0,
    limit: int = 4,
    turn: int = 0,
    seed: int = 0,
) -> list[str]:
    order = rank(
        candidates,
        strategy,
        local_in_flight=local_in_flight,
        spillover_max_local_in_flight=limit,
        turn=turn,
        rng=random.Random(seed),
    )
    return [c.key for c in order]


# -- the candidate ----------------------------------------------------------------------


def test_load_is_in_flight_per_capacity() -> None:
    assert cand("x", in_flight=3, capacity=4).load == 0.75
    assert cand("x", in_flight=0, capacity=2).load == 0.0


def test_a_queue_counts_as_load() -> None:
    assert cand("x", in_flight=2, capacity=2, queued=3).load == 2.5


@pytest.mark.parametrize("strategy", ["least_loaded", "local_spillover"])
def test_new_work_goes_where_the_queue_is_shorter(strategy: Strategy) -> None:
    """Two full peers: the one with fewer requests waiting is tried first, whatever
    the tie-break's draw."""
    for seed in range(20):
        peers = [
            cand("long", in_flight=2, capacity=2, queued=5),
            cand("short", in_flight=2, capacity=2, queued=1),
        ]
        assert ranked(peers, strategy, seed=seed) == ["short", "long"]


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -1}, "capacity"),
        ({"in_flight": -1}, "in_flight"),
        ({"queued": -1}, "queued"),
        ({"hw": float("nan")}, "hardware_score"),
    ],
)
def test_impossible_candidates_are_refused(fields: dict[str, int | float], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        cand("x", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_candidates_rank_to_nothing(strategy: Strategy) -> None:
    assert ranked([], strategy) == []


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="fastest"):
        ranked([cand("x")], cast(Strategy, "fastest"))


# -- local_spillover --------------------------------------------------------------------


def test_local_first_while_under_the_threshold() -> None:
    busy_local = cand("local", local=True, in_flight=3, capacity=4)
    idle_peer = cand("peer", in_flight=0, capacity=4)
    assert ranked([idle_peer, busy_local], local_in_flight=3, limit=4) == ["local", "peer"]


def test_under_the_threshold_locals_by_load_then_remotes_by_load() -> None:
    candidates = [
        cand("peer-busy", in_flight=3, capacity=4),
        cand("local-busy", local=True, in_flight=2, capacity=2),
        cand("peer-idle", in_flight=0, capacity=4),
        cand("local-idle", local=True, in_flight=0, capacity=2),
    ]
    assert ranked(candidates, local_in_flight=2, limit=4) == [
        "local-idle",
        "local-busy",
        "peer-idle",
        "peer-busy",
    ]


def test_at_the_threshold_spills_to_a_less_loaded_peer() -> None:
    local = cand("local", local=True, in_flight=4, capacity=4)
    lighter = cand("lighter", in_flight=1, capacity=4)
    assert ranked([local, lighter], local_in_flight=4, limit=4) == ["lighter", "local"]


def test_no_spill_to_a_peer_as_busy_as_this_node() -> None:
    local = cand("local", local=True, in_flight=4, capacity=4)
    as_busy = cand("as-busy", in_flight=8, capacity=8)  # load 1.0, like ours at 4 of 4
    assert ranked([as_busy, local], local_in_flight=4, limit=4) == ["local", "as-busy"]


def test_spill_puts_lighter_peers_first_then_local_then_the_rest() -> None:
    candidates = [
        cand("heavier", in_flight=6, capacity=4),  # 1.5
        cand("equal", in_flight=5, capacity=4),  # 1.25, as busy as we are
        cand("local", local=True, in_flight=5, capacity=8),
        cand("light", in_flight=1, capacity=4),  # 0.25
        cand("lighter", in_flight=0, capacity=4),  # 0.0
        cand("below", in_flight=4, capacity=4),  # 1.0
    ]
    # this node: 5 in flight against a threshold of 4 -> load 1.25
    assert ranked(candidates, local_in_flight=5, limit=4) == [
        "lighter",
        "light",
        "below",
        "local",
        "equal",
        "heavier",
    ]


def test_spill_compares_loads_exactly() -> None:
    # Just below 1.0, though a float division rounds it to exactly 1.0.
    nearly_full = cand("nearly-full", in_flight=2**60 - 1, capacity=2**60)
    assert nearly_full.load == 1.0
    local = cand("local", local=True, in_flight=4, capacity=4)
    assert ranked([local, nearly_full], local_in_flight=4, limit=4) == ["nearly-full", "local"]


def test_spill_load_is_local_in_flight_over_the_threshold() -> None:
    # The local candidate's own load (0 of 100) does not matter: the node is at 6 of 4.
    local = cand("local", local=True, in_flight=0, capacity=100)
    peer = cand("peer", in_flight=5, capacity=4)  # 1.25 < 1.5
    assert ranked([local, peer], local_in_flight=6, limit=4) == ["peer", "local"]
    assert ranked([local, peer], local_in_flight=5, limit=4) == ["local", "peer"]


@pytest.mark.parametrize("limit", [0, -3])
def test_a_threshold_of_zero_counts_as_one(limit: int) -> None:
    local = cand("local", local=True)
    idle_peer = cand("peer", in_flight=0, capacity=4)
    half_peer = cand("half", in_flight=1, capacity=2)
    busy_peer = cand("busy", in_flight=2, capacity=1)
    # Always spilling; the node's load is local_in_flight / 1.
    assert ranked([local, idle_peer], local_in_flight=0, limit=limit) == ["local", "peer"]
    assert ranked([busy_peer, local, idle_peer, half_peer], local_in_flight=1, limit=limit) == [
        "peer",
        "half",
        "local",
        "busy",
    ]


@pytest.mark.parametrize("local_in_flight", [0, 4, 100])
def test_without_a_local_candidate_remotes_go_least_loaded_first(local_in_flight: int) -> None:
    candidates = [
        cand("busy", in_flight=3, capacity=4),
        cand("weak", in_flight=1, capacity=4, hw=1.0),
        cand("strong", in_flight=1, capacity=4, hw=9.0),
        cand("idle", in_flight=0, capacity=4),
    ]
    assert ranked(candidates, local_in_flight=local_in_flight, limit=4) == [
        "idle",
        "strong",
        "weak",
        "busy",
    ]


def test_at_equal_load_the_shorter_advertised_wait_goes_first() -> None:
    for seed in range(20):
        peers = [
            cand("slow", in_flight=2, capacity=2, queued=2, wait_s=8.0, hw=9.0),
            cand("quick", in_flight=2, capacity=2, queued=2, wait_s=1.0),
        ]
        assert ranked(peers, "least_loaded", seed=seed) == ["quick", "slow"]


# -- least_loaded -----------------------------------------------------------------------


def test_least_loaded_ignores_locality() -> None:
    local = cand("local", local=True, in_flight=2, capacity=4)
    peer = cand("peer", in_flight=1, capacity=4)
    assert ranked([local, peer], "least_loaded") == ["peer", "local"]
    assert ranked([local, peer], "local_spillover", local_in_flight=2) == ["local", "peer"]


def test_least_loaded_is_relative_to_capacity() -> None:
    small = cand("small", in_flight=1, capacity=2)  # 0.5
    big = cand("big", in_flight=3, capacity=8)  # 0.375
    assert ranked([small, big], "least_loaded") == ["big", "small"]


def test_equal_load_goes_to_the_stronger_machine() -> None:
    weak = cand("weak", in_flight=1, capacity=2, hw=1.0)
    strong = cand("strong", in_flight=2, capacity=4, hw=3.5)
    for seed in range(50):
        assert ranked([weak, strong], "least_loaded", seed=seed) == ["strong", "weak"]


def test_full_ties_are_broken_at_random_and_each_comes_first_sometimes() -> None:
    candidates = [cand(key, in_flight=1, capacity=2, hw=2.0) for key in "abc"]
    rng = random.Random(1234)
    orders = Counter(
        tuple(
            c.key
            for c in rank(
                candidates,
                "least_loaded",
                local_in_flight=0,
                spillover_max_local_in_flight=4,
                turn=0,
                rng=rng,
            )
        )
        for _ in range(600)
    )
    firsts = Counter(order[0] for order in orders.elements())
    assert set(firsts) == {"a", "b", "c"}
    assert min(firsts.values()) > 100  # roughly a third each
    assert len(orders) == 6  # every order shows up


def test_random_tie_break_uses_only_the_given_rng() -> None:
    candidates = [cand(key) for key in "abcdef"]
    runs = [ranked(candidates, "least_loaded", seed=7) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert {tuple(ranked(candidates, "least_loaded", seed=s)) for s in range(20)} != {
        tuple(runs[0])
    }


def test_ties_in_both_orders_under_local_spillover() -> None:
    peers = [cand("p", in_flight=1, capacity=2), cand("q", in_flight=2, capacity=4)]
    firsts = {ranked(peers, "local_spillover", seed=s)[0] for s in range(40)}
    assert firsts == {"p", "q"}


# -- loaded beats unloaded; unhealthy never tried ---------------------------------------


@pytest.mark.parametrize("strategy", ["local_spillover", "least_loaded"])
def test_loaded_beats_merely_available(strategy: Strategy) -> None:
    idle_unloaded = cand("unloaded", loaded=False, in_flight=0, capacity=4)
    busy_loaded = cand("loaded", loaded=True, in_flight=3, capacity=4)
    assert ranked([idle_unloaded, busy_loaded], strategy) == ["loaded", "unloaded"]


def test_loaded_peer_beats_an_unloaded_local_candidate() -> None:
    local = cand("local", local=True, loaded=False)
    peer = cand("peer", loaded=True, in_flight=3, capacity=4)
    assert ranked([local, peer], "local_spillover", local_in_flight=0) == ["peer", "local"]


def test_spillover_applies_within_the_unloaded_group() -> None:
    local = cand("local", local=True, loaded=False, in_flight=4, capacity=4)
    peer = cand("peer", loaded=False, in_flight=0, capacity=4)
    assert ranked([local, peer], local_in_flight=2, limit=4) == ["local", "peer"]
    assert ranked([local, peer], local_in_flight=4, limit=4) == ["peer", "local"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unhealthy_candidates_are_never_tried(strategy: Strategy) -> None:
    """Issue 9 item 15: a suspect peer is not a last resort; it gets no request at all."""
    candidates = [
        cand("s-idle", healthy=False, in_flight=0, capacity=4, hw=9.0),
        cand("busy", loaded=False, in_flight=9, capacity=1),
        cand("s-local", local=True, healthy=False),
        cand("ok", in_flight=3, capacity=4),
    ]
    assert ranked(candidates, strategy, turn=3) == ["ok", "busy"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_unhealthy_candidates_rank_to_nothing(strategy: Strategy) -> None:
    candidates = [cand("s1", healthy=False), cand("s2", healthy=False, loaded=False)]
    assert ranked(candidates, strategy) == []


# -- round_robin ------------------------------------------------------------------------


def test_round_robin_rotates_by_turn() -> None:
    candidates = [cand("c"), cand("a"), cand("b")]
    assert ranked(candidates, "round_robin", turn=0) == ["a", "b", "c"]
    assert ranked(candidates, "round_robin", turn=1) == ["b", "c", "a"]
    assert ranked(candidates, "round_robin", turn=2) == ["c", "a", "b"]
    assert ranked(candidates, "round_robin", turn=3) == ["a", "b", "c"]
    assert ranked(candidates, "round_robin", turn=-1) == ["c", "a", "b"]
    assert ranked(candidates, "round_robin", turn=3 * 10**12 + 1) == ["b", "c", "a"]


def test_round_robin_order_does_not_depend_on_input_order_or_rng() -> None:
    candidates = [cand("a"), cand("b"), cand("c"), cand("d")]
    for turn in range(5):
        orders = {
            tuple(ranked(list(perm), "round_robin", turn=turn, seed=seed))
            for seed, perm in enumerate(itertools.permutations(candidates))
        }
        assert len(orders) == 1


def test_round_robin_ignores_load_and_locality() -> None:
    candidates = [
        cand("a-busy", in_flight=9, capacity=1, hw=0.0),
        cand("b-local", local=True, in_flight=0, capacity=8),
        cand("c-idle", in_flight=0, capacity=8, hw=9.0),
    ]
    firsts = [ranked(candidates, "round_robin", turn=t, local_in_flight=0)[0] for t in range(6)]
    assert firsts == ["a-busy", "b-local", "c-idle"] * 2


def test_round_robin_alternates_among_loaded_then_the_rest() -> None:
    candidates = [
        cand("u1", loaded=False),
        cand("l1"),
        cand("u2", loaded=False),
        cand("l2"),
        cand("l3"),
    ]
    assert ranked(candidates, "round_robin", turn=0) == ["l1", "l2", "l3", "u1", "u2"]
    assert ranked(candidates, "round_robin", turn=1) == ["l2", "l3", "l1", "u2", "u1"]
    assert ranked(candidates, "round_robin", turn=2) == ["l3", "l1", "l2", "u1", "u2"]


def test_round_robin_rotates_unloaded_ones_when_none_is_loaded() -> None:
    candidates = [cand("x", loaded=False), cand("y", loaded=False)]
    assert [ranked(candidates, "round_robin", turn=t)[0] for t in range(4)] == ["x", "y"] * 2


# -- the property every strategy keeps ---------------------------------------------------

candidate_lists = st.lists(
    st.builds(
        Candidate,
        key=st.sampled_from("abcdefgh"),  # repeats allowed: a multiset goes in
        node_id=st.sampled_from([SELF_ID, PEER_A, PEER_B]),
        local=st.booleans(),
        loaded=st.booleans(),
        in_flight=st.integers(0, 20),
        capacity=st.integers(1, 8),
        hardware_score=st.floats(-10, 10, allow_nan=False),
        healthy=st.booleans(),
    ),
    max_size=12,
)


@given(
    candidates=candidate_lists,
    strategy=st.sampled_from(STRATEGIES),
    local_in_flight=st.integers(0, 30),
    limit=st.integers(-2, 30),
    turn=st.integers(-(10**6), 10**6),
    seed=st.integers(0, 2**32),
)
def test_rank_permutes_the_healthy_and_drops_the_unhealthy(
    candidates: list[Candidate],
    strategy: Strategy,
    local_in_flight: int,
    limit: int,
    turn: int,
    seed: int,
) -> None:
    order = rank(
        candidates,
        strategy,
        local_in_flight=local_in_flight,
        spillover_max_local_in_flight=limit,
        turn=turn,
        rng=random.Random(seed),
    )
    healthy = [c for c in candidates if c.healthy]
    assert Counter(id(c) for c in order) == Counter(id(c) for c in healthy)
    assert Counter(c.key for c in order) == Counter(c.key for c in healthy)
    loaded = [c.loaded for c in order]
    assert loaded == sorted(loaded, reverse=True)


# -- resolve_model ------------------------------------------------------------------------

ALIASES = {"llama3": ["llama3:8b-instruct-q4_K_M", "Meta-Llama-3-8B-Instruct-GGUF"]}


def test_an_alias_resolves_to_itself_then_its_targets() -> None:
    assert resolve_model("llama3", ALIASES) == [
        "llama3",
        "llama3:8b-instruct-q4_K_M",
        "Meta-Llama-3-8B-Instruct-GGUF",
    ]


def test_a_target_finds_its_alias_and_the_other_targets() -> None:
    assert resolve_model("Meta-Llama-3-8B-Instruct-GGUF", ALIASES) == [
        "Meta-Llama-3-8B-Instruct-GGUF",
        "llama3",
        "llama3:8b-instruct-q4_K_M",
    ]
    assert resolve_model("llama3:8b-instruct-q4_K_M", ALIASES) == [
        "llama3:8b-instruct-q4_K_M",
        "llama3",
        "Meta-Llama-3-8B-Instruct-GGUF",
    ]


@pytest.mark.parametrize("name", ["mistral", "Llama3", "LLAMA3", "llama3 ", ""])
def test_unknown_names_and_other_cases_resolve_to_themselves(name: str) -> None:
    assert resolve_model(name, ALIASES) == [name]


def test_no_aliases_at_all() -> None:
    assert resolve_model("llama3", {}) == ["llama3"]


def test_resolution_never_repeats_a_name() -> None:
    aliases = {
        "a": ["x", "a", "x", "y"],  # lists itself and a target twice
        "b": ["x", "z"],  # shares a target with "a"
        "x": ["b"],  # a target that is an alias too
    }
    assert resolve_model("a", aliases) == ["a", "x", "y"]
    assert resolve_model("x", aliases) == ["x", "b", "a", "y", "z"]
    assert resolve_model("b", aliases) == ["b", "x", "z"]


def test_every_alias_listing_a_target_is_found_in_mapping_order() -> None:
    aliases = {"first": ["shared", "one"], "second": ["two", "shared"]}
    assert resolve_model("shared", aliases) == ["shared", "first", "one", "second", "two"]


def test_aliases_are_followed_one_level_only() -> None:
    aliases = {"a": ["b"], "b": ["c"]}
    assert resolve_model("a", aliases) == ["a", "b"]


def test_a_lone_string_target_is_one_name_not_its_letters() -> None:
    aliases = {"short": "a-long-name"}
    assert resolve_model("short", aliases) == ["short", "a-long-name"]
    assert resolve_model("a-long-name", aliases) == ["a-long-name", "short"]
    assert resolve_model("a", aliases) == ["a"]


# -- hop_policy -----------------------------------------------------------------------------


def test_no_headers_no_restriction() -> None:
    assert hop_policy({}) == HopPolicy(forwarded=False, local_only=False, pinned=None)
    assert hop_policy({"Content-Type": "application/json"}) == HopPolicy()


@pytest.mark.parametrize("name", [HOP_HEADER, "x-shoal-hop", "X-SHOAL-HOP", "x-Shoal-hOp"])
def test_the_hop_marker_is_found_in_any_case(name: str) -> None:
    assert hop_policy({name: "1"}).forwarded
    assert hop_policy(CIMultiDict({name: "1"})).forwarded


@pytest.mark.parametrize("value", ["1", "0", "", "false", SELF_ID])
def test_the_hop_marker_counts_whatever_its_value(value: str) -> None:
    # Doubt resolves toward "forwarded": the worst it costs is a local-only answer.
    assert hop_policy({HOP_HEADER: value}) == HopPolicy(forwarded=True)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", " yes "])
@pytest.mark.parametrize("name", [LOCAL_ONLY_HEADER, "x-shoal-local-only", "X-SHOAL-LOCAL-ONLY"])
def test_local_only_truthy_values(name: str, value: str) -> None:
    assert hop_policy({name: value}) == HopPolicy(local_only=True)


@pytest.mark.parametrize("value", ["0", "false", "no", "", "on", "y", "2", "truee", "1 1"])
def test_local_only_anything_else_is_false(value: str) -> None:
    assert hop_policy({LOCAL_ONLY_HEADER: value}) == HopPolicy()


@pytest.mark.parametrize("name", [NODE_HEADER, "x-shoal-node", "X-SHOAL-NODE"])
def test_a_pin_is_read_in_any_case_and_trimmed(name: str) -> None:
    assert hop_policy({name: "  kitchen "}).pinned == "kitchen"
    assert hop_policy(CIMultiDict({name: "kitchen"})).pinned == "kitchen"


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_pin_is_no_pin(value: str) -> None:
    assert hop_policy({NODE_HEADER: value}).pinned is None


def test_all_three_together_and_other_headers_ignored() -> None:
    headers = CIMultiDict(
        [
            ("Host", "desk:11450"),
            ("x-shoal-hop", "1"),
            ("X-Shoal-Node", "attic"),
            ("X-SHOAL-LOCAL-ONLY", "yes"),
            ("X-Shoal-Nodes", "garage"),
        ]
    )
    assert hop_policy(headers) == HopPolicy(forwarded=True, local_only=True, pinned="attic")


def test_of_a_repeated_header_the_first_wins() -> None:
    headers = CIMultiDict([("X-Shoal-Node", "attic"), ("x-shoal-node", "garage")])
    assert hop_policy(headers).pinned == "attic"
    repeated = CIMultiDict([("x-shoal-local-only", "no"), ("X-Shoal-Local-Only", "yes")])
    assert not hop_policy(repeated).local_only


# -- allowed --------------------------------------------------------------------------------

LOCAL_1 = cand("llama-server", local=True)
LOCAL_2 = cand("ollama", local=True)
ON_A = cand(PEER_A)
ON_B = cand(PEER_B)
ON_C = cand(PEER_C)
EVERYONE = [ON_B, LOCAL_1, ON_A, LOCAL_2, ON_C]


def keys_allowed(policy: HopPolicy, candidates: list[Candidate] = EVERYONE) -> list[str]:
    kept = allowed(candidates, policy, self_id=SELF_ID, self_name=SELF_NAME, names=NAMES)
    return [c.key for c in kept]


LOCALS = [LOCAL_1.key, LOCAL_2.key]


def test_no_restriction_keeps_everything_in_order() -> None:
    assert keys_allowed(HopPolicy()) == [c.key for c in EVERYONE]


@pytest.mark.parametrize(
    "policy",
    [HopPolicy(forwarded=True), HopPolicy(local_only=True), HopPolicy(True, True)],
)
def test_forwarded_or_local_only_keeps_local_candidates(policy: HopPolicy) -> None:
    assert keys_allowed(policy) == LOCALS
    assert keys_allowed(policy, [ON_A, ON_B]) == []


@pytest.mark.parametrize(
    ("pin", "expected"),
    [
        ("kitchen", [PEER_A]),  # by name
        ("attic", [PEER_B]),
        (PEER_C, [PEER_C]),  # by full id
        (PEER_A[:8], [PEER_A]),  # by id prefix of 8
        (PEER_A[:20], [PEER_A]),
        (PEER_A[:7], []),  # too short a prefix names nobody
        ("b0b0b0b0", [PEER_B, PEER_C]),  # an ambiguous prefix names both
        ("b0b0b0b02", [PEER_B]),
        ("Kitchen", []),  # names are case-sensitive
        ("cellar", []),  # nobody
        ("1" * 56, []),  # the end of an id is no prefix
    ],
)
def test_a_pin_keeps_the_candidates_on_the_node_it_names(pin: str, expected: list[str]) -> None:
    assert keys_allowed(HopPolicy(pinned=pin)) == expected


@pytest.mark.parametrize("pin", [SELF_NAME, SELF_ID, SELF_ID[:8], SELF_ID[:30]])
def test_a_pin_naming_this_node_means_local(pin: str) -> None:
    assert keys_allowed(HopPolicy(pinned=pin)) == LOCALS


def test_a_name_or_full_id_beats_a_prefix() -> None:
    names = {PEER_A: "b0b0b0b0", PEER_B: "attic"}
    kept = allowed(
        [ON_A, ON_B],
        HopPolicy(pinned="b0b0b0b0"),
        self_id=SELF_ID,
        self_name=SELF_NAME,
        names=names,
    )
    assert [c.key for c in kept] == [PEER_A]


def test_this_node_wins_a_tie_with_a_peer() -> None:
    names = {PEER_A: SELF_NAME}  # a peer with the same name as this node
    kept = allowed(
        [ON_A, LOCAL_1],
        HopPolicy(pinned=SELF_NAME),
        self_id=SELF_ID,
        self_name=SELF_NAME,
        names=names,
    )
    assert [c.key for c in kept] == [LOCAL_1.key]


def test_a_pin_means_the_same_whichever_nodes_hold_the_model() -> None:
    # "b0b0b0b0" is the name of PEER_A, which does not hold the model; PEER_B's id starts
    # with it, but the client asked for PEER_A.
    names = {PEER_A: "b0b0b0b0"}
    kept = allowed(
        [ON_B, LOCAL_1],
        HopPolicy(pinned="b0b0b0b0"),
        self_id=SELF_ID,
        self_name=SELF_NAME,
        names=names,
    )
    assert kept == []


def test_a_pin_to_a_peer_unknown_by_name_still_matches_its_id() -> None:
    kept = allowed(
        [ON_A, LOCAL_1],
        HopPolicy(pinned=PEER_A[:8]),
        self_id=SELF_ID,
        self_name=SELF_NAME,
        names={},
    )
    assert kept == [ON_A]


def test_a_pinned_forwarded_request_is_served_here_or_nowhere() -> None:
    assert keys_allowed(HopPolicy(forwarded=True, pinned="kitchen")) == []
    assert keys_allowed(HopPolicy(forwarded=True, pinned=SELF_NAME)) == LOCALS
    assert keys_allowed(HopPolicy(local_only=True, pinned=PEER_B)) == []


def test_a_pin_to_this_node_without_local_candidates_leaves_nothing() -> None:
    assert keys_allowed(HopPolicy(pinned=SELF_NAME), [ON_A, ON_B]) == []


def test_headers_to_allowed_end_to_end() -> None:
    policy = hop_policy({"x-shoal-node": " garage ", "X-Shoal-Local-Only": "no"})
    assert keys_allowed(policy) == [PEER_C]
