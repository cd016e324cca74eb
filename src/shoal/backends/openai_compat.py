"""Any OpenAI-compatible server: llama.cpp's llama-server, vLLM, LM Studio, MLX servers.

Capacity (requests the server runs at once) comes, in this order, from the operator's
`capacity` on the backend's config entry, else from the server where it says: llama.cpp's
llama-server answers `GET /props` with `total_slots` (its `--parallel`), read at every
probe. vLLM's `--max-num-seqs` is on no production route (only `/server_info`, which
exists under VLLM_SERVER_DEV_MODE), and LM Studio's and MLX servers' limits on none, so
those answer /props with a 404 and routing falls back to `routing.default_capacity`.
"""

from __future__ import annotations

import re
from typing import Any

from shoal.backends.base import BackendStatus, Health, ModelInfo, Operation
from shoal.backends.http import PROBE_ERRORS, HttpTransport, HttpUpstream
from shoal.protocol import MODELS_PATH

# llama-server's description of itself (tools/server: `total_slots` is `n_parallel`).
PROPS_PATH = "/props"

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


def parse_llama_props(document: Any) -> int | None:
    """Slots from llama-server's `GET /props` answer: `total_slots`, when it is a whole
    number of at least 1; None from a document that does not say."""
    said = document.get("total_slots") if isinstance(document, dict) else None
    if isinstance(said, int) and not isinstance(said, bool) and said >= 1:
        return said
    return None


def capacity_detail(configured: int | None, said: int | None) -> dict[str, Any]:
    """The status detail routing reads capacity from (`router.capacity_of`): the
    operator's number over the server's; nothing when neither says."""
    if configured is not None:
        return {"capacity": configured, "capacity_from": "configured"}
    if said is not None:
        return {"capacity": said, "capacity_from": "backend"}
    return {}


class OpenAICompatBackend:
    kind = "openai"

    def __init__(self, name: str, transport: HttpTransport, *, capacity: int | None = None) -> None:
        self.name = name
        self.location = transport.base_url
        self._transport = transport
        self._capacity = capacity  # configured: wins over what the server says

    async def probe(self) -> BackendStatus:
        try:
            models = await self.list_models()
        except PROBE_ERRORS as exc:
            return BackendStatus(Health.DOWN, reason=f"not answering ({type(exc).__name__})")
        said = None if self._capacity is not None else await self.said_capacity()
        return BackendStatus(
            Health.HEALTHY, models=models, detail=capacity_detail(self._capacity, said)
        )

    async def said_capacity(self) -> int | None:
        """The slots the server says it has (llama-server's /props); None from a server
        that has no such route or does not answer it: routing falls back, quietly."""
        try:
            return parse_llama_props(await self._transport.get_json(PROPS_PATH))
        except PROBE_ERRORS:
            return None

    async def list_models(self) -> tuple[ModelInfo, ...]:
        return parse_openai_models(await self._transport.get_json(MODELS_PATH))

    async def send(self, op: Operation, body: bytes) -> HttpUpstream:
        return await self._transport.send(op, body)

    async def aclose(self) -> None:
        await self._transport.aclose()
