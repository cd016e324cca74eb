"""`shoal service`: the systemd unit passes `systemd-analyze verify` and is hardened
without losing the network or the home dir; the launchd plist is valid; install,
status and uninstall write and remove the unit where told (the manager is not called)."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import service
from shoal.cli.app import app


def directives(unit: str) -> dict[str, str]:
    found = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key] = value
    return found


@pytest.mark.parametrize("scope", ["user", "system"])
def test_unit_verifies(tmp_path: Path, scope: service.Scope) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        reason = "systemd-analyze is not installed (Debian package systemd)"
        if os.environ.get("SHOAL_REQUIRE_NETNS") or os.environ.get("CI"):
            pytest.fail(reason + "; scripts/bootstrap --test installs it as root")
        pytest.skip(reason)
    config = tmp_path / "my config.toml"  # a space: ExecStart must quote it
    unit = service.systemd_unit(service.serve_command(config), scope, "root")
    path = tmp_path / service.UNIT_NAME
    path.write_text(unit)
    done = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if str(path) in line]
    assert not complaints, complaints


def test_unit_contents() -> None:
    command = service.serve_command(Path("/etc/shoal.toml"))
    system = directives(service.systemd_unit(command, "system", "alice"))
    user = directives(service.systemd_unit(command, "user"))
    assert system["ExecStart"].startswith(sys.executable + " -m shoal serve --config ")
    assert system["User"] == "alice" and "User" not in user
    assert system["WantedBy"] == "multi-user.target" and user["WantedBy"] == "default.target"
    for unit in (system, user):
        assert unit["Restart"] == "on-failure"
        assert unit["NoNewPrivileges"] == "yes"
        # mDNS is IPv4 multicast, the interfaces are listed over netlink, the engine's
        # child talks on a Unix socket: none of it may be taken away.
        assert set(unit["RestrictAddressFamilies"].split()) >= {"AF_INET", "AF_UNIX", "AF_NETLINK"}
        assert "PrivateNetwork" not in unit and "IPAddressDeny" not in unit
        assert "ProtectHome" not in unit  # the data dir and model store live in the home
        assert "PrivateDevices" not in unit  # a GPU serves the managed engines
    assert system["ProtectSystem"] == "full" and "ProtectSystem" not in user  # needs root


def test_launchd_plist() -> None:
    command = service.serve_command(None)
    daemon = plistlib.loads(service.launchd_plist(command, "system", Path("/Users/a"), "alice"))
    agent = plistlib.loads(service.launchd_plist(command, "user", Path("/Users/a"), "alice"))
    assert daemon["ProgramArguments"] == [sys.executable, "-m", "shoal", "serve"]
    assert daemon["UserName"] == "alice" and "UserName" not in agent
    assert daemon["RunAtLoad"] and daemon["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == "/Users/a/Library/Logs/shoal.log"


def test_install_status_uninstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform == "darwin":
        pytest.skip("the Linux layout; the plist is tested as text")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    config = tmp_path / "config.toml"
    config.write_text("port = 11460\n")
    units = tmp_path / "units"
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["service", *args, "--dir", str(units)])
        return result.exit_code, result.output

    assert run("status", "--user")[0] == 1
    code, output = run("install", "--user", "--config", str(config))
    assert code == 0, output
    unit = (units / service.UNIT_NAME).read_text()
    assert f"--config {config}" in unit
    assert "loginctl enable-linger" in output
    assert run("status", "--user")[0] == 0
    assert run("uninstall", "--user")[0] == 0
    assert not (units / service.UNIT_NAME).exists()
    assert run("uninstall", "--user")[0] == 1


def test_install_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("port = 'many'\n")
    result = CliRunner().invoke(
        app, ["service", "install", "--user", "--config", str(config), "--dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert not (tmp_path / service.UNIT_NAME).exists()
