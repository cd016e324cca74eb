"""`shoal config set`: edit the TOML file in place, keep comments, refuse what would not load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from shoal.cli.config_file import lookup, parse_value, set_value
from shoal.errors import ConfigError
from shoal.settings import load

ORIGINAL = """\
# Shoal configuration, written by hand.
name = "desk"  # this machine
port = 11450

[engine]
# two threads decode fastest here
threads = 2
"""


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("SHOAL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(ORIGINAL)
    return path


def test_set_existing_key_keeps_comments_and_layout(config: Path) -> None:
    set_value(config, "port", "9000")
    assert config.read_text() == ORIGINAL.replace("port = 11450", "port = 9000")
    assert load(config).port == 9000


def test_set_nested_key_in_existing_table(config: Path) -> None:
    set_value(config, "engine.threads", "4")
    text = config.read_text()
    assert "# two threads decode fastest here" in text
    assert "threads = 4" in text
    assert load(config).engine.threads == 4


def test_set_creates_missing_tables(config: Path) -> None:
    set_value(config, "limits.read_timeout_s", "12.5")
    assert "[limits]" in config.read_text()
    assert "# Shoal configuration, written by hand." in config.read_text()
    assert load(config).limits.read_timeout_s == 12.5


def test_set_adds_a_key_to_an_existing_table(config: Path) -> None:
    set_value(config, "engine.context", "4096")
    settings = load(config)
    assert (settings.engine.threads, settings.engine.context) == (2, 4096)


def test_set_creates_the_file_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "config.toml"
    set_value(path, "engine.enabled", "false")
    assert tomlkit.parse(path.read_text()) == {"engine": {"enabled": False}}
    assert load(path).engine.enabled is False


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("lan", "true", True),
        ("port", "8080", 8080),
        ("detect.interval_s", "2.5", 2.5),
        ("name", '"quoted name"', "quoted name"),
        ("name", "bare-word", "bare-word"),
        ("host", "0.0.0.0", "0.0.0.0"),
        ("log_level", "debug", "debug"),
    ],
)
def test_values_are_parsed_as_toml_or_kept_as_text(
    config: Path, key: str, text: str, expected: Any
) -> None:
    set_value(config, key, text)
    assert lookup(tomlkit.parse(config.read_text()), key) == expected
    value = load(config)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_an_array_of_tables_value(config: Path) -> None:
    set_value(config, "backends", '[{url = "http://10.0.0.5:8080/v1"}]')
    (backend,) = load(config).backends
    assert backend.url == "http://10.0.0.5:8080"


@pytest.mark.parametrize(
    ("key", "text", "named"),
    [
        ("port", "70000", "port"),
        ("port", "many", "port"),
        ("engine.threads", "0", "engine.threads"),
        ("engine.thread", "4", "engine.thread"),
        ("colour", "blue", "colour"),
        ("log_level", "loud", "log_level"),
        ("backends", '[{url = "ftp://x"}]', "backends.0.url"),
    ],
)
def test_invalid_value_is_refused_and_file_unchanged(
    config: Path, key: str, text: str, named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        set_value(config, key, text)
    assert f"{named}:" in caught.value.message
    assert config.read_text() == ORIGINAL
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.toml"]


def test_invalid_value_for_a_new_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError):
        set_value(path, "port", "-1")
    assert list(tmp_path.iterdir()) == []


def test_key_below_a_scalar_is_refused(config: Path) -> None:
    with pytest.raises(ConfigError, match="not a table"):
        set_value(config, "port.number", "1")
    assert config.read_text() == ORIGINAL


def test_malformed_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        set_value(path, "port", "1")
    assert path.read_text() == "port = = 1\n"


def test_validation_does_not_depend_on_the_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_PORT", "9000")
    with pytest.raises(ConfigError):
        set_value(config, "port", "70000")
    assert config.read_text() == ORIGINAL


# -- parse_value and lookup ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        ("-4", -4),
        ("1.5", 1.5),
        ("true", True),
        ("false", False),
        ('"x y"', "x y"),
        ('["a", "b"]', ["a", "b"]),
        ("{a = 1}", {"a": 1}),
        ("hello world", "hello world"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("", ""),
    ],
)
def test_parse_value(text: str, value: Any) -> None:
    assert parse_value(text) == value


def test_lookup() -> None:
    document = {"port": 1, "engine": {"threads": 2, "sub": {"x": None}}}
    assert lookup(document, "port") == 1
    assert lookup(document, "engine.threads") == 2
    assert lookup(document, "engine") == {"threads": 2, "sub": {"x": None}}
    assert lookup(document, "engine.sub.x") is None


@pytest.mark.parametrize("key", ["nope", "engine.nope", "port.x", "engine.threads.x", ""])
def test_lookup_missing_is_key_error(key: str) -> None:
    with pytest.raises(KeyError):
        lookup({"port": 1, "engine": {"threads": 2}}, key)


def test_lookup_in_a_tomlkit_document(config: Path) -> None:
    document = tomlkit.parse(config.read_text())
    assert lookup(document, "engine.threads") == 2
    assert lookup(document, "name") == "desk"
