"""What a serving process sets up for itself: its descriptor limit and its loop's error log.

Both answer one attack: a stranger holding idle connections until the node runs out of
file descriptors. A higher soft limit makes that cost the stranger more; and while the
descriptors are gone, asyncio's report of each failed `accept()` (a traceback per
listener per second) is logged once per interval with a count, never as a flood.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Where the hard limit is unlimited: far above any LAN node's connections, and low enough
# that code sizing tables by the limit (select, some C libraries) stays sane.
FD_LIMIT_CAP = 65536
# One line per 10 s says the node is starved of descriptors as well as a line per
# failure would, at a thousandth of the log.
ACCEPT_ERROR_INTERVAL_S = 10.0

# What asyncio's selector loop says when accept() fails for want of resources
# (`BaseSelectorEventLoop._accept_connection`), and the errnos it says it for.
_ACCEPT_MESSAGE = "socket.accept() out of system resource"
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# And what it reports when one of its retries of accept() — it schedules one per failure,
# up to the listen backlog per wake-up — runs after its listener has closed.
_STALE_RETRY_MESSAGE = "Exception in callback BaseSelectorEventLoop._start_serving("


def raise_fd_limit(cap: int = FD_LIMIT_CAP) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most `cap`); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS refuses above OPEN_MAX
            log.debug("could not raise the open file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.debug("open file limit raised from %d to %d (hard limit %s)", soft, target, hard)
        return target
    log.debug("open file limit %d kept (hard limit %s)", soft, hard)
    return soft


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE now (`FD_LIMIT_CAP` when unlimited): what the node's
    connection cap is derived from, after `raise_fd_limit` raised it."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft


class RateLimit:
    """Once per `interval_s`: `allow(now)` says whether to log, and how many were held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: float | None = None
        self._suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: suppress this one. Otherwise log it, with the count suppressed since."""
        if self._last is not None and now - self._last < self.interval_s:
            self._suppressed += 1
            return None
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        return suppressed


def is_accept_resource_error(context: dict[str, Any]) -> bool:
    exc = context.get("exception")
    return (
        isinstance(exc, OSError)
        and exc.errno in _RESOURCE_ERRNOS
        and str(context.get("message", "")).startswith(_ACCEPT_MESSAGE)
    )


def is_stale_accept_retry(context: dict[str, Any]) -> bool:
    """A retry of accept() scheduled while descriptors were short, run after its listener
    closed ("Invalid file descriptor: -1"): harmless, but thousands of tracebacks at
    shutdown after a descriptor exhaustion."""
    return isinstance(context.get("exception"), ValueError) and str(
        context.get("message", "")
    ).startswith(_STALE_RETRY_MESSAGE)


class AcceptErrorHandler:
    """A loop exception handler: accept() resource errors rate-limited, stale retries of
    accept() dropped, the rest as usual."""

    def __init__(
        self,
        interval_s: float = ACCEPT_ERROR_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = RateLimit(interval_s)
        self._clock = clock

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_stale_accept_retry(context):
            return
        if not is_accept_resource_error(context):
            loop.default_exception_handler(context)
            return
        suppressed = self._limit.allow(self._clock())
        if suppressed is None:
            return
        log.warning(
            "cannot accept connections: %s (retried each second; %d more such errors "
            "since the last of these lines, which come at most every %.0f s)",
            context["exception"], suppressed, self._limit.interval_s,
        )  # fmt: skip


def install_accept_error_handler(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_exception_handler(AcceptErrorHandler())
