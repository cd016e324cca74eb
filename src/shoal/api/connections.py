"""Who may hold a connection to the node, and how long its request head may take.

Theory of operation
-------------------
Every connection to either port costs a file descriptor (and, on the TLS port, some
300 KiB until its handshake ends), and a stranger on the LAN can open them faster than
anything else can close them. Two decisions answer that, both without I/O or a clock of
their own (the listener, `shoal.api.listener`, drives them):

`ConnectionBook` decides at accept time, before a byte is read, whether a connection
may stay. Connections from this machine (loopback) are never counted and never
refused, so the operator's `shoal status` and local clients are served whatever the LAN
does. The others count, on both ports together, against three caps:

- per source address (`max_connections_per_source`): past it, the newcomer is refused
  (closed at once);
- in total (`max_connections`): past it, the connection idle the longest (no request
  yet, or none since its last answer) is evicted to make room; only when every one is
  handling a request is the newcomer refused;
- TLS handshakes under way (`ConnectionCaps.handshakes`): past it, the oldest unfinished
  handshake is evicted.

Evicting the longest idle connection, rather than refusing the newest, is what keeps a
stranger from locking the LAN out: a client's connection sends its request within a
round trip of opening, a peer's handshake ends within a few, while a stranger's idle
connections and stalled handshakes only grow old. To evict a new client's connection
the stranger would have to open a whole cap's worth within that round trip; what it can
evict is a client's pooled keep-alive connection, idle longer than its own, which the
client then opens again. Connections handling a request, and paired nodes' proven
ones, are never evicted.

Admitted connections hold a `Lease`, released exactly once when they close. A
connection that proves on the peer port that it comes from a paired node (a completed
mutual-TLS handshake) stops counting against its address, since a busy peer may open
many, but still counts in the total (the total protects descriptors, which peers use).

`HeadClock` says when a connection's request head (request line and headers) is late:

             connected / first byte after an answer
    IDLE ───────────────────────────────────────────► AWAITING (deadline = now + T)
      ▲                                                      │ head received
      └──────────── answered ─────────── IN_REQUEST ◄────────┘

A new connection starts AWAITING: the first head is due `T` after the connection (for
TLS, the handshake counts). After an answer the connection is IDLE — the idle
keep-alive timeout governs it then — and the next request's first byte starts the clock
again, as nginx's `client_header_timeout` does. Bytes that arrive while a request is
being handled (its body, or a pipelined request) start nothing: the answer comes first.
So a slowloris connection trickling a byte a second is closed `T` after it began.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: Descriptors kept back from LAN connections when the total cap is derived from the
#: open file limit: a quarter of the limit, and at least this many, for loopback
#: clients, backends, peer connections we dial, model files and logs.
RESERVED_FDS_MIN: Final = 256
#: TLS handshakes under way at once from the LAN. Each holds asyncio's 256 KiB read
#: buffer and the TLS state, some 300 KiB in all, until it ends: 256 of them bound that
#: at about 77 MiB. Peers' handshakes end within milliseconds; 256 at once is a burst no
#: LAN cluster makes.
MAX_HANDSHAKES: Final = 256
#: The key for a connection whose address the transport does not know (never on TCP):
#: such connections share one budget rather than escape the caps.
UNKNOWN_SOURCE: Final = "?"


# -- the caps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    per_source: int  # open connections from one LAN address, both ports together
    total: int  # open LAN connections in all
    handshakes: int = MAX_HANDSHAKES  # LAN connections in their TLS handshake at once

    def __post_init__(self) -> None:
        if min(self.per_source, self.total, self.handshakes) < 1:
            raise ValueError(f"connection caps must be at least 1: {self}")


def connection_caps(per_source: int, total: int, open_file_limit: int) -> ConnectionCaps:
    """The caps from the settings (`limits.max_connections_per_source`,
    `limits.max_connections`); a total of 0 is derived from the open file limit,
    keeping a quarter of it (at least `RESERVED_FDS_MIN`) for everything else."""
    if total == 0:
        reserve = max(RESERVED_FDS_MIN, open_file_limit // 4)
        total = max(1, open_file_limit - reserve)
    return ConnectionCaps(per_source=per_source, total=total)


def source_of(peername: object) -> str:
    """The address a connection comes from, in one form per host: a transport's
    `peername` (`(host, port)` or `(host, port, flow, scope)`) without port or IPv6
    zone, IPv4-mapped IPv6 as IPv4; `UNKNOWN_SOURCE` for anything else."""
    host = peername[0] if isinstance(peername, tuple) and peername else None
    if not isinstance(host, str):
        return UNKNOWN_SOURCE
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return UNKNOWN_SOURCE
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.compressed
    return ip.compressed


# -- admission --------------------------------------------------------------------------


class Refused(enum.Enum):
    """Why a connection was closed at once."""

    SOURCE_FULL = "source"  # its address holds max_connections_per_source already
    NODE_FULL = "total"  # max_connections reached, every one of them in use


@dataclass(frozen=True, slots=True)
class BookStatistics:
    open: int  # counted (LAN) connections open now
    exempt_open: int  # loopback connections open now (never counted)
    proven_open: int  # counted in the total only: paired nodes on the peer port
    idle: int  # counted connections handling no request now (the evictable ones)
    handshaking: int  # counted connections in their TLS handshake now
    sources: int  # LAN addresses with a connection counted against them now
    refused_source: int  # since start: refused for their address's cap
    refused_total: int  # since start: refused for the node's total cap
    evicted: int  # since start: closed idle or mid-handshake to admit another


class Lease:
    """An admitted connection's place in the book; `release()` when it closes.

    `on_evict` is how the book closes the connection if it evicts it (the listener sets
    it); `displaced` is the address of a connection evicted to admit this one.
    """

    __slots__ = ("_book", "_proven", "_released", "displaced", "exempt", "on_evict", "source")

    def __init__(self, book: ConnectionBook, source: str, *, exempt: bool) -> None:
        self._book = book
        self.source = source
        self.exempt = exempt
        self.on_evict: Callable[[], None] | None = None
        self.displaced: str | None = None
        self._proven = False
        self._released = False

    def handshake_done(self) -> None:
        """Its TLS handshake ended well. Idempotent."""
        self._book._handshaking.pop(self, None)

    def busy(self) -> None:
        """A complete request head came in (so any handshake is over): not evictable
        while it is handled."""
        self._book._idle.pop(self, None)
        self._book._handshaking.pop(self, None)

    def idle(self) -> None:
        """Its answer is done: evictable again, as the most recently idle."""
        if not (self.exempt or self._proven or self._released):
            self._book._idle.pop(self, None)
            self._book._idle[self] = None

    def proven(self) -> None:
        """The connection proved it comes from a paired node: it no longer counts
        against its address, only in the total, and is never evicted. Idempotent."""
        if self.exempt or self._proven or self._released:
            return
        self._proven = True
        self._book._idle.pop(self, None)
        self._book._handshaking.pop(self, None)
        self._book._unsource(self.source)
        self._book._proven += 1

    def release(self) -> None:
        """The connection closed. Idempotent: every path that ends a connection may call it."""
        if self._released:
            return
        self._released = True
        book = self._book
        if self.exempt:
            book._exempt -= 1
            return
        book._idle.pop(self, None)
        book._handshaking.pop(self, None)
        book._total -= 1
        if self._proven:
            book._proven -= 1
        else:
            book._unsource(self.source)


class ConnectionBook:
    """Open connections per source address, in total and in TLS handshakes, and the
    admission decision (the module's theory of operation says which).

    `exempt(source)` says which addresses are never counted nor refused (the node's
    caller passes "is loopback"; tests may narrow it).
    """

    def __init__(self, caps: ConnectionCaps, exempt: Callable[[str], bool]) -> None:
        self.caps = caps
        self._exempt_source = exempt
        self._by_source: dict[str, int] = {}
        # Counted connections, in the order they became so (dicts as ordered sets): those
        # not handling a request (none yet, or answered), and those in a TLS handshake
        # (always idle too: no request comes before the handshake is over).
        self._idle: dict[Lease, None] = {}
        self._handshaking: dict[Lease, None] = {}
        self._total = 0
        self._exempt = 0
        self._proven = 0
        self._evicted = 0
        self._refused = dict.fromkeys(Refused, 0)

    def admit(self, source: str, *, tls: bool = False) -> Lease | Refused:
        """A lease for a connection from `source` (about to begin a TLS handshake if
        `tls`) that may stay, or why it may not. It may evict older connections to
        make room: their leases are released and their `on_evict` called."""
        if self._exempt_source(source):
            self._exempt += 1
            return Lease(self, source, exempt=True)
        held = self._by_source.get(source, 0)
        if held >= self.caps.per_source:
            return self._refuse(Refused.SOURCE_FULL)
        if self._total >= self.caps.total and not self._idle:
            return self._refuse(Refused.NODE_FULL)
        displaced = None
        if tls and len(self._handshaking) >= self.caps.handshakes:
            displaced = self._evict(next(iter(self._handshaking)))
        if self._total >= self.caps.total:
            displaced = self._evict(next(iter(self._idle)))
        self._by_source[source] = self._by_source.get(source, 0) + 1
        self._total += 1
        lease = Lease(self, source, exempt=False)
        lease.displaced = displaced
        self._idle[lease] = None
        if tls:
            self._handshaking[lease] = None
        return lease

    def open_from(self, source: str) -> int:
        """Connections from `source` counted against its cap now."""
        return self._by_source.get(source, 0)

    def statistics(self) -> BookStatistics:
        return BookStatistics(
            open=self._total,
            exempt_open=self._exempt,
            proven_open=self._proven,
            idle=len(self._idle),
            handshaking=len(self._handshaking),
            sources=len(self._by_source),
            refused_source=self._refused[Refused.SOURCE_FULL],
            refused_total=self._refused[Refused.NODE_FULL],
            evicted=self._evicted,
        )

    def _refuse(self, reason: Refused) -> Refused:
        self._refused[reason] += 1
        return reason

    def _evict(self, victim: Lease) -> str:
        self._evicted += 1
        victim.release()
        if victim.on_evict is not None:
            victim.on_evict()
        return victim.source

    def _unsource(self, source: str) -> None:
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]


# -- the request head's deadline ------------------------------------------------------------


class Phase(enum.Enum):
    AWAITING = "awaiting"  # a request head is due by `deadline`
    IN_REQUEST = "in_request"  # a head is in; the request is being handled
    IDLE = "idle"  # answered; the next byte starts the clock


class HeadClock:
    """When one connection's request head is due; see the module's theory of operation."""

    __slots__ = ("deadline", "phase", "timeout_s")

    def __init__(self, timeout_s: float, now: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the header timeout must be positive, not {timeout_s}")
        self.timeout_s = timeout_s
        self.phase = Phase.AWAITING
        self.deadline: float | None = now + timeout_s

    def bytes_received(self, now: float) -> None:
        """Bytes arrived. Only after an answer do they start the clock."""
        if self.phase is Phase.IDLE:
            self.phase = Phase.AWAITING
            self.deadline = now + self.timeout_s

    def head_received(self) -> None:
        self.phase = Phase.IN_REQUEST
        self.deadline = None

    def answered(self) -> None:
        self.phase = Phase.IDLE
        self.deadline = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
