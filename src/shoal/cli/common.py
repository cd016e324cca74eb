"""What every `shoal` subcommand shares: consoles, option types, config, calls to a node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from shoal import settings as settings_mod
from shoal.cli import client
from shoal.errors import ConfigError

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Config file (default ~/.config/shoal/config.toml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="The node's data dir (default from config).")
]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Node to ask (default: this machine's node).")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def load_settings(config: Path | None, **flags: Any) -> settings_mod.Settings:
    try:
        return settings_mod.load(config, **flags)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


def node_url(url: str | None, config: Path | None) -> str:
    return url or f"http://127.0.0.1:{load_settings(config).port}"


def node_get(
    url: str | None, config: Path | None, path: str, headers: dict[str, str] | None = None
) -> Any:
    try:
        return client.get_json(node_url(url, config), path, headers=headers)
    except client.NodeUnreachable as exc:
        raise fail(str(exc), 3) from None
    except client.NodeRefused as exc:
        raise fail(str(exc), 1) from None


def node_post(url: str | None, config: Path | None, path: str, body: Any) -> Any:
    try:
        return client.post_json(node_url(url, config), path, body)
    except client.NodeUnreachable as exc:
        raise fail(str(exc), 3) from None
    except client.NodeRefused as exc:
        raise fail(str(exc), 1) from None


def human_size(size: int | None) -> str:
    if not size:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}"
        size = size / 1000  # type: ignore[assignment]
    return f"{size:.1f} TB"
