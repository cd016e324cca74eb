"""Route ranking: the order in which the candidates for one request are tried.

Theory of operation (DESIGN §4): a request names a model; `resolve_model` widens that
name to every name it may be served under (aliases both ways). The caller turns the
holders of those names into `Candidate`s, `hop_policy` reads what the request's headers
allow (a forwarded request is never forwarded again; a client may pin a node or forbid
forwarding), `allowed` drops the candidates that policy excludes, and `rank` orders the
rest. Everything here is pure: values in, values out; randomness comes from the
`random.Random` the caller passes.

`rank`'s order, first to last: candidates holding the model loaded, then those merely
holding it; each group in the strategy's order (`round_robin` rotates each group by
`turn`). `prefer` then puts the candidate that holds the prompt's cache first while
it has a free slot (cache affinity, `affinity.py`). Unhealthy candidates (peers that
are suspect or removed) are left out: never tried. A suspect peer is one that just
failed to answer; trying it again would cost the request a full connect timeout (3 s)
whenever it is really gone, a silent one most of all, while a live one is cleared by
the heartbeat sent 1 s after its miss. So a request whose only holders are away gets
503 with Retry-After at once (the router says so) and comes back when a heartbeat has
decided, rather than waiting on a dead link.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from shoal.protocol import HOP_HEADER, LOCAL_ONLY_HEADER, NODE_HEADER
from shoal.routing.affinity import Prompt

Strategy = Literal["local_spillover", "least_loaded", "round_robin"]

UNBOUNDED = 1 << 30  # the slots of a backend that queues by itself

# A shorter id prefix is too likely to name two nodes (or a node by accident).
MIN_ID_PREFIX = 8
_NO_FIT, _PREFIX_FIT, _EXACT_FIT = 0, 1, 2  # how well a pin names a node

_TRUTHY = frozenset({"1", "true", "yes"})
_HOP, _NODE, _LOCAL_ONLY = (h.lower() for h in (HOP_HEADER, NODE_HEADER, LOCAL_ONLY_HEADER))
_POLICY_HEADERS = frozenset({_HOP, _NODE, _LOCAL_ONLY})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One place a request could be served: a local backend, or a peer node."""

    key: str  # unique id of this target: a local backend's name, or a peer's node id
    node_id: str  # the node that would serve it (this node's id for local backends)
    local: bool
    loaded: bool  # model loaded in memory (loaded beats merely available)
    in_flight: int  # requests running there now
    capacity: int  # how many it serves at once (>= 1): what loads are compared by
    hardware_score: float = 0.0  # higher is a stronger machine
    healthy: bool = True  # False for a peer that is away (suspect, removed): never tried
    # Requests it can run at once, for admission (`shoal.routing.admission`): a backend's
    # own figure (llama-server slots, the embedded engine 1) or a peer's sum of them;
    # UNBOUNDED where a backend queues by itself.
    slots: int = UNBOUNDED
    # Requests waiting for a slot there (a peer's advertised queue): work ahead of ours.
    queued: int = 0
    # Requests this node has sent there that have not ended (a peer's; running there or
    # waiting in its queue).
    sent: int = 0
    # Seconds a request queued there now would wait (a peer's advertised estimate).
    wait_s: float = 0.0

    def __post_init__(self) -> None:
        # Bad counts would silently reorder routes; refuse them where they are made.
        if self.capacity < 1:
            raise ValueError(f"candidate {self.key!r}: capacity must be >= 1, not {self.capacity}")
        if self.in_flight < 0 or self.queued < 0:
            raise ValueError(
                f"candidate {self.key!r}: in_flight and queued must be >= 0, "
                f"not {self.in_flight} and {self.queued}"
            )
        if math.isnan(self.hardware_score):
            raise ValueError(f"candidate {self.key!r}: hardware_score is NaN")

    @property
    def load(self) -> float:
        """Requests running or waiting there per request it can serve at once (1.0 =
        full): a node with a queue is further from serving a new request than one
        without, however many it runs."""
        return (self.in_flight + self.queued) / self.capacity


def rank(
    candidates: Sequence[Candidate],
    strategy: Strategy,
    *,
    local_in_flight: int,
    spillover_max_local_in_flight: int,
    turn: int,
    rng: random.Random,
) -> list[Candidate]:
    """The healthy candidates, in the order to try them (see the module docstring).

    `local_in_flight` is this node's running requests and `spillover_max_local_in_flight`
    the count from which `local_spillover` starts sending work to less busy peers.
    `turn` is a counter the caller advances per request, for `round_robin`. `rng` breaks
    ties, so equal candidates share the work instead of the first taking it all.
    """
    healthy = [c for c in candidates if c.healthy]
    groups = ([c for c in healthy if c.loaded], [c for c in healthy if not c.loaded])
    order: list[Candidate] = []
    for group in groups:
        if strategy == "local_spillover":
            order += _spillover(group, local_in_flight, spillover_max_local_in_flight, rng)
        elif strategy == "least_loaded":
            order += _least_loaded(group, rng)
        elif strategy == "round_robin":
            order += _rotated(group, turn)
        else:
            raise ValueError(f"unknown routing strategy {strategy!r}")
    return order


def prefer(order: list[Candidate], key: str) -> list[Candidate]:
    """`order` with the candidate `key` first, if it is there and can take one more now.

    That candidate holds the prompt's cache (it served the conversation's last turn).
    It goes first only while it has the model loaded (unloading drops the cache) and is
    below its capacity: waiting behind its running requests would cost more than reading
    the prompt again elsewhere, so a busy one keeps its place in the strategy's order.
    """
    for i, candidate in enumerate(order):
        if candidate.key == key:
            if i and candidate.loaded and candidate.in_flight < candidate.capacity:
                return [candidate, *order[:i], *order[i + 1 :]]
            break
    return order


def _least_loaded(candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    """By load, then the shorter queue wait, then stronger hardware first, then in
    random order."""
    ordered = list(candidates)
    if len(ordered) > 1:
        rng.shuffle(ordered)  # the sort is stable: exact ties keep this random order
        ordered.sort(key=lambda c: (c.load, c.wait_s, -c.hardware_score))
    return ordered


def _spillover(
    candidates: Sequence[Candidate], local_in_flight: int, threshold: int, rng: random.Random
) -> list[Candidate]:
    local = _least_loaded([c for c in candidates if c.local], rng)
    remote = _least_loaded([c for c in candidates if not c.local], rng)
    if not local or local_in_flight < threshold:
        return local + remote
    # Spill only to a peer strictly less busy than this node: hopping to one as busy as
    # we are adds a round trip and gains nothing. Compared as cross products, exactly.
    limit = max(threshold, 1)
    lighter = [c for c in remote if c.in_flight * limit < local_in_flight * c.capacity]
    heavier = [c for c in remote if c.in_flight * limit >= local_in_flight * c.capacity]
    return lighter + local + heavier


def _rotated(candidates: Sequence[Candidate], turn: int) -> list[Candidate]:
    # Sorted by key, so that a given turn means the same order whatever the input order.
    base = sorted(candidates, key=lambda c: c.key)
    if not base:
        return base
    start = turn % len(base)
    return base[start:] + base[:start]


def resolve_model(requested: str, aliases: Mapping[str, Sequence[str]]) -> list[str]:
    """Every name a request for `requested` may be served under, in preference order.

    The name itself; then, if it is an alias, its targets; then, for every alias that
    lists it as a target, that alias and the alias's other targets. Case-sensitive, no
    duplicates, one level deep (an alias of an alias is not followed).
    """
    names = [requested, *_targets(aliases.get(requested, ()))]
    for alias, targets in aliases.items():
        listed = _targets(targets)
        if requested in listed:
            names += [alias, *listed]
    return list(dict.fromkeys(names))


def _targets(targets: Sequence[str]) -> Sequence[str]:
    # A lone string is a Sequence[str] too: `"a" = "b"` must not mean ["b"]'s letters.
    return (targets,) if isinstance(targets, str) else targets


@dataclass(frozen=True, slots=True)
class HopPolicy:
    """Where a request may go, as its headers say."""

    forwarded: bool = False  # it came from a peer: serve locally or fail, never forward
    local_only: bool = False  # the client forbids forwarding
    pinned: str | None = None  # the client names the node that must serve it
    # The request's prompt, for cache affinity; set by the handler that parsed the body,
    # not from headers. None: no prompt, or the request is served here or nowhere.
    prompt: Prompt | None = None


def hop_policy(headers: Mapping[str, str], prompt: Prompt | None = None) -> HopPolicy:
    """Read the routing headers, whatever their case, from any mapping of headers.

    The hop marker counts whenever present, whatever its value: a peer that marks a
    request must never see it come back, so doubt resolves toward "forwarded".
    `X-Shoal-Local-Only` is on for "1", "true" or "yes" (any case) and off otherwise.
    Of a repeated header, the first wins. `prompt` is kept unless the request is
    forwarded (a forwarded request has no choice of node to make).
    """
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _POLICY_HEADERS and lowered not in found:
            found[lowered] = value
    forwarded = _HOP in found
    return HopPolicy(
        forwarded=forwarded,
        local_only=found.get(_LOCAL_ONLY, "").strip().lower() in _TRUTHY,
        pinned=found.get(_NODE, "").strip() or None,
        prompt=None if forwarded else prompt,
    )


def allowed(
    candidates: Sequence[Candidate],
    policy: HopPolicy,
    *,
    self_id: str,
    self_name: str,
    names: Mapping[str, str],
) -> list[Candidate]:
    """The candidates `policy` lets this request use, in their given order.

    Forwarded or local-only requests keep local candidates only. A pin keeps the
    candidates on the node it names: by name (`names` maps node id to name), by full id,
    or by an id prefix of at least `MIN_ID_PREFIX` characters. An exact name or id wins
    over a prefix; a pin that names this node (at the best match) means local. A pin
    that names no node leaves nothing.
    """
    kept = [c for c in candidates if c.local or not (policy.forwarded or policy.local_only)]
    pin = policy.pinned
    if pin is None:
        return kept
    # How well the pin fits each node: decided over every known node, so that what a
    # pin means does not depend on which nodes hold the requested model.
    fit = {node_id: _pin_fit(pin, node_id, name) for node_id, name in names.items()}
    for c in candidates:
        if not c.local and c.node_id not in fit:
            fit[c.node_id] = _pin_fit(pin, c.node_id, None)
    self_fit = _pin_fit(pin, self_id, self_name)
    best = max([self_fit, *fit.values()])
    if best == _NO_FIT:
        return []
    if self_fit == best:
        return [c for c in kept if c.local]
    return [c for c in kept if not c.local and fit[c.node_id] == best]


def _pin_fit(pin: str, node_id: str, name: str | None) -> int:
    if pin in (node_id, name):
        return _EXACT_FIT
    if len(pin) >= MIN_ID_PREFIX and node_id.startswith(pin):
        return _PREFIX_FIT
    return _NO_FIT
