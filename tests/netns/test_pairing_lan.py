"""The pairing flow end to end on a LAN of namespaces, with the real CLI on each host.

Two nodes in LAN mode with no cluster secret run in pairing mode: they find each other
by mDNS, each lists the other as pending with the same confirmation code, nothing flows
until both operators accept, and then requests are routed across.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMOLLM_ID
from tests.netns.lan import Host, Lan

pytestmark = [pytest.mark.netns, pytest.mark.engine]

PORT = 11450
ASK = """
import json, sys, urllib.request
body = json.dumps({"model": sys.argv[1], "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 3}).encode()
request = urllib.request.Request("http://127.0.0.1:11450/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    print(json.dumps({"status": response.status,
                      "served_by": response.headers["X-Shoal-Served-By"]}))
"""


def shoal(lan: Lan, host: Host, *args: str) -> Any:
    """The real CLI inside the host's namespace, talking to its own node (loopback)."""
    done = lan.exec(
        host,
        [sys.executable, "-m", "shoal", *args, "--url", f"http://127.0.0.1:{PORT}"],
        timeout=30,
    )
    return json.loads(done.stdout) if "--json" in args else done.stdout


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_pairing_across_the_lan(lan: Lan, tmp_path: Path) -> None:
    hosts = {name: lan.add_host(name) for name in ("p1", "p2")}
    for name, host in hosts.items():
        args = [] if name == "p1" else ["--no-embedded"]
        lan.run(
            host,
            [sys.executable, "-m", "shoal", "serve", "--lan", "--port", str(PORT),
             "--name", name, "--data-dir", str(tmp_path / name), "--no-detect", *args],
            # Short heartbeat intervals: a refused peer is out of the table in ~3 s.
            env={"XDG_CONFIG_HOME": str(tmp_path / name / "config"),
                 "SHOAL_MESH__NEW_INTERVAL_S": "1"},
            log=tmp_path / f"{name}.log",
        )  # fmt: skip
    p1, p2 = hosts["p1"], hosts["p2"]

    def pending(viewer: Host, other: str) -> dict[str, Any] | None:
        try:
            listing = shoal(lan, viewer, "pair", "list", "--json")
        except Exception:  # the node is still starting
            return None
        return next((n for n in listing["nodes"] if n["name"] == other), None)

    wait_until(lambda: pending(p1, "p2") and pending(p2, "p1"), 30, "both to list a request")
    seen_by_p1, seen_by_p2 = pending(p1, "p2"), pending(p2, "p1")
    assert seen_by_p1 and seen_by_p2
    assert shoal(lan, p1, "pair", "list", "--json")["mode"] == "pairing"
    assert seen_by_p1["state"] == seen_by_p2["state"] == "pending"
    assert seen_by_p1["code"] == seen_by_p2["code"]  # what the two operators compare

    def p2_models() -> set[str]:
        return {m["id"] for m in shoal(lan, p2, "models", "--lan", "--json")["data"]}

    def peer_state(viewer: Host, node_id: str) -> str | None:
        peers = shoal(lan, viewer, "peers", "--json")["peers"]
        return next((p["state"] for p in peers if p["node_id"] == node_id), None)

    # While pending, meeting again (what every advert and scan may lead to) runs the
    # whole handshake across the LAN and ends in "pending": nothing may flow.
    joined = shoal(lan, p2, "join", f"http://{p1.ip}:{PORT}", "--no-save")
    assert "pairing requested with p1" in joined, joined
    assert f"`shoal pair accept {seen_by_p2['short_id']}`" in joined, joined
    assert SMOLLM_ID not in p2_models()

    # One side is not enough: p1 accepts (by the ID `shoal pair list` shows) and
    # heartbeats p2, whose TLS refuses p1's key until p2 drops out of p1's table.
    shoal(lan, p1, "pair", "accept", seen_by_p1["short_id"])
    wait_until(lambda: peer_state(p1, seen_by_p1["node_id"]) == "removed", 30, "p2 to refuse p1")
    assert SMOLLM_ID not in p2_models()

    shoal(lan, p2, "pair", "accept", seen_by_p2["short_id"])
    wait_until(lambda: SMOLLM_ID in p2_models(), 30, "p2 to list p1's model once paired")
    answer = json.loads(lan.exec(p2, [sys.executable, "-c", ASK, SMOLLM_ID], timeout=60).stdout)
    assert answer == {"status": 200, "served_by": "p1"}
