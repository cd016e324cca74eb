"""Any OpenAI-compatible server: llama.cpp's llama-server, vLLM, LM Studio, MLX servers."""

from __future__ import annotations

import re
from typing import Any

from shoal.backends.base import BackendStatus, Health, ModelInfo, Operation
from shoal.backends.http import PROBE_ERRORS, HttpTransport, HttpUpstream
from shoal.protocol import MODELS_PATH

_QUANT = re.compile(r"(?i)\b(I?Q\d(?:_[A-Z0-9]+)*|F16|BF16|F32|\d+bit)\b")
ALL_OPERATIONS = frozenset(Operation)


def guess_quantization(name: str) -> str | None:
    """`Llama-3-8B-Instruct.Q4_K_M.gguf` -> `Q4_K_M`; None when the name does not say."""
    match = _QUANT.search(name.replace(".", " ").replace("-", " "))
    return match.group(1).upper() if match else None


def parse_openai_models(document: Any) -> tuple[ModelInfo, ...]:
    """Models from a `/v1/models` answer, with the extras llama-server and vLLM add."""
    models = []
    for entry in document["data"]:
        model_id = str(entry["id"])
        meta = entry.get("meta") or {}  # llama-server
        context = meta.get("n_ctx_train") or entry.get("max_model_len")  # vLLM
        models.append(
            ModelInfo(
                id=model_id,
                loaded=True,
                size_bytes=meta.get("size"),
                quantization=guess_quantization(model_id),
                context_length=int(context) if context else None,
                # The list does not say what a model can do; let the server answer.
                operations=ALL_OPERATIONS,
            )
        )
    return tuple(models)


class OpenAICompatBackend:
    kind = "openai"

    def __init__(self, name: str, transport: HttpTransport) -> None:
        self.name = name
        self.location = transport.base_url
        self._transport = transport

    async def probe(self) -> BackendStatus:
        try:
            models = await self.list_models()
        except PROBE_ERRORS as exc:
            return BackendStatus(Health.DOWN, reason=f"not answering ({type(exc).__name__})")
        return BackendStatus(Health.HEALTHY, models=models)

    async def list_models(self) -> tuple[ModelInfo, ...]:
        return parse_openai_models(await self._transport.get_json(MODELS_PATH))

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        return await self._transport.send(op, body)

    async def aclose(self) -> None:
        await self._transport.aclose()
