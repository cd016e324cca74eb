"""`shoal service install|uninstall|status`: run the node at boot, under the system's
service manager: a systemd unit on Linux (a user unit, or a system one), a launchd job on
macOS. The unit and the plist are rendered here as text (tested as text everywhere;
installed only where their manager runs).

Hardening keeps what a node needs: the network (IPv4 multicast for mDNS, netlink to list
the interfaces), Unix sockets (the engine's child), and write access to the user's home
(the data dir, the model store under ~/.cache). It takes away what it never needs: new
privileges, capabilities (the ports are above 1023), kernel tunables, realtime.
"""

from __future__ import annotations

import getpass
import os
import platform
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from shoal import settings as settings_mod
from shoal.cli.common import ConfigOpt, err, fail, out

UNIT_NAME = "shoal.service"
LAUNCHD_LABEL = "org.shoal.node"
Scope = Literal["user", "system"]

service_app = typer.Typer(help="Run the node at boot (systemd, launchd).", no_args_is_help=True)

UserOpt = Annotated[
    bool, typer.Option("--user", help="For this user (default unless run as root).")
]
SystemOpt = Annotated[
    bool, typer.Option("--system", help="For the whole machine (default as root).")
]
DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", hidden=True, help="Where the unit goes (tests); skips the manager."),
]

# -- rendering (pure) -------------------------------------------------------------------

# Options every unit gets: none needs privileges, so a user manager applies them too.
_HARDENING_COMMON = """\
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
# Unix: the engine's child socket; IPv4/IPv6: clients, peers, mDNS; netlink: interfaces.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
"""

# Options only a system manager can apply (they need mount namespaces or capabilities).
# ProtectSystem=full, not strict: the data dir and model store live under the user's
# home, which stays writable (ProtectHome would break pulls and the trust store). Devices
# stay visible: a GPU (/dev/nvidia*, /dev/dri) serves the managed engines.
_HARDENING_SYSTEM = """\
CapabilityBoundingSet=
ProtectSystem=full
PrivateTmp=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
RestrictNamespaces=yes
"""


def serve_command(config: Path | None) -> list[str]:
    """What the service runs: this Python's `shoal serve`, with the config made absolute."""
    command = [sys.executable, "-m", "shoal", "serve"]
    if config is not None:
        command += ["--config", str(config.expanduser().resolve())]
    return command


def systemd_unit(command: list[str], scope: Scope, run_as: str | None = None) -> str:
    """A systemd unit for `command`; `run_as` the user a system unit runs as."""
    exec_start = " ".join(shlex.quote(part) for part in command)
    user = f"User={run_as}\n" if scope == "system" and run_as and run_as != "root" else ""
    wanted_by = "multi-user.target" if scope == "system" else "default.target"
    network = (
        "Wants=network-online.target\nAfter=network-online.target\n"
        if scope == "system"
        else "After=network.target\n"
    )
    return (
        "# Written by `shoal service install`; `shoal service uninstall` removes it.\n"
        "[Unit]\n"
        "Description=Shoal inference node (OpenAI-compatible API on the LAN)\n"
        f"{network}"
        "StartLimitIntervalSec=300\n"
        "StartLimitBurst=10\n"
        "\n[Service]\n"
        "Type=exec\n"
        f"ExecStart={exec_start}\n"
        f"{user}"
        "Environment=PYTHONUNBUFFERED=1\n"
        # The node raises its soft limit to the hard one; connections are descriptors.
        "LimitNOFILE=65536\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        # SIGTERM to the node, which stops its engines and says goodbye to peers (within
        # a few seconds); whatever is left after the timeout is killed.
        "KillMode=mixed\n"
        "TimeoutStopSec=30\n"
        f"{_HARDENING_COMMON}"
        f"{_HARDENING_SYSTEM if scope == 'system' else ''}"
        "\n[Install]\n"
        f"WantedBy={wanted_by}\n"
    )


def launchd_plist(command: list[str], scope: Scope, home: Path, run_as: str | None) -> bytes:
    """A launchd job: a LaunchDaemon (system: at boot, no one logged in) or a LaunchAgent
    (user: at login)."""
    logs = Path("/var/log") if scope == "system" else home / "Library" / "Logs"
    job: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restarted when it fails, as on-failure
        "ThrottleInterval": 2,
        "ProcessType": "Interactive",  # inference: never throttled as background work
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
        "SoftResourceLimits": {"NumberOfFiles": 65536},
        "StandardOutPath": str(logs / "shoal.log"),
        "StandardErrorPath": str(logs / "shoal.log"),
    }
    if scope == "system" and run_as and run_as != "root":
        job["UserName"] = run_as
    return plistlib.dumps(job)


# -- where, and the service manager ----------------------------------------------------


def _scope(user: bool, system: bool) -> Scope:
    if user and system:
        raise fail("give --user or --system, not both", 2)
    if user or system:
        return "user" if user else "system"
    return "system" if os.geteuid() == 0 else "user"


def _run_as() -> str:
    """Whom a system unit runs as: the user behind sudo, else the caller."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def unit_path(scope: Scope, directory: Path | None = None) -> Path:
    if platform.system() == "Darwin":
        folder = (
            Path("/Library/LaunchDaemons")
            if scope == "system"
            else Path.home() / "Library" / "LaunchAgents"
        )
        return (directory or folder) / f"{LAUNCHD_LABEL}.plist"
    if directory is None:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        directory = (
            Path("/etc/systemd/system") if scope == "system" else Path(base) / "systemd/user"
        )
    return directory / UNIT_NAME


def _manager(scope: Scope, *args: str) -> int:
    if platform.system() == "Darwin":
        argv = ["launchctl", *args]
    else:
        argv = ["systemctl", *(["--user"] if scope == "user" else []), *args]
    out.print(f"[dim]$ {escape(shlex.join(argv))}[/dim]", highlight=False)
    try:
        return subprocess.run(argv, check=False).returncode
    except OSError as exc:
        err.print(f"[yellow]warning:[/yellow] {escape(str(exc))}", highlight=False)
        return 127


def _domain(scope: Scope) -> str:
    return "system" if scope == "system" else f"gui/{os.getuid()}"


@service_app.command("install")
def install(
    user: UserOpt = False,
    system: SystemOpt = False,
    config: ConfigOpt = None,
    directory: DirOpt = None,
) -> None:
    """Install and start the node as a service that starts at boot."""
    scope = _scope(user, system)
    config = config or _existing_default_config()
    _check_config(config)
    command = serve_command(config)
    path = unit_path(scope, directory)
    darwin = platform.system() == "Darwin"
    if darwin:
        text = launchd_plist(command, scope, Path.home(), _run_as())
    else:
        text = systemd_unit(command, scope, _run_as()).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    out.print(f"wrote {escape(str(path))}", highlight=False)
    if directory is None and darwin:
        _manager(scope, "bootstrap", _domain(scope), str(path))
    elif directory is None:
        _manager(scope, "daemon-reload")
        if _manager(scope, "enable", "--now", UNIT_NAME) != 0:
            raise fail(f"systemctl could not start {UNIT_NAME}: `shoal service status`", 1)
    _after_install(scope, darwin)


def _after_install(scope: Scope, darwin: bool) -> None:
    if darwin and scope == "user":
        out.print(
            "A LaunchAgent starts at login. To start at boot with no one logged in: "
            "`sudo shoal service install --system`.",
            highlight=False,
        )
    elif not darwin and scope == "user":
        out.print(
            "A user service starts when you log in. To start it at boot with no one "
            f"logged in: `sudo loginctl enable-linger {escape(getpass.getuser())}`.",
            highlight=False,
            soft_wrap=True,
        )
    out.print("Check it: `shoal service status`, then `shoal doctor`.", highlight=False)


def _check_config(config: Path | None) -> None:
    """Refuse to install a service that would fail at once on a bad config."""
    from shoal.errors import ConfigError

    try:
        settings_mod.load(config)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def _existing_default_config() -> Path | None:
    path = Path(os.environ.get("SHOAL_CONFIG") or settings_mod.default_config_path())
    return path if path.is_file() else None


@service_app.command("uninstall")
def uninstall(user: UserOpt = False, system: SystemOpt = False, directory: DirOpt = None) -> None:
    """Stop the service and remove it."""
    scope = _scope(user, system)
    path = unit_path(scope, directory)
    if not path.exists():
        raise fail(f"no service installed at {path}", 1)
    if directory is None:
        if platform.system() == "Darwin":
            _manager(scope, "bootout", f"{_domain(scope)}/{LAUNCHD_LABEL}")
        else:
            _manager(scope, "disable", "--now", UNIT_NAME)
    path.unlink()
    if directory is None and platform.system() != "Darwin":
        _manager(scope, "daemon-reload")
    out.print(f"removed {escape(str(path))}", highlight=False)


@service_app.command("status")
def status(user: UserOpt = False, system: SystemOpt = False, directory: DirOpt = None) -> None:
    """Whether the service is installed, and what its manager says of it."""
    scope = _scope(user, system)
    path = unit_path(scope, directory)
    if not path.exists():
        out.print(
            f"not installed ({escape(str(path))} does not exist): "
            f"`shoal service install{' --system' if scope == 'system' else ''}`",
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(f"installed: {escape(str(path))}", highlight=False)
    if directory is not None:
        return
    if platform.system() == "Darwin":
        code = _manager(scope, "print", f"{_domain(scope)}/{LAUNCHD_LABEL}")
    else:
        code = _manager(scope, "status", "--no-pager", UNIT_NAME)
    raise typer.Exit(0 if code == 0 else 1)
