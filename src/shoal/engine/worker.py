"""The engine child process: llama.cpp and the embedding model behind OpenAI routes.

Run by the supervisor as `python -m shoal.engine.worker --socket PATH ...`; it listens
on a Unix socket, so a crash or hang in native code takes down only this process.
Bodies are parsed with the node's own request models (`shoal.api.requests`): a client
mistake is a 400 naming the parameter here too, and what the model cannot do (more than
one choice, logprobs, images) is a 400 saying so; 500 is kept for the engine failing.
Generations run one at a time (a llama.cpp context holds one sequence) in a worker
thread; requests wait their turn in FIFO order. A client that goes away cancels its
generation at the next token. The process exits when its parent closes its stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from shoal import protocol
from shoal.api.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    as_json,
    joined_text,
    parse,
)
from shoal.errors import InvalidRequest

log = logging.getLogger("shoal.engine.worker")

_DONE = object()
_SAMPLING = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_SAMPLING_CHAT = (*_SAMPLING, "logprobs", "top_logprobs", "response_format")
# /v1/completions' `logprobs` is a count of top tokens, llama-cpp-python's too.
_SAMPLING_COMPLETION = (*_SAMPLING, "logprobs")


class RequestError(InvalidRequest):
    """A request the engine cannot serve; becomes a 400 in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class _Watch:
    """A llama.cpp logits processor: counts tokens, applies logit_bias, and cancels.

    llama-cpp-python's chat API takes no stopping criterion, so a cancelled generation
    is ended the way a model ends one: every token but end-of-generation is masked.
    OpenAI's `logit_bias` is applied here too: llama-cpp-python 0.3.36 drops every other
    logits processor when it is given one (`logits_processor = list.extend(...)`).
    """

    def __init__(
        self, cancel: threading.Event, eos: int, bias: dict[int, float] | None = None
    ) -> None:
        self.cancel = cancel
        self.eos = eos
        self.bias = bias or {}
        self.prompt_tokens: int | None = None
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)  # first call: the prompt, nothing sampled
        self.sampled += 1
        for token, bias in self.bias.items():
            scores[token] += bias
        if self.cancel.is_set():
            scores[:] = -np.inf
            scores[self.eos] = 0.0
        return scores


class Generator:
    """The llama.cpp model, one generation at a time, with counters for /health."""

    def __init__(self, model_path: Path, model_id: str, *, threads: int, context: int) -> None:
        from llama_cpp import Llama  # imported here: only the child loads native code

        self.model_id = model_id
        self._llm = Llama(
            model_path=str(model_path),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self._lock = threading.Lock()
        self.turn = asyncio.Lock()  # FIFO order of waiting requests
        self.waiting = 0
        self.generating = False
        self.tokens_generated = 0
        self.requests = 0
        self.cancelled = 0
        self.last_request: dict[str, Any] = {}

    def run(
        self,
        chat: bool,
        kwargs: dict[str, Any],
        emit: Callable[[object], None],
        cancel: threading.Event,
    ) -> None:
        """In a worker thread: generate, emitting chunks (or one response), then _DONE."""
        from llama_cpp import LogitsProcessorList

        bias = kwargs.pop("logit_bias", None)
        counter = _Watch(cancel, self._llm.token_eos(), bias)
        method = self._llm.create_chat_completion if chat else self._llm.create_completion
        finish_reason = None
        started = time.monotonic()
        with self._lock:
            self.generating = True
            self.requests += 1
            try:
                vocab = self._llm.n_vocab()
                if any(not 0 <= token < vocab for token in counter.bias):
                    message = f"logit_bias token ids must be below {vocab}"
                    raise RequestError(message, "logit_bias", "invalid_value")
                result = method(**kwargs, logits_processor=LogitsProcessorList([counter]))
                if isinstance(result, Iterator):
                    for chunk in result:
                        finish_reason = _finish_reason(chunk) or finish_reason
                        emit(chunk)
                        if cancel.is_set():
                            break
                else:
                    finish_reason = _finish_reason(result)
                    emit(result)
            except RequestError as exc:
                emit(exc)
            except ValueError as exc:  # llama-cpp-python refusing the request
                emit(_refused_by_llama(exc, "messages" if chat else "prompt"))
            except Exception as exc:
                emit(exc)
            finally:
                # Every sampled token is part of the answer, except the end-of-generation
                # token that ends one with finish_reason "stop".
                completion = max(0, counter.sampled - (finish_reason == "stop"))
                self.tokens_generated += counter.sampled
                if cancel.is_set():
                    self.cancelled += 1
                self.last_request = {
                    "prompt_tokens": counter.prompt_tokens or 0,
                    "completion_tokens": completion,
                    "sampled_tokens": counter.sampled,
                    "cancelled": cancel.is_set(),
                    "seconds": round(time.monotonic() - started, 3),
                }
                self.generating = False
                emit(_DONE)


def _refused_by_llama(exc: ValueError, prompt_param: str) -> RequestError:
    """llama-cpp-python says what is wrong with a request only in a ValueError's words."""
    message = str(exc)
    if "exceed context window" in message:  # "Requested tokens (N) exceed context window of M"
        return RequestError(message, prompt_param, "context_length_exceeded")
    return RequestError(message, code="invalid_value")


def _finish_reason(chunk: Any) -> str | None:
    choices = chunk.get("choices") or [{}]
    reason = choices[0].get("finish_reason")
    return str(reason) if reason else None


def sampling_kwargs(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The OpenAI request fields, as llama-cpp-python arguments."""
    if (body.get("n") or 1) != 1:
        message = "the embedded engine generates one choice per request"
        raise RequestError(message, "n", "unsupported_value")
    fields = _SAMPLING_CHAT if chat else _SAMPLING_COMPLETION
    kwargs = {key: body[key] for key in fields if body.get(key) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    kwargs["max_tokens"] = max_tokens if max_tokens else (None if chat else 256)
    if body.get("logit_bias"):
        try:
            bias = {int(k): float(v) for k, v in body["logit_bias"].items()}
        except (TypeError, ValueError, AttributeError):
            message = "logit_bias maps token ids to numbers"
            raise RequestError(message, "logit_bias", "invalid_type") from None
        if not all(-100 <= v <= 100 for v in bias.values()):
            message = "logit_bias values must be between -100 and 100"
            raise RequestError(message, "logit_bias", "invalid_value")
        kwargs["logit_bias"] = bias
    kwargs["stream"] = bool(body.get("stream"))
    if chat:
        kwargs["messages"] = text_messages(body["messages"])
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                message = "the embedded engine takes one prompt per request"
                raise RequestError(message, "prompt", "unsupported_value")
            prompt = prompt[0]
        kwargs["prompt"] = prompt
        if body.get("echo"):
            kwargs["echo"] = True
        if body.get("suffix") is not None:
            kwargs["suffix"] = body["suffix"]
    return kwargs


def text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as llama.cpp's chat templates take them: a message's text parts joined
    into one string. The model reads text only: any other part is refused."""
    result = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text":
                    raise RequestError(
                        f"the embedded engine's model reads text only; it cannot take a "
                        f"content part of type {part.get('type')!r}",
                        f"messages[{i}].content[{j}].type",
                        "unsupported_value",
                    )
            message = {**message, "content": joined_text(content)}
        result.append(message)
    return result


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """Refuse what the engine would otherwise drop or fail on: llama.cpp computes
    logprobs only for a model loaded with every token's logits kept (`logits_all`),
    which would cost context x vocabulary floats (about 400 MB for SmolLM2)."""
    if chat:  # `logprobs: false` and `top_logprobs: 0` ask for nothing
        asked = [p for p in ("logprobs", "top_logprobs") if body.get(p)]
    else:  # a count of top tokens: 0 asks for the chosen token's
        asked = ["logprobs"] if body.get("logprobs") is not None else []
    if asked:
        raise RequestError(
            f"Unsupported parameter: '{asked[0]}' is not supported by the embedded engine.",
            asked[0],
            "unsupported_parameter",
        )


class Worker:
    def __init__(self, generator: Generator, embedder: Any | None) -> None:
        self.generator = generator
        self.embedder = embedder
        # Threads: one generation at a time plus embeddings beside it.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/health", self.health),
                web.post(protocol.CHAT_PATH, self.chat),
                web.post(protocol.COMPLETIONS_PATH, self.completion),
                web.post(protocol.EMBEDDINGS_PATH, self.embeddings),
            ]
        )
        return app

    async def health(self, request: web.Request) -> web.Response:
        g = self.generator
        return _json(
            {
                "status": "ok",
                "pid": os.getpid(),
                "generating": g.generating,
                "waiting": g.waiting,
                "requests": g.requests,
                "cancelled": g.cancelled,
                "tokens_generated": g.tokens_generated,
                "last_request": g.last_request,
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = as_json(parse(ChatRequest if chat else CompletionRequest, await request.read()))
            refuse_unsupported(body, chat)
            kwargs = sampling_kwargs(body, chat)
        except InvalidRequest as exc:
            return _refusal(exc)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        g = self.generator
        g.waiting += 1
        try:
            await g.turn.acquire()
        finally:
            g.waiting -= 1
        future = loop.run_in_executor(self._executor, g.run, chat, kwargs, emit, cancel)
        try:
            first = await queue.get()
            if isinstance(first, InvalidRequest):
                return _refusal(first)
            if isinstance(first, BaseException):
                log.error("generation failed: %r", first)
                return _error(500, f"the engine failed: {type(first).__name__}")
            if not kwargs["stream"]:
                assert isinstance(first, dict)
                first["model"] = g.model_id
                return _json(first)
            return await self._stream(request, first, queue, include_usage)
        finally:
            cancel.set()  # no-op when finished; stops an abandoned generation
            try:
                await asyncio.wait({future})
            finally:
                # Even if cancelled again while waiting: a turn never leaks (the thread
                # lock still keeps a next generation off llama.cpp until this one ends).
                g.turn.release()

    async def _stream(
        self,
        request: web.Request,
        first: object,
        queue: asyncio.Queue[object],
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        item, last = first, None
        while item is not _DONE:
            if isinstance(item, BaseException):
                message = f"the engine failed mid-stream: {type(item).__name__}"
                await response.write(b"data: " + orjson.dumps(_error_doc(message)) + b"\n\n")
                break
            assert isinstance(item, dict)
            item["model"] = self.generator.model_id
            last = item
            await response.write(b"data: " + orjson.dumps(item) + b"\n\n")
            item = await queue.get()
        else:
            if include_usage and last is not None:
                usage = self.generator.last_request
                await response.write(b"data: " + orjson.dumps(_usage_chunk(last, usage)) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = parse(EmbeddingRequest, await request.read())
        except InvalidRequest as exc:
            return _refusal(exc)
        if self.embedder is None:  # a managed model's engine: a chat model only
            message = f"{self.generator.model_id} is not an embedding model"
            return _error(400, message, "model", "unsupported_value")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not all(isinstance(t, str) for t in texts):
            message = "the embedding model takes text input, not token ids"
            return _error(400, message, "input", "unsupported_value")
        dims = body.dimensions
        if dims is not None and dims != self.embedder.dimensions:
            message = f"{self.embedder.model_id} has {self.embedder.dimensions} dimensions"
            return _error(400, message, "dimensions", "unsupported_value")
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(self._executor, self.embedder.embed, texts)
        as_base64 = body.encoding_format == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _b64(vector) if as_base64 else vector.tolist(),
            }
            for i, vector in enumerate(vectors)
        ]
        return _json(
            {
                "object": "list",
                "data": data,
                "model": self.embedder.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _usage_chunk(last: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "id": last.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": last.get("object"),
        "created": last.get("created"),
        "model": last.get("model"),
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _b64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode()


def _error_doc(
    message: str, param: str | None = None, code: str | None = None, kind: str = "server_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _refusal(exc: InvalidRequest) -> web.Response:
    return _error(400, exc.message, exc.param, exc.code)


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json(_error_doc(message, param, code, kind), status=status)


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type="application/json")


async def _exit_with_parent() -> None:
    """The supervisor holds our stdin open; EOF means it is gone, so we go too."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    os._exit(0)


async def _serve(args: argparse.Namespace) -> None:
    from shoal.engine.embedding import Embedder

    generator = Generator(args.model, args.model_id, threads=args.threads, context=args.context)
    embedder = Embedder(args.embedding_dir) if args.embedding_dir else None
    runner = web.AppRunner(
        Worker(generator, embedder).app(), handler_cancellation=True, access_log=None
    )
    await runner.setup()
    args.socket.unlink(missing_ok=True)  # left behind by a crashed predecessor
    await web.UnixSite(runner, str(args.socket)).start()
    log.info("engine ready on %s (pid %d)", args.socket, os.getpid())
    await _exit_with_parent()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal-engine")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-id", required=True)
    # None: no embedding model (a managed model's engine serves one GGUF, nothing else).
    parser.add_argument("--embedding-dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="engine[%(process)d] %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
