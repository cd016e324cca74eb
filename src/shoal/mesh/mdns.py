"""mDNS/DNS-SD: advertising this node as `_shoal._tcp.local.` and browsing for others.

The advert is a hint, never a credential: a peer found here is only an address to
exchange states with. The TXT record is kept small: protocol version, node ID, API port.
One Zeroconf instance per process; unregistering on close sends goodbye packets, which
peers' browsers see as the service's removal (a clean leave, within a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Protocol

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from shoal.mesh import interfaces
from shoal.mesh.membership import Source
from shoal.mesh.state import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_shoal._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


def advertised_addresses(bind_host: str) -> list[str]:
    """The IPv4 addresses peers can reach us on: the bound one, or every non-loopback one."""
    if bind_host not in ("0.0.0.0", ""):
        return [bind_host]
    return [str(address) for address in interfaces.lan_ipv4(link_local=True)]


class Sightings(Protocol):
    """Where discovery reports (implemented by `shoal.trust.admission.Admission`)."""

    def sighted(self, node_id: str, address: str, source: Source) -> None: ...
    def gone(self, node_id: str) -> None: ...


class MdnsDiscovery:
    def __init__(
        self,
        node_id: str,
        node_name: str,
        port: int,
        advert: dict[str, str],
        addresses: list[str],
        sightings: Sightings,
    ) -> None:
        self._node_id = node_id
        self._port = port
        self._sightings = sightings
        safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in node_name)[:40]
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{safe_name}-{node_id[:8]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties={"v": str(PROTOCOL_VERSION), "id": node_id, "port": str(port), **advert},
            server=f"shoal-{node_id[:12]}.local.",
        )
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._to_resolve: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._ids_by_name: dict[str, str] = {}

    async def run(self) -> None:
        """Advertise, browse, and resolve sightings until cancelled; then say goodbye."""
        self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
        try:
            # Browse first: the nodes already there answer our query at once.
            self._browser = AsyncServiceBrowser(
                self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
            )
            # No probing (RFC 6762 §8.1, ~1.5 s): the instance name carries our key
            # fingerprint, so it cannot collide unless a data dir was copied, which the
            # state exchange detects and reports anyway.
            announced = await self._zeroconf.async_register_service(
                self._info, cooperating_responders=True
            )
            await announced
            log.info("advertising %s on mDNS", self._info.name)
            while True:
                service_type, name = await self._to_resolve.get()
                await self._resolve(service_type, name)
        finally:
            await self._close()

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if name == self._info.name:
            return
        if state_change is ServiceStateChange.Removed:
            peer_id = self._ids_by_name.pop(name, None)
            if peer_id is not None:
                self._sightings.gone(peer_id)
        else:
            self._to_resolve.put_nowait((service_type, name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        properties = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        peer_id = properties.get("id", "")
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if properties.get("v") != str(PROTOCOL_VERSION) or len(peer_id) != 64 or not addresses:
            log.debug("ignoring mDNS advert %s: %s", name, properties)
            return
        if peer_id == self._node_id:
            return
        self._ids_by_name[name] = peer_id
        port = info.port or int(properties.get("port") or 0)
        self._sightings.sighted(peer_id, f"http://{addresses[0]}:{port}", "mdns")

    async def _close(self) -> None:
        if self._zeroconf is None:
            return
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        with contextlib.suppress(Exception):
            await self._zeroconf.async_unregister_all_services()
        await self._zeroconf.async_close()
        self._zeroconf = None
