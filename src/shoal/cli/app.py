"""`shoal` subcommands: parse flags, call the node or its API, print for people or --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shoal import protocol
from shoal import settings as settings_mod
from shoal.cli import cluster, config_file, demo, doctor, init_config, service
from shoal.cli.common import (
    ConfigOpt,
    JsonOpt,
    UrlOpt,
    fail,
    load_settings,
    node_get,
    out,
)
from shoal.cli.keys import keys_app
from shoal.cli.models import models_app
from shoal.cli.pull import pull as _pull  # noqa: F401  (registers `shoal models pull`)
from shoal.errors import ConfigError

app = typer.Typer(
    name="shoal",
    help="Turn the machines on a network into one OpenAI-compatible inference cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Read and change the configuration file.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 11450).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Identity and model store.")] = None,
    config: ConfigOpt = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(help="An OpenAI-compatible server URL to use (repeatable)."),
    ] = None,
    ollama: Annotated[
        list[str] | None, typer.Option(help="An Ollama server URL to use (repeatable).")
    ] = None,
    embedded: Annotated[
        bool | None,
        typer.Option("--embedded/--no-embedded", help="Run the embedded engine (default on)."),
    ] = None,
    detect: Annotated[
        bool | None,
        typer.Option(
            "--detect/--no-detect", help="Look for servers on standard ports (default on)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="This node's name (default: hostname).")] = None,
    lan: Annotated[
        bool | None,
        typer.Option("--lan/--no-lan", help="Bind 0.0.0.0 and find peers by mDNS (default off)."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_format: Annotated[
        str | None, typer.Option(help="text (default), or json: one object per line.")
    ] = None,
) -> None:
    """Run a node: serve the models this machine holds on an OpenAI-compatible API."""
    base = load_settings(config)
    extra = [{"url": url, "kind": "openai"} for url in backend or ()]
    extra += [{"url": url, "kind": "ollama"} for url in ollama or ()]
    settings = load_settings(
        config,
        host=host,
        port=port,
        data_dir=data_dir,
        name=name,
        lan=lan,
        log_level=log_level,
        log_format=log_format,
        backends=[*(b.model_dump() for b in base.backends), *extra] if extra else None,
        engine=None if embedded is None else {**base.engine.model_dump(), "enabled": embedded},
        detect=None if detect is None else {**base.detect.model_dump(), "enabled": detect},
    )
    from shoal import logs

    logs.configure(settings.log_level, settings.log_format)
    from shoal.api.access import install_log_redaction

    install_log_redaction()
    from shoal.node import serve as run_node

    run_node(settings)


@app.command()
def status(url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show this node: backends, their health, models, requests in flight."""
    document = node_get(url, config, protocol.STATUS_PATH)
    if as_json:
        out.print_json(json.dumps(document))
        return
    out.print(
        f"[bold]{document['name']}[/bold]  id {document['node_id'][:16]}…  "
        f"v{document['version']}  up {document['uptime_s']:.0f} s  "
        f"in flight {document['in_flight']}  {document['url']}",
        highlight=False,
    )
    table = Table("backend", "kind", "where", "health", "models", "in flight")
    for b in document["backends"]:
        health = b["health"] + (f" ({b['reason']})" if b["reason"] else "")
        colour = {"healthy": "green", "starting": "yellow"}.get(b["health"], "red")
        table.add_row(
            b["name"],
            b["kind"] + (" (detected)" if b["detected"] else ""),
            b["location"],
            f"[{colour}]{health}[/{colour}]",
            ", ".join(m["id"] for m in b["models"]),
            str(b["in_flight"]),
        )
    out.print(table)


@config_app.command("get")
def config_get(
    key: Annotated[str | None, typer.Argument(help="Dotted key, e.g. engine.threads.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the effective value of KEY (file, environment and defaults), or all settings."""
    settings = load_settings(config)
    document = settings.model_dump(mode="json")
    if key is None:
        out.print_json(json.dumps(document))
        return
    try:
        value = config_file.lookup(document, key)
    except KeyError:
        raise fail(f"no setting named {key!r}", 2) from None
    out.print(json.dumps(value) if not isinstance(value, str) else value, highlight=False)


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="Dotted key, e.g. engine.threads.")],
    value: Annotated[str, typer.Argument(help="New value (TOML syntax; bare words are text).")],
    config: ConfigOpt = None,
) -> None:
    """Write KEY = VALUE into the config file, keeping its comments; checks it first."""
    path = config or settings_mod.default_config_path()
    try:
        config_file.set_value(path, key, value)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"{key} = {value}  [dim]({path})[/dim]", highlight=False)


cluster.register(app)
app.command()(doctor.doctor)
app.command()(init_config.init)
app.add_typer(service.service_app, name="service")
app.command()(demo.demo)
