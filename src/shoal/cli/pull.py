"""`shoal models pull REF`: a GGUF from the Hugging Face Hub into this machine's store.

The CLI pulls by itself (no node needs to run); a node's catalog finds the file in the
store. `--on NODE` asks another node of the cluster to pull into its own store instead
(through this machine's node, which must run; the other node fetches from whichever
peers have the file, else the Hub) and shows its progress here.

Exit codes: 0 pulled (or already there), 1 failure, 2 a bad REF or revision, or
nothing on the Hub matches it, 4 the Hub failed or cannot be reached (offline mode
included: trying again may help), 5 not enough disk space, 130 interrupted (pull again
to resume).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from shoal.cli.common import ConfigOpt, JsonOpt, err, fail, human_size, load_settings, out
from shoal.cli.models import models_app
from shoal.errors import ClientError, ShoalError, UpstreamError

if TYPE_CHECKING:
    from shoal.models.pull import PullProgress

EXIT_BAD_REF = 2
EXIT_HUB = 4
EXIT_NO_SPACE = 5
EXIT_INTERRUPTED = 130


@models_app.command(
    "pull",
    epilog="Exit codes: 0 pulled or already there; 1 failure; 2 bad REF or revision, or "
    "nothing matches; 4 the Hub failed or is unreachable (offline mode included); "
    "5 not enough disk space; 130 interrupted (run it again to resume).",
)
def pull(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="org/repo:QUANT (e.g. :q4_k_m), org/repo/file.gguf, or org/repo."
        ),
    ],
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit (default main).")
    ] = None,
    on: Annotated[
        str | None,
        typer.Option(
            "--on",
            metavar="NODE",
            help="Pull into another node's store (its name or the start of its ID).",
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a GGUF into the model store: from paired peers that hold it (through this
    machine's node, if it runs), else from the Hugging Face Hub (resumable)."""
    # Imported here: huggingface_hub costs a third of a second that other commands skip.
    from shoal.models import pull as pulling
    from shoal.models.pull_refs import check_revision, parse_ref
    from shoal.models.stores import store_dir

    settings = load_settings(config)
    try:
        checked = check_revision(revision)
    except ClientError as exc:
        raise fail(exc.message, EXIT_BAD_REF) from None
    try:
        parsed, bad_ref = parse_ref(ref), None
    except ClientError as exc:  # maybe a name only peers know: they are asked first
        parsed, bad_ref = None, exc.message
    url = f"http://127.0.0.1:{settings.port}"
    try:
        result: dict[str, Any] | None
        if on is not None:
            result = _on_node(url, ref, on, checked)
        else:
            result = _from_peers(url, ref, parsed is not None)
    except KeyboardInterrupt:
        raise fail("interrupted; the same command resumes the download", EXIT_INTERRUPTED) from None
    if result is None:
        if parsed is None:
            raise fail(bad_ref or "not a REF", EXIT_BAD_REF)
        store = store_dir(settings.models)
        try:
            with _Bars() as bars:
                pulled = pulling.pull(parsed, store=store, revision=checked, on_progress=bars.show)
        except KeyboardInterrupt:
            raise fail(
                "interrupted; the same command resumes the download", EXIT_INTERRUPTED
            ) from None
        except ShoalError as exc:
            raise fail(exc.message, _exit_code(exc)) from None
        except OSError as exc:
            raise fail(f"cannot write the store at {store}: {exc}", 1) from None
        result = pulled.to_json()
    if as_json:
        out.print_json(json.dumps(result))
        return
    fetched, size = result["downloaded_bytes"], result["size_bytes"]
    if not fetched:
        how = "already in the store"
    else:
        resumed = " (the rest was there from an interrupted pull)" if fetched < size else ""
        where = " from peers" if result["revision"] == "peers" else ""
        how = f"downloaded {human_size(fetched)}{where}{resumed} in {result['seconds']:.1f} s"
        how += ", SHA-256 checked"
    for f in result["files"]:
        out.print(f"{f['name']}  {f['path']}", highlight=False, soft_wrap=True)
    out.print(f"{human_size(size)}, {how}", highlight=False)


def _from_peers(url: str, ref: str, hub_next: bool) -> dict[str, Any] | None:
    """The REF from paired peers, through the node running on this machine (it knows
    them); None if no node runs or no peer has it: the Hub's turn, from here."""
    from shoal.api.pull import PULL_PATH
    from shoal.cli import client

    body = {"model": ref, "source": "peers"}
    try:
        # A holder hashes a file before it first serves it: minutes for a large one.
        result = _follow(client.post_lines(url, PULL_PATH, body, timeout=300.0))
    except (client.NodeUnreachable, client.NodeRefused):
        return None  # no node here, or no peer advertises it
    if isinstance(result, str):
        if not hub_next:
            raise fail(result, EXIT_HUB)
        err.print(f"from peers: {result}; trying the Hub", highlight=False)
        return None
    return result


def _on_node(url: str, ref: str, node: str, revision: str) -> dict[str, Any]:
    """`ref` pulled by the node `node`, asked through this machine's node."""
    from shoal.api.pull import PULL_PATH
    from shoal.cli import client

    body = {"model": ref, "revision": revision, "on": node}
    try:
        result = _follow(client.post_lines(url, PULL_PATH, body, timeout=600.0))
    except client.NodeUnreachable:
        raise fail(f"--on asks through this machine's node: none answers at {url}", 1) from None
    except client.NodeRefused as exc:
        raise fail(str(exc), EXIT_BAD_REF if exc.status in (400, 404) else 1) from None
    if isinstance(result, str):
        raise fail(f"{node}: {result}", EXIT_HUB)
    return result


def _follow(lines: Iterable[dict[str, Any]]) -> dict[str, Any] | str:
    """A node's pull answer shown as bars: its success object, or its error message."""
    from shoal.models.pull import PullProgress

    with _Bars() as bars:
        for line in lines:
            status = line.get("status")
            if status in ("downloading", "verifying"):
                bars.show(
                    PullProgress(
                        line["file"], line["completed"], line["total"], line["resumed"],
                        line["rate_bps"], line["part"], line["parts"], status,
                        line.get("sources"),
                    )
                )  # fmt: skip
            elif status == "success":
                return dict(line)
            elif status == "error":
                return str(line.get("error", {}).get("message", "the pull failed"))
    return "the node's answer ended before the pull did"


def _exit_code(error: ShoalError) -> int:
    from shoal.errors import HubOffline, NotEnoughSpace

    if isinstance(error, ClientError):
        return EXIT_BAD_REF
    if isinstance(error, NotEnoughSpace):
        return EXIT_NO_SPACE
    if isinstance(error, UpstreamError | HubOffline):
        return EXIT_HUB
    return 1


class _Bars:
    """One Rich bar per file on stderr (bytes, rate, time left); stdout stays for results."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.labels: dict[str, str] = {}

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

    def show(self, update: PullProgress) -> None:
        task = self.tasks.get(update.filename)
        if task is None:
            if not self.tasks:  # started with its first bar: no empty frames before
                self.progress.start()
            label = update.filename.rsplit("/", 1)[-1]
            if update.file_count > 1:
                label += f" ({update.file_index}/{update.file_count})"
            # Resumed bytes count as done but not as received: the rate is this pull's.
            task = self.progress.add_task(label, total=update.total, completed=update.resumed)
            self.tasks[update.filename] = task
            self.labels[update.filename] = label
        if update.sources is not None:  # from peers: how many give it now
            plural = "" if update.sources == 1 else "s"
            description = f"{self.labels[update.filename]} · {update.sources} peer{plural}"
            self.progress.update(task, description=description)
        self.progress.update(task, completed=update.done)
