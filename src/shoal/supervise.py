"""Background tasks that outlive their failures: log once, back off, run again.

A node's background tasks (backend probes, heartbeats, admission, the engine, detection,
LAN discovery) each run under `supervise`. An unexpected exception in one is logged
with its traceback and the task is started again after a backoff, so one failing
system call (`OSError: Too many open files` from a probe while a stranger holds every
descriptor) never ends the node. Cancellation is never caught: shutdown stays prompt. A
task that returns has finished its work and is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from shoal.backoff import Backoff

log = logging.getLogger(__name__)

# 1 s lets a passing fault (a descriptor freed a moment later) cost little; doubling to
# a minute keeps a task that fails at once, every time, to one traceback a minute.
RESTART_BACKOFF = Backoff(first_s=1.0, max_s=60.0)
# A run this long was a good one: its failure starts the backoff again from the first
# delay, as a new fault rather than the same one repeating.
HEALTHY_AFTER_S = 60.0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    backoff: Backoff = RESTART_BACKOFF,
    healthy_after_s: float = HEALTHY_AFTER_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Await `run()` until it returns; after an exception, log it and call it again."""
    failures = 0
    while True:
        started = clock()
        try:
            await run()
        except Exception:  # not CancelledError, KeyboardInterrupt, SystemExit: those end it
            if clock() - started >= healthy_after_s:
                failures = 0
            failures += 1
            delay = backoff.delay(failures)
            log.exception(
                "background task %s failed (%d in a row); restarting it in %.1f s",
                name, failures, delay,
            )  # fmt: skip
            await sleep(delay)
        else:
            return
