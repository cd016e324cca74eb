"""The executor: open an answer from the best target, falling back to the next.

An answer is the client's from its first byte on: a stream's first chunk, or the whole
of any other answer. Until then nothing has reached the client, so a target that fails
(cannot connect, reset, a timeout or a stall, a peer lost and its links closed, or a
5xx answer) is skipped for the next one; all but the 5xx are blamed (a local backend is
marked down, a peer suspect). No attempt starts after the overall deadline
(`routing.retry_deadline_s`, counted from the request's arrival); an attempt under way
is bounded by the transport's timeouts instead (`limits.read_timeout_s` for the first
byte, `limits.stall_timeout_s` between chunks) and by its peer's liveness. Once an
answer is open it is the caller's to relay; `Dispatcher.open` closes it and releases
every count on exit, whatever happens. The counts are the load ledger's; the story of
each request is published as events: `RequestRouted` when a target's first byte is in,
`RequestFirstByte` when the relay sends the first byte, `RequestFinished` with its
outcome and timings.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson

from shoal.backends.base import Operation, Upstream
from shoal.errors import (
    BackendUnavailable,
    ShoalError,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
)
from shoal.events import (
    EventBus,
    Outcome,
    RequestFinished,
    RequestFirstByte,
    RequestRouted,
    Route,
)
from shoal.protocol import error_message, usage_counts
from shoal.routing.admission import AdmissionQueue, PoolKey, free_slots, with_room_first
from shoal.routing.ledger import LoadLedger, Slot
from shoal.routing.rank import HopPolicy
from shoal.routing.router import Router, Target
from shoal.routing.scheduler import Ticket

log = logging.getLogger(__name__)

_CLIENT_GONE = 499  # nginx's code for "the client closed the connection"
_SSE = "text/event-stream"


class Answer:
    """An answer whose first byte is in, held for the relay. Implements `Upstream`.

    `streamed`: a 200 event stream, of which the first chunk has been read (the rest is
    read as it is relayed, each chunk within the transport's stall timeout); any other
    answer has been read whole.
    """

    __slots__ = ("_first", "_rest", "_upstream", "streamed", "tail")

    def __init__(self, upstream: Upstream, first: bytes, rest: AsyncIterator[bytes] | None) -> None:
        self._upstream = upstream
        self._first = first
        self._rest = rest
        self.streamed = rest is not None
        # The end of the answer, once relayed: where its usage is (the whole of an answer
        # read at once; a stream's last two chunks, its usage event and `[DONE]`).
        self.tail = b"" if self.streamed else first

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    @property
    def status(self) -> int:
        return self._upstream.status

    @property
    def content_type(self) -> str:
        return self._upstream.content_type

    @property
    def served_by(self) -> str | None:
        return self._upstream.served_by

    @classmethod
    async def first_byte_of(cls, upstream: Upstream) -> Answer:
        """Wait for the answer's first byte. Raises UpstreamFailed / UpstreamTimeout."""
        if upstream.status == 200 and upstream.content_type.startswith(_SSE):
            chunks = upstream.chunks()
            return cls(upstream, await anext(chunks, b""), chunks)
        return cls(upstream, await upstream.read(), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        if self._rest is not None:
            before = last = self._first
            async for chunk in self._rest:
                before, last = last, chunk
                yield chunk
            self.tail = before + last

    async def read(self) -> bytes:
        if self._rest is None:
            return self._first
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        self._upstream.close()


@dataclass(slots=True)
class Opened:
    upstream: Upstream  # as the target answered
    answer: Answer  # the same, its first byte in: what the relay reads
    target: Target
    retried: bool
    request_id: int
    started: float  # monotonic, when the request reached the dispatcher
    _slot: Slot
    _bus: EventBus
    first_byte_s: float | None = None
    broken: bool = field(default=False)

    @property
    def route(self) -> Route:
        return "retried" if self.retried else self.target.route

    def first_byte(self) -> None:
        """The relay sent the answer's first byte to the client (called once or more)."""
        if self.first_byte_s is None:
            self.first_byte_s = time.monotonic() - self.started
            if self._bus.wants(RequestFirstByte):
                self._bus.publish(RequestFirstByte(self.request_id, self.first_byte_s))

    def broke(self) -> None:
        """The stream had started and ended with an error event."""
        self.broken = True


class Dispatcher:
    def __init__(
        self,
        router: Router,
        ledger: LoadLedger,
        bus: EventBus,
        *,
        deadline_s: float,
        admission: AdmissionQueue | None = None,
    ) -> None:
        self._router = router
        self._ledger = ledger
        self._bus = bus
        self._deadline_s = deadline_s
        self._admission = admission
        self._ids = itertools.count(1)

    @asynccontextmanager
    async def open(
        self,
        op: Operation,
        model: str,
        body: bytes,
        policy: HopPolicy,
        *,
        cls: str | None = None,
        weight: float | None = None,
    ) -> AsyncIterator[Opened]:
        """The answer of the best target that gives one. `cls` and `weight`: the
        request's class when it must queue (an API key's; else this node's clients, or
        peers' for a forwarded request)."""
        request_id, started = next(self._ids), time.monotonic()
        self._ledger.request_started()
        opened: Opened | None = None
        outcome: Outcome = "failed"
        status = 500
        admission, ticket = self._admission, None
        pool: PoolKey = ()
        try:
            targets = self._router.route(op, model, policy)
            if admission is not None:
                pool = (model, op.value, policy.pinned or "")
                if not admission.may_start(pool, targets):
                    ticket = await self._queued(admission, pool, op, model, policy, cls, weight)
                    targets = self._router.route(op, model, policy)
                    admission.dispatched(pool, ticket)  # the ledger counts it from here on
                targets = with_room_first(targets)
            opened = await self._open_first(request_id, started, op, model, body, policy, targets)
            try:
                yield opened
            finally:
                opened.upstream.close()
                opened._slot.release()
            status = opened.upstream.status
            outcome = "broken" if opened.broken else "error" if status >= 400 else "ok"
        except ShoalError as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionError):  # the client went away
            outcome, status = "cancelled", _CLIENT_GONE
            raise
        finally:
            self._ledger.request_finished()
            if admission is not None:  # a slot may be free: the next one waiting takes it
                if ticket is not None:
                    admission.done(pool, ticket)
                    self._ledger.queued = admission.queued()
                admission.changed()
            if self._bus.wants(RequestFinished):
                self._finished(request_id, started, op, model, opened, outcome, status)

    async def _queued(
        self,
        admission: AdmissionQueue,
        pool: PoolKey,
        op: Operation,
        model: str,
        policy: HopPolicy,
        cls: str | None,
        weight: float | None,
    ) -> Ticket:
        """Wait for a slot anywhere (429 if none comes in time, or the queue is full)."""

        def free() -> int:
            return free_slots(self._router.route(op, model, policy))

        if policy.forwarded:
            cls, weight = "peer", None
        scope = ("hop" if policy.forwarded else "", "local" if policy.local_only else "")
        self._ledger.queued = admission.queued() + 1
        try:
            return await admission.wait(pool, cls or "local", free, scope, weight)
        finally:
            self._ledger.queued = admission.queued()

    def _finished(
        self,
        request_id: int,
        started: float,
        op: Operation,
        model: str,
        opened: Opened | None,
        outcome: Outcome,
        status: int,
    ) -> None:
        usage = usage_counts(opened.answer.tail) if opened and outcome == "ok" else None
        self._bus.publish(
            RequestFinished(
                request_id,
                op,
                model,
                route=opened.route if opened else None,
                target=opened.target.name if opened else None,
                status=status,
                outcome=outcome,
                first_byte_s=opened.first_byte_s if opened else None,
                total_s=time.monotonic() - started,
                node_id=opened.target.candidate.node_id if opened else None,
                tokens_in=usage[0] if usage else None,
                tokens_out=usage[1] if usage else None,
            )
        )

    async def _open_first(
        self,
        request_id: int,
        started: float,
        op: Operation,
        model: str,
        body: bytes,
        policy: HopPolicy,
        targets: list[Target],
    ) -> Opened:
        deadline = started + self._deadline_s
        failure: ShoalError | None = None
        for attempt, target in enumerate(targets):
            if attempt and time.monotonic() >= deadline:
                break
            slot = self._ledger.hold(target.route, target.candidate.key, target.model)
            try:
                outcome = await _first_byte(target, op, _for_target(body, model, target.model))
            except (BackendUnavailable, UpstreamError) as exc:
                outcome = exc
                target.failed(exc)
            except BaseException:
                slot.release()  # cancelled while waiting for the answer
                raise
            if isinstance(outcome, Answer):
                opened = Opened(
                    outcome.upstream,
                    outcome,
                    target,
                    attempt > 0,
                    request_id,
                    started,
                    slot,
                    self._bus,
                )
                self._routed(opened, op, model, attempt)
                return opened
            slot.release()  # failed: the next target gets the request
            failure = outcome
            log.warning("%s %s failed: %s", target.route, target.name, failure.message)
        assert failure is not None
        raise failure

    def _routed(self, opened: Opened, op: Operation, model: str, attempt: int) -> None:
        if self._bus.wants(RequestRouted):
            target = opened.target
            self._bus.publish(
                RequestRouted(
                    opened.request_id,
                    op,
                    model,
                    target.name,
                    target.candidate.node_id,
                    opened.route,
                    attempt,
                )
            )


def _for_target(body: bytes, requested: str, served_as: str) -> bytes:
    """The body as the target must see it: re-encoded only when an alias renames the model."""
    if served_as == requested:
        return body
    document = orjson.loads(body)
    document["model"] = served_as
    return orjson.dumps(document)


async def _first_byte(target: Target, op: Operation, body: bytes) -> Answer | ShoalError:
    """Send to `target` and wait for its answer's first byte.

    A 5xx answer comes back as the error to report if no target succeeds: the target
    answered, so it is not blamed. A transport failure raises. Whatever was opened is
    closed unless it is returned as an `Answer`.
    """
    upstream = await target.send(op, body)
    answer: Answer | None = None
    try:
        if upstream.status >= 500:
            return await _server_error(upstream)
        answer = await Answer.first_byte_of(upstream)
        return answer
    finally:
        if answer is None:
            upstream.close()


async def _server_error(upstream: Upstream) -> ShoalError:
    """A 5xx answer, read, as the error to report if no target succeeds."""
    try:
        raw = await upstream.read()
    except UpstreamError as exc:
        return exc
    message = f"the backend answered {upstream.status}"
    detail = error_message(raw)
    if detail:
        message += f": {detail}"
    if upstream.status == 503:
        return BackendUnavailable(message, retry_after=2)
    if upstream.status == 504:
        return UpstreamTimeout(message)
    return UpstreamFailed(message)
