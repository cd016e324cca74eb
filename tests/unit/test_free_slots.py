"""How many requests the targets of a pool can take now (`admission.free_slots`), and
which go first (`with_room_first`): free slots, and room in a full peer's queue for
requests of ours (so that its weighted fair queue, not the race to see a free slot,
decides when they run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.routing.admission import PARKED_PER_SLOT, free_slots, with_room_first
from shoal.routing.rank import UNBOUNDED, Candidate


@dataclass
class Target:
    candidate: Candidate


def target(key: str, **fields: Any) -> Any:
    values: dict[str, Any] = {"node_id": key, "local": False, "loaded": True, "capacity": 1}
    return Target(Candidate(key=key, **{**values, **fields}))


def test_free_slots_are_counted_on_every_healthy_target() -> None:
    targets = [
        target("here", local=True, in_flight=1, slots=3),
        target("peer", in_flight=0, slots=2),
        target("away", in_flight=0, slots=4, healthy=False),
    ]
    assert free_slots(targets) == 2 + 2


def test_a_full_peer_takes_requests_of_ours_into_its_queue_up_to_its_slots() -> None:
    assert PARKED_PER_SLOT == 1
    assert free_slots([target("peer", in_flight=2, slots=2, sent=0)]) == 2
    assert free_slots([target("peer", in_flight=2, slots=2, sent=1)]) == 1
    assert free_slots([target("peer", in_flight=2, slots=2, sent=2)]) == 0
    assert free_slots([target("peer", in_flight=3, slots=2, sent=5)]) == 0


def test_a_full_local_backend_takes_none_our_queue_is_its_queue() -> None:
    assert free_slots([target("here", local=True, in_flight=1, slots=1)]) == 0


def test_a_backend_that_queues_by_itself_is_never_full() -> None:
    assert free_slots([target("peer", in_flight=10**6, slots=UNBOUNDED)]) == UNBOUNDED - 10**6


def test_targets_with_room_go_first_in_their_order() -> None:
    full_local = target("here", local=True, in_flight=1, slots=1)
    full_peer = target("parked", in_flight=2, slots=2, sent=0)
    free_a = target("a", in_flight=0, slots=1)
    free_b = target("b", in_flight=1, slots=3)
    no_room = target("full", in_flight=2, slots=2, sent=2)
    order = with_room_first([full_local, no_room, full_peer, free_a, free_b])
    assert [t.candidate.key for t in order] == ["a", "b", "parked", "here", "full"]


def test_one_target_is_left_as_it_is() -> None:
    only = [target("here", local=True, in_flight=5, slots=1)]
    assert with_room_first(only) is only
