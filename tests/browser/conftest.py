"""Fixtures for the dashboard's real-browser tests: Debian's chromium through Playwright.

Playwright's own browser download cannot run here, so the tests launch the system's
chromium (`apt-get install chromium`; `scripts/bootstrap --test` installs it as root).
Where it or the Playwright package is missing the tests skip with the reason, or fail
when `SHOAL_REQUIRE_BROWSER=1` (CI as root: a skip would hide a failure).

A browser can be started inside a network namespace of a `Lan`: its executable is then
a two-line wrapper that runs chromium through `ip netns exec`, so the page reaches the
namespace's own loopback (a node's operator) or the LAN's addresses (a LAN client).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SHOAL_CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SHOAL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"


def browser_unavailable() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set SHOAL_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def require_browser() -> None:
    reason = browser_unavailable()
    if reason is not None:
        if os.environ.get("SHOAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest) -> Path:
    """Where a module keeps its screenshots (kept after the run; gitignored)."""
    path = ARTIFACTS / request.module.__name__.rsplit(".", 1)[-1]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def chromium_in(netns: str, directory: Path) -> Path:
    """An executable that starts chromium inside `netns` with the arguments it is given."""
    wrapper = directory / f"chromium-{netns}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


@pytest.fixture(scope="module")
def wrappers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chromium")
