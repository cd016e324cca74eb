"""`shoal keys`: API keys for clients on the network, kept hashed in the data dir.

Works on the key file directly: no running node is needed, and a running node sees a
change on its next request. Exit codes: 0 done, 1 refused or not found, 2 bad config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shoal import settings as settings_mod
from shoal.errors import ConfigError
from shoal.trust.keys import KeyNameError, KeyStore

keys_app = typer.Typer(
    help="API keys for clients on the network (loopback clients need none).",
    no_args_is_help=True,
)

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Config file (default ~/.config/shoal/config.toml).")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="The node's data dir (default: from config).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _store(config: Path | None, data_dir: Path | None) -> KeyStore:
    try:
        settings = settings_mod.load(config, data_dir=data_dir)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    return KeyStore.in_data_dir(settings.data_dir)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what will use the key, e.g. laptop.")],
    weight: Annotated[
        float | None,
        typer.Option(
            help="Its share when a model's nodes are busy and requests queue (this node's "
            "own clients: 70, peers: 30). Default: as this node's own clients."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a key and print it once: only its hash is kept, so it cannot be shown again."""
    store = _store(config, data_dir)
    try:
        record, secret = store.create(name, weight)
    except (KeyNameError, ValueError) as exc:
        raise _fail(str(exc), 1) from None
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        typer.echo(json.dumps({**record.public(), "key": secret}))
        return
    err.print(
        f"created API key {record.id} ({escape(record.name)}). Copy it now: it is not shown "
        "again. Clients send it as 'Authorization: Bearer <key>'.",
        highlight=False,
    )
    typer.echo(secret)  # alone on stdout, unwrapped: `KEY=$(shoal keys create x)` works


@keys_app.command("list")
def list_keys(
    data_dir: DataDirOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the keys: ID, name, when made (never the keys or their hashes)."""
    try:
        records = _store(config, data_dir).list()
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        typer.echo(json.dumps({"keys": [r.public() for r in records]}))
        return
    if not records:
        err.print("no API keys; make one with 'shoal keys create NAME'", highlight=False)
        return
    table = Table("id", "name", "created", "weight")
    for record in records:
        weight = "-" if record.weight is None else f"{record.weight:g}"
        table.add_row(record.id, escape(record.name), record.created, weight)
    out.print(table)


@keys_app.command("revoke")
def revoke(
    id_or_name: Annotated[str, typer.Argument(help="The key's ID (from 'list') or name.")],
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Delete a key; a running node refuses it from its next request on."""
    try:
        record = _store(config, data_dir).revoke(id_or_name)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if record is None:
        raise _fail(f"no API key has the ID or name {id_or_name!r}", 1)
    out.print(f"revoked API key {record.id} ({escape(record.name)})", highlight=False)
