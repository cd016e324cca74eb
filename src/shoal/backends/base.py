"""The Backend interface: status, models, and one method that sends a request.

Every inference source (the embedded engine, llama-server, vLLM, LM Studio, Ollama, and
later a peer node) speaks OpenAI's wire format, so the interface is narrow on purpose:
`send` posts an OpenAI request body and returns the open answer. Whether the answer is
a stream or a full body is chosen by the request (`"stream": true`), and read through
`Upstream.chunks()` or `Upstream.read()`. Bodies pass through as bytes: Shoal never
re-encodes a request or a token stream it does not need to change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Operation(StrEnum):
    """An OpenAI endpoint a backend can serve, named by its path under /v1."""

    CHAT = "chat/completions"
    COMPLETION = "completions"
    EMBEDDING = "embeddings"


GENERATION = frozenset({Operation.CHAT, Operation.COMPLETION})


class Health(StrEnum):
    HEALTHY = "healthy"
    STARTING = "starting"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    loaded: bool = True
    size_bytes: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    # What the model can do; a chat model usually also does completions.
    operations: frozenset[Operation] = GENERATION
    # Other names it answers to, e.g. a Hub file's `org/repo/file.gguf`: a request for
    # one is served under `id`, here and from any peer.
    aliases: tuple[str, ...] = ()
    # The file's SHA-256 (a managed model whose store names it): peers may fetch the
    # file from this node by it.
    sha256: str | None = None

    def answers_to(self, name: str) -> bool:
        return name == self.id or name in self.aliases

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "loaded": self.loaded,
            "size_bytes": self.size_bytes,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "operations": sorted(self.operations),
            **({"aliases": list(self.aliases)} if self.aliases else {}),
        }


@dataclass(frozen=True, slots=True)
class BackendStatus:
    health: Health
    models: tuple[ModelInfo, ...] = ()
    # Why the backend is not healthy, for people; never a secret.
    reason: str = ""
    # Backend-specific facts worth showing (engine pid, restarts, ...).
    detail: dict[str, Any] = field(default_factory=dict)


class Upstream(Protocol):
    """An answer being received from a backend. Always `close()` it."""

    status: int
    content_type: str
    # The node that produced the answer, when it came through a peer.
    served_by: str | None

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises UpstreamFailed / UpstreamTimeout."""
        ...

    async def read(self) -> bytes:
        """The whole body. Raises UpstreamFailed / UpstreamTimeout."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """An inference source. Implementations: engine, openai_compat, ollama."""

    name: str
    kind: str
    # Where it is, for people (a URL, or "embedded").
    location: str

    async def probe(self) -> BackendStatus:
        """Ask the backend for its health and models now. Never raises."""
        ...

    async def send(self, op: Operation, body: bytes) -> Upstream:
        """POST an OpenAI request body to /v1/<op>; return the open answer.

        Raises BackendUnavailable when the backend cannot be reached at all,
        UpstreamFailed / UpstreamTimeout when it fails before answering.
        """
        ...

    async def aclose(self) -> None: ...
