"""Choosing where a request may go: local backends and peers that hold the model, ranked.

The decisions are `rank.py`'s pure functions; this module gathers their inputs from
the backend registry, the peer table and the load ledger, and wraps each choice as a
`Target` the dispatcher can send to, count (in the ledger, under `route` and `key`), and
blame. When nothing can serve a request, `_nothing_for` says why, as the error the client
should act on: 503 with Retry-After while the holders are down or away, 400 for a model
held but not for this operation, 404 for a model no node holds. With a choice of
targets, the one that holds the prompt's cache goes first while it has a free slot, and
the target that takes a request is remembered as holding its cache (`affinity.py`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

from shoal.backends.base import Operation, Upstream
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ShoalError,
)
from shoal.mesh.membership import PeerState
from shoal.mesh.peers import Holder, Peer, Peers
from shoal.routing.affinity import AffinityTable, Keys
from shoal.routing.ledger import LoadLedger
from shoal.routing.rank import (
    UNBOUNDED,
    Candidate,
    HopPolicy,
    allowed,
    prefer,
    rank,
    resolve_model,
)
from shoal.settings import RoutingSettings

# Retry-After for a model whose only holders are away, by how they are away. A suspect
# peer is re-checked 1 s after its miss (membership.Timing.suspect_retry_s), so in 2 s it
# is back or nearer removal. A removed (or re-sighted, not yet answered) peer comes back
# on its next rejoin probe or sighting: seconds, not a heartbeat's 15.
_RETRY_SUSPECT_S = 2.0
_RETRY_REMOVED_S = 5.0


class Target(Protocol):
    candidate: Candidate  # candidate.key: the backend's name, or the peer's node ID
    name: str  # the backend's name, or the peer node's name
    model: str  # the name the model has there (aliases resolved)
    route: Literal["local", "peer"]
    served: Callable[[str], None] | None  # told the candidate's key when it takes one

    async def send(self, op: Operation, body: bytes) -> Upstream: ...
    def failed(self, error: ShoalError) -> None: ...


class _Served:
    """Called with the key of the target that took a request: it holds its cache now."""

    __slots__ = ("_keys", "_table")

    def __init__(self, table: AffinityTable, keys: Keys) -> None:
        self._table = table
        self._keys = keys

    def __call__(self, key: str) -> None:
        self._table.record(self._keys.record, key, time.monotonic())


class LocalTarget:
    route: Literal["local", "peer"] = "local"
    served: Callable[[str], None] | None = None  # see _Served

    def __init__(
        self, entry: BackendEntry, registry: BackendRegistry, model: str, candidate: Candidate
    ) -> None:
        self._entry = entry
        self._registry = registry
        self.name = entry.backend.name
        self.model = model
        self.candidate = candidate

    async def send(self, op: Operation, body: bytes) -> Upstream:
        upstream = await self._entry.backend.send(op, body)
        if self.served is not None and upstream.status < 400:
            self.served(self.candidate.key)
        return upstream

    def failed(self, error: ShoalError) -> None:
        if isinstance(error, BackendUnavailable):
            self._registry.mark_down(self._entry, error.message)


class PeerTarget:
    route: Literal["local", "peer"] = "peer"
    served: Callable[[str], None] | None = None  # see _Served

    def __init__(self, holder: Holder, peers: Peers, model: str, candidate: Candidate) -> None:
        self._peer_id = holder.peer_id
        self._peers = peers
        self.peer_state = holder.liveness  # as it was when the route was chosen
        self.name = holder.state.name
        self.model = model
        self.candidate = candidate

    async def send(self, op: Operation, body: bytes) -> Upstream:
        upstream = await self._peers.link(self._peer_id).send(op, body)
        if self.served is not None and upstream.status < 400:
            self.served(self.candidate.key)
        return upstream

    def failed(self, error: ShoalError) -> None:
        # It could not be reached, or broke off before answering: suspect at once, so
        # no other request goes there before a heartbeat says it is back. (A peer that
        # answers 503 is reachable; that is not a failure of the peer.)
        self._peers.request_failed(self._peer_id)


class Router:
    def __init__(
        self,
        node_id: str,
        node_name: str,
        registry: BackendRegistry,
        peers: Peers | None,
        ledger: LoadLedger,
        settings: RoutingSettings,
        rng: random.Random | None = None,
    ) -> None:
        self._node_id = node_id
        self._node_name = node_name
        self._registry = registry
        self._peers = peers
        self._ledger = ledger
        self._settings = settings
        self._rng = rng or random.Random()
        self._turn = 0
        self.affinity = AffinityTable() if settings.affinity else None

    def route(self, op: Operation, model: str, policy: HopPolicy) -> list[Target]:
        """Every target allowed for this request, best first; raises when there is none."""
        names = resolve_model(model, self._settings.model_aliases)
        targets: list[Target] = [*self._local(op, names), *self._remote(op, names)]
        # Node names matter only to a pin: build them only then (this is the request path).
        names_by_id = (
            {p.view.peer_id: p.state.name for p in self._peer_list() if p.state is not None}
            if policy.pinned is not None
            else {}
        )
        usable = allowed(
            [t.candidate for t in targets],
            policy,
            self_id=self._node_id,
            self_name=self._node_name,
            names=names_by_id,
        )
        by_key = {t.candidate.key: t for t in targets}
        # A model asked for by its own name goes to its holders first; holders of an
        # alias of it (the same weights under another name) are the fallback.
        exact = [c for c in usable if by_key[c.key].model == model]
        siblings = [c for c in usable if by_key[c.key].model != model]
        ranked = self._rank(exact) + self._rank(siblings)  # away peers are never ranked
        if not ranked:
            away = [t for c in usable if isinstance(t := by_key[c.key], PeerTarget)]
            raise self._nothing_for(op, model, names, policy, away)
        self._turn += 1
        if len(ranked) > 1 and self.affinity is not None and policy.prompt is not None:
            keys = policy.prompt.keys()  # only now: most requests have one target
            if keys is not None:
                return self._affine(ranked, by_key, self.affinity, keys)
        return [by_key[c.key] for c in ranked]

    def _affine(
        self,
        ranked: list[Candidate],
        by_key: dict[str, Target],
        table: AffinityTable,
        keys: Keys,
    ) -> list[Target]:
        """`ranked` as targets, the one holding the prompt's cache first if it is free."""
        affine = table.lookup(keys.lookup, time.monotonic())
        if affine is not None:
            ranked = prefer(ranked, affine)
        served = _Served(table, keys)
        targets = [by_key[c.key] for c in ranked]
        for target in targets:
            target.served = served
        return targets

    def _rank(self, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        return rank(
            candidates,
            self._settings.strategy,
            local_in_flight=self._ledger.local_in_flight,
            spillover_max_local_in_flight=self._settings.spillover_max_local_in_flight,
            turn=self._turn,
            rng=self._rng,
        )

    def _local(self, op: Operation, names: Sequence[str]) -> list[Target]:
        found: dict[str, Target] = {}
        capacity = self._settings.spillover_max_local_in_flight
        default = self._settings.default_capacity
        for name in names:
            for entry in self._registry.candidates(name, op):
                if entry.backend.name in found:
                    continue
                held = [m for m in entry.status.models if m.answers_to(name)]
                candidate = Candidate(
                    key=entry.backend.name,
                    node_id=self._node_id,
                    local=True,
                    loaded=any(m.loaded for m in held),
                    in_flight=self._ledger.backend(entry.backend.name),
                    capacity=capacity,
                    slots=capacity_of(entry.status.detail, default),
                )
                served_as = held[0].id if held else name  # the backend's own name for it
                found[entry.backend.name] = LocalTarget(entry, self._registry, served_as, candidate)
        return list(found.values())

    def _remote(self, op: Operation, names: Sequence[str]) -> list[Target]:
        """Every peer whose last snapshot holds the model for `op`, alive or away.

        Only alive peers are ever tried (`rank` drops the rest); an away one (suspect,
        removed, or sighted again but not yet answered) is kept as an unhealthy
        candidate so that the policy filter and the error can name it.
        """
        if self._peers is None:
            return []
        targets: list[Target] = []
        for holder in self._peers.holders():
            state = holder.state
            usable = [m for m in state.models if op.value in m.operations]
            model = next((m for n in names for m in usable if m.answers_to(n)), None)
            if model is None:
                continue
            peer_id = holder.peer_id
            # Its snapshot counts the requests we sent it once it has them (summing the
            # two counted ours twice for as long as they ran: a peer with a free slot
            # looked full); until then our own count is the lower bound.
            in_flight = max(state.load.in_flight, self._ledger.peer(peer_id))
            candidate = Candidate(
                key=peer_id,
                node_id=peer_id,
                local=False,
                loaded=model.loaded,
                in_flight=in_flight,
                capacity=state.load.capacity,
                slots=UNBOUNDED if state.load.slots is None else state.load.slots,
                queued=state.load.queued,
                sent=self._ledger.peer(peer_id),
                wait_s=state.load.wait_s,
                hardware_score=state.hardware.score,
                healthy=holder.liveness is PeerState.ALIVE,
            )
            targets.append(PeerTarget(holder, self._peers, model.id, candidate))
        return targets

    def _peer_list(self) -> list[Peer]:
        return self._peers.peers() if self._peers is not None else []

    def _nothing_for(
        self,
        op: Operation,
        model: str,
        names: Sequence[str],
        policy: HopPolicy,
        away: Sequence[PeerTarget],
    ) -> ShoalError:
        if away:  # known holders this request may use, none reachable now: come back
            return _away(model, away)
        if policy.pinned is not None:
            return ModelNotFound(
                f"no node matching {policy.pinned!r} can serve {model!r} now", param="model"
            )
        down = [e for name in names for e in self._registry.holders(name, op)]
        if down:  # all of them down, or they would have been targets
            reasons = "; ".join(
                f"{e.backend.name}: {e.status.reason or e.status.health}" for e in down
            )
            return BackendUnavailable(
                f"model {model!r} is temporarily unavailable ({reasons})", retry_after=2
            )
        here_only = policy.forwarded or policy.local_only
        known_here = any(self._registry.knows_model(name) for name in names)
        if known_here or (not here_only and self._peer_holds(names)):
            return InvalidRequest(f"model {model!r} does not support {op.value}", param="model")
        where = "this node" if here_only else "this cluster"
        return ModelNotFound(
            f"the model {model!r} does not exist on {where}; see GET /v1/models",
            param="model",
        )

    def _peer_holds(self, names: Sequence[str]) -> bool:
        """Some peer's last snapshot lists the model, for whatever operation."""
        return any(m.id in names for p in self._peer_list() if p.state for m in p.state.models)


def capacity_of(detail: Mapping[str, object], default: int | None) -> int:
    """Requests a local backend serves at once: what its status says (the `capacity`
    configured on its entry, else the server's own word: an external llama-server's
    /props slots, a managed one's slots, the embedded engine's 1), else `default`
    (`routing.default_capacity`), else UNBOUNDED: it queues by itself."""
    said = detail.get("capacity")
    if isinstance(said, int) and not isinstance(said, bool) and said >= 1:
        return said
    return UNBOUNDED if default is None else default


def _away(model: str, away: Sequence[PeerTarget]) -> BackendUnavailable:
    """503: every holder this request may use is a peer that is away, for now."""
    suspect_only = all(t.peer_state is PeerState.SUSPECT for t in away)
    nodes = ", ".join(f"{t.name} ({t.peer_state})" for t in away)
    return BackendUnavailable(
        f"model {model!r} is held only by node(s) that cannot be reached now: {nodes}; retry later",
        retry_after=_RETRY_SUSPECT_S if suspect_only else _RETRY_REMOVED_S,
    )
