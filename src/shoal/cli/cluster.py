"""`shoal peers`, `join`, `token` and `pair`: the cluster as this node sees it, and trust."""

from __future__ import annotations

import getpass
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shoal import protocol
from shoal import settings as settings_mod
from shoal.cli import config_file
from shoal.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    UrlOpt,
    err,
    fail,
    human_size,
    load_settings,
    node_get,
    node_post,
    out,
)
from shoal.errors import ConfigError
from shoal.mesh.identity import short_id
from shoal.trust import secret as secret_mod

token_app = typer.Typer(help="The cluster secret (secret mode).", no_args_is_help=True)
pair_app = typer.Typer(help="Pairing with other nodes (pairing mode).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(peers)
    app.command()(join)
    app.add_typer(token_app, name="token")
    app.add_typer(pair_app, name="pair")


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
        found = node_post(url, config, protocol.SCAN_PATH, {})["found"]
        if not as_json:
            out.print(f"scan found {len(found)} node(s)", highlight=False)
        if save:
            _save_peers(config, [f["url"] for f in found])
    document = node_get(url, config, protocol.PEERS_PATH)
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
            Text(p["name"] or "?"),  # a peer's name and models are its own: never markup
            Text(p.get("short_id") or p["node_id"][:12], no_wrap=True),
            Text(p["address"]),
            f"[{colour}]{p['health']}[/{colour}]",
            Text(", ".join(m["id"] for m in p["models"])),
            f"{load.get('in_flight', 0)}/{load.get('capacity', '?')}" if load else "",
            f"{hardware.get('cores', '?')} cores, {human_size(hardware.get('ram_bytes'))}"
            if hardware
            else "",
            "never" if seen is None else f"{seen:.0f} s ago",
        )
    out.print(table)


TOKEN_ENV = "SHOAL_CLUSTER_TOKEN"


def join(
    peer_url: Annotated[str, typer.Argument(help="The node to join, e.g. http://10.0.0.5:11450")],
    url: UrlOpt = None,
    config: ConfigOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="The cluster secret (from `shoal token show` there); `-` reads it from "
            f"stdin. On the command line it shows in `ps`: prefer `-`, --token-file or "
            f"{TOKEN_ENV}."
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="A file holding the cluster secret.")
    ] = None,
    data_dir: DataDirOpt = None,
    save: Annotated[
        bool, typer.Option("--save/--no-save", help="Keep it in the config's peers.")
    ] = True,
) -> None:
    """Add one peer by address (for networks where mDNS does not reach).

    In secret mode, give the cluster secret on stdin (`--token -`), in a file
    (--token-file) or in the SHOAL_CLUSTER_TOKEN environment variable.
    """
    secret = _cluster_token(token, token_file)
    if secret is not None:
        secret_mod.write_secret(_data_dir(config, data_dir), secret)
    joined = node_post(url, config, protocol.PEERS_PATH, {"url": peer_url})
    their_id = short_id(joined["node_id"])
    who = escape(f"{joined['name']} ({their_id}) at {joined['url']}")
    if joined["trust"] == "pending":
        out.print(
            f"pairing requested with {who}. Confirmation code [bold]{joined['code']}[/bold]: "
            f"if {escape(joined['name'])} shows the same code, accept there and here "
            f"(`shoal pair accept {their_id}`).",
            highlight=False,
            soft_wrap=True,  # the terminal wraps it: no line break inside the command
        )
    else:
        out.print(f"joined {who}", highlight=False)
    if save:
        _save_peers(config, [joined["url"]])


def _cluster_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token (`-`: stdin), --token-file or the environment; checked."""
    if token is not None and token_file is not None:
        raise fail("give --token or --token-file, not both", 2)
    if token == "-":  # typed at a terminal, not echoed
        read = getpass.getpass if sys.stdin.isatty() else lambda prompt: sys.stdin.readline()
        token, where = read("cluster token: "), "stdin"
    elif token is not None:
        err.print(
            "[yellow]warning:[/yellow] a token on the command line is visible to every "
            f"user of this machine (`ps`): prefer `--token -` (stdin), --token-file or "
            f"{TOKEN_ENV}",
            highlight=False,
        )
        where = "--token"
    elif token_file is not None:
        try:
            token, where = token_file.read_text(), str(token_file)
        except OSError as exc:
            raise fail(f"cannot read the token file: {exc}", 2) from None
    else:
        token, where = os.environ.get(TOKEN_ENV), TOKEN_ENV
        if not token:
            return None
    token = token.strip()
    if not secret_mod.is_token(token):
        raise fail(
            f"the cluster token from {where} is not one `shoal token create` makes: "
            f"{secret_mod.PREFIX} and at least {secret_mod.MIN_TOKEN_CHARS} letters a-z and "
            "digits 2-7 (`shoal token show` on a node of the cluster prints it)",
            2,
        )
    return token


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    return data_dir or load_settings(config).data_dir


@token_app.command("create")
def token_create(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Make a cluster secret (once); nodes that know it admit each other."""
    where = _data_dir(config, data_dir)
    if secret_mod.read_secret(where):
        raise fail("this node already has a cluster secret; `shoal token show` or `rotate`", 1)
    secret_mod.write_secret(where, secret_mod.new_secret())
    token_show(config, data_dir)


@token_app.command("show")
def token_show(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the cluster secret, for `shoal join URL --token -` on other machines."""
    secret = secret_mod.read_secret(_data_dir(config, data_dir))
    if secret is None:
        raise fail("no cluster secret yet: `shoal token create`", 1)
    out.print(secret, highlight=False)


@token_app.command("rotate")
def token_rotate(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Replace the cluster secret. Nodes already paired stay paired; new ones need it."""
    secret_mod.write_secret(_data_dir(config, data_dir), secret_mod.new_secret())
    token_show(config, data_dir)


@pair_app.command("list")
def pair_list(url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Nodes met: pending (waiting for your decision), paired, unpaired."""
    document = node_get(url, config, protocol.PAIRS_PATH)
    if as_json:
        out.print_json(json.dumps(document))
        return
    out.print(f"cluster mode: {document['mode']}", highlight=False)
    _print_pairs(document["nodes"], out.width)


# `shoal pair list`: the ID and the code are what people type and compare, and the
# address is where to check who it is, so none of them may wrap or be cut short. As a
# table while they fit on one line beside a name of _NAME_ROOM columns (the name folds);
# in a narrower terminal, each node as a short block of lines instead.
_ID_WIDTH = len("SHOAL-XXXX-XXXX-XXXX")
_GAP = 2  # columns between two columns of the table: its padding and its blank rule
_NAME_ROOM = 10


def _print_pairs(nodes: list[dict[str, str]], width: int) -> None:
    def widest(key: str) -> int:
        return max([len(key), *(len(n[key]) for n in nodes)])

    fixed = _ID_WIDTH + widest("state") + widest("code") + widest("address") + 4 * _GAP
    if width - fixed < min(widest("name"), _NAME_ROOM):
        for n in nodes:
            lines = (n["name"], f"  {n['short_id']}", f"  {n['state']}, code {n['code']}",
                     f"  {n['address']}")  # fmt: skip
            out.print(Text("\n".join(lines)), soft_wrap=True)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("name", overflow="fold")
    table.add_column("id", no_wrap=True, min_width=_ID_WIDTH)
    for key in ("state", "code", "address"):
        table.add_column(key, no_wrap=True)
    for n in nodes:  # as Text: a name is the other node's choice, never markup
        table.add_row(*(Text(n[k]) for k in ("name", "short_id", "state", "code", "address")))
    out.print(table)


def _pair_action(action: str, node: str, url: str | None, config: Path | None) -> None:
    path = protocol.PAIR_ACTION_PATH.format(node=urllib.parse.quote(node, safe=""), action=action)
    done = node_post(url, config, path, {})
    out.print(Text(f"{action}: {done['name']} ({short_id(done['node_id'])})"))


NodeArg = Annotated[
    str,
    typer.Argument(
        help="Short ID (SHOAL-…, as `shoal pair list` shows it), node ID, its "
        "first 8+ hex digits, or name."
    ),
]


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


def _save_peers(config: Path | None, urls: list[str]) -> None:
    path = config or settings_mod.default_config_path()
    try:
        known = list(config_file.file_value(path, "peers") or [])
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    new = [u for u in urls if u not in known]
    if not new:
        return
    try:
        config_file.set_value(path, "peers", json.dumps(known + new))
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    out.print(f"saved {len(new)} peer(s) to {path}", highlight=False)
