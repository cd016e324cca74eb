"""The catalog: every GGUF this node can serve from its disk, under names people type.

(Interface first; the scanning of stores and the naming are filled in beside it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

#: Where a GGUF was found. "hf": the store (the Hugging Face cache layout, which Shoal
#: writes); the others are adopted read-only.
StoreKind = Literal["hf", "ollama", "lmstudio", "folder"]


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One GGUF on this machine's disk, served from where it lies (never copied)."""

    name: str  # what people type, e.g. "qwen2.5-0.5b-instruct:q4_k_m"; unique in the catalog
    path: Path  # the GGUF file (for the HF layout, the snapshot path, resolved)
    size_bytes: int
    store: StoreKind
    full_name: str | None = None  # "org/repo/file.gguf" for Hub files; also accepted
    sha256: str | None = None  # when known without hashing (HF blob, Ollama digest)
    quantization: str | None = None  # "Q4_K_M", from the GGUF header
    context_length: int | None = None  # the model's trained context, from the header
    architecture: str | None = None  # "llama", "qwen2", ... from the header
    # For the KV cache's size (the memory check before a load), from the header too.
    layers: int | None = None  # <arch>.block_count
    embedding_length: int | None = None  # <arch>.embedding_length
    head_count: int | None = None  # <arch>.attention.head_count
    head_count_kv: int | None = None  # <arch>.attention.head_count_kv

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the model answers to."""
        return (self.name,) if self.full_name is None else (self.name, self.full_name)


class Catalog(Protocol):
    """What the node asks of the catalog."""

    def models(self) -> list[LocalModel]:
        """Every catalogued model, one per distinct file (duplicates merged by SHA-256)."""
        ...

    def find(self, name: str) -> LocalModel | None:
        """The model a (validated) name means, by its short or full name."""
        ...

    async def refresh(self) -> None:
        """Scan the stores again (off the event loop); a pull or a dropped file shows up."""
        ...
