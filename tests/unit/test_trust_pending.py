"""`PendingBook`: who waits in the pending list, as a pure structure with `now` given.

Issue 9 item 4: fresh identities at one per second filled the list, and a real node was
refused until the operator cleared it. Here a flood of any size from a few addresses
leaves a place for a real node, and keeps it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.trust.pending import (
    MAX_PENDING,
    NEW_PER_MINUTE,
    PendingBook,
    PendingFull,
    Request,
    address_of,
)


class Waiting:
    """The pending list the store would hold, driven through the book."""

    def __init__(self, book: PendingBook | None = None) -> None:
        self.book = book or PendingBook()
        self.requests: dict[str, Request] = {}

    def ask(self, address: str, now: float, node_id: str | None = None) -> Request | None:
        """A node completes the handshake from `address`; None when it is refused."""
        node_id = node_id or secrets.token_hex(32)
        known = node_id in self.requests
        since = self.requests[node_id].since if known else now
        new = Request(node_id, address, since)
        others = [r for r in self.requests.values() if r.node_id != node_id]
        try:
            dropped = self.book.admit(others, new, now, known=known)
        except PendingFull:
            return None
        for request in dropped:
            del self.requests[request.node_id]
        self.requests[node_id] = new
        return new

    def __contains__(self, request: Request | None) -> bool:
        return request is not None and request.node_id in self.requests

    def from_address(self, address: str) -> list[Request]:
        return [r for r in self.requests.values() if r.address == address]


def test_one_address_holds_one_place_however_many_identities_it_makes() -> None:
    waiting, now = Waiting(), 0.0
    real = waiting.ask("http://10.0.0.5:11450", now)
    for _ in range(600):  # ten minutes of a fresh identity each second
        now += 1
        waiting.ask("http://10.0.0.66:11450", now)
    assert real in waiting
    assert len(waiting.from_address("http://10.0.0.66:11450")) == 1
    assert len(waiting.requests) == 2
    late = waiting.ask("http://10.0.0.7:11450", now)  # and a real node asking during it
    assert late in waiting


def test_a_new_identity_from_an_address_takes_its_place() -> None:
    waiting = Waiting()
    old = waiting.ask("http://10.0.0.5:11450", 0.0)
    new = waiting.ask("http://10.0.0.5:9999", 1.0)  # the port is the node's to choose
    assert old not in waiting and new in waiting


def test_a_known_request_met_again_from_another_address_pushes_out_the_one_there() -> None:
    waiting = Waiting()
    a = waiting.ask("http://10.0.0.5:11450", 0.0)
    b = waiting.ask("http://10.0.0.6:11450", 1.0)
    assert a is not None and b is not None
    moved = waiting.ask("http://10.0.0.5:11450", 2.0, node_id=b.node_id)
    assert a not in waiting and moved in waiting and len(waiting.requests) == 1
    assert moved is not None and moved.since == 1.0  # still asking since it first asked


def test_an_address_asking_too_fast_waits_and_no_other_does() -> None:
    waiting, now = Waiting(), 100.0
    for _ in range(NEW_PER_MINUTE):
        assert waiting.ask("http://10.0.0.66:11450", now) is not None
    with pytest.raises(PendingFull) as raised:
        waiting.book.admit([], Request("x" * 64, "http://10.0.0.66:1", now), now)
    assert raised.value.retry_after == pytest.approx(60.0)
    assert waiting.ask("http://10.0.0.7:11450", now) is not None
    assert waiting.ask("http://10.0.0.66:11450", now + 60.5) is not None


def test_loopback_nodes_are_told_apart_by_port() -> None:
    assert address_of("http://127.0.0.1:11450") == ("127.0.0.1:11450", "127.0.0.1")
    assert address_of("http://10.0.0.5:11450") == ("10.0.0.5", "10.0.0.5")
    assert address_of("http://[fe80::1]:11450") == ("fe80::/64", "fe80::/64")
    assert address_of("http://Studio.local:11450") == ("studio.local", "studio.local")
    waiting = Waiting()
    one = waiting.ask("http://127.0.0.1:11450", 0.0)
    two = waiting.ask("http://127.0.0.1:11460", 1.0)
    assert one in waiting and two in waiting


def test_a_full_list_evicts_the_oldest_of_the_largest_group() -> None:
    waiting = Waiting(PendingBook(cap=4))
    real = waiting.ask("http://10.0.0.5:11450", 0.0)
    local = [waiting.ask(f"http://127.0.0.1:{port}", 1.0 + i) for i, port in enumerate((1, 2, 3))]
    newcomer = waiting.ask("http://10.0.0.6:11450", 10.0)
    assert newcomer in waiting and real in waiting  # loopback held 3: its oldest went
    assert local[0] not in waiting and local[1] in waiting and local[2] in waiting


def test_a_full_list_of_single_addresses_evicts_the_oldest() -> None:
    waiting = Waiting(PendingBook(cap=3))
    first, second, third = (waiting.ask(f"http://10.0.0.{i}:1", float(i)) for i in (1, 2, 3))
    fourth = waiting.ask("http://10.0.0.4:1", 4.0)
    assert first not in waiting and all(r in waiting for r in (second, third, fourth))


addresses = st.integers(1, 31).map(lambda i: f"http://10.0.1.{i}:11450")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(addresses, st.floats(0, 10)), min_size=1, max_size=400))
def test_fewer_attacking_addresses_than_places_never_push_out_a_real_request(
    flood: list[tuple[str, float]],
) -> None:
    """Up to 31 addresses, any order, any rate, fresh identities each time: the real
    node's request stays, and the list never holds more than MAX_PENDING."""
    waiting, now = Waiting(), 0.0
    real = waiting.ask("http://10.0.0.5:11450", now)
    for address, step in flood:
        now += step
        waiting.ask(address, now)
        assert real in waiting
        assert len(waiting.requests) <= MAX_PENDING


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=MAX_PENDING, max_size=300))
def test_a_real_node_always_gets_in_and_the_cap_holds(flood: list[int]) -> None:
    """Any number of addresses: a real node asking is let in (never refused), and the
    list never holds more than MAX_PENDING."""
    waiting, now = Waiting(), 0.0
    ask: Callable[[str], Request | None] = lambda a: waiting.ask(a, now)  # noqa: E731
    for i in flood:
        now += 1
        ask(f"http://10.0.{i // 100}.{i % 100}:11450")
        assert len(waiting.requests) <= MAX_PENDING
    real = ask("http://10.9.9.9:11450")
    assert real in waiting and len(waiting.requests) <= MAX_PENDING


def test_the_book_forgets_old_rates() -> None:
    book = PendingBook()
    for i in range(100):
        book.admit([], Request(f"{i:064x}", f"http://10.0.2.{i}:1", float(i)), float(i))
    assert len(book._recent) <= 61  # only the groups that asked in the last minute
