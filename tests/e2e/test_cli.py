"""The `shoal` command against real nodes and real config files."""

from __future__ import annotations

import io
import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from shoal.cli import cluster
from shoal.mesh.identity import short_id
from tests.conftest import MINILM_ID, SMOLLM_ID
from tests.support import NodeProcess, clean_env, free_port, start_node


def shoal(home: Path, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        capture_output=True,
        text=True,
        env={**clean_env(home), "COLUMNS": str(columns)},
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
        assert peer["short_id"] in table.stdout  # the ID `shoal pair` takes, whole

        nobody = shoal(
            tmp_path, "join", f"http://127.0.0.1:{free_port()}", "--url", a.url, "--no-save"
        )
        assert nobody.returncode == 1
        assert "no Shoal node answers" in nobody.stderr
    finally:
        a.stop()
        b.stop()
        fake.close()


SHORT_ID = re.compile(r"SHOAL(?:-[A-Z2-7]{4}){3}")


def _pair(name: str, address: str, state: str = "pending") -> dict[str, str]:
    node_id = secrets.token_hex(32)
    return {"node_id": node_id, "short_id": short_id(node_id), "name": name, "state": state,
            "address": address, "code": f"{secrets.randbelow(10**6):06d}"}  # fmt: skip


def test_pair_list_keeps_ids_codes_and_addresses_whole_at_any_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = [
        _pair("workstation-under-the-stairs-by-the-boiler", "http://127.0.0.1:41235"),
        _pair("[/bold] [red]not markup", "http://192.168.100.200:11450", "unpaired"),
        _pair("v6", "http://[fe80::1234:5678:9abc:def0]:11450", "paired"),
    ]
    fields = {n[key] for n in nodes for key in ("name", "address")}
    for width in range(24, 130):
        screen = io.StringIO()
        monkeypatch.setattr(cluster, "out", Console(file=screen, width=width))
        for shown in (nodes[:1], nodes[:2], nodes):
            cluster._print_pairs(shown, width)
        text = screen.getvalue()
        assert "…" not in text, text
        for n in nodes:
            assert n["short_id"] in text and n["code"] in text and n["address"] in text, text
        assert "[/bold]" in text  # a name is shown as it is, never read as markup
        for line in text.splitlines():  # only a long field on a line of its own overflows
            assert len(line) <= width or line.strip() in fields, text


def test_pairing_by_the_id_pair_list_prints_in_a_narrow_terminal(tmp_path: Path) -> None:
    """The ID `shoal pair list` prints, read off an 80- or 60-column terminal, is one a
    user can type back: whole on one line, and accepted by `shoal pair accept`."""
    pairing = {"SHOAL_CLUSTER__MODE": "pairing"}
    long_name = "workstation-under-the-stairs-by-the-boiler"  # pushes the other columns
    a = start_node(tmp_path / "a", "--no-embedded", "--name", "a", wait_backend=None, env=pairing)
    b = start_node(
        tmp_path / "b", "--no-embedded", "--name", long_name, wait_backend=None, env=pairing
    )
    try:
        b_id, a_id = short_id(b.status()["node_id"]), short_id(a.status()["node_id"])
        joined = shoal(tmp_path, "join", b.url, "--url", a.url, "--no-save", columns=80)
        assert joined.returncode == 0, joined.stderr
        assert f"`shoal pair accept {b_id}`" in joined.stdout

        for columns in (80, 60):
            listed = shoal(tmp_path, "pair", "list", "--url", a.url, columns=columns)
            assert listed.returncode == 0, listed.stderr
            assert max(map(len, listed.stdout.splitlines())) <= columns, listed.stdout
            assert SHORT_ID.findall(listed.stdout) == [b_id], listed.stdout
            assert b.url in listed.stdout, listed.stdout  # the address, whole
            assert "…" not in listed.stdout and "pending" in listed.stdout

        printed = SHORT_ID.findall(
            shoal(tmp_path, "pair", "list", "--url", a.url, columns=80).stdout
        )
        accepted = shoal(tmp_path, "pair", "accept", printed[0], "--url", a.url, columns=80)
        assert accepted.returncode == 0, accepted.stderr
        assert accepted.stdout.strip() == f"accept: {long_name} ({b_id})"

        # The other side, with the ID typed the way people do: lower case, no tag.
        seen_by_b = shoal(tmp_path, "pair", "list", "--url", b.url, columns=80).stdout
        assert a_id in seen_by_b and a.url in seen_by_b, seen_by_b
        typed = a_id.removeprefix("SHOAL-").lower()
        accepted = shoal(tmp_path, "pair", "accept", typed, "--url", b.url, columns=80)
        assert accepted.returncode == 0, accepted.stderr
        assert accepted.stdout.strip() == f"accept: a ({a_id})"
        listed = json.loads(shoal(tmp_path, "pair", "list", "--json", "--url", a.url).stdout)
        assert [n["state"] for n in listed["nodes"]] == ["paired"]

        unknown = shoal(tmp_path, "pair", "decline", "no such node", "--url", a.url)
        assert unknown.returncode == 1
        assert "no single known node matches" in unknown.stderr
    finally:
        a.stop()
        b.stop()


# -- the cluster token, and secrets on disk (issue 9, item 7) ----------------------------


def _join_with(
    home: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`shoal join` to a node that is not there: the token is kept before the call fails."""
    nobody = f"http://127.0.0.1:{free_port()}"
    return subprocess.run(
        [sys.executable, "-m", "shoal", "join", nobody, "--url", nobody, "--no-save",
         "--data-dir", str(home / "data"), *args],
        input=stdin, capture_output=True, text=True, timeout=60,
        env={**clean_env(home), "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def _kept(home: Path) -> tuple[str, int]:
    path = home / "data" / "cluster_secret"
    return path.read_text().strip(), path.stat().st_mode & 0o777


@pytest.mark.parametrize("how", ["stdin", "file", "environment"])
def test_join_takes_the_token_without_putting_it_in_ps(tmp_path: Path, how: str) -> None:
    from shoal.trust.secret import new_secret

    token = new_secret()
    if how == "stdin":
        joined = _join_with(tmp_path, "--token", "-", stdin=token + "\n")
    elif how == "file":
        (tmp_path / "token").write_text(token + "\n")
        joined = _join_with(tmp_path, "--token-file", str(tmp_path / "token"))
    else:
        joined = _join_with(tmp_path, env={"SHOAL_CLUSTER_TOKEN": token})
    assert joined.returncode == 3, joined.stderr  # kept, then no node answered
    assert "no Shoal node answers" in joined.stderr
    assert "warning" not in joined.stderr
    assert _kept(tmp_path) == (token, 0o600)


def test_join_warns_about_a_token_on_the_command_line(tmp_path: Path) -> None:
    from shoal.trust.secret import new_secret

    token = new_secret()
    joined = _join_with(tmp_path, "--token", token)
    assert joined.returncode == 3
    assert "warning" in joined.stderr and "ps" in joined.stderr
    assert "SHOAL_CLUSTER_TOKEN" in joined.stderr
    assert _kept(tmp_path) == (token, 0o600)


def test_join_refuses_a_token_shoal_did_not_make(tmp_path: Path) -> None:
    for args, stdin, env in [
        (("--token", "shoal-ct-abc"), "", None),
        (("--token", "-"), "hunter2\n", None),
        ((), "", {"SHOAL_CLUSTER_TOKEN": "shoal-ct-short"}),
    ]:
        refused = _join_with(tmp_path, *args, stdin=stdin, env=env)
        assert refused.returncode == 2, refused.stderr
        assert "not one `shoal token create` makes" in refused.stderr
        assert "hunter2" not in refused.stderr  # the rejected secret is not echoed
    both = _join_with(tmp_path, "--token", "-", "--token-file", str(tmp_path / "t"))
    assert both.returncode == 2 and "not both" in both.stderr
    assert not (tmp_path / "data" / "cluster_secret").exists()


def test_serve_tightens_a_world_readable_secret_and_says_so(tmp_path: Path) -> None:
    from shoal.trust.secret import new_secret, write_secret

    data = tmp_path / "node" / "data"
    write_secret(data, new_secret())
    (data / "cluster_secret").chmod(0o644)
    data.chmod(0o755)
    node = start_node(tmp_path / "node", "--no-embedded", wait_backend=None)
    try:
        assert (data / "cluster_secret").stat().st_mode & 0o777 == 0o600
        assert data.stat().st_mode & 0o777 == 0o700
        assert "cluster_secret was mode 0644" in node.log()
        assert f"{data} was mode 0755" in node.log()
    finally:
        node.stop()
