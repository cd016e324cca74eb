"""A lean asyncio HTTP/1.1 client for timing: keep-alive, and SSE event arrival times.

Why not aiohttp or httpx: on a 2-core machine the client's own cost per request and per
chunk shows up in every figure it measures. This client does the least that HTTP/1.1
needs (Content-Length and chunked bodies, keep-alive) and stamps each SSE `data: {`
event with `time.perf_counter()` as its bytes arrive.

    pool = Pool()
    answer = await pool.request("http://127.0.0.1:8000", "POST", "/v1/chat/completions", body)
    answer.status, answer.latency, answer.ttft, answer.gaps, answer.error
    await pool.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

_EVENT = b"data: {"  # an SSE event carrying JSON (not [DONE])


@dataclass(slots=True)
class Answer:
    status: int = 0  # 0: no answer (see error)
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    started: float = 0.0
    ended: float = 0.0
    events: list[float] = field(default_factory=list)  # arrival time of each JSON event
    body: bytes = b""  # of a non-streamed answer
    error: str | None = None  # why the exchange failed, if it did

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def ttft(self) -> float | None:
        return self.events[0] - self.started if self.events else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:], strict=False)]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        answer: Answer | None = None,
    ) -> tuple[Answer, bool]:
        """One exchange; returns the answer and whether the connection can be reused.

        Raises OSError / asyncio.IncompleteReadError when the connection breaks.
        """
        assert self.reader is not None and self.writer is not None
        answer = answer or Answer(started=time.perf_counter())
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        answer.status = int(status_line.split(" ", 2)[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            answer.headers[name.strip().lower()] = value.strip()
        keep = answer.headers.get("connection", "").lower() != "close"
        events = answer.events
        if answer.headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # (no trailers)
                    break
                data = await reader.readexactly(size + 2)
                count = data.count(_EVENT)
                if count:
                    now = time.perf_counter()
                    events.extend([now] * count)
                parts.append(data[:-2])
            answer.body = b"".join(parts)
        elif "content-length" in answer.headers:
            answer.body = await reader.readexactly(int(answer.headers["content-length"]))
        else:
            answer.body, keep = await reader.read(), False
        answer.ended = time.perf_counter()
        return answer, keep


class Pool:
    """Keep-alive connections per origin; a broken one is dropped, never reused."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._idle: dict[tuple[str, int], list[Connection]] = defaultdict(list)

    async def request(
        self,
        origin: str,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        parts = urlsplit(origin)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        answer = Answer(started=time.perf_counter())
        idle = self._idle[key]
        connection = idle.pop() if idle else None
        keep = False
        try:
            async with asyncio.timeout(self.timeout_s):
                if connection is None:
                    connection = Connection(*key)
                    await connection.connect()
                _, keep = await connection.request(method, path, body, headers, answer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            answer.error = _describe(e)
        except TimeoutError:
            answer.error = f"no complete answer in {self.timeout_s} s"
        except BaseException:  # cancelled: the connection is in an unknown state
            if connection is not None:
                connection.close()
            raise
        if not answer.ended:
            answer.ended = time.perf_counter()
        if connection is not None:
            if keep:
                idle.append(connection)
            else:
                connection.close()
        return answer

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
            idle.clear()
        await asyncio.sleep(0)  # let the transports close


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.IncompleteReadError):
        return "connection closed mid-answer"
    return f"{type(error).__name__}: {error}"


def chat_body(model: str, *, stream: bool = False, max_tokens: int | None = None) -> bytes:
    document: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the fish."}],
        "stream": stream,
    }
    if max_tokens is not None:
        document["max_tokens"] = max_tokens
    return orjson.dumps(document)


def sse_error(answer: Answer) -> bool:
    """Whether a streamed answer carried an error event (a stream broken after it began)."""
    return b'"error"' in answer.body


async def wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")
        await asyncio.sleep(0.05)


@dataclass(slots=True)
class Arrival:
    at: float  # seconds after the start of the trace
    origin: str  # where to send it
    headers: dict[str, str] = field(default_factory=dict)


async def open_loop(
    pool: Pool, arrivals: list[Arrival], path: str, body: bytes, cutoff_s: float
) -> list[Answer]:
    """Send each arrival at its time, whatever the earlier ones are doing (open loop).

    Requests still unanswered `cutoff_s` after the trace began are cancelled; their
    answers carry the error "cut off" and the time they had waited so far.
    """
    start = time.perf_counter()
    answers: list[Answer] = [Answer() for _ in arrivals]

    async def one(index: int, arrival: Arrival) -> None:
        delay = start + arrival.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        answers[index] = Answer(started=time.perf_counter(), error="cut off")
        answers[index] = await pool.request(arrival.origin, "POST", path, body, arrival.headers)

    tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(arrivals)]
    remaining = cutoff_s - (time.perf_counter() - start)
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    now = time.perf_counter()
    for answer in answers:
        if answer.error == "cut off":
            answer.ended = now
    return answers


def poisson(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process: `rate` per second for `seconds`, reproducible."""
    import random

    rng = random.Random(seed)
    times, now = [], rng.expovariate(rate)
    while now < seconds:
        times.append(now)
        now += rng.expovariate(rate)
    return times
