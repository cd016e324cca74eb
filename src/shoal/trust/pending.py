"""Who waits in the pending list (pairing mode): a stranger cannot keep a real node out.

Theory of operation. In pairing mode a node that completes the handshake waits in the
pending list until an operator accepts or declines it. A stranger can complete the
handshake too, as often as it likes and with a fresh identity each time, so the list
is what a stranger would fill. Three rules decide who waits:

1. One request per address. A new identity from an address that already has one
   waiting takes its place (as a node whose data dir was wiped asks again). However
   many identities a stranger makes, each address it holds has one place.
2. The list is capped (MAX_PENDING), and a new address always gets in: when the list
   is full, the oldest request of the group holding the most requests makes way. A
   group is an address as `strikes.source_of` counts it (an IPv6 /64, several ports
   of this machine's loopback), so a host with many addresses in one group evicts
   its own first. Hence a real node is never pushed out while the stranger holds
   fewer addresses than the list has places (31 of 32); beyond that it is pushed out
   only by requests from new addresses, and can ask again (`shoal join`).
3. A group adds at most NEW_PER_MINUTE new requests a minute (each one rewrites the
   trust store): a bound on churn that never holds back any other group.

Pure: the pending requests and the time are parameters; the book keeps only the times
of recent new requests per group.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shoal.trust.strikes import source_of

MAX_PENDING = 32
NEW_PER_MINUTE = 10
_MINUTE_S = 60.0


class PendingFull(Exception):
    """Too many new pairing requests from one source too fast: try again later."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Request:
    """A pending node as the book sees it: who, the API address it was met at, since when."""

    node_id: str
    address: str
    since: float


def address_of(url: str) -> tuple[str, str]:
    """(the address, its group) of a node's API URL: one request per address waits, and
    eviction starts with the largest group. A loopback address is told apart by port
    (several nodes of this machine) and grouped by host."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return url, url
    if not host:
        return url, url
    group = source_of(host)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    return (f"{group}:{port}" if loopback and port else group), group


@dataclass
class PendingBook:
    cap: int = MAX_PENDING
    per_minute: int = NEW_PER_MINUTE
    _recent: dict[str, list[float]] = field(default_factory=dict)  # group -> new requests

    def admit(
        self, waiting: Sequence[Request], new: Request, now: float, *, known: bool = False
    ) -> list[Request]:
        """Let `new` wait; the requests that make way for it (to be dropped).

        `waiting` is every other pending request. `known`: `new` was already waiting (a
        pending node met again): it costs no new place, only the address rule applies.
        Raises PendingFull, changing nothing, when its group asks too often.
        """
        address, group = address_of(new.address)
        replaced = [r for r in waiting if address and address_of(r.address)[0] == address]
        if known:
            return replaced
        recent = [t for t in self._recent.get(group, ()) if t > now - _MINUTE_S]
        if len(recent) >= self.per_minute:
            raise PendingFull(
                "too many new pairing requests from this address; try again later",
                retry_after=recent[0] + _MINUTE_S - now,
            )
        staying = [r for r in waiting if r not in replaced]
        evicted = []
        while len(staying) >= self.cap:
            oldest = _oldest_of_largest_group(staying, group)
            staying.remove(oldest)
            evicted.append(oldest)
        self._forget_before(now - _MINUTE_S)
        self._recent[group] = [*recent, now]
        return replaced + evicted

    def _forget_before(self, moment: float) -> None:
        for group in list(self._recent):
            times = [t for t in self._recent[group] if t > moment]
            if times:
                self._recent[group] = times
            else:
                del self._recent[group]


def _oldest_of_largest_group(staying: Sequence[Request], newcomer_group: str) -> Request:
    """The request to evict: the oldest of the group that holds the most (the newcomer
    counted in its own group; ties go to the oldest request)."""
    sizes: dict[str, int] = {newcomer_group: 1}
    groups = [address_of(r.address)[1] for r in staying]
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    largest = max(sizes[g] for g in groups)
    candidates = [r for r, g in zip(staying, groups, strict=True) if sizes[g] == largest]
    return min(candidates, key=lambda r: r.since)
