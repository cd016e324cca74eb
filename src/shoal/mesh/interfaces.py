"""This machine's network addresses, read in one place.

The Host allowlist, the mDNS advert and the subnet scan all need them. Reading them can
fail (psutil raises OSError when the process is out of file descriptors): that is
logged and answered with no addresses, never raised into a background task.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import psutil

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def local_addresses() -> list[Address]:
    """Every IPv4 and IPv6 address of this machine's interfaces (loopback included)."""
    try:
        interfaces = psutil.net_if_addrs()
    except OSError as exc:
        log.warning("cannot read the network interfaces now: %s", exc)
        return []
    found: list[Address] = []
    for addresses in interfaces.values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = address.address.partition("%")[0]  # an IPv6 zone is not part of it
            try:
                found.append(ipaddress.ip_address(text))
            except ValueError:
                continue
    return found


def lan_ipv4(*, link_local: bool = False) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses other machines may reach: never loopback; link-local only if
    asked (mDNS answers on a link-local-only network; a /24 scan of one is pointless)."""
    return [
        a
        for a in local_addresses()
        if isinstance(a, ipaddress.IPv4Address)
        and not a.is_loopback
        and (link_local or not a.is_link_local)
    ]
