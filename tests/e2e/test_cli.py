"""The `shoal` command against real nodes and real config files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINILM_ID, SMOLLM_ID
from tests.support import NodeProcess, clean_env, free_port


def shoal(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        capture_output=True,
        text=True,
        env={**clean_env(home), "COLUMNS": "200"},
        timeout=60,
    )


@pytest.mark.engine
def test_status_and_models(engine_node: NodeProcess, tmp_path: Path) -> None:
    status = shoal(tmp_path, "status", "--json", "--url", engine_node.url)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["backends"][0]["health"] == "healthy"
    assert set(document["models"]) == {SMOLLM_ID, MINILM_ID}

    table = shoal(tmp_path, "status", "--url", engine_node.url)
    assert table.returncode == 0
    assert "embedded" in table.stdout and "healthy" in table.stdout

    models = shoal(tmp_path, "models", "--url", engine_node.url)
    assert models.returncode == 0
    assert SMOLLM_ID in models.stdout and "Q4_1" in models.stdout
    listed = json.loads(shoal(tmp_path, "models", "--json", "--url", engine_node.url).stdout)
    assert {m["id"] for m in listed["data"]} == {SMOLLM_ID, MINILM_ID}


def test_status_without_a_node_says_so(tmp_path: Path) -> None:
    result = shoal(tmp_path, "status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "no Shoal node answers" in result.stderr


def test_config_set_get_keeps_comments_and_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "shoal.toml"
    config.write_text(
        '# my node\nport = 12000\n\n[[backends]]\nurl = "http://127.0.0.1:9"\n'
        'api_key = "sk-very-secret"\n'
    )
    assert (
        shoal(tmp_path, "config", "set", "engine.threads", "4", "--config", str(config)).returncode
        == 0
    )
    assert config.read_text().startswith("# my node\nport = 12000\n")
    got = shoal(tmp_path, "config", "get", "engine.threads", "--config", str(config))
    assert got.stdout.strip() == "4"

    refused = shoal(tmp_path, "config", "set", "port", "70000", "--config", str(config))
    assert refused.returncode == 2
    assert "port" in refused.stderr
    assert "port = 12000" in config.read_text()

    everything = shoal(tmp_path, "config", "get", "--config", str(config))
    assert everything.returncode == 0
    assert "sk-very-secret" not in everything.stdout
    assert json.loads(everything.stdout)["port"] == 12000


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("port = 'eleven'\n")
    result = shoal(tmp_path, "serve", "--config", str(config))
    assert result.returncode == 2
    assert "port" in result.stderr


def test_join_peers_and_models_lan(tmp_path: Path) -> None:
    from tests.fakes import FakeServer
    from tests.support import start_node, wait_for

    fake = FakeServer(["far-model"]).start()
    a = start_node(tmp_path / "a", "--no-embedded", "--name", "a", wait_backend=None)
    b = start_node(
        tmp_path / "b", "--no-embedded", "--name", "b", "--backend", fake.url, wait_backend=None
    )
    try:
        config = tmp_path / "a.toml"
        joined = shoal(tmp_path, "join", b.url, "--url", a.url, "--config", str(config))
        assert joined.returncode == 0, joined.stderr
        assert "joined b" in joined.stdout
        assert b.url in config.read_text()  # saved for the next start

        def listed() -> bool:
            out = shoal(tmp_path, "models", "--lan", "--json", "--url", a.url).stdout
            return any(m["id"] == "far-model" for m in json.loads(out)["data"])

        wait_for(listed, 15, "a to list b's model")
        local = json.loads(shoal(tmp_path, "models", "--json", "--url", a.url).stdout)
        assert local["data"] == []  # without --lan: this node's own models only

        peers = json.loads(shoal(tmp_path, "peers", "--json", "--url", a.url).stdout)
        (peer,) = peers["peers"]
        assert (peer["name"], peer["health"]) == ("b", "healthy")
        table = shoal(tmp_path, "peers", "--url", a.url)
        assert "far-model" in table.stdout and "healthy" in table.stdout

        nobody = shoal(
            tmp_path, "join", f"http://127.0.0.1:{free_port()}", "--url", a.url, "--no-save"
        )
        assert nobody.returncode == 1
        assert "no Shoal node answers" in nobody.stderr
    finally:
        a.stop()
        b.stop()
        fake.close()
