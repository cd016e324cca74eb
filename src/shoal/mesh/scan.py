"""The subnet scan: a bounded, concurrent probe of the local /24s for Shoal's port.

For networks that block multicast. Every address answering a state exchange is a peer
found; nothing else is sent to an address that does not answer on the port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

import psutil

from shoal.trust.store import TrustedNode

# Addresses probed at once: a /24 takes a few connect timeouts, not 254 of them.
DEFAULT_CONCURRENCY = 64


def local_networks() -> list[ipaddress.IPv4Network]:
    """The /24 around each non-loopback IPv4 address of this machine."""
    networks = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family != socket.AF_INET:
                continue
            ip = ipaddress.IPv4Address(address.address)
            if ip.is_loopback or ip.is_link_local:
                continue
            networks.add(ipaddress.IPv4Network(f"{ip}/24", strict=False))
    return sorted(networks)


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
