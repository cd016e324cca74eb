"""What this node tells its peers about itself: a fresh state snapshot on demand,
with the peers it introduces (`introductions`, wired by the node to `Peers`) and the
files it is pulling (`files`, wired to `Downloads`). Its `seq` grows only when something
a peer uses changed (uptime and clock change by themselves and are no change): peers
that hold the current one are answered `Unchanged` (`shoal.mesh.state.Message`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from shoal import __version__
from shoal.backends.registry import BackendRegistry
from shoal.mesh.state import FileAdvert, Hardware, Introduction, Load, ModelAdvert, NodeState
from shoal.routing.ledger import LoadLedger


class OwnState:
    def __init__(
        self,
        node_id: str,
        name: str,
        registry: BackendRegistry,
        ledger: LoadLedger,
        hardware: Hardware,
        *,
        capacity: int,
        slots: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.api_port = 0  # set by the node once it listens
        self.hardware = hardware
        self._registry = registry
        self._ledger = ledger
        self._capacity = capacity
        self._slots = slots
        self._seq = 0
        self._last: tuple[object, ...] = ()  # the last snapshot's content (no times)
        self._started = time.monotonic()
        self.boot = secrets.token_hex(8)  # this start of the process
        self.introductions: Callable[[], tuple[Introduction, ...]] = tuple
        self.files: Callable[[], tuple[FileAdvert, ...]] = tuple  # files being pulled
        self.wait: Callable[[], float] = float  # a new request's queue wait (the queue's)

    def snapshot(self) -> NodeState:
        """Models held (loaded wins over available), load as the ledger counts it; `seq`
        one more than the last snapshot's if anything but the times changed."""
        models: dict[str, ModelAdvert] = {}
        for info, _ in self._registry.models():
            known = models.get(info.id)
            models[info.id] = ModelAdvert(
                id=info.id,
                loaded=info.loaded or (known is not None and known.loaded),
                operations=tuple(sorted(info.operations)),
                size_bytes=info.size_bytes,
                quantization=info.quantization,
                context_length=info.context_length,
                aliases=info.aliases,
                sha256=info.sha256 or (known.sha256 if known is not None else None),
            )
        load = Load(
            in_flight=self._ledger.local_in_flight,
            queued=self._ledger.queued,
            capacity=self._capacity,
            slots=self._slots(),
            wait_s=round(self.wait(), 1),  # to a tenth: a changing estimate is a change
        )
        peers, files = self.introductions(), self.files()
        # Everything a peer uses but the times (asked for on every beat: no copies).
        content = (
            self.name,
            self.api_port,
            self.hardware,
            tuple(models.values()),
            load,
            peers,
            files,
        )
        if content != self._last:
            self._seq += 1
            self._last = content
        return NodeState(
            node_id=self.node_id,
            name=self.name,
            version=__version__,
            api_port=self.api_port,
            seq=self._seq,
            uptime_s=round(time.monotonic() - self._started, 3),
            models=content[3],
            load=load,
            hardware=self.hardware,
            peers=peers,
            files=files,
            clock=time.time(),
            boot=self.boot,
        )
