"""Broken links on a LAN of namespaces: silent faults only (issue 9, items 11 to 15).

A cable is pulled at the switch (`ip link set pN down` in the bridge's namespace): no
RST, no FIN, the node just goes silent, as a pulled cable or a partition does. Three
nodes in one secret cluster, found by mDNS: n1 alone holds `solo`, n1 and n2 hold `duo`,
n3 holds nothing and is where the clients come in. Their backends are
tests/netns/backend.py, each request saying how long to take. The nodes' liveness timers
are shrunk through their config file (1 s heartbeats, 2 s timeout) and the stall timeout
is 8 s; the read timeout keeps its default of 300 s, so a request that waits it out shows
here as hung (the agent gives up after HUNG_S).

The tests run in order on one cluster, then the scan-only mesh on a Lan of its own. Each
prints what it measured: requests offered, completed, failed with a clear error, hung,
and the time to each.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal.trust.secret import new_secret
from tests.netns.cluster import (
    Agent,
    Cluster,
    Node,
    require_netns,
    start_backend,
    wait_until,
)
from tests.netns.lan import Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

BACKEND_PORT = 18082
SECRET = new_secret()
HUNG_S = 45.0  # an answer (or the next chunk of one) later than this is a hung request
# Longer than n3 takes to notice the pull (at most 3 s), so that the two ways a stream
# from n1 must end are told apart: at once when n3 suspects n1, or after this stall.
STALL_TIMEOUT_S = 8.0
CONNECT_TIMEOUT_S = 5.0  # a dial to a silent node costs this: long enough to tell apart
OUTAGE_S = 60.0  # the issue's partition: n3 used to refuse n1's model 8 minutes after
CONFIG = f"""
[mesh]
new_interval_s = 1.0
established_interval_s = 1.0
stable_interval_s = 1.0
heartbeat_timeout_s = 2.0
suspect_retry_s = 0.5
misses_to_remove = 4

[limits]
stall_timeout_s = {STALL_TIMEOUT_S}
connect_timeout_s = {CONNECT_TIMEOUT_S}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_netns()
    home = tmp_path_factory.mktemp("broken")
    with Lan() as lan:
        h1, h2, h3, hc = (lan.add_host(n) for n in ("n1", "n2", "n3", "client"))
        start_backend(lan, h1, BACKEND_PORT, ["solo", "duo"])
        start_backend(lan, h2, BACKEND_PORT, ["duo"])
        holder = ("--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}")
        nodes = {
            "n1": Node("n1", h1, home / "n1", holder, secret=SECRET, config=CONFIG),
            "n2": Node("n2", h2, home / "n2", holder, secret=SECRET, config=CONFIG),
            "n3": Node("n3", h3, home / "n3", ("--no-embedded",), secret=SECRET, config=CONFIG),
        }
        built = Cluster(lan, hc, Agent(lan, hc), nodes)
        try:
            for node in nodes.values():
                built.start(node)
            yield built
        finally:
            lan.teardown()
            built.agent.close()
            built.report()


# -- what became of each request ---------------------------------------------------------


@dataclass
class Ask:
    """One request the clients offer: its model, whether streamed, the backend's pacing."""

    label: str
    model: str
    stream: bool
    pacing: str = ""  # tests/netns/backend.py's `fake:` instructions
    at: float = 0.0  # seconds after the batch begins

    @property
    def service_s(self) -> float:
        """How long the backend takes over it: its delay, and its words' gaps."""
        pace = {"delay": 0.0, "words": 3.0, "gap": 0.0}
        for word in self.pacing.split():
            key, _, value = word.partition("=")
            pace[key] = float(value)
        return pace["delay"] + pace["words"] * pace["gap"]


@dataclass
class Fate:
    ask: Ask
    kind: str  # completed | failed (a clear error) | hung | cut (silently) | dropped
    status: int | None
    started: float  # since the cable was pulled (negative: before)
    seconds: float  # until it ended
    served_by: str | None
    route: str | None
    retry_after: str | None
    detail: str

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    def line(self) -> str:
        who = f"{self.served_by or '-'}/{self.route or '-'}"
        return (
            f"{self.ask.label:<34} {self.kind:<9} {self.status or '-'!s:<4} {who:<12} "
            f"start {self.started:+6.2f} s  end {self.ended:+6.2f} s  {self.detail[:60]}"
        )


def fate_of(ask: Ask, answer: dict[str, Any], offset: float) -> Fate:
    """Classify an agent's answer; `offset`: the batch's start, from the pull."""
    started = offset + float(answer.get("started", 0.0))
    seconds = float(answer.get("seconds", 0.0))
    headers = {k.lower(): v for k, v in (answer.get("headers") or {}).items()}
    served_by, route = headers.get("x-shoal-served-by"), headers.get("x-shoal-route")
    status = answer.get("status")
    body = str(answer.get("body", ""))
    if "error" in answer:
        hung = "timed out" in answer["error"] or "TimeoutError" in answer["error"]
        kind, detail = ("hung" if hung else "dropped"), answer["error"]
    elif status == 200 and ask.stream:
        if "data: [DONE]" in body:
            kind, detail = "completed", ""
        elif 'data: {"error"' in body:
            kind, detail = "failed", body.rsplit("data: ", 1)[-1].strip()[:200]
        else:
            kind, detail = "cut", body[-120:]
    elif status == 200:
        kind, detail = "completed", ""
    else:
        try:
            error = json.loads(body)["error"]
            kind, detail = "failed", f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            kind, detail = "dropped", body[:120]
    return Fate(
        ask, kind, status, started, seconds, served_by, route, headers.get("retry-after"), detail
    )


def body_of(ask: Ask) -> dict[str, Any]:
    content = f"fake: {ask.pacing}" if ask.pacing else "hi"
    return {"model": ask.model, "messages": [{"role": "user", "content": content}],
            "stream": ask.stream}  # fmt: skip


def tally(fates: list[Fate]) -> str:
    counts = Counter(f.kind for f in fates)
    kinds = ("completed", "failed", "hung", "cut", "dropped")
    return f"offered {len(fates)}: " + ", ".join(f"{k} {counts[k]}" for k in kinds)


def settled(cluster: Cluster) -> None:
    """Every node sees both others healthy, and n3 can route both models."""
    names = set(cluster.nodes)
    wait_until(
        lambda: all(cluster.sees_all_healthy(v, sorted(names - {v})) for v in names),
        60, "every node to see both others healthy",
    )  # fmt: skip
    wait_until(lambda: {"solo", "duo"} <= cluster.models_at("n3"), 30, "n3 to list both models")


PULL_AT = 0.6  # seconds into the first requests (the figure)


def around_the_pull() -> list[Ask]:
    """The requests the clients offer n3 around the pull, `at` from the first ones."""
    # In flight at the pull: only n1 holds `solo`.
    asks = [
        Ask("solo stream in flight", "solo", True, "words=400 gap=0.05"),
        Ask("solo non-stream in flight", "solo", False, "delay=20"),
    ]
    # In flight at the pull, `duo`: on n1 or n2, nothing sent to the client yet.
    asks += [Ask(f"duo non-stream in flight #{i}", "duo", False, "delay=3") for i in range(6)]
    stream = "delay=2 words=20 gap=0.05"
    asks += [Ask(f"duo stream in flight #{i}", "duo", True, stream) for i in range(4)]
    # Sent after the pull, on connections n3 keeps alive to n1 among others.
    for t in (0.3, 0.6, 1.0, 1.5, 2.5, 4, 6, 9):
        asks.append(Ask(f"duo non-stream at {t:g} s", "duo", False, "delay=0.5", PULL_AT + t))
    for t in (0.3, 1.0, 2.5, 6):
        asks.append(Ask(f"duo stream at {t:g} s", "duo", True, "words=10 gap=0.05", PULL_AT + t))
    # While n1 is away, `solo` has no holder to go to; and a model no node ever held.
    for t in (0.3, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0):
        asks.append(Ask(f"solo at {t:g} s", "solo", False, at=PULL_AT + t))
    asks.append(Ask("never-held at 12 s", "never-held", False, at=PULL_AT + 12))
    return asks


# -- the tests ---------------------------------------------------------------------------


def test_the_mesh_forms_and_routes(cluster: Cluster) -> None:
    started = min(n.started for n in cluster.nodes.values())
    settled(cluster)
    cluster.measured("start → full mesh, both models routable at n3", time.monotonic() - started)
    answer = cluster.chat("n3", "solo")
    assert (answer.get("status"), answer["headers"]["X-Shoal-Served-By"]) == (200, "n1"), answer


def test_a_stream_whose_source_goes_silent_ends_within_the_stall_timeout(
    cluster: Cluster,
) -> None:
    """Item 11, the stall timeout: tokens come every 50 ms, then nothing (the holder's
    engine hangs). The client must get an error event within seconds, not wait out the
    read timeout (300 s)."""
    ask = Ask(
        "solo stream, source stalls after 5", "solo", True, "words=200 gap=0.05 stall_after=5"
    )
    url = cluster.nodes["n3"].url + "/v1/chat/completions"
    answer = cluster.agent.call("POST", url, body_of(ask), timeout=HUNG_S, stream=True)
    fate = fate_of(ask, answer, 0.0)
    print(f"\n{fate.line()}\n  first byte after {answer.get('first_byte_seconds')} s")
    cluster.measured("stalled stream: start → error event", fate.seconds)
    assert fate.kind == "failed", fate.line()  # an error event, not a hang or a silent cut
    first_byte = answer.get("first_byte_seconds") or 0.0
    # 5 chunks take 0.25 s; then the stall timeout, and 3 s of slack.
    assert fate.seconds - first_byte < STALL_TIMEOUT_S + 3, fate.line()


def test_a_pulled_cable_costs_requests_seconds_and_heals_by_itself(cluster: Cluster) -> None:
    """Items 11, 12, 13 and 15 around one pull of n1's cable, OUTAGE_S long."""
    lan, n1 = cluster.lan, cluster.nodes["n1"]
    settled(cluster)
    asks = around_the_pull()
    url = cluster.nodes["n3"].url + "/v1/chat/completions"
    client = cluster.agent
    batch = [
        {**client.request("POST", url, body_of(a), timeout=HUNG_S, stream=a.stream), "at": a.at}
        for a in asks
    ]
    monitor = Agent(lan, cluster.agent_host)
    monitor.api_keys = client.api_keys
    watch = Cluster(lan, cluster.agent_host, monitor, cluster.nodes)
    try:
        sent = time.monotonic()
        client.send({"batch": batch})
        wait_until(lambda: time.monotonic() >= sent + PULL_AT, 2, "the pull's moment", 0.01)
        lan.link(n1.host, up=False, at_switch=True)
        pulled = time.monotonic()
        views: dict[str, float] = {}  # "<viewer> <health>" -> first seen, since the pull

        def look() -> None:
            for viewer in ("n3", "n2"):
                health = watch.health(viewer, "n1")
                views.setdefault(f"{viewer} {health}", time.monotonic() - pulled)

        while not client.ready():
            look()
            assert time.monotonic() - pulled < HUNG_S + 30, "the batch never ended"
            time.sleep(0.1)
        answers = client.receive(5)["results"]
        fates = [fate_of(a, answer, sent - pulled) for a, answer in zip(asks, answers, strict=True)]
        print("\nrequests through n3 (times from the pull of n1's cable):")
        for fate in fates:
            print("  " + fate.line())
        # Keep the cable out for the whole outage, watching n3's view of n1.
        while time.monotonic() - pulled < OUTAGE_S:
            look()
            time.sleep(0.5)
        lan.link(n1.host, up=True, at_switch=True)
        restored = time.monotonic()
        names = set(cluster.nodes)
        healed = wait_until(
            lambda: all(watch.sees_all_healthy(v, sorted(names - {v})) for v in names),
            75, "the mesh to heal by itself", interval=0.25,
        )  # fmt: skip
        routable = wait_until(
            lambda: watch.chat("n3", "solo", timeout=10).get("status") == 200,
            30, "n3 to route solo to n1 again", interval=0.25,
        )  # fmt: skip
    finally:
        lan.link(n1.host, up=True, at_switch=True)  # whatever failed, the cable goes back
        monitor.close()

    print(f"n3's and n2's view of n1 after the pull: {json.dumps(views)}")
    noticed = views.get("n3 degraded", views.get("n3 unreachable"))
    assert noticed is not None, f"n3 never noticed the pulled cable: {views}"
    cluster.measured("pull → n3 notices n1 (suspect)", noticed)
    if "n3 unreachable" in views:
        cluster.measured("pull → n3 removes n1", views["n3 unreachable"])
    cluster.measured("cable back → every node sees both others healthy", healed - restored)
    cluster.measured("cable back → n3 routes solo to n1 again", routable - restored)
    groups = {
        "solo in flight": [
            f for f in fates if f.ask.label.startswith("solo") and "flight" in f.ask.label
        ],
        "duo (two holders)": [f for f in fates if f.ask.model == "duo"],
        "solo while away": [f for f in fates if f.ask.label.startswith("solo at")],
    }
    for what, group in groups.items():
        cluster.figures[f"pull: {what}"] = tally(group)
        print(f"{what}: {tally(group)}")
    # Every behaviour is checked and every miss reported, not only the first.
    problems = [f"{what}: {fate.line()}" for what, fate in misbehaved(groups, noticed, fates)]
    assert not problems, "\n".join(problems)
    # Item 12: the whole mesh came back without anyone running `shoal join`.
    assert healed - restored < 65.0


ABORT_S = 2.0  # "at once": how long after n3 notices an attempt on n1 may still run


def misbehaved(
    groups: dict[str, list[Fate]], noticed: float, fates: list[Fate]
) -> Iterator[tuple[str, Fate]]:
    """The requests around the pull that did not do what issue 9 asks, and why.

    Suspecting a peer aborts every attempt on it at once (item 11): an attempt still
    connecting included, which would otherwise run out the connect timeout (5 s here).
    """
    for fate in groups["solo in flight"]:
        # Item 11: in flight to the only holder, they end with a clear error (an error
        # event for the stream) at once when n3 notices (or by the stall timeout).
        if fate.kind != "failed" or fate.ended > noticed + ABORT_S:
            yield f"item 11: no clear error within {ABORT_S} s of n3 noticing", fate
    for fate in groups["duo (two holders)"]:
        # Item 11, two holders: none is lost. None of them had sent the client a byte when
        # the cable went, so those caught on n1 are retried on n2 at once.
        if fate.kind != "completed":
            yield "item 11: lost although another holder was there", fate
        elif fate.ended > max(noticed, fate.started) + fate.ask.service_s + ABORT_S:
            yield f"item 11: not retried on n2 within {ABORT_S} s of n3 noticing", fate
    for fate in groups["solo while away"]:
        # Items 13 and 15: while n1 is away its model is 503 with Retry-After (not 400),
        # and once n3 suspects n1 it does not dial it: the answer comes in far less than
        # a connect timeout.
        if fate.kind == "hung" or fate.status not in (502, 503, 504):
            yield "items 13/15: hung, or not a 5xx while the only holder is away", fate
        elif fate.started < noticed and fate.ended > noticed + ABORT_S:
            yield f"item 11: an attempt on n1 outlived n3 noticing by over {ABORT_S} s", fate
        elif fate.started > noticed + 0.5 and not (
            fate.status == 503 and fate.retry_after and fate.seconds < CONNECT_TIMEOUT_S / 2
        ):
            yield "items 13/15: not a quick 503 with Retry-After once n1 is suspect", fate
    never = next(f for f in fates if f.ask.model == "never-held")
    if (never.status, never.kind) != (404, "failed"):
        yield "item 13: a model no node held is not 404", never


# Heartbeats so rare they cannot notice anything within the test: only the links can.
QUIET_CONFIG = CONFIG.replace("interval_s = 1.0", "interval_s = 120.0")
SILENCE_S = 5.0  # shoal.backends.http.SilenceDetection: 2 s idle + 3 probes 1 s apart


def test_a_silent_peer_fails_its_requests_within_seconds_whatever_the_heartbeats(
    lan: Lan, tmp_path: Path
) -> None:
    """Item 11 between two heartbeats: an established peer is checked every 15-30 s, so
    a request waiting on a peer whose cable was pulled must not wait for the next one.
    The peer link's TCP keepalive fails the connection within seconds, and the request
    is retried on the other holder. Heartbeats here are 120 s apart."""
    h1, h2, h3, hc = (lan.add_host(n) for n in ("n1", "n2", "n3", "client"))
    for host in (h1, h2):
        start_backend(lan, host, BACKEND_PORT, ["duo"])
    holder = ("--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}")
    nodes = {
        name: Node(name, host, tmp_path / name, args, secret=SECRET, config=QUIET_CONFIG)
        for name, host, args in (
            ("n1", h1, holder), ("n2", h2, holder), ("n3", h3, ("--no-embedded",))
        )
    }  # fmt: skip
    quiet = Cluster(lan, hc, Agent(lan, hc), nodes)
    try:
        for node in nodes.values():
            quiet.start(node)
        wait_until(
            lambda: quiet.sees_all_healthy("n3", ["n1", "n2"]) and "duo" in quiet.models_at("n3"),
            60, "n3 to see both holders",
        )  # fmt: skip
        # Nothing reaches the client before the pull: what is caught on n1 can be retried.
        asks = [Ask(f"duo non-stream #{i}", "duo", False, "delay=3") for i in range(6)]
        asks += [Ask(f"duo stream #{i}", "duo", True, "delay=2 words=20 gap=0.1") for i in range(4)]
        url = nodes["n3"].url + "/v1/chat/completions"
        batch = [quiet.agent.request("POST", url, body_of(a), timeout=HUNG_S, stream=a.stream)
                 for a in asks]  # fmt: skip
        sent = time.monotonic()
        quiet.agent.send({"batch": batch})
        wait_until(lambda: time.monotonic() >= sent + PULL_AT, 2, "the pull's moment", 0.01)
        lan.link(h1, up=False, at_switch=True)
        pulled = time.monotonic()
        answers = quiet.agent.receive(HUNG_S + 15)["results"]
        fates = [fate_of(a, r, sent - pulled) for a, r in zip(asks, answers, strict=True)]
        print("\nrequests through n3, heartbeats 120 s apart (times from the pull):")
        for fate in fates:
            print("  " + fate.line())
        print(f"quiet heartbeats: {tally(fates)}")
        quiet.figures["quiet heartbeats: requests around the pull"] = tally(fates)
        retried = [f for f in fates if f.route == "retried"]
        if retried:
            last = max(f.ended for f in retried)
            quiet.measured("quiet heartbeats: pull → last retried answer", last)
        assert all(f.kind == "completed" for f in fates), [f.line() for f in fates]
        # The requests caught on n1 end by SILENCE_S after its last byte, then are served
        # again on n2 (their service time), with 3 s of slack; never a heartbeat's wait.
        limit = SILENCE_S + 3.0
        late = [f.line() for f in fates if f.ended > f.ask.service_s + limit]
        assert not late, late
    finally:
        lan.link(h1, up=True, at_switch=True)
        quiet.agent.close()
        quiet.report(1500)


def test_scan_only_discovery_ends_in_a_complete_mesh(lan: Lan, tmp_path: Path) -> None:
    """Item 14: mDNS off. s2 and s3 wait 60 s before scanning; s1 scans after 1 s and
    finds both, and being found, they skip their own scan. Only peers telling each other
    whom they know can make s2 and s3 meet before their own scan."""
    hosts = {name: lan.add_host(name) for name in ("s1", "s2", "s3", "client")}
    client = hosts.pop("client")
    nodes = {
        name: Node(
            name, host, tmp_path / name, ("--no-embedded",), secret=SECRET,
            env={"SHOAL_MESH__MDNS": "false",
                 "SHOAL_MESH__SCAN_AFTER_S": "1" if name == "s1" else "60"},
            config=CONFIG,
        )
        for name, host in hosts.items()
    }  # fmt: skip
    scan = Cluster(lan, client, Agent(lan, client), nodes)
    try:
        for name in ("s2", "s3"):
            scan.start(nodes[name])
        for name in ("s2", "s3"):
            wait_until(lambda n=name: scan.agent.json(nodes[n].url + "/healthz") is not None,
                       30, f"{name} to listen")  # fmt: skip
        scan.start(nodes["s1"])
        started = nodes["s1"].started
        names = set(nodes)
        seen: dict[str, float] = {}
        deadline = started + 40  # s2's and s3's own scans come 60 s after their start
        while len(seen) < 3 and time.monotonic() < deadline:
            for viewer in names - set(seen):
                if scan.sees_all_healthy(viewer, sorted(names - {viewer})):
                    seen[viewer] = time.monotonic() - started
            time.sleep(0.25)
        views = {v: {p: d["health"] for p, d in scan.peers_of(v).items()} for v in sorted(names)}
        print(f"\nscan-only: s1 start → complete view at {seen}; views {views}")
        assert set(seen) == names, f"the mesh stayed partial: {views}"
    finally:
        scan.agent.close()
        scan.report(1500)
