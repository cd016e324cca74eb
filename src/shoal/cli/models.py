"""`shoal models …`: what the node and the cluster can serve, and the model store.

`shoal models` (and `--lan`) lists what a node serves; the subcommands manage models on
this machine's disk (registered here, or beside it: `shoal.cli.pull`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from shoal import protocol
from shoal.cli.common import ConfigOpt, JsonOpt, UrlOpt, human_size, node_get, out

models_app = typer.Typer(
    help="List the models this node or the cluster can serve; manage the model store.",
    invoke_without_command=True,
)


@models_app.callback()
def models(
    context: typer.Context,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    lan: Annotated[
        bool, typer.Option("--lan", help="Every model in the cluster and the nodes holding it.")
    ] = False,
) -> None:
    """List the models this node (or, with --lan, the cluster) can serve now."""
    if context.invoked_subcommand is not None:
        return
    headers = {} if lan else {"X-Shoal-Local-Only": "1"}
    document = node_get(url, config, protocol.MODELS_PATH, headers)
    if as_json:
        out.print_json(json.dumps(document))
        return
    table = Table("model", "loaded", "size", "quant", "context", "serves", "nodes", "backends")
    for m in document["data"]:
        table.add_row(
            m["id"],
            "yes" if m.get("loaded") else "no",
            human_size(m.get("size_bytes")),
            m.get("quantization") or "",
            str(m.get("context_length") or ""),
            ", ".join(m.get("operations") or ()),
            ", ".join(m.get("nodes") or ()),
            ", ".join(m.get("backends") or ()),
        )
    out.print(table)
