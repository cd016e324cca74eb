"""Talking HTTP to an OpenAI-compatible server: the transport every backend shares.

aiohttp errors are translated into Shoal's error tree here, once.

Every wait on the network (connecting and the answer's head in `send`, the first read of
its body) runs under an `asyncio.Timeout` the transport holds in its `Waits`; later reads
are watched for stalls (`HttpUpstream`). aiohttp's own read timeout is not used: it
re-arms a timer on every packet received, a cost per chunk that these deadlines, set
once per wait, do not have. `abort()`
moves all their deadlines to now: a peer found silent (a pulled cable sends no RST)
frees its requests at once, whether they are connecting, waiting for an answer or in
the middle of a stream, instead of each waiting out its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from shoal import __version__
from shoal.backends.base import Operation
from shoal.errors import BackendUnavailable, UpstreamFailed, UpstreamTimeout
from shoal.settings import LimitSettings

#: For callers that pass none: the setting's default (`limits.stall_timeout_s`).
DEFAULT_STALL_TIMEOUT_S: float = LimitSettings.model_fields["stall_timeout_s"].default
#: Said to every server, in place of aiohttp's own (skipping it costs 15 µs a request).
USER_AGENT = f"shoal/{__version__}"
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class SilenceDetection:
    """TCP keepalive and user timeout: the kernel fails a connection whose other end has
    gone silent (a pulled cable, a partition: no RST ever comes) after about
    `idle_s + interval_s * probes` with nothing in flight, or `unacked_s` with data
    unacknowledged, instead of never (keepalive off) or after 15 minutes of
    retransmissions. A live peer's kernel answers the probes however long its model
    thinks, so only a dead link fails."""

    idle_s: int = 2
    interval_s: int = 1
    probes: int = 3
    unacked_s: int = 5

    def socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """A socket for aiohttp's `socket_factory`, with these options set."""
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Linux has all four; macOS has TCP_KEEPALIVE for the idle time, and no user timeout.
        for name, value in (
            ("TCP_KEEPIDLE", self.idle_s),
            ("TCP_KEEPALIVE", self.idle_s),
            ("TCP_KEEPINTVL", self.interval_s),
            ("TCP_KEEPCNT", self.probes),
            ("TCP_USER_TIMEOUT", self.unacked_s * 1000),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
        return sock


class Waits:
    """The network waits of one transport, and why they were cut short, if they were.

    Two kinds: a wait under an `asyncio.Timeout` (connecting, the first byte of an
    answer: once per request), and the later reads of answers already begun, which
    carry no timer of their own (one per chunk cost 11 µs, a third of a relayed chunk's
    overhead): each `HttpUpstream` watches its own silence with one timer per stall
    period, and `abort` ends its read by failing its stream.
    """

    __slots__ = ("_live", "_streams", "reason")

    def __init__(self) -> None:
        self._live: set[asyncio.Timeout] = set()
        self._streams: set[HttpUpstream] = set()  # answers begun, not yet closed
        self.reason: str | None = None  # set by abort(): every later wait fails at once

    def start(self, delay: float | None) -> asyncio.Timeout:
        """A timeout to wait under; `end()` it after. Raises if the transport was aborted."""
        if self.reason is not None:
            raise UpstreamFailed(self.reason)
        timeout = asyncio.timeout(delay)
        self._live.add(timeout)
        return timeout

    def end(self, timeout: asyncio.Timeout) -> None:
        self._live.discard(timeout)

    def abort(self, reason: str) -> None:
        self.reason = reason
        now = asyncio.get_running_loop().time()
        for timeout in self._live:
            if not timeout.expired():
                timeout.reschedule(now)
        for stream in list(self._streams):
            stream.fail(UpstreamFailed(reason))


class HttpUpstream:
    """An aiohttp response being relayed. Implements `Upstream`.

    The wait for the body's first bytes is the read timeout (a queued request or a long
    prompt waits there); once the body has begun, every later read must bring
    something within the stall timeout (tokens come every few tens of ms: silence this
    long is a pulled cable or a hung engine, not a slow one). Those later reads are
    watched, not timed: each notes when it began, and one timer per stall period checks
    whether the read under way has waited that long; if so it fails the stream, which
    ends the read at once with `UpstreamTimeout`.
    """

    __slots__ = (
        "_begun",
        "_loop",
        "_read_timeout_s",
        "_reading_since",
        "_response",
        "_stall_timeout_s",
        "_waits",
        "_watch",
        "content_type",
        "served_by",
        "status",
    )  # fmt: skip

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        read_timeout_s: float,
        stall_timeout_s: float,
        waits: Waits,
    ) -> None:
        self._response = response
        self._read_timeout_s = read_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._waits = waits
        self._begun = False  # some of the body has arrived
        self._loop = asyncio.get_running_loop()
        self._reading_since: float | None = None  # a read of a begun body is under way
        self._watch: asyncio.TimerHandle | None = None
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        # Set when the answer comes from another Shoal node (a peer, after a hop).
        self.served_by = response.headers.get("X-Shoal-Served-By")

    async def chunks(self) -> AsyncIterator[bytes]:
        while data := await self._next():
            yield data

    async def read(self) -> bytes:
        parts = []
        while data := await self._next():
            parts.append(data)
        return b"".join(parts)

    async def _next(self) -> bytes:
        """Whatever has arrived of the body (no buffering between chunks); b"" at its end."""
        if not self._begun:
            return await self._first()
        if self._waits.reason is not None:
            raise UpstreamFailed(self._waits.reason)
        self._reading_since = self._loop.time()
        try:
            return await self._response.content.readany()
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend broke off its answer ({_describe(exc)})") from None
        finally:
            self._reading_since = None

    async def _first(self) -> bytes:
        """The first read, within the read timeout; then the watch begins, unless that
        read brought the whole body (a small answer read at once needs no watch)."""
        content = self._response.content
        if content.is_eof():  # all of it is here (a small answer, with its head): no wait
            self._begun = True
            return await content.readany()
        timeout = self._waits.start(self._read_timeout_s)
        try:
            async with timeout:
                data = await content.readany()
        except TimeoutError:
            if self._waits.reason is not None:
                raise UpstreamFailed(self._waits.reason) from None
            raise UpstreamTimeout("the backend did not answer in time (read timeout)") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend broke off its answer ({_describe(exc)})") from None
        finally:
            self._waits.end(timeout)
        self._begun = True
        if data and not content.at_eof():
            self._waits._streams.add(self)
            self._watch = self._loop.call_later(self._stall_timeout_s, self._check)
        return data

    def _check(self) -> None:
        """The stall watch: fail a read that has waited the whole stall timeout."""
        since = self._reading_since
        now = self._loop.time()
        if since is not None and now - since >= self._stall_timeout_s:
            self._watch = None
            self.fail(
                UpstreamTimeout(
                    f"the backend stopped sending for {self._stall_timeout_s:g} s (stall timeout)"
                )
            )
            return
        # Not reading (the relay is writing to its client), or not for long enough yet.
        due = (now if since is None else since) + self._stall_timeout_s
        self._watch = self._loop.call_at(due, self._check)

    def fail(self, error: Exception) -> None:
        """End the answer with `error`: a read under way or to come raises it."""
        self._response.content.set_exception(error)
        self.close()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._waits._streams.discard(self)
        # close(), not release(): an unfinished stream must not go back to the pool, and
        # closing the connection is what tells the backend to stop generating.
        self._response.close()


class HttpTransport:
    """A session to one OpenAI-compatible base URL (TCP, or a Unix socket)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        api_key: str | None = None,
        unix_socket: str | None = None,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        silence: SilenceDetection | None = None,
        keepalive_timeout_s: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # How long an idle pooled connection is kept (aiohttp's default: 15 s).
        self._keepalive_timeout_s = keepalive_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s)
        self._read_timeout_s = read_timeout_s
        # `send`'s bound: connecting (aiohttp's connect timeout, a pooled connection needs
        # none), then the answer's head within the read timeout.
        self._send_timeout_s = connect_timeout_s + read_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._waits = Waits()
        self._probe_timeout = aiohttp.ClientTimeout(total=max(connect_timeout_s, 2.0) + 3.0)
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._unix_socket = unix_socket
        self._ssl = ssl_context
        self._silence = silence
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self._unix_socket is not None:
                connector = aiohttp.UnixConnector(path=self._unix_socket, limit=0)
            else:
                connector = aiohttp.TCPConnector(
                    limit=0,
                    ttl_dns_cache=60,
                    ssl=self._ssl if self._ssl is not None else True,
                    socket_factory=self._silence.socket if self._silence else None,
                    keepalive_timeout=self._keepalive_timeout_s,
                )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
            )
        return self._session

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        url = f"{self.base_url}/v1/{op.value}"
        timeout = self._waits.start(self._send_timeout_s)
        try:
            async with timeout:
                response = await self._client().post(url, data=body, headers=_JSON)
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnavailable(f"cannot connect to the backend ({_describe(exc)})") from None
        except TimeoutError:
            if self._waits.reason is not None:
                raise BackendUnavailable(self._waits.reason) from None
            raise UpstreamTimeout("the backend did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend failed ({_describe(exc)})") from None
        finally:
            self._waits.end(timeout)
        return HttpUpstream(response, self._read_timeout_s, self._stall_timeout_s, self._waits)

    async def get_json(self, path: str, timeout_s: float | None = None) -> Any:
        """GET a small JSON document (model lists, health). Raises aiohttp/timeout errors."""
        timeout = self._probe_timeout if timeout_s is None else aiohttp.ClientTimeout(timeout_s)
        async with self._client().get(f"{self.base_url}{path}", timeout=timeout) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def get_range(self, path: str, first: int, last: int, timeout_s: float) -> bytearray:
        """GET bytes `first`..`last` (inclusive) of a file (peer protocol): the body of a
        206 of exactly that length, within `timeout_s` in all. Raises aiohttp errors
        (ClientResponseError on another status), TimeoutError, or ValueError if the
        answer is not that range."""
        async with self._client().get(
            f"{self.base_url}{path}",
            headers={"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(timeout_s),
        ) as response:
            response.raise_for_status()
            if response.status != 206:
                raise ValueError(f"asked for a range, got {response.status}")
            if response.content_length not in (None, last - first + 1):  # before reading it
                raise ValueError(
                    f"asked for {last - first + 1} bytes, told {response.content_length}"
                )
            # Read into one buffer of the size asked for: each byte is copied once (this
            # was a third of a pull's CPU when the buffer grew and was copied out).
            expected = last - first + 1
            body = bytearray(expected)
            view, got = memoryview(body), 0
            try:
                async for piece in response.content.iter_any():
                    if got + len(piece) > expected:  # never buffer more than was asked
                        raise ValueError(f"asked for {expected} bytes, got more")
                    view[got : got + len(piece)] = piece
                    got += len(piece)
            except RuntimeError as exc:  # aiohttp's "Connection closed.": the peer went away
                raise aiohttp.ClientPayloadError(f"the answer was cut short: {exc}") from None
        if got != expected:
            raise ValueError(f"asked for {expected} bytes, got {got}")
        return body

    async def post(self, path: str, body: bytes, timeout_s: float) -> bytes:
        """POST a small JSON message (peer protocol); the answer's body on 2xx.

        Raises aiohttp errors (ClientResponseError on a non-2xx) and TimeoutError.
        """
        async with self._client().post(
            f"{self.base_url}{path}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(timeout_s),
        ) as response:
            response.raise_for_status()
            return await response.read()

    @contextlib.asynccontextmanager
    async def post_streaming(
        self, path: str, body: bytes, read_timeout_s: float
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST JSON, for an answer read as it comes (a relayed pull's progress lines):
        the response, whatever its status; every read within `read_timeout_s`."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._timeout.connect, sock_read=read_timeout_s
        )
        async with self._client().post(
            f"{self.base_url}{path}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        ) as response:
            yield response

    def abort(self, reason: str) -> None:
        """End every wait on this transport at once with `reason`, and every later one."""
        self._waits.abort(reason)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and session.connector is not None:
            # Aborted, not shut down: a TLS close_notify to a silent peer waits for ever.
            await session.connector.close(abort_ssl=True)
            await session.close()


def _describe(exc: BaseException) -> str:
    """A short reason for people, without URLs' credentials or stack traces."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or type(exc.os_error).__name__
    return type(exc).__name__


PROBE_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    TimeoutError,
    asyncio.TimeoutError,
    orjson.JSONDecodeError,
    ValueError,
    KeyError,
    TypeError,
)
