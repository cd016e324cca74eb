"""A fake OpenAI-compatible streaming backend for load: fast, in a process of its own.

    python -m bench.fake_backend --port P [--models m] [--ttft-ms X] [--chunk-gap-ms Y]
        [--chunks N] [--speed F] [--capacity C] [--fault none|stall|reset|500]

Prints `ready <port>` on stdout once it listens. Serves /health, /v1/models,
/v1/chat/completions and /v1/completions (streamed as SSE or not), plus two routes of
its own: GET /fake/stats (counters), POST /fake/stats/reset, and POST /fake/config
(change any option above while it runs, e.g. `{"fault": "reset"}`).

A generation waits `ttft-ms` before its first chunk, then `chunk-gap-ms` between chunks;
`max_tokens` in a request, when given, is its chunk count, else `--chunks`. `--speed`
divides every delay (0.5 is twice as slow). `--capacity` is how many generations run at
once; the rest wait in FIFO order, which is what makes a slow instance fall behind.
Faults: `stall` accepts a request and never answers; `reset` resets the connection after
the first chunk (streaming) or before answering; `500` answers an OpenAI-style error.

It is a benchmark tool, not a substitute for real engines in tests. It is a raw asyncio
`Protocol` with a minimal HTTP/1.1 parser, driven by callbacks and timers, no task per
request: on one core it answers about 2× the requests/s of the same thing written with
aiohttp (access log off), so that the proxies, not the backend, are what load measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import sys
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import orjson

FAULTS = ("none", "stall", "reset", "500")


@dataclass
class Config:
    models: tuple[str, ...] = ("bench-model",)
    ttft_ms: float = 0.0
    chunk_gap_ms: float = 0.0
    chunks: int = 16
    speed: float = 1.0
    capacity: int = 0  # 0: unlimited
    fault: str = "none"

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key not in Config.__dataclass_fields__:
                raise ValueError(f"unknown option {key!r}")
            if key == "models":
                value = tuple(value)
            elif key == "fault" and value not in FAULTS:
                raise ValueError(f"fault must be one of {FAULTS}")
            setattr(self, key, value)


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}


def _head(status: int, content_type: bytes, length: int | None, close: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
    lines.append(b"Content-Type: " + content_type)
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Cache-Control: no-cache")
    else:
        lines.append(b"Content-Length: %d" % length)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json(status: int, document: Any, close: bool = False) -> bytes:
    body = orjson.dumps(document)
    return _head(status, b"application/json", len(body), close) + body


def _error(status: int, message: str, close: bool = False) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json(status, {"error": {"message": message, "type": kind, "code": None}}, close)


def _sse_chunk(event: bytes) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = b"data: " + event + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Generation:
    """One request being answered: timers only, no task."""

    __slots__ = ("chat", "chunks", "conn", "handle", "model", "sent", "stream", "usage")

    def __init__(
        self, conn: HttpProtocol, model: str, chat: bool, stream: bool, chunks: int, usage: bool
    ) -> None:
        self.conn, self.model, self.chat, self.stream = conn, model, chat, stream
        self.chunks, self.usage, self.sent = chunks, usage, 0
        self.handle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.conn.transport is not None

    def start(self) -> None:
        server = self.conn.server
        delay = server.config.ttft_ms / 1000 / server.config.speed
        if not self.stream:  # the whole generation, then one answer
            gap = server.config.chunk_gap_ms / 1000 / server.config.speed
            delay += gap * max(0, self.chunks - 1)
        if delay > 0:
            self.handle = server.loop.call_later(delay, self._first)
        else:  # answer at once, in the same loop iteration
            self._first()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def _first(self) -> None:
        conn, config = self.conn, self.conn.server.config
        if config.fault == "reset" and not self.stream:
            conn.abort()
            return
        if not self.stream:
            conn.finish(_json(200, self._whole(), conn.close_after))
            return
        conn.write(_head(200, b"text/event-stream", None, conn.close_after))
        if self.chat:  # OpenAI opens a chat stream with the role
            conn.write(_sse_chunk(self._event({"role": "assistant", "content": ""})))
        self._next()

    def _next(self) -> None:
        conn, config = self.conn, self.conn.server.config
        gap = config.chunk_gap_ms / 1000 / config.speed
        while True:
            conn.write(_sse_chunk(self._event({"content": f"tok{self.sent} "})))
            self.sent += 1
            if config.fault == "reset":
                conn.abort()
                return
            if self.sent >= self.chunks:
                conn.finish(self._tail())
                return
            if gap > 0:
                self.handle = conn.server.loop.call_later(gap, self._next)
                return

    def _event(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
            kind = "text_completion"
        return orjson.dumps(
            {"id": "bench", "object": kind, "created": 0, "model": self.model, "choices": [choice]}
        )

    def _tail(self) -> bytes:
        events = [self._event({}, "stop")]
        if self.usage:
            events.append(
                orjson.dumps(
                    {
                        "id": "bench",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": self.model,
                        "choices": [],
                        "usage": self._usage(),
                    }
                )
            )
        events.append(b"[DONE]")
        return b"".join(_sse_chunk(e) for e in events) + b"0\r\n\r\n"

    def _usage(self) -> dict[str, int]:
        prompt, completion = 8, self.chunks
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _whole(self) -> dict[str, Any]:
        text = "".join(f"tok{i} " for i in range(self.chunks))
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text, "finish_reason": "stop"}, "text_completion"
        return {
            "id": "bench",
            "object": kind,
            "created": 0,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(),
        }


class Server:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config, self.loop = config, loop
        self.running = 0
        self.waiting: deque[Generation] = deque()
        self.stats = {"requests": 0, "completed": 0, "max_running": 0, "max_waiting": 0}

    def admit(self, generation: Generation) -> None:
        self.stats["requests"] += 1
        capacity = self.config.capacity
        if capacity <= 0 or self.running < capacity:
            self._run(generation)
        else:
            self.waiting.append(generation)
            self.stats["max_waiting"] = max(self.stats["max_waiting"], len(self.waiting))

    def release(self) -> None:
        self.running -= 1
        capacity = self.config.capacity
        while self.waiting and (capacity <= 0 or self.running < capacity):
            generation = self.waiting.popleft()
            if generation.alive:
                self._run(generation)

    def _run(self, generation: Generation) -> None:
        self.running += 1
        self.stats["max_running"] = max(self.stats["max_running"], self.running)
        generation.start()


class HttpProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy: Generation | None = None
        self.stalled = False
        self.close_after = False
        self.serving = False  # inside _serve: an answer given at once must not re-enter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy is not None:
            self.busy.cancel()
            if self.busy in self.server.waiting:
                self.server.waiting.remove(self.busy)
            else:
                self.server.release()
            self.busy = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def finish(self, data: bytes) -> None:
        self.write(data)
        self.busy = None
        self.server.stats["completed"] += 1
        self.server.release()
        if self.close_after and self.transport is not None:
            self.transport.close()
            return
        self._serve()

    def abort(self) -> None:
        """Reset the connection (RST, not FIN): SO_LINGER 0 then close."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def _serve(self) -> None:
        if self.serving:
            return
        self.serving = True
        try:
            while self.busy is None and not self.stalled and self.transport is not None:
                request = self._parse()
                if request is None:
                    return
                self._dispatch(*request)
        finally:
            self.serving = False

    def _parse(self) -> tuple[bytes, bytes, bytes] | None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buffer[:end]).split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ", 2)
        except ValueError:
            self.write(_error(400, "bad request line", close=True))
            self._close()
            return None
        length, chunked = 0, False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.strip().lower()
                close = value == b"close" or (close and value != b"keep-alive")
        start = end + 4
        if chunked:
            decoded = _dechunk(buffer, start)
            if decoded is None:
                return None
            body, consumed = decoded
        else:
            if len(buffer) < start + length:
                return None
            body, consumed = bytes(buffer[start : start + length]), start + length
        del buffer[:consumed]
        self.close_after = close
        return method, target.split(b"?", 1)[0], body

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _reply(self, data: bytes) -> None:
        self.write(data)
        if self.close_after:
            self._close()

    def _dispatch(self, method: bytes, path: bytes, body: bytes) -> None:
        config = self.server.config
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            return self._generate(path == b"/v1/chat/completions", body)
        if method == b"GET" and path in (b"/health", b"/healthz"):
            return self._reply(_json(200, {"status": "ok"}, self.close_after))
        if method == b"GET" and path == b"/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "bench"}
                for m in config.models
            ]
            return self._reply(_json(200, {"object": "list", "data": data}, self.close_after))
        if method == b"GET" and path == b"/fake/stats":
            document = {
                **self.server.stats,
                "running": self.server.running,
                "waiting": len(self.server.waiting),
                "config": asdict(config),
            }
            return self._reply(_json(200, document, self.close_after))
        if method == b"POST" and path == b"/fake/stats/reset":
            self.server.stats.update(requests=0, completed=0, max_running=0, max_waiting=0)
            return self._reply(_json(200, self.server.stats, self.close_after))
        if method == b"POST" and path == b"/fake/config":
            try:
                config.update(orjson.loads(body))
            except (ValueError, TypeError) as exc:
                return self._reply(_error(400, str(exc), self.close_after))
            return self._reply(_json(200, asdict(config), self.close_after))
        return self._reply(_error(404, "no such route", self.close_after))

    def _generate(self, chat: bool, body: bytes) -> None:
        config = self.server.config
        try:
            request = orjson.loads(body)
            model = str(request["model"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._reply(_error(400, "body must be JSON with a model", self.close_after))
            return
        if config.fault == "500":
            self._reply(_error(500, "fake backend: fault 500", self.close_after))
            return
        if config.fault == "stall":
            self.stalled = True  # hold the connection, answer nothing, read nothing more
            return
        chunks = request.get("max_tokens") or request.get("max_completion_tokens")
        options = request.get("stream_options") or {}
        generation = Generation(
            self,
            model,
            chat,
            bool(request.get("stream")),
            int(chunks) if chunks else config.chunks,
            bool(options.get("include_usage")),
        )
        self.busy = generation
        self.server.admit(generation)


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    body, at = bytearray(), start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", at)
            return None if trailer_end < 0 else (bytes(body), trailer_end + 2)
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake_backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="bench-model", help="comma-separated model ids")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--chunk-gap-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--capacity", type=int, default=0, help="0: unlimited")
    parser.add_argument("--fault", choices=FAULTS, default="none")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be > 0")
    config = Config(
        models=tuple(m for m in args.models.split(",") if m),
        ttft_ms=args.ttft_ms,
        chunk_gap_ms=args.chunk_gap_ms,
        chunks=args.chunks,
        speed=args.speed,
        capacity=args.capacity,
        fault=args.fault,
    )
    return args, config


async def serve(host: str, port: int, config: Config) -> None:
    loop = asyncio.get_running_loop()
    server = Server(config, loop)
    listener = await loop.create_server(
        lambda: HttpProtocol(server), host, port, reuse_address=True, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {listener.sockets[0].getsockname()[1]}", flush=True)
    async with listener:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, config))
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
