"""A token bucket: the one rate limit (model files served to peers while this node
serves inference, `models.share_rate_limit`).

Pure: the caller passes the clock. `reserve(n, now)` takes `n` tokens at once, going
into debt if it must, and answers the seconds to wait before sending them; so pieces
reserved one after another are paced in order, and a piece larger than the burst is
simply paced by its own size.
"""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("need rate > 0 and burst > 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount` tokens; the seconds to wait before using them (0: at once)."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
