"""Secrets on disk: the data dir 0700, its secrets 0600, looser modes tightened aloud."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from shoal.mesh import identity
from shoal.node import Node
from shoal.trust import secret as secret_mod
from tests.cluster import node_settings

SECRETS = ("node.key", "cluster_secret", "trust.json", "api_keys.json")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_private_files_are_the_four_the_node_keeps() -> None:
    assert set(secret_mod.PRIVATE_FILES) == set(SECRETS)


def test_loose_modes_are_tightened_with_a_warning_naming_file_and_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    for name in SECRETS:
        (data / name).write_text("x")
        (data / name).chmod(0o644)
    (data / "trust.json").chmod(0o640)
    (data / "model.gguf").write_text("not a secret")
    (data / "model.gguf").chmod(0o644)
    with caplog.at_level(logging.WARNING):
        secret_mod.protect_data_dir(data)
    assert mode(data) == 0o700
    assert {name: mode(data / name) for name in SECRETS} == dict.fromkeys(SECRETS, 0o600)
    assert mode(data / "model.gguf") == 0o644  # only secrets are touched
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert any(f"{data} was mode 0755" in w for w in warnings)
    assert any(f"{data / 'cluster_secret'} was mode 0644" in w for w in warnings)
    assert any(f"{data / 'trust.json'} was mode 0640" in w for w in warnings)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        secret_mod.protect_data_dir(data)
    assert caplog.records == []  # tight already: nothing said


def test_a_missing_data_dir_is_made_private(tmp_path: Path) -> None:
    secret_mod.protect_data_dir(tmp_path / "new" / "data")
    assert mode(tmp_path / "new" / "data") == 0o700


def test_a_loosened_node_key_is_tightened_aloud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity.load_or_create(tmp_path)
    (tmp_path / identity.KEY_FILE).chmod(0o604)
    with caplog.at_level(logging.WARNING):
        identity.load_or_create(tmp_path)
    assert mode(tmp_path / identity.KEY_FILE) == 0o600
    (message,) = [r.getMessage() for r in caplog.records]
    assert "node.key was mode 0604" in message


async def test_a_node_protects_its_data_dir_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = node_settings(tmp_path, "n0", "secret")
    secret_mod.write_secret(settings.data_dir, secret_mod.new_secret())
    (settings.data_dir / "cluster_secret").chmod(0o644)
    settings.data_dir.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        Node(settings)
    assert mode(settings.data_dir) == 0o700
    assert mode(settings.data_dir / "cluster_secret") == 0o600
    assert any("cluster_secret was mode 0644" in r.getMessage() for r in caplog.records)


def test_write_secret_makes_a_private_file_even_over_a_loose_leftover(tmp_path: Path) -> None:
    leftover = tmp_path / "cluster_secret.new"
    leftover.write_text("old")
    leftover.chmod(0o644)
    token = secret_mod.new_secret()
    secret_mod.write_secret(tmp_path, token)
    assert mode(tmp_path / "cluster_secret") == 0o600
    assert secret_mod.read_secret(tmp_path) == token


def test_only_tokens_shaped_like_new_secret_are_taken() -> None:
    token = secret_mod.new_secret()
    assert secret_mod.is_token(token)
    assert len(token) == len("shoal-ct-") + 32
    assert secret_mod.is_token("shoal-ct-" + "a" * 26)
    for weak in (
        "shoal-ct-abc",  # the issue's: recovered offline in 1,371 guesses
        "shoal-ct-" + "a" * 25,
        "shoal-ct-" + "A" * 32,  # another secret than the one made (case matters)
        "shoal-ct-" + "1" * 32,  # not base32
        token[len("shoal-ct-") :],
        token + " ",
        "",
    ):
        assert not secret_mod.is_token(weak), weak
