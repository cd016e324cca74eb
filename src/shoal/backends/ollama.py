"""Ollama: models from its native API, generation through its OpenAI-compatible routes.

`GET /api/tags` lists the models on disk, `GET /api/ps` the ones loaded in memory
(https://github.com/ollama/ollama/blob/main/docs/api.md).

Chat bodies are translated in one way: a message whose content is text parts is sent
with the parts joined into one string. Ollama's OpenAI route took only a string before
it learned images, and since then makes each text part a message of its own; joined,
they mean what llama.cpp's server and vLLM make of them. Parts with an image are left
for Ollama, which reads base64 `data:` URLs.

Capacity: Ollama runs OLLAMA_NUM_PARALLEL requests at once per loaded model, a setting of
its server that no route of its API shows (not /api/ps, /api/show or /api/version). So
it is what the operator configures (`capacity` on the backend's entry), else
`routing.default_capacity`, else none: Ollama queues the rest by itself.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

from shoal.api.requests import joined_text
from shoal.backends.base import GENERATION, ModelInfo, Operation
from shoal.backends.http import HttpUpstream
from shoal.backends.openai_compat import OpenAICompatBackend

_EMBEDDING_FAMILIES = frozenset({"bert", "nomic-bert", "xlm-roberta"})


def parse_ollama_models(tags: Any, ps: Any) -> tuple[ModelInfo, ...]:
    loaded = {entry["name"]: entry for entry in ps.get("models") or ()}
    models = []
    for entry in tags.get("models") or ():
        details = entry.get("details") or {}
        families = set(details.get("families") or ()) | {details.get("family")}
        is_embedding = bool(families & _EMBEDDING_FAMILIES)
        running = loaded.get(entry["name"]) or {}
        context = running.get("context_length")
        models.append(
            ModelInfo(
                id=entry["name"],
                loaded=entry["name"] in loaded,
                size_bytes=entry.get("size"),
                quantization=details.get("quantization_level"),
                context_length=int(context) if context else None,
                operations=frozenset({Operation.EMBEDDING}) if is_embedding else GENERATION,
            )
        )
    return tuple(models)


def join_text_parts(body: bytes) -> bytes:
    """A chat body with each message of text parts given its text as one string. A
    body of another shape is left as it is, for Ollama to refuse."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    messages = document.get("messages") if isinstance(document, dict) else None
    joined = False
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if _all_text(content):
            message["content"] = joined_text(content)
            joined = True
    return orjson.dumps(document) if joined else body


def _all_text(content: Any) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    )


class OllamaBackend(OpenAICompatBackend):
    kind = "ollama"

    async def list_models(self) -> tuple[ModelInfo, ...]:
        tags = await self._transport.get_json("/api/tags")
        ps = await self._transport.get_json("/api/ps")
        return parse_ollama_models(tags, ps)

    async def said_capacity(self) -> int | None:
        return None  # not visible through its API (see the module's docstring)

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        if op is Operation.CHAT:
            body = join_text_parts(body)
        return await super().send(op, body)
