"""Fixtures shared by the in-process cluster tests."""

from __future__ import annotations

from collections import Counter

import pytest

from shoal.trust.service import Met, Trust


@pytest.fixture
def handshakes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Handshakes started, by the API URL they went to."""
    started: Counter[str] = Counter()
    original = Trust.admit

    async def counted(self: Trust, api_url: str) -> Met:
        started[api_url] += 1
        return await original(self, api_url)

    monkeypatch.setattr(Trust, "admit", counted)
    return started
