"""Reading a request body: bounded in size and in time, on every route that reads one.

A declared body larger than the route's cap is refused before any of it is read; a
chunked one as soon as it passes the cap (413 either way). A body that does not arrive
within the body timeout (a client that stalls or trickles, on purpose or not) is 408.

A compressed body is inflated here, not by aiohttp (the node's server runs with
`auto_decompress=False`): a bounded piece at a time, so that it is refused as soon as
its inflated size passes the cap, and the memory it costs stays near the cap whatever
its compression ratio. gzip and deflate are inflated (what aiohttp would have inflated
without the optional brotli and zstd packages); any other Content-Encoding is 415.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import hdrs, web

from shoal.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedEncoding

_READ_BYTES = 1 << 16
_PIECE = 1 << 18  # inflated bytes per step: what a step holds beside the body
# RFC 9110 §8.4.1.3: "x-gzip" is to be read as "gzip".
_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
_ACCEPTED = ("gzip", "deflate")


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    too_large = PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    inflater = _inflater(request.headers.getall(hdrs.CONTENT_ENCODING, []))
    content = request.content
    if inflater is None and content.is_eof():  # all of it came with the head: no wait
        body = await content.read()
        if len(body) > limit:
            raise too_large
        return body
    # Pieces joined once at the end: a growing buffer would hold its old and new copies
    # at once each time it moves, near twice the cap just before a 413.
    pieces: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(_READ_BYTES):
                new = [chunk] if inflater is None else inflater.inflate(chunk, limit + 1 - size)
                pieces += new
                size += sum(map(len, new))
                if size > limit:
                    raise too_large
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    if inflater is not None:
        inflater.finish()
    return b"".join(pieces)


def _inflater(encodings: list[str]) -> Inflater | None:
    """The inflater for a request's Content-Encoding headers; None for an identity body."""
    codings = [c.strip().lower() for value in encodings for c in value.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _CODINGS:
        return Inflater(_CODINGS[codings[0]])
    raise UnsupportedEncoding(
        f"Content-Encoding {', '.join(codings)!r} is not supported; "
        f"send the body as is, or with {' or '.join(_ACCEPTED)}",
        accepted=_ACCEPTED,
    )


class Inflater:
    """A gzip or deflate body, inflated a bounded piece at a time as it arrives.

    gzip is RFC 1952 (members may follow one another); deflate is RFC 9110's zlib
    stream (RFC 1950), or the raw deflate some clients send, told apart by the first
    byte as aiohttp does. Malformed or truncated data is a 400.
    """

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._stream: zlib._Decompress | None = None
        self._ended = False  # a deflate stream is one stream: nothing may follow it

    def inflate(self, data: bytes, budget: int) -> list[bytes]:
        """`data` inflated, in pieces of at most `_PIECE` bytes and `budget` bytes in all
        (the caller's cap + 1: a bomb stops one byte past the cap)."""
        pieces = []
        while budget > 0:
            stream = self._stream
            if stream is None:
                if not data:
                    break
                stream = self._start(data)
            want = min(budget, _PIECE)
            try:
                piece = stream.decompress(data, want)
            except zlib.error:
                raise self._malformed() from None
            pieces.append(piece)
            budget -= len(piece)
            if stream.eof:
                data, self._stream = stream.unused_data, None
                continue
            data = stream.unconsumed_tail
            if not data and len(piece) < want:
                break  # all of `data` is inflated (a full piece may leave output pending)
        return pieces

    def finish(self) -> None:
        """The body has ended: refuse it if its compressed data had not."""
        if self._stream is not None:
            raise InvalidRequest(f"the {self.coding} request body ends before its data does")

    def _start(self, data: bytes) -> zlib._Decompress:
        if self._ended:
            raise InvalidRequest(f"data follows the end of the {self.coding} request body")
        if self.coding == "gzip":
            wbits = 16 + zlib.MAX_WBITS
        else:
            self._ended = True
            is_zlib = data[0] & 0x0F == 8  # RFC 1950's compression method: deflate
            wbits = zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS
        self._stream = zlib.decompressobj(wbits)
        return self._stream

    def _malformed(self) -> InvalidRequest:
        return InvalidRequest(f"the request body is not valid {self.coding} data")
