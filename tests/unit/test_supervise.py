"""Background tasks that fail are logged and restarted; the process guards its descriptors.

`supervise` with a short injected backoff and a recorded `sleep` (no real waiting);
a real `Node` whose admission task fails twice and keeps serving; the descriptor limit
raised in a subprocess; accept() errors rate-limited on a fake clock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shoal.backoff import Backoff
from shoal.node import Node
from shoal.process import AcceptErrorHandler, RateLimit
from shoal.supervise import supervise
from tests.cluster import node_settings, wait_until

BACKOFF = Backoff(first_s=1.0, max_s=4.0)


class Flaky:
    """Fails `failures` times, then returns; counts its runs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")


class Slept:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_a_failing_task_is_logged_once_per_failure_and_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky, slept = Flaky(failures=4), Slept()
    with caplog.at_level(logging.ERROR, logger="shoal.supervise"):
        await supervise("probe", flaky.run, backoff=BACKOFF, clock=lambda: 0.0, sleep=slept)
    assert flaky.runs == 5  # four failures, then the run that returned ends it
    assert slept.delays == [1.0, 2.0, 4.0, 4.0]  # doubling to the ceiling
    assert len(caplog.records) == 4
    for record in caplog.records:
        assert "background task probe failed" in record.getMessage()
        assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)


async def test_a_long_good_run_resets_the_backoff() -> None:
    now = [0.0]
    slept = Slept()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            now[0] += 61.0  # the third run ran well for a minute before failing
        if runs <= 3:
            raise RuntimeError("boom")

    await supervise("x", run, backoff=BACKOFF, clock=lambda: now[0], sleep=slept)
    assert slept.delays == [1.0, 2.0, 1.0]


async def test_cancellation_ends_it_at_once_running_or_backing_off() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(supervise("forever", forever))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert cancelled.is_set()

    # In the backoff's sleep (an hour, real asyncio.sleep): cancelled without waiting.
    failed = Flaky(failures=1_000)
    task = asyncio.create_task(
        supervise("failing", failed.run, backoff=Backoff(first_s=3600.0, max_s=3600.0))
    )
    await wait_until(lambda: failed.runs == 1, 5, "the first failure")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)


async def test_a_cancelled_error_from_inside_is_not_retried() -> None:
    async def run() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervise("x", run, sleep=Slept())


async def test_a_node_keeps_serving_while_a_background_task_fails(tmp_path: Path) -> None:
    node = Node(node_settings(tmp_path, "n0", "open"))
    node.restart_backoff = Backoff(first_s=0.01, max_s=0.01)
    runs = 0

    async def admission_run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise OSError(errno.EMFILE, "Too many open files")
        await asyncio.Event().wait()

    node.admission.run = admission_run  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await wait_until(lambda: runs == 3, 10, "admission to be restarted twice")
    assert not task.done()
    async with aiohttp.ClientSession() as session, session.get(node.url + "/healthz") as r:
        assert r.status == 200
    stop.set()
    await asyncio.wait_for(task, 10)  # ends cleanly, the failures not raised


# -- the descriptor limit ----------------------------------------------------------------


def _limit_after_raising(soft: int, cap: int | None = None) -> tuple[int, int]:
    code = textwrap.dedent(f"""
        import resource
        from shoal.process import raise_fd_limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard))
        got = raise_fd_limit({"" if cap is None else cap})
        print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_the_soft_fd_limit_is_raised_to_the_hard_limit_or_the_cap() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise to")
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert _limit_after_raising(256) == (expected, expected)
    assert _limit_after_raising(256, cap=300) == (300, 300)
    assert _limit_after_raising(280, cap=260) == (280, 280)  # never lowered


# -- accept() errors ---------------------------------------------------------------------


class FakeLoop:
    def __init__(self) -> None:
        self.delegated: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.delegated.append(context)


def _accept_error(code: int = errno.EMFILE) -> dict[str, Any]:
    return {
        "message": "socket.accept() out of system resource",
        "exception": OSError(code, "Too many open files"),
    }


def test_the_rate_limit_lets_one_through_per_interval_with_the_count_held_back() -> None:
    limit = RateLimit(10.0)
    allowed = [(t, limit.allow(float(t))) for t in range(25)]
    assert [(t, n) for t, n in allowed if n is not None] == [(0, 0), (10, 9), (20, 9)]


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    handler, loop = AcceptErrorHandler(10.0, clock=lambda: now[0]), FakeLoop()
    with caplog.at_level(logging.WARNING, logger="shoal.process"):
        for tick in range(100):  # 4 listeners failing each second for 25 s
            now[0] = tick / 4
            handler(loop, _accept_error(errno.ENFILE if tick % 2 else errno.EMFILE))  # type: ignore[arg-type]
    assert loop.delegated == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # at 0, 10 and 20 s
    assert "cannot accept connections" in messages[0] and " 0 more" in messages[0]
    assert " 39 more" in messages[1] and " 39 more" in messages[2]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback per failure


def test_every_other_loop_error_goes_to_the_default_handler() -> None:
    handler, loop = AcceptErrorHandler(10.0, clock=lambda: 0.0), FakeLoop()
    others = [
        {"message": "Task exception was never retrieved", "exception": ValueError("x")},
        {"message": "socket.accept() out of system resource",
         "exception": OSError(errno.ECONNRESET, "reset")},
        {"message": "something else", "exception": OSError(errno.EMFILE, "fds")},
        {"message": "no exception at all"},
    ]  # fmt: skip
    for context in others:
        handler(loop, context)  # type: ignore[arg-type]
    assert loop.delegated == others
