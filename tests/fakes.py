"""Small fake inference servers for tests of Shoal's own logic and error paths.

`FakeServer` runs an aiohttp app in a thread on a loopback port. Its behaviour is set
through `mode` while it runs. The Ollama flavour follows Ollama's documented API
(https://github.com/ollama/ollama/blob/main/docs/api.md): /api/tags, /api/ps and the
OpenAI-compatible /v1 routes. None of this replaces the real engines in the e2e tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import orjson
from aiohttp import web

from tests.support import free_port


def _chat_response(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    doc = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class FakeServer:
    """modes: "ok", "500", "html500", "reset" (close before answering),
    "stall" (never answer), "die_mid_stream" (stream 2 chunks, then drop the connection),
    "silent_mid_stream" (stream 2 chunks, then send nothing more, the connection open:
    a pulled cable or a hung engine), "silent_before_first_chunk" (a stream's headers,
    then nothing), "silent_mid_body" (half of a non-streamed answer, then nothing)."""

    def __init__(self, models: list[str], *, ollama: bool = False) -> None:
        self.models = models
        self.ollama = ollama
        self.mode = "ok"
        self.delay_s = 0.0  # before answering
        self.chunk_gap_s = 0.0  # between stream chunks
        self.words = ("hello", " from", " fake")
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._released = asyncio.Event()  # set on stop: stalled handlers end
        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/models", self._models),
                web.post("/v1/chat/completions", self._chat),
                web.post("/v1/embeddings", self._embeddings),
                web.get("/api/tags", self._tags),
                web.get("/api/ps", self._ps),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    def stop(self) -> None:
        if self._runner is not None:
            self._loop.call_soon_threadsafe(self._released.set)
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None

    def restart(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # -- handlers -----------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        if self.ollama:
            raise web.HTTPNotFound()
        data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _tags(self, request: web.Request) -> web.Response:
        if not self.ollama:
            raise web.HTTPNotFound()
        models = [
            {
                "name": m,
                "model": m,
                "size": 1_000_000 * (i + 1),
                "details": {
                    "format": "gguf",
                    "family": "bert" if "embed" in m else "llama",
                    "families": ["bert"] if "embed" in m else ["llama"],
                    "parameter_size": "1B",
                    "quantization_level": "Q4_K_M",
                },
            }
            for i, m in enumerate(self.models)
        ]
        return web.json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        if not self.ollama:
            raise web.HTTPNotFound()
        loaded = [{"name": m, "model": m, "context_length": 4096} for m in self.models[:1]]
        return web.json_response({"models": loaded})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        mode = self.mode
        if mode == "500":
            return web.json_response({"error": {"message": "boom", "type": "x"}}, status=500)
        if mode == "html500":
            return web.Response(text="<html>Internal Error</html>", status=500)
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if mode == "stall":
            await self._released.wait()
            return web.Response(status=499)
        model = body["model"]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if mode == "silent_mid_body":
            return await self._silent_mid_body(request, model)
        if not body.get("stream"):
            return web.json_response(_chat_response(model, "".join(self.words)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if mode == "silent_before_first_chunk":
            await self._released.wait()
            return response
        for word in self.words:
            await response.write(_chunk(model, word))
            if self.chunk_gap_s:
                await asyncio.sleep(self.chunk_gap_s)
            if mode == "die_mid_stream" and word == " from":
                assert request.transport is not None
                request.transport.abort()
                return response
            if mode == "silent_mid_stream" and word == " from":
                await self._released.wait()
                return response
        await response.write(_chunk(model, None, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _silent_mid_body(self, request: web.Request, model: str) -> web.StreamResponse:
        answer = orjson.dumps(_chat_response(model, "".join(self.words)))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(answer)
        await response.prepare(request)
        await response.write(answer[: len(answer) // 2])
        await self._released.wait()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [1.0, 0.0, 0.0]}
            for i in range(len(inputs))
        ]
        return web.json_response({"object": "list", "data": data, "model": body["model"]})
