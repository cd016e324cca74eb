"""`shoal` subcommands: parse flags, call the node or its API, print for people or --json."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shoal import settings as settings_mod
from shoal.cli import client, config_file
from shoal.cli.keys import keys_app
from shoal.errors import ConfigError
from shoal.trust import secret as secret_mod

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
token_app = typer.Typer(help="The cluster secret (secret mode).", no_args_is_help=True)
app.add_typer(token_app, name="token")
pair_app = typer.Typer(help="Pairing with other nodes (pairing mode).", no_args_is_help=True)
app.add_typer(pair_app, name="pair")

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


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _load(config: Path | None, **flags: Any) -> settings_mod.Settings:
    try:
        return settings_mod.load(config, **flags)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


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
) -> None:
    """Run a node: serve the models this machine holds on an OpenAI-compatible API."""
    base = _load(config)
    extra = [{"url": url, "kind": "openai"} for url in backend or ()]
    extra += [{"url": url, "kind": "ollama"} for url in ollama or ()]
    settings = _load(
        config,
        host=host,
        port=port,
        data_dir=data_dir,
        name=name,
        lan=lan,
        log_level=log_level,
        backends=[*(b.model_dump() for b in base.backends), *extra] if extra else None,
        engine=None if embedded is None else {**base.engine.model_dump(), "enabled": embedded},
        detect=None if detect is None else {**base.detect.model_dump(), "enabled": detect},
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from shoal.api.access import install_log_redaction

    install_log_redaction()
    from shoal.node import serve as run_node

    run_node(settings)


@app.command()
def status(url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show this node: backends, their health, models, requests in flight."""
    document = _get(url, config, "/shoal/v1/status")
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


@app.command()
def models(
    url: UrlOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    lan: Annotated[
        bool, typer.Option("--lan", help="Every model in the cluster and the nodes holding it.")
    ] = False,
) -> None:
    """List the models this node (or, with --lan, the cluster) can serve now."""
    headers = {} if lan else {"X-Shoal-Local-Only": "1"}
    document = _get(url, config, "/v1/models", headers)
    if as_json:
        out.print_json(json.dumps(document))
        return
    table = Table("model", "loaded", "size", "quant", "context", "serves", "nodes", "backends")
    for m in document["data"]:
        table.add_row(
            m["id"],
            "yes" if m.get("loaded") else "no",
            _size(m.get("size_bytes")),
            m.get("quantization") or "",
            str(m.get("context_length") or ""),
            ", ".join(m.get("operations") or ()),
            ", ".join(m.get("nodes") or ()),
            ", ".join(m.get("backends") or ()),
        )
    out.print(table)


@app.command()
def peers(
    url: UrlOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    scan: Annotated[
        bool, typer.Option("--scan", help="Probe the local /24 for Shoal nodes first.")
    ] = False,
    save: Annotated[
        bool, typer.Option("--save", help="With --scan: keep what is found in the config.")
    ] = False,
) -> None:
    """Show the cluster as this node sees it: peers, health, models, load, hardware."""
    if scan:
        found = _post(url, config, "/shoal/v1/peers/scan", {})["found"]
        if not as_json:
            out.print(f"scan found {len(found)} node(s)", highlight=False)
        if save:
            _save_peers(config, [f["url"] for f in found])
    document = _get(url, config, "/shoal/v1/peers")
    if as_json:
        out.print_json(json.dumps(document))
        return
    table = Table("name", "id", "address", "health", "models", "load", "hardware", "last seen")
    for p in document["peers"]:
        colour = {"healthy": "green", "degraded": "yellow"}.get(p["health"], "red")
        load = p["load"] or {}
        hardware = p["hardware"] or {}
        seen = p["last_seen_s_ago"]
        table.add_row(
            p["name"] or "?",
            p["node_id"][:12],
            p["address"],
            f"[{colour}]{p['health']}[/{colour}]",
            ", ".join(m["id"] for m in p["models"]),
            f"{load.get('in_flight', 0)}/{load.get('capacity', '?')}" if load else "",
            f"{hardware.get('cores', '?')} cores, {_size(hardware.get('ram_bytes'))}"
            if hardware
            else "",
            "never" if seen is None else f"{seen:.0f} s ago",
        )
    out.print(table)


@app.command()
def join(
    peer_url: Annotated[str, typer.Argument(help="The node to join, e.g. http://10.0.0.5:11450")],
    url: UrlOpt = None,
    config: ConfigOpt = None,
    token: Annotated[
        str | None, typer.Option(help="The cluster secret (from `shoal token show` there).")
    ] = None,
    data_dir: DataDirOpt = None,
    save: Annotated[
        bool, typer.Option("--save/--no-save", help="Keep it in the config's peers.")
    ] = True,
) -> None:
    """Add one peer by address (for networks where mDNS does not reach)."""
    if token is not None:
        if not token.startswith(secret_mod.PREFIX):
            raise _fail(f"a cluster token starts with {secret_mod.PREFIX}", 2)
        secret_mod.write_secret(_data_dir(config, data_dir), token)
    joined = _post(url, config, "/shoal/v1/peers", {"url": peer_url})
    who = f"{joined['name']} ({joined['node_id'][:12]}) at {joined['url']}"
    if joined["trust"] == "pending":
        out.print(
            f"pairing requested with {who}. Confirmation code [bold]{joined['code']}[/bold]: "
            f"if {joined['name']} shows the same code, accept there and here "
            f"(`shoal pair accept {joined['node_id'][:12]}`).",
            highlight=False,
        )
    else:
        out.print(f"joined {who}", highlight=False)
    if save:
        _save_peers(config, [joined["url"]])


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    return data_dir or _load(config).data_dir


@token_app.command("create")
def token_create(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Make a cluster secret (once); nodes that know it admit each other."""
    where = _data_dir(config, data_dir)
    if secret_mod.read_secret(where):
        raise _fail("this node already has a cluster secret; `shoal token show` or `rotate`", 1)
    secret_mod.write_secret(where, secret_mod.new_secret())
    token_show(config, data_dir)


@token_app.command("show")
def token_show(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the cluster secret, to give to `shoal join URL --token` on other machines."""
    secret = secret_mod.read_secret(_data_dir(config, data_dir))
    if secret is None:
        raise _fail("no cluster secret yet: `shoal token create`", 1)
    out.print(secret, highlight=False)


@token_app.command("rotate")
def token_rotate(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Replace the cluster secret. Nodes already paired stay paired; new ones need it."""
    secret_mod.write_secret(_data_dir(config, data_dir), secret_mod.new_secret())
    token_show(config, data_dir)


@pair_app.command("list")
def pair_list(url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Nodes met: pending (waiting for your decision), paired, unpaired."""
    document = _get(url, config, "/shoal/v1/pairs")
    if as_json:
        out.print_json(json.dumps(document))
        return
    out.print(f"cluster mode: {document['mode']}", highlight=False)
    table = Table("name", "id", "state", "confirmation code", "address")
    for n in document["nodes"]:
        table.add_row(n["name"], n["short_id"], n["state"], n["code"], n["address"])
    out.print(table)


def _pair_action(action: str, node: str, url: str | None, config: Path | None) -> None:
    done = _post(url, config, f"/shoal/v1/pairs/{node}/{action}", {})
    out.print(f"{action}: {done['name']} ({done['node_id'][:12]})", highlight=False)


NodeArg = Annotated[str, typer.Argument(help="Node ID, ID prefix (8+ characters) or name.")]


@pair_app.command("accept")
def pair_accept(node: NodeArg, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Pair with a pending node (check its confirmation code first)."""
    _pair_action("accept", node, url, config)


@pair_app.command("decline")
def pair_decline(node: NodeArg, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Refuse a pending node; it is ignored until paired again."""
    _pair_action("decline", node, url, config)


@pair_app.command("unpair")
def pair_unpair(node: NodeArg, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Stop trusting a paired node; its live connections are cut at once."""
    _pair_action("unpair", node, url, config)


@pair_app.command("forget")
def pair_forget(node: NodeArg, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Drop a node from the trust store entirely."""
    _pair_action("forget", node, url, config)


@config_app.command("get")
def config_get(
    key: Annotated[str | None, typer.Argument(help="Dotted key, e.g. engine.threads.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the effective value of KEY (file, environment and defaults), or all settings."""
    settings = _load(config)
    document = settings.model_dump(mode="json")
    if key is None:
        out.print_json(json.dumps(document))
        return
    try:
        value = config_file.lookup(document, key)
    except KeyError:
        raise _fail(f"no setting named {key!r}", 2) from None
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
        raise _fail(str(exc), 2) from None
    out.print(f"{key} = {value}  [dim]({path})[/dim]", highlight=False)


def _node_url(url: str | None, config: Path | None) -> str:
    return url or f"http://127.0.0.1:{_load(config).port}"


def _get(
    url: str | None, config: Path | None, path: str, headers: dict[str, str] | None = None
) -> Any:
    try:
        return client.get_json(_node_url(url, config), path, headers=headers)
    except client.NodeUnreachable as exc:
        raise _fail(str(exc), 3) from None
    except client.NodeRefused as exc:
        raise _fail(str(exc), 1) from None


def _post(url: str | None, config: Path | None, path: str, body: Any) -> Any:
    try:
        return client.post_json(_node_url(url, config), path, body)
    except client.NodeUnreachable as exc:
        raise _fail(str(exc), 3) from None
    except client.NodeRefused as exc:
        raise _fail(str(exc), 1) from None


def _save_peers(config: Path | None, urls: list[str]) -> None:
    path = config or settings_mod.default_config_path()
    try:
        known = list(config_file.file_value(path, "peers") or [])
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    new = [u for u in urls if u not in known]
    if not new:
        return
    try:
        config_file.set_value(path, "peers", json.dumps(known + new))
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    out.print(f"saved {len(new)} peer(s) to {path}", highlight=False)


def _size(size: int | None) -> str:
    if not size:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}"
        size = size / 1000  # type: ignore[assignment]
    return f"{size:.1f} TB"
