"""The JSON views of a node: status, peers, models, pairs.

One module shapes what people and programs see of the node, so the operator API, the
OpenAI model list, and later the dashboard and `/metrics`, show the same facts the same
way. Views read the node's services; they change nothing (but `status`, which asks the
backends first, so it shows the present rather than the last probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from typing import Any

from shoal import __version__
from shoal.backends.registry import BackendEntry, BackendRegistry
from shoal.mesh.identity import short_id
from shoal.mesh.peers import Peer, Peers
from shoal.mesh.state import Hardware
from shoal.routing.ledger import LoadLedger
from shoal.trust.admission import Admission
from shoal.trust.store import TrustedNode

REFRESH_TIMEOUT_S = 1.5  # a status never waits longer for a slow backend


class Views:
    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        hardware: Hardware,
        registry: BackendRegistry,
        peers: Peers,
        ledger: LoadLedger,
        admission: Admission,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.url = ""  # set by the node once it listens
        self._hardware = hardware
        self._registry = registry
        self._peers = peers
        self._ledger = ledger
        self._admission = admission
        self._started_at = time.time()

    async def status(self, *, probe: bool = True) -> dict[str, Any]:
        """This node, its backends probed now (one that is slow keeps its last status);
        `probe=False`: as last known, for a live view that redraws on every change."""
        if probe:
            entries = list(self._registry.entries())
            probes = asyncio.gather(*(self._registry.probe(e) for e in entries))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await probes
        return {
            "name": self.name,
            "node_id": self.node_id,
            "short_id": short_id(self.node_id),
            "version": __version__,
            "url": self.url,
            "uptime_s": round(time.time() - self._started_at, 1),
            "in_flight": self._ledger.requests,
            "local_in_flight": self._ledger.local_in_flight,
            "load": self._ledger.statistics(),
            "hardware": hardware(self._hardware),
            "backends": [self._backend(entry) for entry in self._registry.entries()],
            "models": sorted({info.id for info, _ in self._registry.models()}),
            "peers": len(self._peers.routable()),
            "cluster_mode": self._admission.trust.refresh_mode(),
            "duplicate_id_seen_from": self._admission.trust.duplicate_seen_at,
        }

    def peers(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "peers": [peer(p) for p in self._peers.peers()]}

    def load(self) -> dict[str, Any]:
        """This node's load now, from the ledger, nothing probed (for `/metrics`)."""
        return self._ledger.statistics()

    def models(self, *, local_only: bool) -> dict[str, Any]:
        """Every model the cluster can serve now, each once, with the nodes that hold it."""
        merged: dict[str, dict[str, Any]] = {}

        def add(model_id: str, node_name: str, loaded: bool, facts: dict[str, Any]) -> None:
            model = merged.setdefault(
                model_id,
                {"id": model_id, "object": "model", "created": 0, "owned_by": "shoal",
                 "loaded": False, "nodes": [], "backends": [], **_facts(facts)},
            )  # fmt: skip
            model["loaded"] = model["loaded"] or loaded
            for alias in facts.get("aliases") or ():  # other names it answers to
                if alias not in model.setdefault("aliases", []):
                    model["aliases"].append(alias)
            if node_name not in model["nodes"]:
                model["nodes"].append(node_name)

        for info, entry in self._registry.models():
            add(info.id, self.name, info.loaded, info.as_dict())
            merged[info.id]["backends"].append(entry.backend.name)
        if not local_only:
            for p in self._peers.routable():
                assert p.state is not None
                for advert in p.state.models:
                    add(advert.id, p.state.name, advert.loaded, asdict(advert))
        return {"object": "list", "data": sorted(merged.values(), key=lambda m: m["id"])}

    def pairs(self) -> dict[str, Any]:
        nodes = self._admission.pairs()
        return {"mode": self._admission.trust.mode, "nodes": [pair(n) for n in nodes]}

    def _backend(self, entry: BackendEntry) -> dict[str, Any]:
        status = entry.status
        return {
            "name": entry.backend.name,
            "kind": entry.backend.kind,
            "location": entry.backend.location,
            "detected": entry.detected,
            "health": status.health.value,
            "reason": status.reason,
            "in_flight": self._ledger.backend(entry.backend.name),
            "models": [m.as_dict() for m in status.models],
            "detail": status.detail,
        }


def hardware(hw: Hardware) -> dict[str, Any]:
    return {
        "cpu": hw.cpu,
        "cores": hw.cores,
        "ram_bytes": hw.ram_bytes,
        "gpu": hw.gpu,
        "vram_bytes": hw.vram_bytes,
        "score": round(hw.score, 2),
    }


def peer(p: Peer) -> dict[str, Any]:
    view, state = p.view, p.state
    now = time.monotonic()
    return {
        "node_id": view.peer_id,
        "short_id": short_id(view.peer_id),
        "name": state.name if state else None,
        "address": view.address,
        "state": view.state.value,
        "health": view.health.value,
        "sources": sorted(view.sources),
        "last_seen_s_ago": None if view.last_seen is None else round(now - view.last_seen, 1),
        "heartbeat_interval_s": view.interval_s,
        "version": state.version if state else None,
        "clock_offset_s": (
            None if p.clock_offset_s is None else round(p.clock_offset_s, 3)
        ),  # its wall clock minus ours
        "uptime_s": state.uptime_s if state else None,
        "models": [
            {"id": m.id, "loaded": m.loaded, "operations": list(m.operations)}
            for m in (state.models if state else ())
        ],
        "load": (
            {
                "in_flight": state.load.in_flight,
                "queued": state.load.queued,
                "capacity": state.load.capacity,
            }
            if state
            else None
        ),
        "hardware": hardware(state.hardware) if state else None,
    }


def pair(node: TrustedNode) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "short_id": node.short_id,
        "name": node.name,
        "state": node.state.value,
        "address": node.address,
        "code": node.code,
    }


def _facts(model: dict[str, Any]) -> dict[str, Any]:
    keys = ("context_length", "quantization", "size_bytes", "operations")
    return {key: model.get(key) for key in keys}
