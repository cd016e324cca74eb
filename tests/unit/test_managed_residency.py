"""The managed engines' decisions (`shoal.engine.residency`): pure, no loop, no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.engine.residency import (
    ENGINE_OVERHEAD_BYTES,
    FIRST_USE_GRACE_S,
    GIB,
    MIB,
    RETRY_AFTER_MAX_S,
    Load,
    Phase,
    Refuse,
    Residency,
    Wait,
    expected_load_s,
    memory_needed,
    progress,
    retry_after_s,
    slot_context,
)
from shoal.models.catalog import LocalModel


def gguf(**fields: object) -> LocalModel:
    base: dict[str, object] = {
        "name": "smollm2-135m-instruct:q4_1",
        "path": Path("/models/smollm2.gguf"),
        "size_bytes": 100 * MIB,
        "store": "folder",
    }
    return LocalModel(**{**base, **fields})  # type: ignore[arg-type]


# -- memory -------------------------------------------------------------------------------


def test_kv_cache_from_the_header_smollm2() -> None:
    # SmolLM2-135M: 30 layers, width 576, 9 heads, 3 KV heads (head_dim 64).
    model = gguf(layers=30, embedding_length=576, head_count=9, head_count_kv=3)
    need = memory_needed(model, context=4096, slots=2)
    assert need.kv_bytes == 30 * 4096 * 2 * 2 * 3 * 64 * 2 == 188_743_680
    assert need.total == 100 * MIB + 188_743_680 + ENGINE_OVERHEAD_BYTES
    assert need.kv_known
    assert "4096 tokens × 2 slot(s)" in need.describe()


def test_without_kv_heads_every_head_has_its_own_kv() -> None:
    model = gguf(layers=2, embedding_length=128, head_count=4)
    assert memory_needed(model, 100, 1).kv_bytes == 2 * 100 * 1 * 2 * 4 * 32 * 2


def test_key_and_value_lengths_from_the_header_win() -> None:
    # Qwen3-0.6B: width 1024, 16 heads (64 wide), yet K and V are 128 wide per head.
    model = gguf(
        layers=28, embedding_length=1024, head_count=16, head_count_kv=8,
        key_length=128, value_length=128,
    )  # fmt: skip
    assert memory_needed(model, 1000, 1).kv_bytes == 28 * 1000 * 8 * (128 + 128) * 2


def test_context_is_capped_at_the_trained_context() -> None:
    model = gguf(layers=1, embedding_length=64, head_count=1, context_length=2048)
    assert slot_context(model, 8192) == 2048
    assert memory_needed(model, 8192, 1).context == 2048
    assert slot_context(gguf(), 8192) == 8192  # unknown: as configured


def test_unknown_shape_counts_no_kv_and_says_so() -> None:
    need = memory_needed(gguf(layers=30), 4096, 2)
    assert (need.kv_bytes, need.kv_known) == (0, False)
    assert "not counted" in need.describe()


# -- admission ----------------------------------------------------------------------------


def residency(max_loaded: int, *loaded: tuple[str, int, float]) -> Residency:
    """Ready residents: (name, need, last used)."""
    r = Residency(max_loaded)
    for name, need, last_used in loaded:
        r.add(name, need, keep_alive_s=300, now=last_used)
        r.ready(name, last_used)
    return r


def test_room_and_a_free_slot_loads_with_no_eviction() -> None:
    r = residency(2, ("a", GIB, 0))
    assert r.admit("b", GIB, limit=None, available=4 * GIB) == Load()


def test_max_loaded_evicts_the_least_recently_used() -> None:
    r = residency(2, ("a", GIB, 5), ("b", GIB, 1))
    assert r.admit("c", GIB, limit=None, available=8 * GIB) == Load(("b",))


def test_a_busy_model_is_never_evicted() -> None:
    r = residency(2, ("a", GIB, 5), ("b", GIB, 1))
    r.begin("b", 6)  # b is now the most recent and busy
    assert r.admit("c", GIB, limit=None, available=8 * GIB) == Load(("a",))
    r.begin("a", 7)
    decision = r.admit("c", GIB, limit=None, available=8 * GIB)
    assert isinstance(decision, Wait)
    assert "all in use" in decision.reason
    r.end("a", 8)
    assert r.admit("c", GIB, limit=None, available=8 * GIB) == Load(("a",))


def test_a_loading_model_is_never_evicted() -> None:
    r = residency(1)
    r.add("a", GIB, 300, now=0)
    assert isinstance(r.admit("b", GIB, limit=None, available=8 * GIB), Wait)


def test_memory_under_a_limit_evicts_until_it_fits() -> None:
    r = residency(4, ("a", 2 * GIB, 1), ("b", 2 * GIB, 2), ("c", 2 * GIB, 3))
    # limit 7: 1 free; 4 needed: a and b go (LRU), c stays.
    assert r.admit("d", 4 * GIB, limit=7 * GIB, available=0) == Load(("a", "b"))


def test_memory_without_a_limit_counts_what_the_system_has_and_what_unloading_frees() -> None:
    r = residency(4, ("a", 2 * GIB, 1), ("b", 2 * GIB, 2))
    assert r.admit("c", 3 * GIB, limit=None, available=1 * GIB) == Load(("a",))
    assert r.admit("c", GIB, limit=None, available=1 * GIB) == Load()


def test_a_loading_model_is_counted_against_what_the_system_says_is_available() -> None:
    r = residency(4)
    r.add("a", 2 * GIB, 300, now=0)  # still reading its file: not yet in `available`
    assert isinstance(r.admit("b", 2 * GIB, limit=None, available=3 * GIB), Wait)
    r.ready("a", 1)  # loaded: the system's figure includes it now
    assert r.admit("b", 2 * GIB, limit=None, available=3 * GIB) == Load()


def test_too_large_even_with_everything_unloaded_is_refused() -> None:
    r = residency(4, ("a", 2 * GIB, 1))
    refused = r.admit("big", 8 * GIB, limit=None, available=GIB)
    assert isinstance(refused, Refuse)
    assert (refused.need, refused.room) == (8 * GIB, 3 * GIB)
    refused = r.admit("big", 8 * GIB, limit=4 * GIB, available=0)
    assert isinstance(refused, Refuse)
    assert refused.room == 4 * GIB
    assert "limit" in refused.reason


def test_fits_only_once_busy_models_finish_is_a_wait() -> None:
    r = residency(4, ("a", 3 * GIB, 1))
    r.begin("a", 2)
    decision = r.admit("b", 2 * GIB, limit=4 * GIB, available=0)
    assert isinstance(decision, Wait)
    assert "serving requests" in decision.reason


@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.integers(0, 100), st.booleans()), min_size=0, max_size=6
    ),
    st.integers(1, 6),
    st.integers(1, 16),
    st.one_of(st.none(), st.integers(0, 40)),
    st.integers(0, 40),
)
def test_admission_invariants(
    loaded: list[tuple[int, int, bool]],
    max_loaded: int,
    need: int,
    limit: int | None,
    available: int,
) -> None:
    r = Residency(max_loaded)
    for i, (size, used, busy) in enumerate(loaded[:max_loaded]):
        r.add(f"m{i}", size, 300, now=used)
        r.ready(f"m{i}", used)
        if busy:
            r.begin(f"m{i}", used)
    decision = r.admit("new", need, limit=limit, available=available)
    if isinstance(decision, Load):
        evicted = [r.residents[n] for n in decision.evict]
        assert all(e.idle for e in evicted)  # never a busy one
        assert len(r.residents) - len(evicted) < max_loaded  # a slot is free
        freed = sum(e.need for e in evicted)
        room = limit - sum(x.need for x in r.residents.values()) if limit is not None else available
        assert room + freed >= need  # it fits
        kept_idle = [x for x in r.residents.values() if x.idle and x not in evicted]
        assert all(e.last_used <= k.last_used for e in evicted for k in kept_idle)  # LRU
    elif isinstance(decision, Refuse):
        assert decision.need > decision.room


# -- idle expiry ---------------------------------------------------------------------------


def test_idle_models_expire_after_their_keep_alive_from_their_last_request() -> None:
    r = Residency(4)
    r.add("a", GIB, keep_alive_s=10, now=0)
    r.ready("a", 1)
    r.begin("a", 2)
    assert r.next_due() is None  # busy: no timer
    r.end("a", 5)
    assert r.next_due() == 15
    assert r.expired(14.9) == []
    assert r.expired(15) == ["a"]


def test_a_model_never_used_waits_for_the_request_that_loaded_it() -> None:
    r = Residency(4)
    r.add("a", GIB, keep_alive_s=0, now=0)
    r.ready("a", 1)
    assert r.next_due() == 1 + FIRST_USE_GRACE_S
    assert r.expired(2) == []
    r.begin("a", 3)
    r.end("a", 4)
    assert r.expired(4) == ["a"]  # keep_alive 0: gone once used


def test_a_loading_or_restarting_model_never_expires() -> None:
    r = Residency(4)
    r.add("a", GIB, keep_alive_s=0, now=0)
    assert r.expired(1e9) == []
    r.ready("a", 1)
    r.loading("a")  # its engine crashed and restarts
    assert r.residents["a"].phase is Phase.LOADING
    assert r.expired(1e9) == []
    assert r.next_due() is None


def test_expired_in_least_recently_used_order_and_ends_after_removal_are_ignored() -> None:
    r = residency(4, ("a", GIB, 3), ("b", GIB, 1))
    for name in "ab":
        r.begin(name, 0)
    r.end("a", 3)
    r.end("b", 1)
    assert r.expired(1000) == ["b", "a"]
    r.remove("a")
    r.end("a", 5)  # a request that outlived an unload: nothing to count
    assert list(r.residents) == ["b"]


# -- progress -----------------------------------------------------------------------------


def test_expected_load_time_from_size_then_from_measurement() -> None:
    assert expected_load_s(400 * MIB, None) == pytest.approx(2.0)
    assert expected_load_s(400 * MIB, 0.7) == 0.7


@pytest.mark.parametrize(
    ("elapsed", "expected", "done", "retry"),
    [
        (0.0, 2.0, 0.0, 2.0),
        (1.0, 2.0, 0.5, 1.0),
        (1.9, 2.0, 0.95, 1.0),
        (5.0, 2.0, 0.99, 1.0),  # late: never 100 % before the engine says so
        (0.0, 100.0, 0.0, RETRY_AFTER_MAX_S),
    ],
)
def test_progress_and_retry_after(
    elapsed: float, expected: float, done: float, retry: float
) -> None:
    assert progress(elapsed, expected) == pytest.approx(done)
    assert retry_after_s(elapsed, expected) == retry
