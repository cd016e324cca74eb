"""HTTP to one paired peer: state exchange, goodbye, forwarded requests, model files and
pulls asked of it, over mTLS.

The link dials the peer's TLS port with a context that presents our certificate and
trusts only the peer's own (pinned by the trust store). A forwarded request carries the
hop header, so the peer serves it itself or fails: loops are impossible.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import aiohttp
import orjson

from shoal.backends.base import Operation
from shoal.backends.http import HttpTransport, HttpUpstream, SilenceDetection
from shoal.mesh.state import Message, decode_message
from shoal.protocol import GOODBYE_PATH, HOP_HEADER, PEER_PULL_PATH, STATE_PATH
from shoal.settings import LimitSettings

#: Idle seconds a pooled connection to a peer is kept. Above the longest heartbeat
#: interval (30 s, long-stable peers), so every beat reuses the mTLS connection instead of
#: paying a new TLS handshake (aiohttp's default, 15 s, closed it just before the 15 s and
#: 30 s beats); below the peer's server-side idle timeout (`limits.idle_timeout_s`, 75 s by
#: default), so we never send on a connection the peer is closing.
KEEPALIVE_S = 45.0


class PeerLink:
    def __init__(self, url: str, limits: LimitSettings, context: ssl.SSLContext) -> None:
        self.url = url.rstrip("/")
        self._transport = HttpTransport(
            self.url,
            connect_timeout_s=limits.connect_timeout_s,
            read_timeout_s=limits.read_timeout_s,
            stall_timeout_s=limits.stall_timeout_s,
            headers={HOP_HEADER: "1"},
            ssl_context=context,
            # A request waiting on a peer whose cable was pulled fails within seconds,
            # whenever the next heartbeat comes (established peers: every 15-30 s).
            silence=SilenceDetection(),
            keepalive_timeout_s=min(KEEPALIVE_S, 0.6 * limits.idle_timeout_s),
        )

    async def exchange(self, ours: bytes, timeout_s: float) -> Message:
        """Send our side of a state exchange (`shoal.mesh.state.Message`, encoded), get
        theirs: one heartbeat. Raises on failure."""
        return decode_message(await self._transport.post(STATE_PATH, ours, timeout_s))

    async def goodbye(self, node_id: str, timeout_s: float) -> None:
        await self._transport.post(GOODBYE_PATH, orjson.dumps({"node_id": node_id}), timeout_s)

    async def file_manifest(self, sha256: str, timeout_s: float) -> object:
        """The peer's manifest of the file `sha256` (`shoal.api.share`), unchecked JSON."""
        return await self._transport.get_json(f"/shoal/v1/files/{sha256}/manifest", timeout_s)

    async def file_range(
        self, sha256: str, first: int, last: int, timeout_s: float
    ) -> bytes | bytearray:
        """Bytes `first`..`last` (inclusive, whole chunks) of the file `sha256`."""
        return await self._transport.get_range(f"/shoal/v1/files/{sha256}", first, last, timeout_s)

    @contextlib.asynccontextmanager
    async def pull(self, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        """Ask the peer to pull a model into its own store (`shoal models pull --on`):
        its answer, NDJSON progress lines as they come. A progress line comes at least
        every few seconds, but a large file is hashed in silence at the end."""
        async with self._transport.post_streaming(PEER_PULL_PATH, body, 600.0) as response:
            yield response

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        return await self._transport.send(op, body)

    def abort(self, reason: str) -> None:
        """Fail every request on this link at once, wherever it is (see HttpTransport)."""
        self._transport.abort(reason)

    async def aclose(self) -> None:
        await self._transport.aclose()
