"""Exponential backoff, the one rule every retry in the node follows.

Pure: the caller counts its own consecutive failures and asks for the delay. Used by
backend re-probes, engine restarts, static-peer retries and rejoin probes of removed
peers.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2**32 times any first delay is past every ceiling: a failure count from a backend down
# for months must not overflow a float.
_MAX_EXPONENT = 32


@dataclass(frozen=True, slots=True)
class Backoff:
    first_s: float  # the delay after the first failure
    max_s: float  # the ceiling
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s or self.factor < 1:
            raise ValueError("need 0 < first_s <= max_s and factor >= 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (>= 1; 0 waits nothing)."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.first_s * self.factor ** min(failures - 1, _MAX_EXPONENT))
