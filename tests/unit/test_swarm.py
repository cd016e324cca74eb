"""`Swarm`: which chunks of a file to ask of which peer, driven along explicit timelines.

Every test passes `now` by hand; the multi-source runs use a simulated clock in which
each source serves its requests one after the other at its own rate.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shoal.models.swarm import CHUNK_BYTES, Delivery, Request, Swarm, Tuning

MB = 1_000_000
ALL = range(10_000)


def swarm_of(chunks: int, **tuning: int | float) -> Swarm:
    return Swarm(chunks * CHUNK_BYTES, tuning=Tuning(**tuning))  # type: ignore[arg-type]


def every(chunks: int) -> range:
    return range(chunks)


def ok(request: Request) -> dict[int, bool]:
    return dict.fromkeys(request.chunks, True)


def in_flight(s: Swarm) -> dict[str, int]:
    return {x.source: x.in_flight for x in s.statistics().sources}


def simulate(
    s: Swarm,
    rates: Mapping[str, float],
    *,
    holdings: Mapping[str, Iterable[int]] | None = None,
    bad: Mapping[str, set[int]] | None = None,
    latency: float = 0.0005,
) -> tuple[dict[int, str], float]:
    """Run `s` to completion; each source answers its requests in order at `rates[source]`
    bytes/s. Returns which source each chunk came from, and the finishing time."""
    bad = bad or {}
    busy_until = dict.fromkeys(rates, 0.0)
    pending: list[tuple[float, int, Request]] = []
    aborted: set[int] = set()
    written: dict[int, str] = {}
    for source in rates:
        have = every(s.chunk_count) if holdings is None else holdings[source]
        assert s.add_source(source, have, 0.0)

    def send(now: float) -> None:
        for r in s.next_requests(now):
            start = max(now + latency, busy_until[r.source])
            busy_until[r.source] = start + r.count * s.chunk_bytes / rates[r.source]
            heapq.heappush(pending, (busy_until[r.source], r.serial, r))

    send(0.0)
    now = 0.0
    while not s.done():
        assert pending, "stalled"
        now, _, r = heapq.heappop(pending)
        if r.serial in aborted:
            continue
        results = {i: i not in bad.get(r.source, set()) for i in r.chunks}
        d = s.delivered(r, results, now)
        for i in d.accepted:
            assert i not in written, f"chunk {i} written twice"
            written[i] = r.source
        aborted |= {c.serial for c in d.cancel}
        for source, n in in_flight(s).items():
            assert n <= s.tuning.max_in_flight, source
        send(now)
    return written, now


# -- shape of requests -------------------------------------------------------------------


def test_a_new_source_gets_four_requests_of_four_chunks_from_the_start() -> None:
    s = swarm_of(100)
    s.add_source("a", every(100), 0.0)
    reqs = s.next_requests(0.0)
    assert [(r.first, r.count, r.source, r.duplicate) for r in reqs] == [
        (0, 4, "a", False),
        (4, 4, "a", False),
        (8, 4, "a", False),
        (12, 4, "a", False),
    ]
    assert s.next_requests(0.0) == []  # its pipeline is full
    assert reqs[0].byte_range(CHUNK_BYTES, s.size) == (0, 4 * CHUNK_BYTES - 1)


def test_the_last_chunk_may_be_short_and_its_range_ends_at_the_file() -> None:
    s = Swarm(3 * CHUNK_BYTES + 10)
    assert s.chunk_count == 4
    s.add_source("a", every(4), 0.0)
    (r,) = s.next_requests(0.0)
    assert r.byte_range(CHUNK_BYTES, s.size) == (0, 3 * CHUNK_BYTES + 9)
    d = s.delivered(r, ok(r), 1.0)
    assert d == Delivery((0, 1, 2, 3), ())
    assert s.done()
    assert s.statistics().sources[0].bytes_per_s == pytest.approx(3 * CHUNK_BYTES + 10)


def test_an_empty_file_is_done_at_once() -> None:
    s = Swarm(0)
    assert s.done() and not s.stalled()
    s.add_source("a", (), 0.0)
    assert s.next_requests(0.0) == []


def test_a_fast_source_gets_long_runs_and_a_deep_pipeline_a_slow_one_short_runs() -> None:
    s = swarm_of(2000)
    s.add_source("fast", every(2000), 0.0)
    s.add_source("slow", every(2000), 0.0)
    first = {r.source: r for r in s.next_requests(0.0)}
    # fast: 4 MiB in 4 ms (~1 GB/s); slow: 4 MiB in 4 s (~1 MB/s)
    s.delivered(first["fast"], ok(first["fast"]), 0.004)
    s.delivered(first["slow"], ok(first["slow"]), 4.0)
    more = s.next_requests(4.0)
    fast = [r for r in more if r.source == "fast"]
    slow = [r for r in more if r.source == "slow"]
    assert {r.count for r in fast} == {16}
    assert {r.count for r in slow} == {1}
    assert in_flight(s) == {"fast": 8, "slow": 4}


def test_tuning_is_checked() -> None:
    with pytest.raises(ValueError, match="in_flight"):
        Tuning(min_in_flight=9)
    with pytest.raises(ValueError, match="run_chunks"):
        Tuning(initial_run_chunks=17)
    with pytest.raises(ValueError, match="ewma"):
        Tuning(ewma_weight=0)
    with pytest.raises(ValueError, match="target"):
        Tuning(request_target_s=0)
    with pytest.raises(ValueError, match="window"):
        Tuning(strikes_to_drop=0)
    with pytest.raises(ValueError, match="size"):
        Swarm(-1)
    with pytest.raises(ValueError, match="chunk 5"):
        Swarm(5 * CHUNK_BYTES, verified=[5])
    s = swarm_of(5)
    s.add_source("a", (), 0.0)
    with pytest.raises(ValueError, match="chunk -1"):
        s.have("a", [-1], 0.0)


# -- which chunks ------------------------------------------------------------------------


def test_rarest_first_chunks_only_one_source_holds_go_first() -> None:
    s = swarm_of(40, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(40), 0.0)
    s.add_source("b", range(20), 0.0)
    s.add_source("c", range(20), 0.0)
    by_source = {r.source: r for r in s.next_requests(0.0)}
    assert by_source["a"].first == 20  # held by a alone
    assert {by_source["b"].first, by_source["c"].first} == {0, 4}


def test_rarest_first_order_follows_the_holders_count() -> None:
    s = swarm_of(6, min_in_flight=8, max_in_flight=8, initial_run_chunks=1)
    for source, have in (("a", every(6)), ("b", [0, 1, 2, 3]), ("c", [0, 1]), ("d", [0])):
        s.add_source(source, have, 0.0)
    issued = [(r.source, r.first, r.duplicate) for r in s.next_requests(0.0)]
    # holders: 0 -> 4, 1 -> 3, 2 and 3 -> 2, 4 and 5 -> 1 (a alone); each source takes
    # the rarest it can, one request per round; then endgame copies, least asked first
    assert issued == [
        ("a", 4, False),
        ("b", 2, False),
        ("c", 1, False),
        ("d", 0, False),
        ("a", 5, False),
        ("b", 3, False),
        ("c", 0, True),
        ("a", 2, True),
        ("b", 1, True),
        ("a", 3, True),
    ]
    assert s.statistics().endgame


def test_the_window_keeps_requests_near_the_lowest_missing_chunk() -> None:
    s = swarm_of(100, window_chunks=10, initial_run_chunks=2)
    s.add_source("a", every(100), 0.0)
    s.add_source("rare", [90], 0.0)  # 90 is rarer, but outside the window of a
    reqs = s.next_requests(0.0)
    assert sorted(r.first for r in reqs if r.source == "a") == [0, 2, 4, 6]
    assert [r.first for r in reqs if r.source == "rare"] == [90]  # beyond: all it has


def test_a_source_still_pulling_is_asked_for_what_it_gains() -> None:
    s = swarm_of(8, initial_run_chunks=1)
    s.add_source("peer", (), 0.0)
    assert s.next_requests(0.0) == []
    assert s.stalled()
    s.have("peer", [3, 5], 1.0)
    assert sorted(r.first for r in s.next_requests(1.0)) == [3, 5]
    s.have("nobody", [1], 1.0)  # unknown source: ignored


def test_resume_asks_only_for_what_is_missing() -> None:
    s = Swarm(10 * CHUNK_BYTES, verified=[0, 1, 2, 5, 5])
    assert s.statistics().verified == 4
    assert s.missing() == [3, 4, 6, 7, 8, 9]
    s.add_source("a", every(10), 0.0)
    chunks = sorted(i for r in s.next_requests(0.0) for i in r.chunks)
    assert chunks == [3, 4, 6, 7, 8, 9]
    assert s.is_verified(5) and not s.is_verified(3)


# -- answers -----------------------------------------------------------------------------


def test_chunks_left_out_of_an_answer_are_asked_again() -> None:
    s = swarm_of(4, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(4), 0.0)
    (r,) = s.next_requests(0.0)
    d = s.delivered(r, {0: True, 1: True}, 0.01)
    assert d.accepted == (0, 1)
    (again,) = s.next_requests(0.01)
    assert list(again.chunks) == [2, 3]


def test_a_stale_answer_is_ignored() -> None:
    s = swarm_of(4)
    s.add_source("a", every(4), 0.0)
    (r,) = s.next_requests(0.0)
    assert s.remove_source("a", 1.0) == [r]
    assert s.delivered(r, ok(r), 2.0) == Delivery((), ())
    assert s.failed(r, 2.0) == Delivery((), ())
    assert s.remove_source("a", 2.0) == []
    assert s.statistics().verified == 0


def test_a_failed_request_is_put_back_and_three_in_a_row_drop_the_source() -> None:
    s = swarm_of(4, initial_run_chunks=1, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(4), 0.0)
    for now in (1.0, 2.0):
        (r,) = s.next_requests(now)
        assert r.first == 0  # put back: asked again
        assert s.failed(r, now) == Delivery((), ())
    (r,) = s.next_requests(3.0)
    s.delivered(r, ok(r), 3.5)  # a success resets the count
    for now in (4.0, 5.0):
        (r,) = s.next_requests(now)
        assert s.failed(r, now).dropped == ()
    (r,) = s.next_requests(6.0)
    assert s.failed(r, 6.0).dropped == ("a",)
    assert s.next_requests(6.0) == [] and s.stalled()
    assert not s.add_source("a", every(4), 7.0)
    assert [x.dropped for x in s.statistics().sources] == [True]


def test_a_removed_source_gives_its_requests_back_to_the_others() -> None:
    s = swarm_of(32, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(32), 0.0)
    s.add_source("b", every(32), 0.0)
    reqs = s.next_requests(0.0)
    ra = next(r for r in reqs if r.source == "a")
    rb = next(r for r in reqs if r.source == "b")
    assert s.remove_source("a", 1.0) == [ra]
    s.delivered(rb, ok(rb), 1.0)
    (again,) = s.next_requests(1.0)
    assert again.source == "b" and again.first == ra.first


# -- bad chunks --------------------------------------------------------------------------


def test_a_bad_chunk_is_asked_of_another_source_and_strikes_its_sender() -> None:
    s = swarm_of(8, min_in_flight=1, max_in_flight=1, initial_run_chunks=2)
    s.add_source("liar", every(8), 0.0)
    s.add_source("good", every(8), 0.0)
    reqs = {r.source: r for r in s.next_requests(0.0)}
    liar = reqs["liar"]
    d = s.delivered(liar, {liar.first: True, liar.first + 1: False}, 1.0)
    assert d.accepted == (liar.first,)
    s.delivered(reqs["good"], ok(reqs["good"]), 1.0)
    nxt = {r.source: r for r in s.next_requests(1.0)}
    assert liar.first + 1 in nxt["good"].chunks
    assert liar.first + 1 not in nxt["liar"].chunks
    stats = {x.source: x for x in s.statistics().sources}
    assert stats["liar"].strikes == 1 and s.statistics().bad_chunks == 1


def test_a_bad_chunk_only_its_sender_holds_is_asked_of_it_again() -> None:
    s = swarm_of(1)
    s.add_source("only", [0], 0.0)
    (r,) = s.next_requests(0.0)
    s.delivered(r, {0: False}, 1.0)
    (again,) = s.next_requests(1.0)
    assert again.source == "only"
    assert s.delivered(again, {0: True}, 2.0).accepted == (0,)


def test_three_strikes_drop_a_source_and_abort_its_requests() -> None:
    s = swarm_of(64, initial_run_chunks=1)
    s.add_source("liar", every(64), 0.0)
    s.add_source("good", every(64), 0.0)
    mine = [r for r in s.next_requests(0.0) if r.source == "liar"]
    assert len(mine) == 4
    for r in mine[:2]:
        assert s.delivered(r, {r.first: False}, 1.0).dropped == ()
    d = s.delivered(mine[2], {mine[2].first: False}, 1.0)
    assert d.dropped == ("liar",)
    assert set(d.cancel) == {mine[3]}
    assert in_flight(s)["liar"] == 0
    assert all(r.source == "good" for r in s.next_requests(1.0))
    s.remove_source("liar", 2.0)  # (already gone)
    assert not s.add_source("liar", every(64), 2.0)


def test_strikes_survive_a_remove_and_re_add() -> None:
    s = swarm_of(8, initial_run_chunks=1, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(8), 0.0)
    (r,) = s.next_requests(0.0)
    s.delivered(r, {r.first: False}, 1.0)
    s.remove_source("a", 1.0)
    s.add_source("a", every(8), 2.0)
    assert s.statistics().sources[0].strikes == 1


def test_a_source_that_lies_about_every_chunk_is_dropped_and_the_file_completes() -> None:
    s = swarm_of(200)
    bad = {"liar": set(range(200))}
    written, _ = simulate(s, {"liar": 500 * MB, "good": 50 * MB}, bad=bad)
    assert set(written.values()) == {"good"}
    assert {x.source: x.dropped for x in s.statistics().sources} == {"liar": True, "good": False}


# -- endgame -----------------------------------------------------------------------------


def test_endgame_asks_twice_and_the_first_answer_wins() -> None:
    s = swarm_of(4, initial_run_chunks=4, min_in_flight=1, max_in_flight=1)
    s.add_source("slow", every(4), 0.0)
    (r_slow,) = s.next_requests(0.0)
    s.add_source("fast", every(4), 1.0)
    (r_fast,) = s.next_requests(1.0)
    assert r_fast.duplicate and r_fast.chunks == r_slow.chunks
    assert s.statistics().endgame
    assert s.next_requests(1.0) == []  # two copies at most, one per source
    d = s.delivered(r_fast, ok(r_fast), 2.0)
    assert d.accepted == (0, 1, 2, 3) and d.cancel == (r_slow,)
    assert s.done() and s.statistics().duplicates == 1
    assert s.delivered(r_slow, ok(r_slow), 9.0) == Delivery((), ())


def test_a_partly_answered_duplicate_keeps_going() -> None:
    s = swarm_of(4, initial_run_chunks=4, min_in_flight=1, max_in_flight=1)
    s.add_source("a", every(4), 0.0)
    (ra,) = s.next_requests(0.0)
    s.add_source("b", every(4), 0.0)
    (rb,) = s.next_requests(0.0)
    d = s.delivered(ra, {0: True, 1: True}, 1.0)
    assert d.cancel == ()
    d = s.delivered(rb, ok(rb), 1.5)
    assert d.accepted == (2, 3)  # 0 and 1 were written already


# -- many sources, simulated clock -------------------------------------------------------


def test_sources_share_the_work_by_their_speed() -> None:
    s = swarm_of(1200)
    rates = {"a": 100 * MB, "b": 50 * MB, "c": 25 * MB}
    written, finished = simulate(s, rates)
    assert sorted(written) == list(range(1200))
    share = {k: sum(v == k for v in written.values()) / 1200 for k in rates}
    assert share["a"] == pytest.approx(4 / 7, abs=0.05)
    assert share["b"] == pytest.approx(2 / 7, abs=0.05)
    assert share["c"] == pytest.approx(1 / 7, abs=0.05)
    ideal = s.size / sum(rates.values())
    assert finished < ideal * 1.1
    rate = {x.source: x.bytes_per_s for x in s.statistics().sources}
    assert rate["a"] == pytest.approx(100 * MB, rel=0.1)
    assert rate["c"] == pytest.approx(25 * MB, rel=0.1)


def test_a_slow_source_does_not_hold_up_the_end() -> None:
    s = swarm_of(300)
    rates = {"fast": 100 * MB, "crawl": 1 * MB}
    _, finished = simulate(s, rates)
    # without endgame copies the crawling source's last requests would take seconds
    assert finished < s.size / (101 * MB) * 1.2
    assert s.statistics().duplicates > 0


def test_a_fan_out_partial_holders_complete_each_other() -> None:
    s = swarm_of(300)
    holdings = {"a": range(0, 150), "b": range(100, 300), "c": range(0, 300, 2)}
    written, _ = simulate(s, dict.fromkeys(holdings, 50 * MB), holdings=holdings)
    assert sorted(written) == list(range(300))
    assert set(written.values()) == {"a", "b", "c"}


def test_decisions_are_fast_enough_for_a_large_file() -> None:
    # 8 GiB from 3 sources: the simulated pull must not take long in real time
    s = swarm_of(8192)
    written, _ = simulate(s, {"a": 100 * MB, "b": 100 * MB, "c": 100 * MB})
    assert len(written) == 8192


# -- any order of events -----------------------------------------------------------------


class SwarmMachine(RuleBasedStateMachine):
    """Random joins, leaves, gains, answers (good, bad, partial), failures and time; an
    honest source that holds everything stays. Whatever happens, a bounded drive at the
    end completes the file, each chunk accepted once."""

    CHUNKS = 40

    @initialize(
        min_in_flight=st.integers(1, 4),
        extra=st.integers(0, 4),
        run=st.integers(1, 16),
        window=st.integers(1, 50),
    )
    def start(self, min_in_flight: int, extra: int, run: int, window: int) -> None:
        tuning = Tuning(
            min_in_flight=min_in_flight,
            max_in_flight=min_in_flight + extra,
            initial_run_chunks=run,
            window_chunks=window,
        )
        self.swarm = Swarm(self.CHUNKS * CHUNK_BYTES - 7, tuning=tuning)
        self.now = 0.0
        self.outstanding: dict[int, Request] = {}
        self.written: set[int] = set()
        self.liars: set[str] = set()
        self.swarm.add_source("honest", every(self.CHUNKS), self.now)

    def _apply(self, d: Delivery) -> None:
        for i in d.accepted:
            assert i not in self.written, f"chunk {i} accepted twice"
            self.written.add(i)
        for r in d.cancel:
            self.outstanding.pop(r.serial)

    @rule(
        source=st.sampled_from(["p", "q", "r"]),
        have=st.sets(st.integers(0, CHUNKS - 1)),
        liar=st.booleans(),
    )
    def join(self, source: str, have: set[int], liar: bool) -> None:
        if self.swarm.add_source(source, have, self.now) and liar:
            self.liars.add(source)

    @rule(source=st.sampled_from(["p", "q", "r"]), have=st.sets(st.integers(0, CHUNKS - 1)))
    def gains(self, source: str, have: set[int]) -> None:
        self.swarm.have(source, have, self.now)

    @rule(source=st.sampled_from(["p", "q", "r"]))
    def leaves(self, source: str) -> None:
        for r in self.swarm.remove_source(source, self.now):
            self.outstanding.pop(r.serial)

    @rule(dt=st.floats(0.0, 2.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule()
    def ask(self) -> None:
        for r in self.swarm.next_requests(self.now):
            assert r.serial not in self.outstanding
            assert 1 <= r.count <= self.swarm.tuning.max_run_chunks
            assert r.first + r.count <= self.CHUNKS
            assert not any(self.swarm.is_verified(i) for i in r.chunks)
            self.outstanding[r.serial] = r

    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data(), kind=st.sampled_from(["good", "partial", "failed"]))
    def answer(self, data: st.DataObject, kind: str) -> None:
        serial = data.draw(st.sampled_from(sorted(self.outstanding)))
        r = self.outstanding.pop(serial)
        if kind == "failed" and r.source != "honest":  # (the honest one stays reachable)
            self._apply(self.swarm.failed(r, self.now))
            return
        results = self._results(r)
        if kind == "partial":
            results = dict(list(results.items())[: data.draw(st.integers(0, r.count))])
        self._apply(self.swarm.delivered(r, results, self.now))

    def _results(self, r: Request) -> dict[int, bool]:
        return dict.fromkeys(r.chunks, r.source not in self.liars)

    @invariant()
    def within_the_caps(self) -> None:
        if not hasattr(self, "swarm"):
            return
        stats = self.swarm.statistics()
        assert stats.in_flight == len(self.outstanding)
        for x in stats.sources:
            assert x.in_flight <= self.swarm.tuning.max_in_flight
            if x.strikes >= 3:
                assert x.dropped  # a repeat offender is gone for this download
            if x.strikes:
                assert x.source in self.liars  # and only a liar takes a strike
        assert "honest" not in {x.source for x in stats.sources if x.dropped}
        assert stats.verified == len(self.written)

    def teardown(self) -> None:
        if not hasattr(self, "swarm"):
            return
        for _ in range(10_000):
            if self.swarm.done():
                break
            self.ask()
            assert self.outstanding, "stalled with an honest source holding everything"
            serial = min(self.outstanding)
            r = self.outstanding.pop(serial)
            self.now += 0.01
            self._apply(self.swarm.delivered(r, self._results(r), self.now))
        assert self.swarm.done()
        assert self.written == set(range(self.CHUNKS))
        for x in self.swarm.statistics().sources:
            if x.source in self.liars and x.delivered == 0 and x.strikes >= 3:
                assert x.dropped


TestSwarmMachine = SwarmMachine.TestCase
TestSwarmMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_salt_gives_each_pull_its_own_order_among_equally_rare_chunks() -> None:
    """Pullers starting together from one seed must not all ask for chunk 0 first, or
    none would ever hold a chunk the others lack."""
    firsts = set()
    for salt in range(8):
        swarm = Swarm(64 * CHUNK_BYTES, salt=salt * 7919)
        swarm.add_source("seed", range(64), 0.0)
        firsts.add(swarm.next_requests(0.0)[0].first)
    assert len(firsts) >= 4, firsts
    plain = Swarm(64 * CHUNK_BYTES)
    plain.add_source("seed", range(64), 0.0)
    assert plain.next_requests(0.0)[0].first == 0
