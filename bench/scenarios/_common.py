"""What several scenarios share: the command line, pinning this process, waiting for peers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from bench.processes import wait_json

MODEL = "bench-model"


def command(name: str, quick: bool) -> str:
    return f"python -m bench {name}{' --quick' if quick else ''}"


@contextlib.contextmanager
def pinned_self(cpus: set[int]) -> Iterator[None]:
    """Run this process (the load generator) on `cpus` for the block, then as before."""
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):  # not Linux, or fewer cores
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def healthy_peers(document: Any, model: str | None = None) -> set[str]:
    return {
        p["name"]
        for p in document["peers"]
        if p["health"] == "healthy"
        and (model is None or any(m["id"] == model for m in p["models"]))
    }


def wait_peers(url: str, names: set[str], timeout_s: float = 30, model: str | None = None) -> None:
    """Until the node at `url` sees every one of `names` healthy (holding `model`)."""
    wait_json(
        url + "/shoal/v1/peers",
        lambda document: names <= healthy_peers(document, model),
        timeout_s,
        f"{url} to see {sorted(names)} healthy",
    )
