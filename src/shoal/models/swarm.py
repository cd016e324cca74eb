"""What to ask of which peer, for one file pulled from several at once: a sans-I/O scheduler.

Theory of operation
-------------------
`Swarm` does no I/O and reads no clock. A file is `ceil(size / chunk_bytes)` chunks. A
driver tells it which sources (peers) have which chunks (`add_source`, `have`: a source
may itself still be pulling and gain chunks), asks `next_requests(now)` what to send, and
reports each answer: `delivered(request, results, now)` with, per chunk, whether its
SHA-256 matched the manifest (a chunk left out of `results` did not arrive), or
`failed(request, now)` (reset, timeout). `delivered` answers with the chunks to write (each
chunk is accepted once, so none is ever written twice) and the requests to abort.

    chunk:  MISSING ──requested──► IN FLIGHT ──verified──► VERIFIED
               ▲                      │ bad hash, failed,
               └──────────────────────┘ source removed or dropped

Choosing, per source with room (fastest first, one request each per round):
- a request is a run of up to 16 contiguous chunks (the server's Range limit), sized so
  it lasts about `request_target_s` at the source's estimated rate: a slow source gets
  small runs and cannot hold a large part of the file hostage;
- 4 to 8 requests in flight per source: more for a fast one, enough to keep its link
  busy for `pipeline_target_s` while answers travel;
- rarest first (fewest live holders, then lowest index, or an order of the pull's own
  with a `salt`) within a window of
  `window_chunks` ahead of the lowest missing chunk, so rare chunks spread before their
  only holder leaves and the file fills roughly front to back; beyond the window only
  when the source has nothing in it;
- endgame: once every missing chunk is in flight, a source with room asks again for
  chunks already in flight elsewhere (at most `endgame_copies` requests per chunk); the
  first answer wins and the others are returned to abort;
- a chunk whose hash does not match is asked again of another holder (the same one only
  if no other has it) and its source takes a strike; at `strikes_to_drop` strikes, or
  `failures_to_drop` failed requests in a row, the source is dropped for this download
  (it cannot come back by `add_source`); its requests are put back.

The throughput estimate is an EWMA of bytes/s per source. With requests pipelined, an
answer's time is counted from the later of its sending and the source's previous answer,
which measures the source's rate rather than the depth of its queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

CHUNK_BYTES: Final = 1 << 20  # DESIGN.md §6: manifests hash every 1 MiB
MAX_RUN_CHUNKS: Final = 16  # the serving side's Range limit (DESIGN.md §6)
_MIN_SAMPLE_S: Final = 1e-3
_MASK_64: Final = (1 << 64) - 1


@dataclass(frozen=True)
class Tuning:
    min_in_flight: int = 4  # requests per source: enough to hide a LAN round trip
    max_in_flight: int = 8  # more only queues at the source and delays the endgame
    max_run_chunks: int = MAX_RUN_CHUNKS
    # A source with no estimate yet: 4 MiB, long enough to measure, short if it is slow.
    initial_run_chunks: int = 4
    # 512 MiB: larger than 8 × 16 MiB in flight from 3 sources, so the window never
    # starves a swarm, small enough that the file fills roughly in order.
    window_chunks: int = 512
    request_target_s: float = 0.25  # a request's duration at the source's rate, seconds
    pipeline_target_s: float = 1.0  # seconds of a source's rate kept in flight
    ewma_weight: float = 0.3  # of the newest throughput sample
    strikes_to_drop: int = 3  # bad chunks: one may be a flipped bit in transit, three is a liar
    failures_to_drop: int = 3  # failed requests in a row
    endgame_copies: int = 2  # requests at once for one chunk, in the endgame

    def __post_init__(self) -> None:
        if not 1 <= self.min_in_flight <= self.max_in_flight:
            raise ValueError("need 1 <= min_in_flight <= max_in_flight")
        if not 1 <= self.initial_run_chunks <= self.max_run_chunks:
            raise ValueError("need 1 <= initial_run_chunks <= max_run_chunks")
        if self.window_chunks < 1 or self.strikes_to_drop < 1 or self.failures_to_drop < 1:
            raise ValueError("window_chunks, strikes_to_drop and failures_to_drop must be >= 1")
        if self.request_target_s <= 0 or self.pipeline_target_s <= 0:
            raise ValueError("request_target_s and pipeline_target_s must be > 0")
        if not 0 < self.ewma_weight <= 1 or self.endgame_copies < 1:
            raise ValueError("need 0 < ewma_weight <= 1 and endgame_copies >= 1")


@dataclass(frozen=True, slots=True)
class Request:
    """Chunks `first` … `first + count - 1` of the file, asked of `source`."""

    serial: int
    source: str
    first: int
    count: int
    sent_at: float
    duplicate: bool  # an endgame copy of chunks already asked of another source

    @property
    def chunks(self) -> range:
        return range(self.first, self.first + self.count)

    def byte_range(self, chunk_bytes: int, size: int) -> tuple[int, int]:
        """The HTTP Range, first and last byte inclusive."""
        return self.first * chunk_bytes, min(size, (self.first + self.count) * chunk_bytes) - 1


@dataclass(frozen=True, slots=True)
class Delivery:
    accepted: tuple[int, ...]  # chunks verified for the first time: write these
    cancel: tuple[Request, ...]  # requests to abort: answered elsewhere, or source dropped
    dropped: tuple[str, ...] = ()  # sources dropped for this download by this report


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    source: str
    chunks: int  # chunks it holds (as announced)
    delivered: int  # chunks it gave that were accepted
    bytes_per_s: float | None
    in_flight: int
    strikes: int
    dropped: bool


@dataclass(frozen=True, slots=True)
class SwarmStatistics:
    chunks: int
    verified: int
    in_flight: int  # requests
    endgame: bool
    requests: int  # issued in all
    duplicates: int  # endgame copies issued
    cancelled: int  # requests returned to abort
    bad_chunks: int
    sources: tuple[SourceStatistics, ...]


@dataclass(slots=True)
class _Source:
    id: str
    have: set[int]
    rate: float | None = None
    in_flight: dict[int, Request] = field(default_factory=dict)
    asked: dict[int, int] = field(default_factory=dict)  # chunk -> its requests in flight here
    strikes: int = 0
    failures: int = 0
    delivered: int = 0
    last_answer_at: float | None = None
    dropped: bool = False


class Swarm:
    def __init__(
        self,
        size: int,
        chunk_bytes: int = CHUNK_BYTES,
        *,
        verified: Iterable[int] = (),
        tuning: Tuning = Tuning(),
        salt: int | None = None,
    ) -> None:
        """`salt`: break ties between equally rare chunks in an order of its own (a
        random one per pull), not lowest first: pullers that start together then ask
        the seed for different chunks, and have chunks to give each other."""
        if size < 0 or chunk_bytes < 1:
            raise ValueError("need size >= 0 and chunk_bytes >= 1")
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.chunk_count = -(-size // chunk_bytes)
        self.tuning = tuning
        self._salt = salt
        n = self.chunk_count
        self._verified = bytearray(n)
        self._holders = [0] * n  # live sources holding each chunk
        self._asked = [0] * n  # requests in flight for each chunk
        self._refused: dict[int, set[str]] = {}  # chunk -> sources that sent it bad
        self._sources: dict[str, _Source] = {}
        self._dropped: dict[str, _Source] = {}
        # Sources removed (gone from the mesh for now): their strikes stand if they come
        # back, and what they delivered still counts in the statistics.
        self._removed: dict[str, _Source] = {}
        self._requests: dict[int, Request] = {}
        self._serial = 0
        self._verified_count = 0
        self._idle = 0  # missing chunks some live source holds, with no request in flight
        self._low = 0  # every chunk below is verified
        self._issued = self._duplicates = self._cancelled = self._bad = 0
        for index in verified:
            self._check_index(index)
            if not self._verified[index]:
                self._verified[index] = 1
                self._verified_count += 1
        self._advance_low()

    # -- sources -----------------------------------------------------------------------

    def add_source(self, source: str, have: Iterable[int], now: float) -> bool:
        """A peer that holds `have`. False (ignored) if it was dropped for this download."""
        if source in self._dropped:
            return False
        if source not in self._sources:
            removed = self._removed.pop(source, None)
            src = self._sources[source] = _Source(source, set())
            if removed is not None:
                src.strikes, src.delivered = removed.strikes, removed.delivered
        self.have(source, have, now)
        return True

    def have(self, source: str, chunks: Iterable[int], now: float) -> None:
        """`source` now holds `chunks` too (it is pulling the file itself)."""
        src = self._sources.get(source)
        if src is None:
            return
        for index in chunks:
            self._check_index(index)
            if index not in src.have:
                was = self._is_idle(index)
                src.have.add(index)
                self._holders[index] += 1
                self._idle += self._is_idle(index) - was

    def remove_source(self, source: str, now: float) -> list[Request]:
        """The peer is gone (connection lost, left the mesh): its requests, to abort, are
        put back. It may be added again later."""
        src = self._sources.get(source)
        if src is None:
            return []
        outstanding = self._forget(src)
        src.have.clear()
        self._removed[source] = src
        return outstanding

    # -- requests ----------------------------------------------------------------------

    def next_requests(self, now: float) -> list[Request]:
        """Requests to send now. Call again after every report and every new source."""
        issued: list[Request] = []
        while not self.done():
            ready = sorted(
                (s for s in self._sources.values() if len(s.in_flight) < self._depth(s)),
                key=lambda s: (-(s.rate or 0.0), s.id),
            )
            round_ = [r for s in ready if (r := self._pick(s, now)) is not None]
            if not round_:
                break
            issued += round_
        return issued

    def delivered(self, request: Request, results: Mapping[int, bool], now: float) -> Delivery:
        """The answer to `request`: per chunk, True if its hash matched. A chunk left out
        did not arrive and is asked again."""
        if self._requests.get(request.serial) != request:
            return Delivery((), ())  # aborted or its source dropped: the answer is stale
        src = self._sources[request.source]
        self._retire(request, src)
        accepted: list[int] = []
        good_bytes = 0
        for index in request.chunks:
            ok = results.get(index)
            if ok is None:
                continue
            if not ok:
                self._bad += 1
                src.strikes += 1
                self._refused.setdefault(index, set()).add(src.id)
                continue
            good_bytes += self._chunk_size(index)
            if not self._verified[index]:
                was = self._is_idle(index)
                self._verified[index] = 1
                self._idle -= was
                self._verified_count += 1
                src.delivered += 1
                accepted.append(index)
                self._refused.pop(index, None)
        if good_bytes:
            src.failures = 0
            self._measure(src, request, good_bytes, now)
        self._advance_low()
        cancel = [
            r for r in list(self._requests.values()) if all(self._verified[i] for i in r.chunks)
        ]
        for r in cancel:
            self._retire(r, self._sources[r.source])
        self._cancelled += len(cancel)
        dropped: tuple[str, ...] = ()
        if src.strikes >= self.tuning.strikes_to_drop:
            cancel += self._drop(src)
            dropped = (src.id,)
        return Delivery(tuple(accepted), tuple(cancel), dropped)

    def failed(self, request: Request, now: float) -> Delivery:
        """`request` got no answer (reset, timeout): its chunks are put back."""
        if self._requests.get(request.serial) != request:
            return Delivery((), ())
        src = self._sources[request.source]
        self._retire(request, src)
        src.failures += 1
        if src.failures >= self.tuning.failures_to_drop:
            return Delivery((), tuple(self._drop(src)), (src.id,))
        return Delivery((), ())

    # -- queries -----------------------------------------------------------------------

    def done(self) -> bool:
        """Every chunk verified."""
        return self._verified_count == self.chunk_count

    def stalled(self) -> bool:
        """Not done, nothing in flight and (just after `next_requests`) nothing to ask:
        no live source holds what is missing."""
        return not self.done() and not self._requests

    def is_verified(self, index: int) -> bool:
        return bool(self._verified[index])

    def missing(self) -> list[int]:
        return [i for i in range(self._low, self.chunk_count) if not self._verified[i]]

    def statistics(self) -> SwarmStatistics:
        every = sorted(
            [*self._sources.values(), *self._dropped.values(), *self._removed.values()],
            key=lambda s: s.id,
        )
        return SwarmStatistics(
            chunks=self.chunk_count,
            verified=self._verified_count,
            in_flight=len(self._requests),
            endgame=self._idle == 0 and bool(self._requests) and not self.done(),
            requests=self._issued,
            duplicates=self._duplicates,
            cancelled=self._cancelled,
            bad_chunks=self._bad,
            sources=tuple(
                SourceStatistics(
                    s.id, len(s.have), s.delivered, s.rate, len(s.in_flight), s.strikes, s.dropped
                )
                for s in every
            ),
        )

    # -- choosing ----------------------------------------------------------------------

    def _depth(self, src: _Source) -> int:
        t = self.tuning
        if src.rate is None:
            return t.min_in_flight
        per_request = self._run_length(src) * self.chunk_bytes
        wanted = math.ceil(src.rate * t.pipeline_target_s / per_request)
        return max(t.min_in_flight, min(t.max_in_flight, wanted))

    def _run_length(self, src: _Source) -> int:
        t = self.tuning
        if src.rate is None:
            return t.initial_run_chunks
        fits = int(src.rate * t.request_target_s / self.chunk_bytes)
        return max(1, min(t.max_run_chunks, fits))

    def _eligible(self, src: _Source, index: int) -> bool:
        if index not in src.have or self._verified[index] or src.asked.get(index):
            return False
        refused = self._refused.get(index)
        if refused is None or src.id not in refused:
            return True
        # It sent this chunk bad: ask it again only if every live holder did too.
        return all(s.id in refused for s in self._sources.values() if index in s.have)

    def _pick(self, src: _Source, now: float) -> Request | None:
        endgame = self._idle == 0  # nothing a live source holds is left unasked
        limit = self.tuning.endgame_copies if endgame else 1

        def wanted(i: int) -> bool:
            return self._asked[i] < limit and self._eligible(src, i)

        window_end = min(self.chunk_count, self._low + self.tuning.window_chunks)
        first = self._rarest(src, range(self._low, window_end), wanted)
        if first is None:
            first = self._rarest(src, range(window_end, self.chunk_count), wanted)
        if first is None:
            return None
        count, run = 1, self._run_length(src)
        while count < run and first + count < self.chunk_count and wanted(first + count):
            count += 1
        self._serial += 1
        request = Request(self._serial, src.id, first, count, now, duplicate=endgame)
        self._requests[request.serial] = request
        src.in_flight[request.serial] = request
        for i in request.chunks:
            was = self._is_idle(i)
            self._asked[i] += 1
            self._idle -= was
            src.asked[i] = src.asked.get(i, 0) + 1
        self._issued += 1
        self._duplicates += endgame
        return request

    def _rarest(self, src: _Source, span: range, wanted: Callable[[int], bool]) -> int | None:
        best: int | None = None
        best_key = (0, 0, 0)
        salt = self._salt
        # Iterate the smaller of the span and the source's holdings.
        candidates: Iterable[int] = (
            span if len(span) <= len(src.have) else sorted(i for i in src.have if i in span)
        )
        for i in candidates:
            if wanted(i):
                tie = i if salt is None else ((i ^ salt) * 0x9E3779B97F4A7C15) & _MASK_64
                key = (self._asked[i], self._holders[i], tie)
                if best is None or key < best_key:
                    best, best_key = i, key
        return best

    # -- bookkeeping -------------------------------------------------------------------

    def _is_idle(self, index: int) -> bool:
        return not self._verified[index] and not self._asked[index] and self._holders[index] > 0

    def _retire(self, request: Request, src: _Source) -> None:
        del self._requests[request.serial]
        del src.in_flight[request.serial]
        for i in request.chunks:
            self._asked[i] -= 1
            self._idle += self._is_idle(i)
            left = src.asked[i] - 1
            if left:
                src.asked[i] = left
            else:
                del src.asked[i]

    def _forget(self, src: _Source) -> list[Request]:
        outstanding = list(src.in_flight.values())
        for r in outstanding:
            self._retire(r, src)
        del self._sources[src.id]
        for i in src.have:
            was = self._is_idle(i)
            self._holders[i] -= 1
            self._idle -= was and not self._is_idle(i)
        self._cancelled += len(outstanding)
        return outstanding

    def _drop(self, src: _Source) -> list[Request]:
        src.dropped = True
        self._dropped[src.id] = src
        return self._forget(src)

    def _measure(self, src: _Source, request: Request, good_bytes: int, now: float) -> None:
        since = request.sent_at
        if src.last_answer_at is not None:
            since = max(since, src.last_answer_at)
        src.last_answer_at = now
        # Under a millisecond is a clock's noise, not a measurement (and 0 would divide).
        sample = good_bytes / max(now - since, _MIN_SAMPLE_S)
        w = self.tuning.ewma_weight
        src.rate = sample if src.rate is None else src.rate + w * (sample - src.rate)

    def _advance_low(self) -> None:
        while self._low < self.chunk_count and self._verified[self._low]:
            self._low += 1

    def _chunk_size(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise ValueError(f"chunk {index} is not in 0..{self.chunk_count - 1}")
