"""Wrong cluster secrets, counted per source address: a few tries, then one a minute.

Theory of operation. In secret mode each run of the handshake lets the other side test
one guess of the secret, and no more (`shoal.trust.pake`); this book bounds how many
runs a source gets. Every proof that fails is a strike against its source. A source
has FREE_TRIES strikes to spend, and earns one back every REFILL_S; with none left, it
is refused (429, Retry-After) before any proof is checked or sent. A proof that passes
clears its source. A full-strength token (160 bits) makes this moot; it is what keeps a
weak secret, typed in by hand, from being guessed online in a day.

The book is kept on both sides. As responder a node counts the confirms whose proof
fails, by the address they came from. As initiator it counts, by the address it
dialled, each proof it sends that is not answered by a valid proof: a node that
advertises itself (mDNS) to collect proofs gets no more guesses than one that dials.

A source is an IPv4 address, or an IPv6 /64 (one host on a LAN may hold a whole /64),
or a host name as dialled. Pure: time is a parameter.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

#: Wrong secrets a source may try at once: room for an operator's typing mistakes.
FREE_TRIES = 5
#: Then one more try each minute: 1,440 a day, per source.
REFILL_S = 60.0
#: Sources remembered at most (each a few dozen bytes); past it the longest-quiet go.
MAX_SOURCES = 4096


def source_of(host: str) -> str:
    """The source a host counts as: an IPv4 address (IPv4-mapped IPv6 too), an IPv6 /64,
    or else the host name as written, in lower case."""
    text = host.strip("[]").partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return host.lower()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class Strikes:
    """Strikes per source: source -> (tries left, when that was counted)."""

    free_tries: float = FREE_TRIES
    refill_s: float = REFILL_S
    max_sources: int = MAX_SOURCES
    _left: dict[str, tuple[float, float]] = field(default_factory=dict)

    def wait(self, source: str, now: float) -> float:
        """Seconds before `source` may try again; 0 when it may now."""
        left = self._tries_left(source, now)
        return 0.0 if left >= 1 else (1 - left) * self.refill_s

    def failed(self, source: str, now: float) -> None:
        """One try spent (a wrong proof, or one sent and not answered by a right one)."""
        self._left[source] = (self._tries_left(source, now) - 1, now)
        if len(self._left) > self.max_sources:
            self._forget_quietest(now)

    def cleared(self, source: str) -> None:
        """A right proof: the source has shown it knows the secret."""
        self._left.pop(source, None)

    def sources(self) -> int:
        return len(self._left)

    def _tries_left(self, source: str, now: float) -> float:
        left, since = self._left.get(source, (self.free_tries, now))
        return min(self.free_tries, left + max(0.0, now - since) / self.refill_s)

    def _forget_quietest(self, now: float) -> None:
        full = [s for s in self._left if self._tries_left(s, now) >= self.free_tries]
        for source in full:
            del self._left[source]
        while len(self._left) > self.max_sources:
            del self._left[min(self._left, key=lambda s: self._left[s][1])]
