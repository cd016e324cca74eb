"""The node's listeners, on the API port and the mutual-TLS peer port: each connection
admitted or refused before a byte is read, its request heads timed, and aiohttp's own
refusals of malformed requests answered in the API's error shape.

    accept ──► _Gate: book.admit(source) ──── refused ───► closed at once (counted; one
                         │ lease                             log line per 10 s at most)
      API port ──────────┼─────────────────────────────────► GuardedHandler(raw transport)
      peer port ─────────┴─► TLS handshake, within the ────► GuardedHandler(TLS transport)
                             header timeout

An admission may evict an older connection instead (`ConnectionBook`): each lease
carries the way to close its connection (`Lease.on_evict`, the raw transport's abort).
The decisions are `shoal.api.connections`' (`ConnectionBook`, `HeadClock`); this module
is the I/O around them. `GuardedHandler` is aiohttp's `web.RequestHandler` (one per
connection) with the lease, the head timer and JSON errors added. It learns that a
request head is complete, and that its answer is done, from the access middleware
(`handling(request)`): the one place every request passes once its head is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, TypedDict, Unpack, cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)

from shoal.api.connections import (
    BookStatistics,
    ConnectionBook,
    HeadClock,
    Lease,
    Phase,
    Refused,
    source_of,
)
from shoal.api.errors import error_response
from shoal.errors import InvalidRequest, ShoalError
from shoal.process import RateLimit

log = logging.getLogger(__name__)

#: Refusals (connections over a cap, late heads, malformed requests) come in floods when
#: someone means harm: one line per kind per 10 s, with a count, says as much.
REFUSAL_LOG_INTERVAL_S: Final = 10.0
#: Connections the kernel may queue before we accept them (aiohttp's default is 128). A
#: stranger's burst of connections fills a short queue, and a client whose SYN finds it
#: full waits a second for the retry; refusing is fast, so let the queue absorb bursts.
#: Linux caps it at net.core.somaxconn (4096 since 5.4).
ACCEPT_BACKLOG: Final = 1024


class HandlerOptions(TypedDict, total=False):
    """Keyword arguments for each connection's `web.RequestHandler` (no access log:
    the node reports requests itself, `shoal.events.RequestFinished`)."""

    keepalive_timeout: float
    max_line_size: int
    max_field_size: int
    max_headers: int
    auto_decompress: bool


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    connections: BookStatistics
    head_timeouts: int  # connections closed since start for a late request head
    malformed_requests: int  # requests aiohttp's parser refused since start


class Listeners:
    """What the node's listening sites share: one connection book for both ports, the
    header timeout, the options of every connection's handler, and the refusal log."""

    def __init__(
        self, book: ConnectionBook, *, header_timeout_s: float, handler_options: HandlerOptions
    ) -> None:
        self.book = book
        self.header_timeout_s = header_timeout_s
        self._options = handler_options
        self._loop = asyncio.get_running_loop()
        self._head_timeouts = 0
        self._malformed = 0
        kinds = ("refused", "evicted", "late", "malformed")
        self._logs = {kind: RateLimit(REFUSAL_LOG_INTERVAL_S) for kind in kinds}

    def site(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> GuardedSite:
        return GuardedSite(runner, self, host, port, ssl_context=ssl_context)

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(self.book.statistics(), self._head_timeouts, self._malformed)

    def handler(self, server: web.Server, lease: Lease) -> GuardedHandler:
        clock = HeadClock(self.header_timeout_s, self._loop.time())
        return GuardedHandler(
            server, listeners=self, lease=lease, clock=clock, loop=self._loop, **self._options
        )

    # -- the refusal log, at most one line per kind per interval ---------------------------

    def _log(self, kind: str, level: int, message: str, *args: object) -> None:
        suppressed = self._logs[kind].allow(self._loop.time())
        if suppressed is not None:
            log.log(
                level,
                message + " (%d more since the last such line; at most one every %.0f s)",
                *args, suppressed, REFUSAL_LOG_INTERVAL_S,
            )  # fmt: skip

    def refused(self, source: str, reason: Refused) -> None:
        caps = self.book.caps
        if reason is Refused.SOURCE_FULL:
            why = f"it has {caps.per_source} open (limits.max_connections_per_source)"
        else:
            why = (
                f"the node has {caps.total} LAN connections open, all handling requests "
                "(limits.max_connections)"
            )
        self._log("refused", logging.WARNING, "refused a connection from %s: %s", source, why)

    def evicted(self, source: str, newcomer: str) -> None:
        self._log(
            "evicted", logging.WARNING,
            "closed a connection from %s, idle the longest or in an unfinished TLS "
            "handshake, to admit one from %s: the node holds as many LAN connections or "
            "handshakes as it may (limits.max_connections %d, TLS handshakes %d)",
            source, newcomer, self.book.caps.total, self.book.caps.handshakes,
        )  # fmt: skip

    def head_timed_out(self, source: str) -> None:
        self._head_timeouts += 1
        self._log(
            "late", logging.INFO,
            "closed a connection from %s: no complete request head within %g s "
            "(limits.header_timeout_s)", source, self.header_timeout_s,
        )  # fmt: skip

    def malformed(self, source: str, error: ShoalError) -> None:
        self._malformed += 1
        self._log(
            "malformed", logging.INFO, "refused a malformed HTTP request from %s with %d %s: %s",
            source, error.status, error.code, error.message,
        )  # fmt: skip


class GuardedSite(web.BaseSite):
    """A listening TCP socket whose connections go through the book (`web.TCPSite`'s
    place); with `ssl_context`, TLS begins only once a connection is admitted."""

    __slots__ = ("_handshakes", "_host", "_listeners", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        listeners: Listeners,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=ACCEPT_BACKLOG)
        self._listeners = listeners
        self._host = host
        self._port = port
        # Admitted TLS connections whose handshake is under way, with their raw transport.
        self._handshakes: dict[asyncio.Task[None], tuple[asyncio.Transport, GuardedHandler]] = {}

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            functools.partial(_Gate, self),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )

    async def stop(self) -> None:
        await super().stop()
        for task in self._handshakes:
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    def arrived(self, transport: asyncio.Transport, gate: _Gate) -> None:
        listeners = self._listeners
        source = source_of(transport.get_extra_info("peername"))
        lease = listeners.book.admit(source, tls=self._ssl_context is not None)
        if isinstance(lease, Refused):
            transport.abort()
            listeners.refused(source, lease)
            return
        lease.on_evict = transport.abort  # for TLS, the raw transport: closes either stage
        if lease.displaced is not None:
            listeners.evicted(lease.displaced, source)
        server = self._runner.server
        assert server is not None  # the runner is set up before a site starts
        handler = listeners.handler(server, lease)
        if self._ssl_context is None:
            transport.set_protocol(handler)
            handler.connection_made(transport)
            return
        transport.pause_reading()  # not a byte before the handshake takes the transport
        gate.handler = handler
        task = asyncio.get_running_loop().create_task(self._handshake(transport, handler))
        self._handshakes[task] = (transport, handler)
        task.add_done_callback(self._handshake_done)

    async def _handshake(self, raw: asyncio.Transport, handler: GuardedHandler) -> None:
        assert self._ssl_context is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw,
                handler,
                self._ssl_context,
                server_side=True,
                # The handshake is part of the time the request head is given.
                ssl_handshake_timeout=max(0.001, handler.head_time_left(loop.time())),
            )
        except Exception as exc:  # refused certificate, timeout, reset: the caller's doing
            log.debug("TLS handshake from %s failed: %r", handler.lease.source, exc)
            # The traceback holds start_tls's frame, which holds the future holding this
            # exception: a cycle that would keep asyncio's 256 KiB TLS buffer alive until
            # a full garbage collection. Broken here, a flood of failed handshakes frees
            # its memory as it goes (measured: 600 MiB of garbage otherwise).
            exc.__traceback__ = None
            tls = None
        if tls is None:  # failed, or closed (evicted) mid-handshake
            handler.abandon()
            raw.abort()
            return
        handler.lease.handshake_done()
        handler.lease.proven()  # the peer port's context accepts paired nodes' only
        handler.connection_made(tls)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        raw, handler = self._handshakes.pop(task)
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:  # the site stopped, or a bug
            if error is not None:
                log.error("TLS handshake from %s", handler.lease.source, exc_info=error)
            handler.abandon()
            raw.abort()


class _Gate(asyncio.Protocol):
    """A connection's first moment: its site admits or refuses it, then (TLS) holds it
    until the handshake takes the transport over."""

    __slots__ = ("_site", "handler")

    def __init__(self, site: GuardedSite) -> None:
        self._site = site
        self.handler: GuardedHandler | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport; uvloop's are not asyncio.Transport subclasses.
        self._site.arrived(cast(asyncio.Transport, transport), self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handler is not None:  # closed before its handshake began
            self.handler.abandon()


class GuardedHandler(web.RequestHandler):
    """aiohttp's handler for one connection, holding its lease and timing its heads."""

    __slots__ = ("_clock", "_connected", "_gone", "_head_timer", "_listeners", "lease")

    def __init__(
        self,
        manager: web.Server,
        *,
        listeners: Listeners,
        lease: Lease,
        clock: HeadClock,
        loop: asyncio.AbstractEventLoop,
        **options: Unpack[HandlerOptions],
    ) -> None:
        # aiohttp takes access_log=None to mean none, but types it as a Logger only.
        super().__init__(manager, loop=loop, access_log=None, **options)  # type: ignore[arg-type]
        self._listeners = listeners
        self.lease = lease
        self._clock = clock
        self._head_timer: asyncio.TimerHandle | None = None
        self._connected = False
        self._gone = False

    # -- the connection's life --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gone:  # lost after its TLS handshake, before it was handed over
            return
        self._connected = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.abandon()
        if self._connected:
            super().connection_lost(exc)

    def abandon(self) -> None:
        """The connection is gone (or never got past its handshake): give its place back."""
        self._gone = True
        self.lease.release()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        clock = self._clock
        if clock.phase is Phase.IDLE:
            clock.bytes_received(self._loop.time())
            self._arm()
        super().data_received(data)

    # -- the request head's deadline ------------------------------------------------------

    def head_received(self) -> None:
        self._clock.head_received()
        self.lease.busy()

    def answered(self) -> None:
        self._clock.answered()
        self.lease.idle()

    def head_time_left(self, now: float) -> float:
        deadline = self._clock.deadline
        return self._clock.timeout_s if deadline is None else deadline - now

    def _arm(self) -> None:
        # One timer at a time: when it fires it reads the clock, and sets the next.
        deadline = self._clock.deadline
        if self._head_timer is None and deadline is not None and not self._gone:
            self._head_timer = self._loop.call_at(deadline, self._head_due)

    def _head_due(self) -> None:
        self._head_timer = None
        if not self._connected or self._gone:
            return  # in the TLS handshake: its own timeout; connection_made arms again
        if self._clock.expired(self._loop.time()):
            self._listeners.head_timed_out(self.lease.source)
            self.force_close()
        else:
            self._arm()

    # -- aiohttp's own refusals, as JSON ------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Called by aiohttp for a request its parser refused (400), or a handler error
        nothing caught (500, 504): the answer in Shoal's error shape, and the
        connection closed after it, as aiohttp does."""
        if request.writer.output_size > 0:  # what aiohttp does: too late to answer
            raise ConnectionError("an answer has begun; cannot send an error instead")
        error = protocol_error(status, exc, self)
        if status < 500:
            self._listeners.malformed(self.lease.source, error)
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        response = error_response(error)
        response.force_close()
        return response


@contextlib.contextmanager
def handling(request: web.BaseRequest) -> Iterator[None]:
    """Around the handling of a request whose head is in: stops the connection's head
    timer, and when the handling ends, lets the next request's first byte start it.
    For the access middleware; a no-op on a connection the node's listeners did not
    accept (aiohttp's test server)."""
    handler = request.protocol
    if not isinstance(handler, GuardedHandler):
        yield
        return
    handler.head_received()
    try:
        yield
    finally:
        handler.answered()


# -- aiohttp's parser errors in Shoal's terms ---------------------------------------------

_DUPLICATE = re.compile(r"Duplicate '([A-Za-z0-9-]{1,40})' header found")
_PRINTABLE = re.compile(r"[ -~]{1,120}")


def protocol_error(
    status: int, exc: BaseException | None, limits: web.RequestHandler
) -> ShoalError:
    """The error for what aiohttp refused before any handler ran, with aiohttp's status.

    Messages are Shoal's own: aiohttp's quote the offending bytes (which may be an
    `Authorization` header); only llhttp's fixed reason phrases are passed on.
    """
    if status >= 500:
        error = ShoalError("internal error; see the node's log")
    else:
        error = _client_error(exc, limits)
    error.status = status
    return error


def _client_error(exc: BaseException | None, limits: web.RequestHandler) -> ShoalError:
    too_large = "request_header_fields_too_large"
    match exc:
        case LineTooLong(args=(_, limit, *_)) if limit == limits.max_line_size:
            return _invalid(
                f"the request line is longer than {limit} bytes (a request target that "
                "long is not one of this API's)",
                "uri_too_long",
            )
        case LineTooLong(args=(_, limit, *_)):
            return _invalid(f"a header field is longer than {limit} bytes", too_large)
        case HttpProcessingError(message=message) if message == "Too many headers received":
            return _invalid(
                f"the request has more than {limits.max_headers} header fields", too_large
            )
        case HttpProcessingError(message=message) if found := _DUPLICATE.match(message):
            return _invalid(f"the request has more than one {found[1]} header")
        case HttpProcessingError(message=message) if message.startswith("Missing 'Host'"):
            return _invalid("an HTTP/1.1 request must have a Host header")
        case BadHttpMethod(message=message) if "HTTPS" in message:
            return _invalid("this port speaks HTTP, not HTTPS")
        case BadHttpMethod():
            return _invalid("the request method is not a valid HTTP method")
        case BadStatusLine():
            return _invalid("the request line is malformed; expected 'METHOD /path HTTP/1.1'")
        case InvalidURLError():
            return _invalid("the request target is malformed")
        case InvalidHeader():
            return _invalid("a header field has an invalid value")
        case TransferEncodingError():
            return _invalid("the chunked request body is malformed")
        case ContentLengthError():
            return _invalid("the request body is shorter than its Content-Length")
        case ContentEncodingError():
            return _invalid("the request body cannot be decoded by its Content-Encoding")
        case PayloadEncodingError():
            return _invalid("the request body is malformed")
        case HttpProcessingError(message=message):
            reason = _PRINTABLE.match(message.partition("\n")[0].rstrip(":. "))
            return _invalid(f"malformed HTTP request: {reason[0]}" if reason else "")
    return _invalid("")


def _invalid(message: str, code: str = "invalid_request") -> ShoalError:
    error = InvalidRequest(message or "malformed HTTP request")
    error.code = code
    return error
