"""`shoal init`: write a commented config for the common cases, and say what comes next.

Two cases: one machine (the node on loopback, no trust to set up), or a LAN cluster
(`--lan`), with a cluster secret made here (`--secret`, kept in the data dir 0600 as
`shoal token create` keeps it, never written to the config or the terminal). The file is
checked with the real settings loader before it takes the place of anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from shoal import settings as settings_mod
from shoal.cli.common import ConfigOpt, DataDirOpt, fail, out
from shoal.errors import ConfigError
from shoal.trust import secret as secret_mod

_HEADER = """\
# Shoal's configuration, written by `shoal init{flags}`.
# Precedence: these defaults < this file < SHOAL_* environment variables < flags.
# `shoal config get KEY` shows what is in effect; `shoal config set KEY VALUE` edits this
# file in place. Every key is in the README, "Configuration".

# name = "studio"          # what peers and operators see; default: the host name
port = {port}              # the OpenAI-compatible API; the peer port (mutual TLS) is the next
{data_dir}
"""

_SINGLE = """\
# One machine: the node listens on 127.0.0.1 only, and no other machine can reach it.
# For a cluster, run `shoal init --lan --force` (or set lan = true).
lan = false
"""

_LAN = """\
# A LAN cluster: the node listens on every address (0.0.0.0) and finds its peers by
# mDNS (UDP 5353; `shoal doctor` checks the firewall). Where multicast does not reach,
# list peers by address:
lan = true
# peers = ["http://192.168.1.50:11450"]

[cluster]
# Who may join. Default: "secret" when the data dir holds a cluster secret ({secret}),
# else "pairing" (each operator accepts the other: `shoal pair list`, `shoal pair accept`).
# mode = "pairing"
# allowed_hosts = ["shoal.example.lan"]   # extra Host names (a reverse proxy in front)

[mesh]
mdns = true
scan_after_s = 10          # scan the local /24 once if mDNS finds no one by then
"""

_COMMON = """\

[engine]
enabled = true             # the packaged SmolLM2 (chat) and MiniLM (embeddings), offline
threads = 2                # llama.cpp threads; 2 decode fastest on a 2-core machine

[detect]
enabled = true             # use Ollama, llama-server, vLLM, LM Studio found on this machine

[models]
# store = "~/.cache/huggingface/hub"   # where `shoal models pull` puts GGUFs
# folders = ["~/models"]               # more GGUFs, adopted read-only
max_loaded = 2             # models loaded at once; the least recently used unloads first

# [[backends]]             # a server Shoal does not find by itself
# url = "http://127.0.0.1:8080"
# kind = "openai"          # or "ollama"
"""


def render(*, lan: bool, port: int, data_dir: Path | None, secret: bool) -> str:
    """The commented config for one machine or a LAN cluster."""
    where = (
        f"data_dir = {json.dumps(str(data_dir))}"
        if data_dir
        else '# data_dir = "~/.local/share/shoal"'
    )
    text = _HEADER.format(
        flags=(" --lan" if lan else "") + (" --secret" if secret else ""),
        port=port,
        data_dir=where + "   # identity, trust store, cluster secret",
    )
    text += "\n" + (
        _LAN.format(secret="made by --secret" if secret else "`shoal token create`")
        if lan
        else _SINGLE
    )
    return text + _COMMON


def init(
    lan: Annotated[bool, typer.Option("--lan", help="A cluster of machines on this LAN.")] = False,
    secret: Annotated[
        bool,
        typer.Option("--secret", help="Also make a cluster secret (implies --lan)."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing config.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    port: Annotated[int, typer.Option(help="The API port.")] = settings_mod.DEFAULT_PORT,
) -> None:
    """Write a commented config (one machine, or --lan for a cluster) and say what next."""
    lan = lan or secret
    path = config or Path(os.environ.get("SHOAL_CONFIG") or settings_mod.default_config_path())
    if path.exists() and not force:
        raise fail(f"{path} exists; `shoal init --force` replaces it", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(path.name + ".new")
    absolute = data_dir.expanduser().resolve() if data_dir else None
    candidate.write_text(render(lan=lan, port=port, data_dir=absolute, secret=secret))
    try:
        settings = settings_mod.load(candidate, environ=False)
    except ConfigError as exc:  # a bug here, not the user's: keep their file as it was
        candidate.unlink()
        raise fail(f"the config written would not load: {exc}", 1) from None
    candidate.replace(path)
    out.print(f"wrote {escape(str(path))}", highlight=False)
    if secret:
        _make_secret(settings.data_dir)
    _next_steps(lan=lan, secret=secret, settings=settings, config=config)


def _make_secret(data_dir: Path) -> None:
    """A new cluster secret in `data_dir`, unless it has one (kept: nodes use it)."""
    if secret_mod.read_secret(data_dir):
        out.print("kept the cluster secret this node already has", highlight=False)
        return
    secret_mod.write_secret(data_dir, secret_mod.new_secret())
    out.print(
        f"made a cluster secret in {escape(str(data_dir / secret_mod.SECRET_FILE))} (0600)",
        highlight=False,
    )


def _next_steps(
    *, lan: bool, secret: bool, settings: settings_mod.Settings, config: Path | None
) -> None:
    flag = f" --config {config}" if config else ""
    steps = [
        f"start the node: `shoal serve{flag}` (or `shoal service install` to run it at boot)",
        "check it: `shoal doctor" + flag + "`",
    ]
    if not lan:
        steps.append(
            f"point any OpenAI client at http://127.0.0.1:{settings.port}/v1 "
            "(no key needed on this machine)"
        )
    elif secret:
        steps += [
            "on each other machine: `shoal init --lan`, then `shoal join "
            f"http://<this machine's address>:{settings.port} --token -` and paste what "
            "`shoal token show` prints here (it is never shown in this output)",
            "LAN clients need a key: `shoal keys create NAME`",
        ]
    else:
        steps += [
            "on each other machine: `shoal init --lan` and `shoal serve`; then accept "
            "each other: `shoal pair list`, `shoal pair accept ID` on both, after "
            "checking the codes match (or use a secret: `shoal init --lan --secret`)",
            "LAN clients need a key: `shoal keys create NAME`",
        ]
    out.print("next:", highlight=False)
    for number, step in enumerate(steps, 1):
        out.print(f"  {number}. {escape(step)}", highlight=False, soft_wrap=True)
