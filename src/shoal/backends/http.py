"""Talking HTTP to an OpenAI-compatible server: the transport every backend shares.

aiohttp errors are translated into Shoal's error tree here, once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from shoal.backends.base import Operation
from shoal.errors import BackendUnavailable, UpstreamFailed, UpstreamTimeout


class HttpUpstream:
    """An aiohttp response being relayed. Implements `Upstream`."""

    __slots__ = ("_response", "content_type", "served_by", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        # Set when the answer comes from another Shoal node (a peer, after a hop).
        self.served_by = response.headers.get("X-Shoal-Served-By")

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                # readany() returns whatever has arrived: no buffering between chunks.
                data = await content.readany()
                if not data:
                    return
                yield data
        except TimeoutError:
            raise UpstreamTimeout("the backend stopped sending (read timeout)") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend broke off its answer ({_describe(exc)})") from None

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError:
            raise UpstreamTimeout("the backend did not answer in time (read timeout)") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend broke off its answer ({_describe(exc)})") from None

    def close(self) -> None:
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
        api_key: str | None = None,
        unix_socket: str | None = None,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=max(connect_timeout_s, 2.0) + 3.0)
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._unix_socket = unix_socket
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self._unix_socket is not None:
                connector = aiohttp.UnixConnector(path=self._unix_socket, limit=0)
            else:
                connector = aiohttp.TCPConnector(
                    limit=0, ttl_dns_cache=60, ssl=self._ssl if self._ssl is not None else True
                )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        url = f"{self.base_url}/v1/{op.value}"
        try:
            response = await self._client().post(
                url, data=body, headers={"Content-Type": "application/json"}
            )
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnavailable(f"cannot connect to the backend ({_describe(exc)})") from None
        except TimeoutError:
            raise UpstreamTimeout("the backend did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"the backend failed ({_describe(exc)})") from None
        return HttpUpstream(response)

    async def get_json(self, path: str, timeout_s: float | None = None) -> Any:
        """GET a small JSON document (model lists, health). Raises aiohttp/timeout errors."""
        timeout = self._probe_timeout if timeout_s is None else aiohttp.ClientTimeout(timeout_s)
        async with self._client().get(f"{self.base_url}{path}", timeout=timeout) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

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

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


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
