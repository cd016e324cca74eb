"""Who may call a route: every route's declared audience, and the one access decision.

Theory of operation: each route in the route table (`shoal.api.app`) declares its
`Audience`. For every request the access middleware describes the caller as a `Caller`
(where it connects from, on which port, which paired node its TLS certificate proves)
and asks `decide()`, a pure function, what to do. The middleware does only the I/O
around it: reading the certificate, checking an API key when the verdict says one is
needed, and formatting a refusal.

    audience   who passes
    ────────   ──────────────────────────────────────────────────────────────────────
    PUBLIC     anyone (health probe; the admission handshake, which must work before
               any trust exists and authenticates by itself)
    CLIENT     this machine; a paired node; a LAN client with an API key, or with none
               in an open cluster (the OpenAI API; status and cluster views)
    LOCAL      this machine's operator only, on the API port (what makes the node
               contact addresses or changes trust: join, scan, pairing)
    PEER       a paired node over mutual TLS on the peer port (state, goodbye)

On the peer port, a TLS certificate that is not a paired node's is refused whatever the
route: that port is for paired nodes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from shoal.settings import ClusterMode


class Audience(StrEnum):
    PUBLIC = "public"
    CLIENT = "client"
    LOCAL = "local"
    PEER = "peer"


@dataclass(frozen=True, slots=True)
class Caller:
    loopback: bool  # connects from this machine
    peer_port: bool  # connects to the mutual-TLS peer port
    peer: str | None  # the paired node its certificate proves (peer port only)


class Verdict(StrEnum):
    ALLOW = "allow"
    NEED_KEY = "need_key"  # allowed with a valid API key
    NOT_PAIRED = "not_paired"  # a certificate on the peer port that is no paired node's
    LOCAL_ONLY = "local_only"
    PEER_ONLY = "peer_only"


def decide(audience: Audience, caller: Caller, mode: ClusterMode) -> Verdict:
    """What to do with a request for a route of `audience` from `caller`."""
    # `is` chains, not `match`: this runs on every request.
    if caller.peer_port and caller.peer is None:
        return Verdict.NOT_PAIRED
    if audience is Audience.CLIENT:
        if caller.peer is not None or caller.loopback or mode == "open":
            return Verdict.ALLOW
        return Verdict.NEED_KEY
    if audience is Audience.PUBLIC:
        return Verdict.ALLOW
    if audience is Audience.PEER:
        return Verdict.ALLOW if caller.peer is not None else Verdict.PEER_ONLY
    # LOCAL: a paired node on this machine is still a node, not the operator.
    return Verdict.ALLOW if caller.loopback and not caller.peer_port else Verdict.LOCAL_ONLY
