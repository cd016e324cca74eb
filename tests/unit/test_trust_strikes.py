"""`Strikes`: wrong cluster secrets per source, on a clock the test moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.trust.strikes import FREE_TRIES, REFILL_S, Strikes, source_of


def test_a_few_free_tries_then_one_a_minute() -> None:
    strikes, now = Strikes(), 1000.0
    for _ in range(FREE_TRIES):
        assert strikes.wait("10.0.0.9", now) == 0
        strikes.failed("10.0.0.9", now)
    assert strikes.wait("10.0.0.9", now) == pytest.approx(REFILL_S)
    assert strikes.wait("10.0.0.8", now) == 0  # another source is not held back
    now += REFILL_S / 2
    assert strikes.wait("10.0.0.9", now) == pytest.approx(REFILL_S / 2)
    now += REFILL_S / 2
    assert strikes.wait("10.0.0.9", now) == 0
    strikes.failed("10.0.0.9", now)  # the one try earned back, spent
    assert strikes.wait("10.0.0.9", now) == pytest.approx(REFILL_S)
    now += 10 * REFILL_S * FREE_TRIES  # a long quiet: the free tries again, no more
    for _ in range(FREE_TRIES):
        strikes.failed("10.0.0.9", now)
    assert strikes.wait("10.0.0.9", now) > 0


def test_a_right_proof_clears_the_source() -> None:
    strikes = Strikes()
    for _ in range(FREE_TRIES):
        strikes.failed("10.0.0.9", 0.0)
    strikes.cleared("10.0.0.9")
    assert strikes.wait("10.0.0.9", 0.0) == 0 and strikes.sources() == 0


@given(st.lists(st.tuples(st.integers(0, 9), st.floats(0, 30)), max_size=300))
def test_never_more_tries_than_the_bucket_allows(attempts: list[tuple[int, float]]) -> None:
    """However tries are spread in time, a source gets at most FREE_TRIES plus one per
    REFILL_S elapsed."""
    strikes, now, spent = Strikes(), 0.0, 0
    for source, step in attempts:
        now += step
        if strikes.wait(f"10.0.0.{source}", now) == 0:
            strikes.failed(f"10.0.0.{source}", now)
            spent += source == 0
    assert spent <= FREE_TRIES + now / REFILL_S


def test_the_book_is_bounded() -> None:
    strikes = Strikes(max_sources=20)
    for i in range(100):
        strikes.failed(f"10.0.{i // 250}.{i % 250}", float(i))
        assert strikes.sources() <= 20
    assert "10.0.0.99" in strikes._left  # the latest strike is kept, the quietest go


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("10.0.0.9", "10.0.0.9"),
        ("::ffff:10.0.0.9", "10.0.0.9"),
        ("fe80::1:2:3:4", "fe80::/64"),
        ("fe80::1:2:3:5%eth0", "fe80::/64"),  # a host's many addresses in a /64: one source
        ("[2001:db8:1:2::7]", "2001:db8:1:2::/64"),
        ("Studio.local", "studio.local"),
    ],
)
def test_sources(host: str, source: str) -> None:
    assert source_of(host) == source
