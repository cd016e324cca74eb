"""Which managed models are in memory: the decisions, with no I/O (DESIGN §2).

Theory of operation: `Residency` holds one `Resident` per model that has an engine,
loading or ready, and the managed backend (`shoal.engine.managed`) asks it, with `now`:

- `admit(name, need, ...)` before a load: `Load` (naming the idle models to unload
  first, least recently used first), `Wait` (the room is held by models serving
  requests, or loading: try again soon) or `Refuse` (it cannot fit even with every
  other model unloaded). A model with requests in flight, or still loading, is never
  chosen for unloading.
- `add`, `ready`, `remove` as engines start, answer and go; `begin` and `end` around
  each request (its last use is when its last request ended, as Ollama counts).
- `expired(now)`: ready, idle models whose keep_alive has passed (a model not yet used
  waits at least `FIRST_USE_GRACE_S` for the request that loaded it to come back);
  `next_due()` says when to ask again, so the caller sleeps until then and no longer.

Memory is counted in estimates (`memory_needed`: the file, which llama.cpp maps whole,
plus the KV cache for every slot's context, plus the engine's own buffers). Under a
limit (`models.memory_limit_bytes`) the free room is the limit less every resident's
estimate; without one it is what the system reports available less the estimates of
the models still loading (a model half read is only half counted by the system).
Unloading a model gives back its estimate. Load progress is time-based: llama-server
does not report its own, so `expected_load_s` guesses from the file's size, or from
the model's last measured load, and `progress` reports elapsed time against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from shoal.models.catalog import LocalModel

MIB = 1024 * 1024
GIB = 1024 * MIB
# llama.cpp's compute buffers and the engine process itself, beside the weights and the
# KV cache (SmolLM2-135M with 1024 tokens: about 150 MiB resident over the file and the
# cache, measured with the embedded worker; llama-server uses less).
ENGINE_OVERHEAD_BYTES = 160 * MIB
KV_BYTES_PER_VALUE = 2  # llama.cpp's KV cache is f16 by default
# Load time with no measurement yet: start-up, then the file read at about disk speed
# (page-cache warm loads are faster; a guess long rather than short keeps the
# Retry-After from sending a client back too early).
LOAD_BASE_S = 1.0
LOAD_BYTES_PER_S = 400 * MIB
RETRY_AFTER_MAX_S = 30.0  # the OpenAI SDKs honour a Retry-After of up to 60 s
# A model that cannot load because busy models hold the room: they finish in seconds.
WAIT_RETRY_S = 2.0
# A model loaded for a request waits at least this long for that request to come back,
# whatever its keep_alive (0 would unload it before the client's retry): the SDKs retry
# after a Retry-After of up to 60 s.
FIRST_USE_GRACE_S = 60.0


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """What a model needs in memory, loaded for `context` tokens in each of `slots`."""

    file_bytes: int
    kv_bytes: int
    overhead_bytes: int
    context: int  # tokens per slot
    slots: int
    kv_known: bool  # False: the GGUF header lacks the fields; the cache is not counted

    @property
    def total(self) -> int:
        return self.file_bytes + self.kv_bytes + self.overhead_bytes

    def describe(self) -> str:
        kv = (
            f"KV cache {gib(self.kv_bytes)} for {self.context} tokens × {self.slots} slot(s)"
            if self.kv_known
            else "KV cache not counted: the file does not say its shape"
        )
        parts = f"file {gib(self.file_bytes)}, {kv}, engine {gib(self.overhead_bytes)}"
        return f"{gib(self.total)} ({parts})"


def slot_context(model: LocalModel, context: int) -> int:
    """Tokens per slot: the configured context, never more than the model was trained on."""
    if model.context_length:
        return min(context, model.context_length)
    return context


def memory_needed(model: LocalModel, context: int, slots: int) -> MemoryNeed:
    """The estimate a load is admitted with: file + KV cache + engine overhead.

    KV cache = layers × tokens × slots × kv_heads × (key_length + value_length) × 2
    bytes. Per head, K and V are embedding_length / head_count wide unless the header
    says otherwise (Gemma, Qwen3); grouped-query attention shares them between heads
    (kv_heads = head_count_kv, else head_count).
    """
    tokens = slot_context(model, context)
    layers, width, heads = model.layers, model.embedding_length, model.head_count
    kv_bytes, known = 0, False
    if layers and heads and (width or (model.key_length and model.value_length)):
        kv_heads = model.head_count_kv or heads
        head_dim = (width or 0) // heads
        per_head = (model.key_length or head_dim) + (model.value_length or head_dim)
        kv_bytes = layers * tokens * slots * kv_heads * per_head * KV_BYTES_PER_VALUE
        known = True
    return MemoryNeed(model.size_bytes, kv_bytes, ENGINE_OVERHEAD_BYTES, tokens, slots, known)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


# -- load progress ------------------------------------------------------------------------


def expected_load_s(size_bytes: int, measured_s: float | None) -> float:
    """How long a load should take: as it last did, else from the file's size."""
    if measured_s is not None:
        return max(measured_s, 0.1)
    return LOAD_BASE_S + size_bytes / LOAD_BYTES_PER_S


def progress(elapsed_s: float, expected_s: float) -> float:
    """The share of the load done, by time: never 1 until the engine says it is ready."""
    if expected_s <= 0:
        return 0.99
    return min(0.99, max(0.0, elapsed_s / expected_s))


def retry_after_s(elapsed_s: float, expected_s: float) -> float:
    """When to come back: the load's expected rest, at least 1 s, at most 30 s."""
    return min(RETRY_AFTER_MAX_S, max(1.0, math.ceil(expected_s - elapsed_s)))


# -- residency ---------------------------------------------------------------------------


class Phase(StrEnum):
    LOADING = "loading"  # its engine is starting (or restarting)
    READY = "ready"  # its engine answers


@dataclass(slots=True)
class Resident:
    name: str
    need: int  # bytes, the estimate it was admitted with
    keep_alive_s: float
    last_used: float  # monotonic; when its last request ended (or it became ready)
    phase: Phase = Phase.LOADING
    in_flight: int = 0
    used: bool = False  # it has served a request

    @property
    def idle(self) -> bool:
        return self.phase is Phase.READY and self.in_flight == 0


@dataclass(frozen=True, slots=True)
class Load:
    evict: tuple[str, ...] = ()  # unload these first, in this order


@dataclass(frozen=True, slots=True)
class Wait:
    reason: str
    retry_after_s: float = WAIT_RETRY_S


@dataclass(frozen=True, slots=True)
class Refuse:
    need: int
    room: int  # the most this node could give it, every other model unloaded
    reason: str


Admission = Load | Wait | Refuse


@dataclass(slots=True)
class Residency:
    max_loaded: int
    residents: dict[str, Resident] = field(default_factory=dict)

    def admit(self, name: str, need: int, *, limit: int | None, available: int) -> Admission:
        """May `name` (needing `need` bytes) load now, and what must go first?

        `limit` is the bytes all managed models may use (None: no limit), `available`
        what the system reports available now (read only when `limit` is None).
        """
        assert name not in self.residents, f"{name} is resident already"
        others = self.residents.values()
        if limit is not None:
            free = limit - sum(r.need for r in others)
        else:
            free = available - sum(r.need for r in others if r.phase is Phase.LOADING)
        room = free + sum(r.need for r in others)
        if need > room:
            where = "the memory limit" if limit is not None else "available memory"
            return Refuse(need, max(room, 0), f"more than {where} allows")
        # The least recently used idle models, first to go.
        idle = sorted((r for r in others if r.idle), key=lambda r: (r.last_used, r.name))
        evict: list[Resident] = []
        while len(self.residents) - len(evict) >= self.max_loaded:
            if len(evict) == len(idle):
                return Wait(f"{self.max_loaded} model(s) loaded (models.max_loaded), all in use")
            evict.append(idle[len(evict)])
        while free + sum(r.need for r in evict) < need:
            if len(evict) == len(idle):
                return Wait("the memory it needs is held by models serving requests")
            evict.append(idle[len(evict)])
        return Load(tuple(r.name for r in evict))

    def add(self, name: str, need: int, keep_alive_s: float, now: float) -> None:
        self.residents[name] = Resident(name, need, keep_alive_s, last_used=now)

    def ready(self, name: str, now: float) -> None:
        resident = self.residents.get(name)
        if resident is not None and resident.phase is Phase.LOADING:
            resident.phase = Phase.READY
            resident.last_used = now  # its keep_alive counts from when it could serve

    def loading(self, name: str) -> None:
        """Its engine went down and restarts: not ready, not evictable, until it answers."""
        resident = self.residents.get(name)
        if resident is not None:
            resident.phase = Phase.LOADING

    def remove(self, name: str) -> Resident | None:
        return self.residents.pop(name, None)

    def begin(self, name: str, now: float) -> None:
        resident = self.residents[name]
        resident.in_flight += 1
        resident.used = True
        resident.last_used = now

    def end(self, name: str, now: float) -> None:
        resident = self.residents.get(name)
        if resident is not None:  # unloaded (by the operator) while the request ran
            resident.in_flight = max(0, resident.in_flight - 1)
            resident.last_used = now

    def expired(self, now: float) -> list[str]:
        """Idle models whose keep_alive has passed, least recently used first."""
        due = [r for r in self.residents.values() if r.idle and now >= _expiry(r)]
        return [r.name for r in sorted(due, key=lambda r: (r.last_used, r.name))]

    def next_due(self) -> float | None:
        """When the next idle model expires (monotonic), or None while none can."""
        return min((_expiry(r) for r in self.residents.values() if r.idle), default=None)


def _expiry(resident: Resident) -> float:
    if resident.used:
        return resident.last_used + resident.keep_alive_s
    return resident.last_used + max(resident.keep_alive_s, FIRST_USE_GRACE_S)
