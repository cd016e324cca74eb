"""The load ledger: the one count of work in flight, per backend, per peer and per model.

Routing ranks candidates by it, the advert tells peers this node's own load from it,
and the status view, metrics and (later) the scheduler read it. Only the dispatcher
writes it, through `Slot`s that release exactly once, so the books balance through
failures and cancellations. Every change of this node's own load (work on its local
backends) is published as `LoadChanged`, the same figure the advert carries.
"""

from __future__ import annotations

from typing import Literal

from shoal.events import EventBus, LoadChanged

Where = Literal["local", "peer"]


class Slot:
    """One request's hold on one target; `release()` is idempotent."""

    __slots__ = ("_ledger", "key", "model", "released", "where")

    def __init__(self, ledger: LoadLedger, where: Where, key: str, model: str) -> None:
        self._ledger = ledger
        self.where = where
        self.key = key
        self.model = model
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._ledger._add(self.where, self.key, self.model, -1)


class LoadLedger:
    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        # Plain dicts (half the cost of Counter's): this runs twice per request.
        self._backends: dict[str, int] = {}  # by local backend name
        self._peers: dict[str, int] = {}  # by peer node ID: sent there, not yet done
        self._models: dict[str, int] = {}  # by model name as served, local and sent
        self._local = 0
        self.requests = 0  # requests this node is handling, wherever they are served
        self.queued = 0  # requests waiting for a slot (the scheduler, issue 11, fills it)

    # -- writing (the dispatcher) --------------------------------------------------------

    def hold(self, where: Where, key: str, model: str) -> Slot:
        """Count one request on a local backend (`key`: its name) or a peer (its ID)."""
        self._add(where, key, model, +1)
        return Slot(self, where, key, model)

    def request_started(self) -> None:
        self.requests += 1

    def request_finished(self) -> None:
        self.requests -= 1

    def _add(self, where: Where, key: str, model: str, delta: int) -> None:
        models = self._models
        models[model] = models.get(model, 0) + delta
        if where == "local":
            backends = self._backends
            backends[key] = backends.get(key, 0) + delta
            self._local += delta
            self._bus.publish(LoadChanged(self._local, self.queued))
        else:
            self._peers[key] = self._peers.get(key, 0) + delta

    # -- reading -------------------------------------------------------------------------

    @property
    def local_in_flight(self) -> int:
        """Requests running on this node's own backends: what its advert says."""
        return self._local

    def backend(self, name: str) -> int:
        return self._backends.get(name, 0)

    def peer(self, peer_id: str) -> int:
        """Requests this node has sent to `peer_id` that are not finished yet (its own
        snapshot counts them too, once it has them: routing takes the larger)."""
        return self._peers.get(peer_id, 0)

    def model(self, name: str) -> int:
        return self._models.get(name, 0)

    def statistics(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "local_in_flight": self._local,
            "queued": self.queued,
            "by_backend": {k: v for k, v in self._backends.items() if v},
            "by_peer": {k: v for k, v in self._peers.items() if v},
            "by_model": {k: v for k, v in self._models.items() if v},
        }
