"""The bare aiohttp pass-through proxy of DESIGN §11: what any aiohttp proxy costs.

    python -m bench.baselines.aiohttp_proxy --port P --backend http://127.0.0.1:B

Forwards every POST under /v1/ to the backend and relays the answer, streamed chunk by
chunk when it is SSE; no routing, no auth, no metrics, no access log. Shoal's CPU per
request is held against this (target ≤ 1.7×), so it is kept as lean as aiohttp allows.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKEND = web.AppKey("backend", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[BACKEND] + request.path,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            raw = await upstream.read()
            return web.Response(
                body=raw,
                status=upstream.status,
                content_type=None,
                headers={"Content-Type": content_type},
            )
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type}
        )
        await response.prepare(request)
        while chunk := await upstream.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response


async def start_session(app: web.Application) -> None:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def close_session(app: web.Application) -> None:
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines.aiohttp_proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[BACKEND] = args.backend.rstrip("/")
    app.on_startup.append(start_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/v1/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
