"""`shoal.settings.load`: defaults < TOML file < SHOAL_* env < flags, and its refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from shoal import settings as settings_mod
from shoal.errors import ConfigError
from shoal.settings import DEFAULT_PORT, load


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No SHOAL_* variable from the outside, and XDG dirs under tmp: the real user config
    is never read."""
    for key in list(os.environ):
        if key.upper().startswith("SHOAL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "config.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- defaults and where the file comes from ---------------------------------------------


def test_defaults_without_any_file(tmp_path: Path) -> None:
    settings = load()
    assert settings.port == DEFAULT_PORT
    assert settings.host == "127.0.0.1"
    assert settings.lan is False
    assert settings.log_level == "info"
    assert settings.backends == ()
    assert settings.engine.threads == 2
    assert settings.engine.context == 2048
    assert settings.detect.enabled is True
    assert settings.limits.max_body_bytes == 8 * 1024 * 1024
    assert settings.data_dir == tmp_path / "xdg-data" / "shoal"
    assert settings.config_path == tmp_path / "xdg-config" / "shoal" / "config.toml"


def test_default_file_under_xdg_config_home_is_read(tmp_path: Path) -> None:
    write(tmp_path / "xdg-config" / "shoal" / "config.toml", "port = 9001\n")
    assert load().port == 9001


def test_shoal_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "elsewhere.toml", "port = 9002\n")
    write(tmp_path / "xdg-config" / "shoal" / "config.toml", "port = 9001\n")
    monkeypatch.setenv("SHOAL_CONFIG", str(path))
    settings = load()
    assert settings.port == 9002
    assert settings.config_path == path


def test_explicit_path_wins_over_shoal_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path
) -> None:
    monkeypatch.setenv("SHOAL_CONFIG", str(write(tmp_path / "env.toml", "port = 9002\n")))
    write(config, "port = 9003\n")
    assert load(config).port == 9003


def test_explicit_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as caught:
        load(missing)
    assert str(missing) in caught.value.message


def test_explicit_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path)


# -- precedence ---------------------------------------------------------------------------


def test_file_overrides_defaults(config: Path) -> None:
    write(config, 'port = 9001\nlog_level = "debug"\n[engine]\nthreads = 3\n')
    settings = load(config)
    assert (settings.port, settings.log_level, settings.engine.threads) == (9001, "debug", 3)
    assert settings.engine.context == 2048  # untouched keys of a table keep their default


def test_env_overrides_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(config, "port = 9001\n")
    monkeypatch.setenv("SHOAL_PORT", "9002")
    assert load(config).port == 9002


def test_nested_env_merges_with_the_file_table(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config, "[engine]\nthreads = 3\ncontext = 4096\n")
    monkeypatch.setenv("SHOAL_ENGINE__THREADS", "4")
    settings = load(config)
    assert settings.engine.threads == 4
    assert settings.engine.context == 4096


def test_env_name_is_case_insensitive_for_nested_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_LIMITS__READ_TIMEOUT_S", "12.5")
    assert load().limits.read_timeout_s == 12.5


def test_flags_override_env(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(config, "port = 9001\n")
    monkeypatch.setenv("SHOAL_PORT", "9002")
    assert load(config, port=9003).port == 9003


def test_none_flags_are_not_given(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(config, 'port = 9001\nhost = "10.0.0.2"\n')
    monkeypatch.setenv("SHOAL_NAME", "from-env")
    settings = load(config, port=None, host=None, name=None)
    assert (settings.port, settings.host, settings.name) == (9001, "10.0.0.2", "from-env")


def test_table_flag_merges_with_file_and_env(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(config, "[engine]\ncontext = 4096\n")
    monkeypatch.setenv("SHOAL_ENGINE__THREADS", "4")
    settings = load(config, engine={"enabled": False})
    assert settings.engine.enabled is False
    assert settings.engine.context == 4096
    assert settings.engine.threads == 4


def test_backends_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "SHOAL_BACKENDS", '[{"url": "http://10.0.0.5:8080/v1/", "kind": "ollama", "name": "b"}]'
    )
    (backend,) = load().backends
    assert (backend.url, backend.kind, backend.name) == ("http://10.0.0.5:8080", "ollama", "b")


def test_data_dir_follows_xdg_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "other"))
    assert load().data_dir == tmp_path / "other" / "shoal"


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


# -- refusals name the key -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000\n", "port"),
        ("port = -1\n", "port"),
        ('log_level = "loud"\n', "log_level"),
        ("prot = 1\n", "prot"),
        ("[engine]\nthreads = 0\n", "engine.threads"),
        ("[engine]\ncontext = 64\n", "engine.context"),
        ("[engine]\nthreadz = 2\n", "engine.threadz"),
        ("[detect]\ninterval_s = 0\n", "detect.interval_s"),
        ("[limits]\nmax_body_bytes = 10\n", "limits.max_body_bytes"),
        ('[[backends]]\nurl = "ftp://h"\n', "backends.0.url"),
        ('[[backends]]\nurl = "10.0.0.5:8080"\n', "backends.0.url"),
        ('[[backends]]\nurl = "http://h"\nkind = "triton"\n', "backends.0.kind"),
        ('[[backends]]\nkind = "openai"\n', "backends.0.url"),
    ],
)
def test_invalid_file_value_names_the_key(config: Path, text: str, key: str) -> None:
    write(config, text)
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert f"  {key}:" in caught.value.message
    assert str(config) in caught.value.message


@pytest.mark.parametrize(
    ("env", "value", "key"),
    [
        ("SHOAL_ENGINE__THREADS", "zero", "engine.threads"),
        ("SHOAL_PORT", "99999", "port"),
        ("SHOAL_LAN", "perhaps", "lan"),
    ],
)
def test_invalid_env_value_names_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, key: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load()
    assert f"  {key}:" in caught.value.message


def test_invalid_flag_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load(port=-5)
    assert "  port:" in caught.value.message


def test_malformed_toml_is_a_config_error_naming_the_file(config: Path) -> None:
    write(config, "port = \n")
    with pytest.raises(ConfigError) as caught:
        load(config)
    assert str(config) in caught.value.message


def test_config_error_is_not_a_validation_error(config: Path) -> None:
    write(config, "port = 70000\n")
    with pytest.raises(ConfigError) as caught:
        load(config)
    # `from None`: no pydantic trace for the operator
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


# -- backends ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("http://10.0.0.5:8080/", "http://10.0.0.5:8080"),
        ("http://10.0.0.5:8080/v1", "http://10.0.0.5:8080"),
        ("http://10.0.0.5:8080/v1/", "http://10.0.0.5:8080"),
        ("https://llm.example/api/v1", "https://llm.example/api"),
        ("https://llm.example/v10", "https://llm.example/v10"),
    ],
)
def test_backend_url_is_normalised(config: Path, url: str, expected: str) -> None:
    write(config, f'[[backends]]\nurl = "{url}"\n')
    (backend,) = load(config).backends
    assert backend.url == expected
    assert backend.kind == "openai"
    assert backend.name is None


def test_several_backends_keep_their_order_and_kinds(config: Path) -> None:
    write(
        config,
        '[[backends]]\nurl = "http://a:1"\nkind = "ollama"\nname = "first"\n'
        '[[backends]]\nurl = "http://b:2/v1"\napi_key = "sk-secret"\n',
    )
    first, second = load(config).backends
    assert (first.url, first.kind, first.name) == ("http://a:1", "ollama", "first")
    assert (second.url, second.kind) == ("http://b:2", "openai")
    assert second.api_key is not None
    assert second.api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(second) + str(second.model_dump(mode="json"))
    assert "sk-secret" not in repr(second)


# -- bind_host ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "bind"),
    [
        ({}, "127.0.0.1"),
        ({"lan": True}, "0.0.0.0"),
        ({"lan": True, "host": "192.168.1.5"}, "192.168.1.5"),
        ({"lan": False, "host": "10.0.0.1"}, "10.0.0.1"),
        ({"lan": True, "host": "::"}, "::"),
    ],
)
def test_bind_host(flags: dict[str, object], bind: str) -> None:
    assert load(**flags).bind_host == bind


def test_lan_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_LAN", "true")
    assert load().bind_host == "0.0.0.0"


def test_default_config_path_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert settings_mod.default_config_path() == tmp_path / "home" / ".config" / "shoal" / (
        "config.toml"
    )


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "two\nlines", "bell\x07", "esc\x1b[2J"])
def test_a_node_name_peers_would_refuse_is_refused_here_first(name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        load(None, name=name, environ=False)


def test_a_node_name_is_stripped_and_the_hostname_default_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load(None, name="  kitchen  ", environ=False).name == "kitchen"
    monkeypatch.setattr(settings_mod.socket, "gethostname", lambda: "h" * 100 + ".lan")
    assert load(None, environ=False).name == "h" * 64
