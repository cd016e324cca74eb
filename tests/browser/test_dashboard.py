"""The dashboard in a real browser, against a real cluster on a namespace LAN.

Three nodes in LAN mode with no cluster secret (pairing mode), each in its namespace:

    n1   the embedded engine (SmolLM2, real tokens); the browser runs here, on loopback:
         the node's operator, who needs no key
    n2   a fake OpenAI backend on its loopback serving `alpha-7b`
    n3   the same, serving `beta-13b`
    lan  an HTTP client with an API key for n1 (tests/netns/agent.py), and a second
         browser: a LAN visitor, who must give a key

The tests run in order, as one story: n1's operator accepts n2 and n3 from the page
(their operators accept n1 with the CLI), the page shows every node and model, a
client's request appears as it is routed, the chat box streams an answer, a LAN
visitor is asked for a key, and n3, killed, turns unhealthy. Screenshots of every step
are kept under test-artifacts/browser/ (two of them are the README's).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import chromium_in
from tests.conftest import SMOLLM_ID
from tests.netns.cluster import Agent, require_netns, start_backend, wait_until
from tests.netns.lan import Host, Lan

with contextlib.suppress(ImportError):  # else `require_browser` skips (or fails) saying so
    from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

pytestmark = [
    pytest.mark.browser,
    pytest.mark.netns,
    pytest.mark.engine,
    pytest.mark.timeout(300),
]

PORT = 11450
BACKEND_PORT = 8089
OPERATOR_URL = f"http://127.0.0.1:{PORT}/"
MODELS = {"n2": "alpha-7b", "n3": "beta-13b"}
SECONDS = 1000  # Playwright counts milliseconds


@dataclass
class Scene:
    lan: Lan
    hosts: dict[str, Host]
    processes: dict[str, Any]
    agent: Agent
    playwright: Playwright
    browser: Browser  # in n1's namespace
    page: Page  # n1's operator, at 1440 × 900
    artifacts: Path
    wrappers: Path

    def shot(self, name: str, page: Page | None = None) -> Path:
        path = self.artifacts / f"{name}.png"
        (page or self.page).screenshot(path=path, full_page=True)
        return path

    def shoal(self, host: str, *args: str) -> Any:
        """The real CLI inside a host's namespace, talking to its own node (loopback)."""
        done = self.lan.exec(
            self.hosts[host],
            [sys.executable, "-m", "shoal", *args, "--url", f"http://127.0.0.1:{PORT}"],
            timeout=30,
        )
        return json.loads(done.stdout) if "--json" in args else done.stdout

    def pending(self, viewer: str, other: str) -> dict[str, Any] | None:
        try:
            listing = self.shoal(viewer, "pair", "list", "--json")
        except Exception:  # still starting
            return None
        found = [n for n in listing["nodes"] if n["name"] == other and n["state"] == "pending"]
        return found[0] if found else None


def watch_console(page: Page, errors: list[str]) -> None:
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            errors.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )


@pytest.fixture(scope="module")
def scene(
    require_browser: None, artifacts: Path, wrappers: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    require_netns()
    home = tmp_path_factory.mktemp("cluster")
    with Lan() as lan:
        hosts = {name: lan.add_host(name) for name in ("n1", "n2", "n3", "lan")}
        processes: dict[str, Any] = {}
        for name in ("n2", "n3"):
            start_backend(lan, hosts[name], BACKEND_PORT, [MODELS[name]])
        for name in ("n1", "n2", "n3"):
            extra = [] if name == "n1" else [
                "--no-embedded", "--backend", f"http://127.0.0.1:{BACKEND_PORT}",
            ]  # fmt: skip
            processes[name] = lan.run(
                hosts[name],
                [sys.executable, "-m", "shoal", "serve", "--lan", "--port", str(PORT),
                 "--name", name, "--data-dir", str(home / name), "--no-detect", *extra],
                # A refused or new peer is heard from again every second, not every 10.
                env={"XDG_CONFIG_HOME": str(home / name / "config"),
                     "SHOAL_MESH__NEW_INTERVAL_S": "1"},
                log=home / f"{name}.log",
            )  # fmt: skip
        agent = Agent(lan, hosts["lan"])
        # The LAN client's key for n1, as `shoal keys create` makes it.
        from shoal.trust.keys import KeyStore

        n1_url = f"http://{hosts['n1'].ip}:{PORT}"
        agent.api_keys[n1_url] = KeyStore.in_data_dir(home / "n1").create("dashboard-test")[1]
        wait_until(lambda: agent.json(n1_url + "/healthz") is not None, 60, "n1 to listen")

        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(
            executable_path=str(chromium_in(hosts["n1"].netns, wrappers)),
            args=["--disable-gpu", "--disable-dev-shm-usage"],
        )
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        watch_console(page, errors)
        scene = Scene(lan, hosts, processes, agent, playwright, browser, page, artifacts, wrappers)
        try:
            yield scene
            assert not errors, errors
        finally:
            try:
                browser.close()
                playwright.stop()
            finally:
                agent.close()
                for name in ("n1", "n2", "n3"):
                    log = home / f"{name}.log"
                    if log.exists():
                        (artifacts / f"{name}.log").write_bytes(log.read_bytes())


def node_card(page: Page, name: str) -> Any:
    return page.locator(f'.node[data-node="{name}"]')


def test_the_operator_accepts_pairings_from_the_page(scene: Scene) -> None:
    page = scene.page
    page.goto(OPERATOR_URL)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=20 * SECONDS)
    expect(page.locator("#mode")).to_have_text("pairing mode")
    for other in ("n2", "n3"):
        # The page shows the request with the same 6-digit code the other node shows.
        banner = page.locator(f'.pair[data-pair="{other}"]')
        expect(banner).to_be_visible(timeout=60 * SECONDS)
        wait_until(lambda o=other: scene.pending(o, "n1"), 30, f"{other} to list n1 as pending")
        theirs = scene.pending(other, "n1")
        assert theirs is not None
        assert banner.locator(".code").get_attribute("data-code") == theirs["code"]
        assert len(theirs["code"]) == 6 and theirs["code"].isdigit()
    scene.shot("1-pending-pairings")

    for other in ("n2", "n3"):
        page.locator(f'.pair[data-pair="{other}"] button', has_text="Accept").click()
        expect(page.locator(f'.pair[data-pair="{other}"]')).to_have_count(0, timeout=10 * SECONDS)
        # The other operator accepts n1 with the CLI: then the two are paired.
        n1 = scene.pending(other, "n1")
        assert n1 is not None
        scene.shoal(other, "pair", "accept", n1["short_id"])
    for other in ("n2", "n3"):
        card = node_card(page, other)
        expect(card).to_have_attribute("data-health", "healthy", timeout=30 * SECONDS)
        expect(card.locator(".badge", has_text="paired")).to_be_visible()
    listing = scene.shoal("n1", "pair", "list", "--json")
    states = {n["name"]: n["state"] for n in listing["nodes"]}
    assert states.items() >= {"n2": "paired", "n3": "paired"}.items()


def test_the_page_shows_every_node_and_model(scene: Scene) -> None:
    page = scene.page
    expect(page.locator(".node")).to_have_count(3)
    expect(node_card(page, "n1")).to_have_attribute("data-self", "1")
    for name, model in MODELS.items():
        expect(node_card(page, name).locator(f'.chip[data-model="{model}"]')).to_be_visible(
            timeout=15 * SECONDS
        )
    expect(node_card(page, "n1").locator(f'.chip[data-model="{SMOLLM_ID}"]')).to_be_visible()
    for model in (*MODELS.values(), SMOLLM_ID):
        expect(page.locator(f'#models tr[data-model="{model}"]')).to_be_visible()
    expect(page.locator('#models tr[data-model="alpha-7b"] .chip')).to_have_text("n2")
    expect(page.locator("#stat-nodes")).to_have_text("3/3")


def test_a_clients_request_appears_where_it_was_routed(scene: Scene) -> None:
    page = scene.page
    url = f"http://{scene.hosts['n1'].ip}:{PORT}/v1/chat/completions"
    for model in ("beta-13b", "alpha-7b"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        answer = scene.agent.call("POST", url, body)
        assert answer["status"] == 200, answer
    expect(page.locator('#requests tr[data-model="beta-13b"]')).to_have_attribute(
        "data-node", "n3", timeout=10 * SECONDS
    )
    row = page.locator('#requests tr[data-model="alpha-7b"]').first
    expect(row).to_have_attribute("data-node", "n2", timeout=10 * SECONDS)
    expect(row).to_have_attribute("data-state", "done")
    expect(row.locator(".route")).to_have_text("peer")
    expect(row.locator(".status-ok")).to_have_text("200")


def test_the_chat_box_streams_an_answer(scene: Scene) -> None:
    page = scene.page
    page.select_option("#chat-model", SMOLLM_ID)
    page.fill("#chat-input", "Say hello to the fish.")
    page.click("#chat-send")
    bubble = page.locator(".msg.assistant").last
    # Streaming: the bubble grows while it is marked as streaming, then the mark goes.
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        streaming = "streaming" in (bubble.get_attribute("class") or "")
        if not streaming and seen:
            break
        if streaming:
            length = len(bubble.text_content() or "")
            if length and (not seen or length != seen[-1]):
                seen.append(length)
        time.sleep(0.05)
    assert len(seen) >= 2, f"the answer did not arrive in pieces: {seen}"
    assert (bubble.text_content() or "").strip()
    expect(page.locator(".msg-meta").last).to_contain_text("served by n1")
    row = page.locator(f'#requests tr[data-model="{SMOLLM_ID}"]').first
    expect(row).to_have_attribute("data-state", "done", timeout=10 * SECONDS)
    expect(row).to_have_attribute("data-node", "n1")
    scene.shot("2-cluster-desktop-1440")
    for width, height in ((1024, 900), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        scene.shot(f"3-cluster-{width}")
    page.set_viewport_size({"width": 1440, "height": 900})


def test_a_lan_visitor_is_asked_for_a_key(scene: Scene) -> None:
    browser = scene.playwright.chromium.launch(
        executable_path=str(chromium_in(scene.hosts["lan"].netns, scene.wrappers)),
        args=["--disable-gpu", "--disable-dev-shm-usage"],
    )
    try:
        page = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
        n1 = f"http://{scene.hosts['n1'].ip}:{PORT}"
        page.goto(n1 + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible(timeout=10 * SECONDS)
        expect(page.locator("#conn")).to_have_attribute("data-state", "locked")
        page.fill("#key-input", "shoal-sk-not-a-key")
        page.click("#key-save")
        expect(page.locator("#key-error")).to_contain_text("not valid", timeout=10 * SECONDS)
        scene.shot("4-lan-visitor-key", page)
        page.fill("#key-input", scene.agent.api_keys[n1])
        page.click("#key-save")
        expect(dialog).to_be_hidden()
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10 * SECONDS)
        expect(page.locator(".node")).to_have_count(3)
        # Pairing is the node's own operator's: a visitor sees no pairing and no buttons.
        expect(page.locator("#foot-note")).to_contain_text("Viewing from the network")
        scene.shot("5-lan-visitor-dark-390", page)
    finally:
        browser.close()


def test_a_killed_node_turns_unhealthy_within_seconds(scene: Scene) -> None:
    page = scene.page
    expect(node_card(page, "n3")).to_have_attribute("data-health", "healthy")
    scene.processes["n3"].kill()  # SIGKILL: no goodbye
    killed = time.monotonic()
    expect(node_card(page, "n3")).not_to_have_attribute(
        "data-health", "healthy", timeout=10 * SECONDS
    )
    seconds = time.monotonic() - killed
    print(f"\nn3 killed: unhealthy on the page after {seconds:.2f} s")
    expect(page.locator("#stat-nodes")).to_have_text("2/3")
    scene.shot("6-node-killed")
