"""The subnet scan: a bounded, concurrent probe of the local /24s for Shoal's port.

For networks that block multicast. Every address answering a state exchange is a peer
found; nothing else is sent to an address that does not answer on the port.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from shoal.mesh import interfaces
from shoal.trust.store import TrustedNode

# Addresses probed at once: a /24 takes a few connect timeouts, not 254 of them.
DEFAULT_CONCURRENCY = 64


def local_networks() -> list[ipaddress.IPv4Network]:
    """The /24 around each non-loopback IPv4 address of this machine."""
    return sorted({ipaddress.IPv4Network(f"{ip}/24", strict=False) for ip in interfaces.lan_ipv4()})


def scan_targets(
    networks: Iterable[ipaddress.IPv4Network], port: int, exclude: Iterable[str] = ()
) -> list[str]:
    skip = set(exclude)
    return [
        f"http://{host}:{port}"
        for network in networks
        for host in network.hosts()
        if str(host) not in skip
    ]


async def scan(
    targets: list[str],
    probe: Callable[[str], Awaitable[TrustedNode | None]],
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[tuple[str, TrustedNode]]:
    """Probe every target, `concurrency` at a time; the ones that answered."""
    gate = asyncio.Semaphore(concurrency)

    async def one(url: str) -> tuple[str, TrustedNode | None]:
        async with gate:
            return url, await probe(url)

    results = await asyncio.gather(*(one(url) for url in targets))
    return [(url, state) for url, state in results if state is not None]


class Scanner:
    """`shoal peers --scan`, and LAN mode's scan when mDNS finds nobody: every address of
    the local /24s but this machine's own is met through admission."""

    def __init__(
        self,
        meet: Callable[[str], Awaitable[TrustedNode | None]],
        *,
        self_id: str,
        port: int,
        own_addresses: Callable[[], Iterable[str]],
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self._meet = meet
        self._self_id = self_id
        self.port = port  # the API port peers listen on (ours, by convention)
        self._own = own_addresses
        self._concurrency = concurrency

    async def run(self) -> list[tuple[str, TrustedNode]]:
        targets = scan_targets(local_networks(), self.port, exclude=set(self._own()))
        found = await scan(targets, self._meet, self._concurrency)
        return [(url, node) for url, node in found if node.node_id != self._self_id]
