"""`shoal init`: the config it writes loads with the real settings loader, a secret goes
to the data dir (0600) and never to the terminal, and nothing is overwritten without
--force."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal import settings as settings_mod
from shoal.cli.app import app
from shoal.cli.init_config import render
from shoal.trust import secret as secret_mod


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("SHOAL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_single_machine_config_loads(home: Path) -> None:
    code, output = invoke("init")
    assert code == 0, output
    path = settings_mod.default_config_path()
    assert path.is_file() and "next:" in output
    settings = settings_mod.load(path, environ=False)
    assert settings.lan is False and settings.port == 11450
    assert settings.bind_host == "127.0.0.1"
    assert "#" in path.read_text()  # commented
    assert not (settings.data_dir / secret_mod.SECRET_FILE).exists()


def test_lan_with_secret(home: Path) -> None:
    code, output = invoke("init", "--lan", "--secret")
    assert code == 0, output
    settings = settings_mod.load(settings_mod.default_config_path(), environ=False)
    assert settings.lan and settings.mesh.mdns and settings.cluster.mode is None
    secret = secret_mod.read_secret(settings.data_dir)
    assert secret is not None and secret_mod.is_token(secret)
    mode = stat.S_IMODE((settings.data_dir / secret_mod.SECRET_FILE).stat().st_mode)
    assert mode == 0o600
    assert secret not in output and secret not in settings_mod.default_config_path().read_text()
    assert "shoal join" in output and "--token -" in output


def test_refuses_to_overwrite_without_force(home: Path) -> None:
    config = home / "elsewhere" / "shoal.toml"
    assert invoke("init", "--config", str(config), "--data-dir", str(home / "dd"))[0] == 0
    before = config.read_text()
    code, output = invoke("init", "--lan", "--config", str(config))
    assert code == 1 and "--force" in output
    assert config.read_text() == before
    dd = str(home / "dd")
    code, output = invoke(
        "init", "--lan", "--secret", "--force", "--config", str(config), "--data-dir", dd
    )
    assert code == 0, output
    settings = settings_mod.load(config, environ=False)
    assert settings.lan and settings.data_dir == (home / "dd").resolve()
    # a secret already there is kept, not replaced: the nodes that know it stay admitted
    first = secret_mod.read_secret(settings.data_dir)
    assert invoke("init", "--secret", "--force", "--config", str(config), "--data-dir", dd)[0] == 0
    assert secret_mod.read_secret(settings.data_dir) == first


@pytest.mark.parametrize("lan", [False, True])
@pytest.mark.parametrize("secret", [False, True])
def test_every_template_loads(tmp_path: Path, lan: bool, secret: bool) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        render(lan=lan, port=11460, data_dir=tmp_path / 'a "quoted" dir', secret=secret)
    )
    settings = settings_mod.load(path, environ=False)
    assert settings.lan is lan and settings.port == 11460
    assert settings.data_dir == tmp_path / 'a "quoted" dir'
