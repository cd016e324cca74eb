"""`shoal models …`: what the node and the cluster can serve, and the model store.

`shoal models` (and `--lan`) lists what a node serves; `--local` lists the GGUFs on this
machine's disk (read here, from the settings, with the loaded state from the node when
one answers); the subcommands manage them (registered here, or beside it:
`shoal.cli.pull`). Every name is checked (`shoal.models.names.check_name`) before
anything is read or sent. Exit codes: 0 done, 1 refused or not found, 2 bad arguments
or config, 3 no node answering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from shoal import protocol
from shoal.cli import client
from shoal.cli.common import (
    ConfigOpt,
    JsonOpt,
    UrlOpt,
    err,
    fail,
    human_size,
    load_settings,
    node_get,
    node_url,
    out,
)
from shoal.models.catalog import ModelCatalog
from shoal.models.names import InvalidModelName, check_name, lookup_key
from shoal.models.remove import adopted_message, remove_model

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
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="The GGUFs on this machine's disk: store, size, loaded, memory."
        ),
    ] = False,
) -> None:
    """List the models this node (or, with --lan, the cluster) can serve now."""
    if context.invoked_subcommand is not None:
        return
    if local:
        if lan:
            raise _fail("--local and --lan do not go together", 2)
        _list_local(url, config, as_json)
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


# --- this machine's disk: `--local`, `rm`, `load`, `unload` ------------------------------

# Seconds to wait for a load: a multi-GB model read from a slow disk takes minutes.
_LOAD_TIMEOUT_S = 600.0
# Seconds to wait for the node's view of its models; without it the list still prints.
_STATE_TIMEOUT_S = 3.0

NameArg = Annotated[str, typer.Argument(help="The model's name (`shoal models --local`).")]


def _checked_name(name: str) -> str:
    try:
        return check_name(name)
    except InvalidModelName as exc:
        raise _fail(exc.message, 2) from None


def _fail(message: str, code: int) -> typer.Exit:
    return fail(escape(message), code)


def _catalog(config: Path | None) -> ModelCatalog:
    catalog = ModelCatalog(load_settings(config).models)
    catalog.scan()
    return catalog


def _node_state(url: str | None, config: Path | None) -> tuple[dict[str, Any] | None, str]:
    """The local node's view of its models by name, or None and why not."""
    base = node_url(url, config)
    try:
        document = client.get_json(base, protocol.LOCAL_MODELS_PATH, timeout=_STATE_TIMEOUT_S)
    except client.NodeUnreachable:
        return None, f"no node answers at {base}: loaded state unknown"
    except client.NodeRefused as exc:
        return None, f"the node at {base} did not say what it has loaded ({exc})"
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None, f"the node at {base} answered {protocol.LOCAL_MODELS_PATH} in an unknown shape"
    by_name = {
        lookup_key(entry["name"]): entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }
    return by_name, ""


def _list_local(url: str | None, config: Path | None, as_json: bool) -> None:
    catalog = _catalog(config)
    state, why = _node_state(url, config)
    rows: list[dict[str, Any]] = []
    for model in catalog.models():
        sources = catalog.sources(model)
        entry: dict[str, Any] | None = None
        if state is not None:
            entry = next((state[k] for k in map(lookup_key, model.names) if k in state), {})
        rows.append(
            {
                "name": model.name,
                "names": list(model.names),
                "store": model.store,
                "writable": model.writable,
                "path": str(model.path),  # the file itself (an HF blob)
                # where it was found (an HF snapshot entry), then its copies elsewhere
                "found_at": [str(found.path) for found in sources],
                "size_bytes": model.size_bytes,
                "sha256": model.sha256,
                "quantization": model.quantization,
                "context_length": model.context_length,
                "architecture": model.architecture,
                "loaded": None if entry is None else bool(entry.get("loaded")),
                "state": None if entry is None else entry.get("state"),
                "memory_bytes": None if entry is None else entry.get("memory_bytes"),
            }
        )
    if as_json:
        document = {"data": rows, "node_answered": state is not None, "note": why or None}
        out.print_json(json.dumps(document))
        return
    table = Table("model", "store", "size", "quant", "context", "arch", "loaded", "memory")
    table.add_column("path", overflow="fold")
    for row in rows:
        loaded, state = row["loaded"], row["state"]
        table.add_row(
            escape(row["name"]),
            row["store"] + ("" if row["writable"] else " (adopted)"),
            human_size(row["size_bytes"]),
            escape(row["quantization"] or ""),
            str(row["context_length"] or ""),
            escape(row["architecture"] or ""),
            "?" if loaded is None else escape(str(state)) if state else "yes" if loaded else "no",
            human_size(row["memory_bytes"]) if isinstance(row["memory_bytes"], int) else "",
            escape(row["found_at"][0] if row["found_at"] else row["path"]),
        )
    out.print(table)
    if not rows:
        err.print("no GGUF models found on this machine's disk", highlight=False)
    if why:
        err.print(escape(why), highlight=False)


@models_app.command("rm")
def remove(
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Delete a model from Shoal's store (never from Ollama's, LM Studio's or a folder)."""
    name = _checked_name(name)
    catalog = _catalog(config)
    model = catalog.find(name)
    if model is None:
        raise _fail(f"no model named {name} on this machine; `shoal models --local` lists them", 1)
    sources = catalog.sources(model)
    if not any(found.writable for found in sources):
        raise _fail(f"{name} is not in Shoal's store: {adopted_message(sources)}", 1)
    if not yes and not typer.confirm(
        f"Delete {model.name} ({human_size(model.size_bytes)}) from {catalog.store_dir()}?",
        err=True,
    ):
        raise _fail("nothing removed", 1)
    removed = remove_model(sources)
    if as_json:
        document = {
            "model": model.name,
            "removed": [str(path) for path in (*removed.entries, *removed.blobs)],
            "freed_bytes": removed.freed_bytes,
            "kept": [str(found.path) for found in removed.kept],
        }
        out.print_json(json.dumps(document))
        return
    out.print(
        f"removed {escape(model.name)} ({human_size(removed.freed_bytes) or '0 B'} freed)",
        highlight=False,
    )
    for found in removed.kept:
        out.print(f"still on disk, adopted read-only: {escape(str(found.path))}", highlight=False)


@models_app.command("load")
def load(
    name: NameArg, url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None
) -> None:
    """Load a model on this machine's node now, rather than at its first request."""
    _post_model(protocol.LOAD_PATH, "loaded", name, url, config, as_json)


@models_app.command("unload")
def unload(
    name: NameArg, url: UrlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None
) -> None:
    """Unload a model from this machine's node, freeing its memory."""
    _post_model(protocol.UNLOAD_PATH, "unloaded", name, url, config, as_json)


def _post_model(
    path: str, done: str, name: str, url: str | None, config: Path | None, as_json: bool
) -> None:
    name = _checked_name(name)
    base = node_url(url, config)
    try:
        document = client.post_json(base, path, {"model": name}, timeout=_LOAD_TIMEOUT_S)
    except client.NodeUnreachable as exc:
        raise _fail(str(exc), 3) from None
    except client.NodeRefused as exc:
        raise _fail(f"the node did not {path.rpartition('/')[2]} {name}: {exc}", 1) from None
    if as_json:
        out.print_json(json.dumps(document))
        return
    memory = document.get("memory_bytes") if isinstance(document, dict) else None
    extra = f" ({human_size(memory)})" if isinstance(memory, int) and memory else ""
    out.print(f"{done} {escape(name)}{extra}", highlight=False)
