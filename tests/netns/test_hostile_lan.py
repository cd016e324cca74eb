"""A hostile LAN: a stranger with no key attacks one node (issue 9, items 1 to 10).

Hosts on one Lan: `victim`, a node in pairing mode (LAN mode with no secret) whose
descriptor limit is 1024, soft and hard, as a desktop session or a service manager sets
it, fronting tests/netns/backend.py; `attacker`, running tests/netns/attacker.py; and
`client`, a LAN client with an API key. The victim's own operator is an agent inside the
victim's namespace, on loopback, and the real `shoal status` / `shoal pair list` there.

Each test is one class of attack. While it runs, the operator's and the keyed client's
`/healthz` are timed (p50 and max printed), a keyed chat request goes through, and the
node's resident memory, peak memory, log size and open descriptors are read before and
after: all are printed, and each is asserted against a generous bound stated below.
The victim's header, body and idle timeouts are shortened in its config file so that
the suite stays short; the caps on connections keep their defaults.

Item 7 (secrets on disk) is covered by tests/unit/test_secrets_on_disk.py, which runs a
node; it needs no LAN.
"""

from __future__ import annotations

import contextlib
import json
import select
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal.protocol import HELLO_PATH, PAIRS_PATH
from shoal.trust.secret import new_secret, write_secret
from tests.netns.cluster import (
    HERE,
    PORT,
    Agent,
    Cluster,
    Node,
    require_netns,
    spread,
    start_backend,
    wait_until,
)
from tests.netns.lan import Host, Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

BACKEND_PORT = 18083
FD_LIMIT = 1024
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 4.0
IDLE_TIMEOUT_S = 8.0  # longer than the header timeout, to tell them apart
PER_SOURCE = 128  # limits.max_connections_per_source, the default
CONFIG = f"""
[limits]
header_timeout_s = {HEADER_TIMEOUT_S}
body_timeout_s = {BODY_TIMEOUT_S}
idle_timeout_s = {IDLE_TIMEOUT_S}
max_connections_per_source = {PER_SOURCE}
"""
LOOPBACK = f"http://127.0.0.1:{PORT}"
# The bounds each attack is held to (a node idles at about 70 MiB and logs a few lines).
HEALTHZ_MAX_S = 2.0  # the slowest /healthz answer during an attack
RSS_GROWTH_MAX = 48 << 20  # resident memory after the attack, over before
LOG_GROWTH_MAX = 64 << 10  # log bytes written during the attack
MIB = 1 << 20


class Attacker:
    """tests/netns/attacker.py on the attacker's host."""

    def __init__(self, lan: Lan, host: Host) -> None:
        self.host = host
        self.process = lan.run(host, [sys.executable, str(HERE / "attacker.py")], pipes=True)

    def do(self, timeout: float = 60, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"the attacker did not answer {command['cmd']} within {timeout} s"
        answer = dict(json.loads(self.process.stdout.readline()))
        assert "error" not in answer, answer["error"]
        return answer

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Stage:
    lan: Lan
    cluster: Cluster
    victim: Node
    operator: Agent  # in the victim's namespace, on loopback
    attacker: Attacker
    spare: Host  # for a real second node
    home: Path

    @property
    def target(self) -> dict[str, Any]:
        return {"host": self.victim.host.ip, "port": PORT}

    def shoal(self, *args: str, check: bool = True) -> Any:
        """The real CLI inside the victim's namespace: the operator's own view."""
        argv = [sys.executable, "-m", "shoal", *args, "--url", LOOPBACK]
        return self.lan.exec(self.victim.host, argv, timeout=30, check=check)

    @contextlib.contextmanager
    def attack(self, what: str) -> Iterator[Watch]:
        """Measure the node while the body attacks it; `Watch.check` the bounds after."""
        watch = Watch(what, self)
        try:
            yield watch
        finally:
            watch.finish()


@dataclass
class Watch:
    what: str
    stage: Stage
    operator_s: list[float] = field(default_factory=list)
    client_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    fds_max: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        victim = self.stage.victim
        self.rss_before, self.peak_before = victim.rss_bytes(), peak_rss(victim)
        self.log_before = victim.log_bytes()

    def probe(self) -> None:
        """One /healthz from the operator (loopback) and one from the keyed client (LAN)."""
        stage = self.stage
        self.fds_max = max(self.fds_max, stage.victim.open_fds())
        for who, agent, base, times in (
            ("operator", stage.operator, LOOPBACK, self.operator_s),
            ("client", stage.cluster.agent, stage.victim.url, self.client_s),
        ):
            answer = agent.call("GET", base + "/healthz", timeout=5)
            if answer.get("status") == 200:
                times.append(answer["seconds"])
            else:
                self.failures.append(f"{who} /healthz: {answer.get('status') or answer}")

    def sample(self, seconds: float, every: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.probe()
            time.sleep(every)

    def finish(self) -> None:
        stage, victim = self.stage, self.stage.victim
        self.probe()
        self.alive = victim.alive()
        if self.alive:
            chat = stage.cluster.chat("victim", "m", timeout=10)
            if chat.get("status") != 200:
                self.failures.append(f"keyed client chat: {chat.get('status') or chat}")
            status = stage.shoal("status", check=False)
            if status.returncode:
                self.failures.append(f"shoal status exited {status.returncode}: {status.stderr}")
            self.rss_after, self.peak_after = victim.rss_bytes(), peak_rss(victim)
        else:
            self.rss_after = self.peak_after = 0
        self.log_growth = victim.log_bytes() - self.log_before
        self.figure = (
            f"operator /healthz {spread(self.operator_s)}; client /healthz "
            f"{spread(self.client_s)}; {len(self.failures)} failed; RSS "
            f"{self.rss_before / MIB:.0f} → {self.rss_after / MIB:.0f} MiB (peak "
            f"+{max(0, self.peak_after - self.peak_before) / MIB:.0f} MiB); log "
            f"+{self.log_growth / 1024:.1f} KiB; fds up to {self.fds_max}/{FD_LIMIT}; "
            f"{time.monotonic() - self.started:.1f} s"
        )
        stage.cluster.figures[self.what] = self.figure
        print(f"\n{self.what}: {self.figure}")
        for failure in self.failures[:10]:
            print(f"  {failure}")

    def check(
        self, rss_growth_max: int = RSS_GROWTH_MAX, log_growth_max: int = LOG_GROWTH_MAX
    ) -> None:
        """The node lived, served its operator and keyed client throughout, quickly, and
        its memory and log grew within the bounds."""
        assert self.alive, f"the node exited during {self.what}"
        assert not self.failures, f"{self.what}: not served throughout: {self.failures[:5]}"
        assert max(self.operator_s + self.client_s) < HEALTHZ_MAX_S, self.figure
        assert self.rss_after - self.rss_before < rss_growth_max, self.figure
        assert self.log_growth < log_growth_max, self.figure


def peak_rss(node: Node) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def openai_error(answer: dict[str, Any]) -> dict[str, Any] | None:
    """The `error` object of an answer in OpenAI's shape, or None if it is not one."""
    try:
        error = json.loads(answer["body"])["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error):
        return error
    return None


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    require_netns()
    home = tmp_path_factory.mktemp("hostile")
    with Lan() as lan:
        victim_host, client, attacker_host, spare = (
            lan.add_host(n) for n in ("victim", "client", "attacker", "spare")
        )
        start_backend(lan, victim_host, BACKEND_PORT, ["m"])
        victim = Node(
            "victim", victim_host, home / "victim",
            ("--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}"),
            config=CONFIG, fd_limit=FD_LIMIT,
        )  # fmt: skip
        cluster = Cluster(lan, client, Agent(lan, client), {"victim": victim})
        operator = Agent(lan, victim_host)
        attacker = Attacker(lan, attacker_host)
        built = Stage(lan, cluster, victim, operator, attacker, spare, home)
        try:
            cluster.start(victim)
            wait_until(lambda: "m" in cluster.models_at("victim"), 30, "the victim to serve m")
            yield built
        finally:
            lan.teardown()
            for agent in (cluster.agent, operator, attacker):
                agent.close()
            cluster.report()


# -- the attacks ---------------------------------------------------------------------------


def test_the_victim_runs_with_1024_descriptors_and_serves(stage: Stage) -> None:
    assert stage.victim.fd_limits() == (FD_LIMIT, FD_LIMIT)
    with stage.attack("no attack (baseline)") as watch:
        watch.sample(2)
    watch.check()
    assert "pairing" in stage.shoal("pair", "list").stdout


def test_idle_connections_do_not_take_the_node_offline(stage: Stage) -> None:
    """Item 1: ~1,100 connections that send a partial request line, from one address,
    each opened again a second after the node closes it, for 12 s. The node keeps at
    most `max_connections_per_source` of them, closes the rest at once and each kept
    one after the header timeout; its operator and keyed client are served throughout."""
    with stage.attack("1,100 idle connections from one address") as watch:
        opened = stage.attacker.do(
            cmd="idle", name="idle", **stage.target, count=1100,
            data=f"GET /v1/models HTTP/1.1\r\nHost: {stage.victim.host.ip}", reopen_s=1.0,
            limit_s=12,
        )  # fmt: skip
        watch.sample(6)
        during = stage.attacker.do(cmd="status", name="idle")
        watch.sample(2)
        after = stage.attacker.do(cmd="stop", name="idle")
    print(f"  attacker once all were tried: {opened}\n  at 6 s: {during}\n  at the end: {after}")
    watch.check()
    # The cap: at most PER_SOURCE kept; far from running out of descriptors.
    assert during["held"] <= PER_SOURCE + 8, during
    assert watch.fds_max < FD_LIMIT // 2, watch.figure
    # Those kept are closed after the header timeout, not left to pile up.
    longest = after["lifetime_max_s"]
    assert longest is not None and longest < HEADER_TIMEOUT_S + 3.0, after


def test_slow_and_endless_requests_are_cut_off(stage: Stage) -> None:
    """Item 2: slowloris heads (1 byte a second), a chunked body that never ends, a
    huge declared body on the unauthenticated handshake route, and an idle keep-alive
    connection: each is answered or closed within its timeout."""
    ip = stage.victim.host.ip
    with stage.attack("slowloris, endless body, huge Content-Length, idle keep-alive") as watch:
        stage.attacker.do(
            cmd="slowloris", name="slow", **stage.target, count=20, interval_s=1.0, limit_s=25
        )
        stage.attacker.do(
            cmd="trickle", name="trickle", **stage.target, path=HELLO_PATH, interval_s=0.5,
            limit_s=25,
        )  # fmt: skip
        stage.attacker.do(
            cmd="idle", name="keepalive", **stage.target, count=1, limit_s=25,
            data=f"GET /healthz HTTP/1.1\r\nHost: {ip}\r\n\r\n",
        )  # fmt: skip
        huge = stage.attacker.do(
            cmd="raw", **stage.target, within_s=10,
            data=f"POST {HELLO_PATH} HTTP/1.1\r\nHost: {ip}\r\nContent-Type: application/json"
            "\r\nContent-Length: 1000000000\r\n\r\n",
        )  # fmt: skip
        watch.sample(3)

        def all_ended() -> bool:
            return all(
                stage.attacker.do(cmd="status", name=name)["open"] == 0
                for name in ("slow", "trickle", "keepalive")
            )

        with contextlib.suppress(AssertionError):  # reported below, attack by attack
            wait_until(all_ended, max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S, IDLE_TIMEOUT_S) + 6,
                       "every slow connection to be closed", interval=0.5)  # fmt: skip
        results = {
            name: stage.attacker.do(cmd="stop", name=name)
            for name in ("slow", "trickle", "keepalive")
        }
    print(f"  huge Content-Length on the handshake: {huge['status']} in {huge['seconds']:.2f} s")
    for name, result in results.items():
        print(f"  {name}: {result}")
    watch.check()
    assert huge["status"] == 413 and huge["seconds"] < 2.0, huge
    slow, trickle, keepalive = results["slow"], results["trickle"], results["keepalive"]
    assert slow["closed_by_node"] == slow["connected"] == 20, slow
    assert slow["lifetime_max_s"] < HEADER_TIMEOUT_S + 2.5, slow
    # 408 within the body timeout; then aiohttp reads what is still coming for at most
    # its lingering time (10 s) before it closes.
    assert any(line.startswith("HTTP/1.1 408") for line in trickle["answers"]), trickle
    assert trickle["answered_max_s"] < BODY_TIMEOUT_S + 2.5, trickle
    assert trickle["closed_by_node"] == 1 and trickle["lifetime_max_s"] < BODY_TIMEOUT_S + 13
    assert keepalive["closed_by_node"] == 1, keepalive
    assert IDLE_TIMEOUT_S - 1 < keepalive["lifetime_max_s"] < IDLE_TIMEOUT_S + 3.0, keepalive


def test_padded_hellos_are_refused_and_cost_no_memory(stage: Stage) -> None:
    """Item 3: 300 valid pairing hellos padded with 12 kB of an unknown field."""
    with stage.attack("300 padded hellos") as watch:
        sent = stage.attacker.do(
            cmd="hellos", url=stage.victim.url, count=300, padding=12_000, concurrency=16
        )
        watch.sample(1)
    print(f"  answers: {sent}")
    watch.check(rss_growth_max=16 * MIB)  # the issue saw +510 MiB
    assert sent["statuses"] and all(400 <= int(s) < 500 for s in sent["statuses"]), sent


MARKUP_NAMES = ("[/]", "[red]x[/]")
HOSTILE_NAMES = ("\x1b]0;pwned\x07\x1b[2J", "evil\nINFO forged log line")


def test_names_a_stranger_chooses_reach_the_operator_escaped(stage: Stage) -> None:
    """Item 6: a pending node named with Rich markup is listed as written, and declining
    it works; names with terminal escapes or a newline are refused at the boundary and
    forge no log line. One name at a time: a node may keep one request per address."""
    url = stage.victim.url
    listings: dict[str, Any] = {}
    with stage.attack("strangers with markup and escapes in their names") as watch:
        for name in MARKUP_NAMES:
            outcome = stage.attacker.do(cmd="pair", url=url, name=name)["outcome"]
            listing = stage.shoal("pair", "list", check=False)
            nodes = json.loads(stage.shoal("pair", "list", "--json").stdout)["nodes"]
            listings[name] = (outcome, listing, {n["name"]: n for n in nodes})
        refused = {
            name: stage.attacker.do(cmd="hello", url=url, name=name) for name in HOSTILE_NAMES
        }
        last = MARKUP_NAMES[-1]  # still pending: a newer request replaces an older one
        short_id = listings[last][2].get(last, {}).get("short_id", "none")
        declined = stage.shoal("pair", "decline", short_id, check=False)
    for name, (outcome, listing, _) in listings.items():
        print(f"  {name!r}: {outcome}; shoal pair list exited {listing.returncode}:")
        print(listing.stdout + listing.stderr[-500:])
    print(f"  hellos: {refused}\n  decline: {declined.stdout}{declined.stderr[-300:]}")
    watch.check()
    for name, (outcome, listing, listed) in listings.items():
        assert outcome == "pending", (name, outcome)
        assert listing.returncode == 0, listing.stderr
        assert name in listing.stdout and name in listed, listing.stdout
        assert "\x1b" not in listing.stdout
    assert all(400 <= r["status"] < 500 for r in refused.values()), refused
    assert declined.returncode == 0 and last in declined.stdout, declined.stderr
    log = stage.victim.log_text()
    assert "\x1b" not in log and "\x07" not in log
    assert not any(line.startswith("INFO forged") for line in log.splitlines())


def test_a_real_node_can_ask_to_pair_during_a_pairing_flood(stage: Stage) -> None:
    """Item 4: fresh identities from one address, 3 a second, each a real pairing
    handshake; meanwhile a real second node on another host starts, finds the victim by
    mDNS, and must get into its pending list."""
    friend = Node("friend", stage.spare, stage.home / "friend", ("--no-embedded",))
    with stage.attack("pairing flood, 3 identities a second") as watch:
        stage.attacker.do(cmd="flood", name="flood", url=stage.victim.url, rate=3, limit_s=40)
        wait_until(lambda: flooded(stage) >= 15, 30, "the flood to be under way", interval=0.5)
        stage.cluster.start(friend)
        try:
            asked = None
            with contextlib.suppress(AssertionError):
                asked = wait_until(lambda: pending_names(stage) & {"friend"}, 30,
                                   "the friend to be pending", interval=0.5)  # fmt: skip
        finally:
            flood = stage.attacker.do(cmd="stop", name="flood")
            if friend.process is not None:
                stage.lan.stop(friend.process)
        names = pending_names(stage)
    print(f"  flood: {flood['outcomes']}\n  pending now: {len(names)} nodes")
    watch.check()
    if asked is not None:
        stage.cluster.measured(
            "flood: friend's start → pending at the victim", asked - friend.started
        )
    assert asked is not None, f"a real node could not ask to pair during the flood: {flood}"


def flooded(stage: Stage) -> int:
    """Handshakes the flood has completed so far, whatever their outcome."""
    return sum(stage.attacker.do(cmd="status", name="flood")["outcomes"].values())


def pending_names(stage: Stage) -> set[str]:
    listing = stage.operator.json(LOOPBACK + PAIRS_PATH) or {"nodes": []}
    return {n["name"] for n in listing["nodes"] if n["state"] == "pending"}


def test_malformed_input_is_a_client_error(stage: Stage) -> None:
    """Item 8: a malformed certificate or port in a handshake is a 4xx, never a 500;
    on the client API, what is validated is what is forwarded."""
    url = stage.victim.url
    bad_hellos = {
        "malformed certificate": {
            "cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        },
        "peer_port -5": {"peer_port": -5},
        "api_port 1e30": {"api_port": 1e30},
        "peer_port '11451'": {"peer_port": "11451"},
    }
    with stage.attack("malformed handshakes and coerced client values") as watch:
        hellos = {
            what: stage.attacker.do(cmd="hello", url=url, fields=fields)
            for what, fields in bad_hellos.items()
        }
        chat_url = url + "/v1/chat/completions"
        hi = [{"role": "user", "content": "hi"}]
        client = {
            "max_tokens '3'": {"model": "m", "messages": hi, "max_tokens": "3"},
            "stream 'false'": {"model": "m", "messages": hi, "stream": "false"},
            "text content parts": {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            },
        }
        answers = {
            what: stage.cluster.agent.call("POST", chat_url, body, timeout=10)
            for what, body in client.items()
        }
    for what, answer in hellos.items():
        print(f"  hello with {what}: {answer['status']} {answer['body'][:120]}")
    for what, answer in answers.items():
        print(f"  chat with {what}: {answer.get('status')} {str(answer.get('body'))[:160]}")
    watch.check()
    for what, answer in hellos.items():
        assert 400 <= answer["status"] < 500, f"{what}: {answer}"
        assert openai_error({"body": answer["body"]}), f"{what}: {answer}"
    assert answers["text content parts"]["status"] == 200, answers["text content parts"]
    for what, param, value in (
        ("max_tokens '3'", "max_tokens", 3),
        ("stream 'false'", "stream", False),
    ):
        answer = answers[what]
        if answer["status"] == 400:  # refused, naming the parameter
            error = openai_error(answer)
            assert error and error["param"] == param, answer
            continue
        assert answer["status"] == 200, answer
        assert answer["headers"]["Content-Type"].startswith("application/json"), answer
        forwarded = json.loads(json.loads(answer["body"])["choices"][0]["message"]["content"])
        assert forwarded.get(param, value) == value, f"{what}: the backend got {forwarded}"


def test_protocol_errors_answer_in_the_openai_shape(stage: Stage) -> None:
    """Item 9: the HTTP parser's own refusals are JSON in OpenAI's error shape."""
    ip = stage.victim.host.ip
    requests = {
        "duplicate Host": f"GET /healthz HTTP/1.1\r\nHost: {ip}\r\nHost: {ip}\r\n\r\n",
        "100 headers": f"GET /healthz HTTP/1.1\r\nHost: {ip}\r\n"
        + "".join(f"X-H{i}: v\r\n" for i in range(100))
        + "\r\n",
        "a 5,000-byte target": f"GET /{'a' * 5000} HTTP/1.1\r\nHost: {ip}\r\n\r\n",
        "a 9,000-byte header": f"GET /healthz HTTP/1.1\r\nHost: {ip}\r\nX-L: {'a' * 9000}\r\n\r\n",
        "a garbage request line": "NOT HTTP AT ALL\r\n\r\n",
    }
    with stage.attack("protocol errors") as watch:
        answers = {what: stage.attacker.do(cmd="raw", **stage.target, data=data, within_s=5)
                   for what, data in requests.items()}  # fmt: skip
    wrong = {}
    for what, answer in answers.items():
        print(f"  {what}: {answer['status']} {answer['headers'].get('content-type')} "
              f"{answer['body'][:100]!r}")  # fmt: skip
        error = openai_error(answer)
        if not (answer["status"] and 400 <= answer["status"] < 500 and error):
            wrong[what] = (answer["status"], answer["body"][:100])
    watch.check()
    assert not wrong, f"not in OpenAI's error shape: {wrong}"


def test_a_gzip_bomb_is_refused_with_bounded_memory(stage: Stage) -> None:
    """Item 10: 1 MiB of gzip that inflates to 1 GiB, on the unauthenticated handshake
    route and, from a keyed client, on the client API: 413, and little memory."""
    key = stage.cluster.agent.api_keys[stage.victim.url]
    bombs = {
        "handshake route": {"path": HELLO_PATH, "inflated": 1 << 30},
        "client API, with a key": {
            "path": "/v1/chat/completions", "inflated": 1 << 30,
            "headers": {"Authorization": f"Bearer {key}"},
        },
    }  # fmt: skip
    with stage.attack("1 MiB gzip bombs (1 GiB inflated)") as watch:
        answers = {
            what: stage.attacker.do(cmd="raw", **stage.target, bomb=bomb, within_s=30, timeout=60)
            for what, bomb in bombs.items()
        }
        watch.sample(1)
    peak = max(0, watch.peak_after - watch.peak_before)
    for what, answer in answers.items():
        print(f"  {what}: {answer['status']} in {answer['seconds']:.2f} s, {answer['sent']} B sent")
    print(f"  peak memory +{peak / MIB:.1f} MiB")
    watch.check(rss_growth_max=32 * MIB)
    for what, answer in answers.items():
        assert answer["status"] == 413 and openai_error(answer), f"{what}: {answer}"
    assert peak < 32 * MIB, f"the bombs took the peak memory up {peak / MIB:.0f} MiB"


def test_wrong_secret_attempts_are_rate_limited(stage: Stage) -> None:
    """Item 5: in secret mode (a secret appears on disk, as `shoal token create` makes
    it; the node takes it up at the next handshake), 30 handshakes with a wrong secret
    from one address: the node answers 429 once they come too fast."""
    write_secret(stage.victim.data_dir, new_secret())
    with stage.attack("30 wrong-secret handshakes from one address") as watch:
        tried = stage.attacker.do(cmd="wrong_secret", url=stage.victim.url, count=30, timeout=120)
    statuses = [(path, status) for path, status, _ in tried["statuses"]]
    limited = [entry for entry in tried["statuses"] if entry[1] == 429]
    print(f"  {len(statuses)} answers: {summarise(statuses)}\n  outcomes: {tried['outcomes']}")
    watch.check()
    assert limited, "no wrong-secret attempt was ever rate-limited"
    assert all(retry_after for _, _, retry_after in limited), limited
    first = next(i for i, entry in enumerate(tried["statuses"]) if entry[1] == 429)
    stage.cluster.figures["wrong secret: answers before the first 429"] = str(first)


def summarise(statuses: list[tuple[str, int]]) -> str:
    """How often each route answered each status, in order of first appearance."""
    counts = Counter(statuses)
    return ", ".join(f"{path} {status} ×{count}" for (path, status), count in counts.items())
