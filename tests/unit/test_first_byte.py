"""`Dispatcher.open` waits for an answer's first byte before handing it over (issue 9,
item 11): a failure until then goes to the next target, within the retry deadline; a
failure after it is the relay's to report. Counts and closes stay balanced."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shoal.errors import ShoalError, UpstreamFailed, UpstreamTimeout
from tests.unit.test_dispatch import ANYWHERE, BODY, CHAT, FakeUpstream, in_flight, make


class FakeStream:
    """A 200 event stream: `chunks` as they come, then `error` if set."""

    def __init__(self, chunks: list[bytes], error: ShoalError | None = None) -> None:
        self.status = 200
        self.content_type = "text/event-stream"
        self.served_by: str | None = None
        self._chunks = chunks
        self._error = error
        self.closed = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._error is not None:
            raise self._error

    async def read(self) -> bytes:
        raise AssertionError("a stream is relayed chunk by chunk, never read whole")

    def close(self) -> None:
        self.closed += 1


STALLED = UpstreamTimeout("the backend stopped sending for 20 s (stall timeout)")


async def test_an_answer_that_stalls_before_its_end_goes_to_the_next_target() -> None:
    stalled = FakeUpstream(200, read_error=STALLED)
    good = FakeUpstream(200, b'{"ok": 1}')
    dispatcher, _, backends, entries = make(stalled, good)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is good
        assert opened.route == "retried"
        assert await opened.answer.read() == b'{"ok": 1}'
        assert stalled.closed == 1
        assert [in_flight(dispatcher, e) for e in entries] == [0, 1]
    assert good.closed == 1
    assert [len(b.sent) for b in backends] == [1, 1]


async def test_a_stream_that_breaks_before_its_first_chunk_goes_to_the_next_target() -> None:
    broken = FakeStream([], UpstreamFailed("the backend broke off its answer"))
    good = FakeStream([b"data: 1\n\n", b"data: 2\n\n"])
    dispatcher, _, _, entries = make(broken, good)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is good
        assert opened.answer.streamed
        assert [c async for c in opened.answer.chunks()] == [b"data: 1\n\n", b"data: 2\n\n"]
        assert broken.closed == 1
    assert good.closed == 1
    assert [in_flight(dispatcher, e) for e in entries] == [0, 0]


async def test_a_stream_that_breaks_after_its_first_chunk_is_the_relays_to_report() -> None:
    midway = FakeStream([b"data: 1\n\n"], STALLED)
    other = FakeStream([b"data: x\n\n"])
    dispatcher, _, backends, _ = make(midway, other)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.upstream is midway
        chunks = opened.answer.chunks()
        assert await anext(chunks) == b"data: 1\n\n"
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
    assert midway.closed == 1
    assert not backends[1].sent  # the client had a byte: never sent twice


async def test_no_retry_starts_after_the_deadline_even_for_a_stall() -> None:
    stalled = FakeUpstream(200, read_error=STALLED)
    good = FakeUpstream(200)
    dispatcher, _, backends, entries = make(stalled, good, deadline_s=0)
    with pytest.raises(UpstreamTimeout):
        async with dispatcher.open(CHAT, "m", BODY, ANYWHERE):
            pass
    assert [len(b.sent) for b in backends] == [1, 0]
    assert stalled.closed == 1
    assert [in_flight(dispatcher, e) for e in entries] == [0, 0]


async def test_an_empty_stream_is_handed_over_empty() -> None:
    empty = FakeStream([])
    dispatcher, _, _, _ = make(empty)
    async with dispatcher.open(CHAT, "m", BODY, ANYWHERE) as opened:
        assert opened.answer.streamed
        assert [c async for c in opened.answer.chunks()] == []
    assert empty.closed == 1
