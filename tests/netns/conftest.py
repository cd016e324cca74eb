"""Fixtures for tests that build a LAN out of network namespaces (root and iproute2)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns.lan import Lan, netns_available


@pytest.fixture
def require_netns() -> None:
    """Skip the test, with the reason, where network namespaces cannot be built."""
    reason = netns_available()
    if reason is not None:
        if os.environ.get("SHOAL_REQUIRE_NETNS"):  # CI: a skip here would hide a failure
            pytest.fail(f"network namespace tests cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture
def lan(require_netns: None) -> Iterator[Lan]:
    """A fresh Lan, torn down after the test whatever happened in it."""
    with Lan() as network:
        yield network
