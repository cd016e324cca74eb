"""Where tokens come from: one interface for every inference source."""

from shoal.backends.base import (
    Backend,
    BackendStatus,
    Health,
    ModelInfo,
    Operation,
    Upstream,
)

__all__ = ["Backend", "BackendStatus", "Health", "ModelInfo", "Operation", "Upstream"]
