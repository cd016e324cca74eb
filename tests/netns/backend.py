"""A fake OpenAI-compatible backend that runs inside a namespace, paced by its requests.

    backend.py --port P --model M [--model M2 ...]

Serves `GET /v1/models` and `POST /v1/chat/completions` on 127.0.0.1. A request says
how it wants to be answered in its last message, e.g. `fake: delay=2 words=200 gap=0.05
stall_after=5`: wait `delay` s before answering, stream `words` chunks `gap` s apart,
and go silent for good after `stall_after` chunks (a hung engine). A non-streamed answer
carries, as its message content, the JSON body the backend received, so a test can see
what Shoal forwarded. Runs until killed; prints `ready` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

STALL_S = 3600.0  # "for good": far beyond any test


def _pacing(body: dict[str, Any]) -> dict[str, float]:
    pacing = {"delay": 0.0, "words": 3.0, "gap": 0.0, "stall_after": -1.0}
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
    if isinstance(content, str) and content.startswith("fake:"):
        for word in content.removeprefix("fake:").split():
            key, _, value = word.partition("=")
            if key in pacing:
                pacing[key] = float(value)
    return pacing


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    document = {
        "id": "chatcmpl-netns",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def make_app(models: list[str]) -> web.Application:
    async def list_models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "netns"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        pacing = _pacing(body)
        model = str(body.get("model"))
        await asyncio.sleep(pacing["delay"])
        if body.get("stream") is not True:
            message = {"role": "assistant", "content": json.dumps(body)}
            return web.json_response(
                {
                    "id": "chatcmpl-netns",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(int(pacing["words"])):
            if index == pacing["stall_after"]:
                await asyncio.sleep(STALL_S)
            await response.write(_chunk(model, f" w{index}"))
            await asyncio.sleep(pacing["gap"])
        await response.write(_chunk(model, None, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(port: int, models: list[str]) -> None:
    runner = web.AppRunner(make_app(models), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.model))


if __name__ == "__main__":
    main()
