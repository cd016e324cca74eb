"""The token bucket that paces model files served to peers while inference runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.pacing import TokenBucket


def test_a_burst_goes_at_once_then_the_rate_holds() -> None:
    bucket = TokenBucket(rate=100.0, burst=50.0, now=0.0)
    assert bucket.reserve(50, 0.0) == 0.0  # the burst
    assert bucket.reserve(100, 0.0) == pytest.approx(1.0)  # in debt: a second of tokens
    assert bucket.reserve(100, 0.0) == pytest.approx(2.0)  # queued behind the first
    assert bucket.reserve(0, 3.0) == 0.0  # paid back by t = 2, refilled to 50 at t = 2.5
    assert bucket.reserve(60, 3.0) == pytest.approx(0.1)


def test_idle_time_refills_no_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.reserve(5, 1000.0) == 0.0
    assert bucket.reserve(1, 1000.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate, burst, 0.0)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 1000)), max_size=50))
def test_what_is_sent_never_beats_the_rate_plus_the_burst(steps: list[tuple[float, int]]) -> None:
    """Sending each reservation when it says, the bytes sent by any time t are at most
    burst + rate * t."""
    rate, burst = 100.0, 200.0
    bucket = TokenBucket(rate, burst, 0.0)
    now, sent_at = 0.0, []
    for gap, size in steps:
        now += gap
        sent_at.append((now + bucket.reserve(size, now), size))
    for t, _ in sent_at:
        total = sum(size for when, size in sent_at if when <= t)
        assert total <= burst + rate * t + 1e-6
