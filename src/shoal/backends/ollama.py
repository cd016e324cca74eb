"""Ollama: models from its native API, generation through its OpenAI-compatible routes.

`GET /api/tags` lists the models on disk, `GET /api/ps` the ones loaded in memory
(https://github.com/ollama/ollama/blob/main/docs/api.md).
"""

from __future__ import annotations

from typing import Any

from shoal.backends.base import GENERATION, ModelInfo, Operation
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


class OllamaBackend(OpenAICompatBackend):
    kind = "ollama"

    async def list_models(self) -> tuple[ModelInfo, ...]:
        tags = await self._transport.get_json("/api/tags")
        ps = await self._transport.get_json("/api/ps")
        return parse_ollama_models(tags, ps)
