"""`python -m bench [SCENARIO ...] [--quick]`: run scenarios and print them side by side.

Each scenario's result is written as JSON and PNG to bench/results/ (quick runs to
bench/results/tmp/, which git ignores). A full run of every scenario also rewrites the
summary table in bench/README.md. A scenario that fails is reported and the others
still run; the exit status is then 1, so CI notices a harness that rots.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table

from bench import harness, plot, scenarios, summary


def available() -> list[str]:
    return [
        info.name
        for info in pkgutil.iter_modules(scenarios.__path__)
        if not info.name.startswith("_")
    ]


ORDER = [
    "proxy_overhead", "throughput", "streaming", "routing_quality", "affinity", "overload",
    "failover", "discovery", "cluster_idle", "model_transfer", "engine_tokens",
]  # fmt: skip


def ordered(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def print_result(console: Console, result: harness.Result) -> None:
    table = Table("metric", "baseline", "value", "Shoal", "Shoal vs baseline", "target", "")
    for row in result.rows:
        table.add_row(
            f"{row.metric} ({row.unit})",
            row.baseline_name or "—",
            harness.spread(row.baseline),
            harness.spread(row.shoal) if row.shoal else f"not measured: {row.missing}",
            harness.comparison_text(row),
            row.target_text,
            harness.met_text(row),
        )
    console.print(table)
    for row in result.rows:
        if row.missing and row.shoal:
            console.print(f"  {row.metric}: baseline not measured: {row.missing}", highlight=False)
    for note in result.notes:
        console.print(f"  {note}", highlight=False)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", nargs="*", help=f"any of: {', '.join(ordered(available()))}")
    parser.add_argument("--quick", action="store_true", help="few rounds, for CI (< 2 min in all)")
    parser.add_argument(
        "--summary", action="store_true", help="only rebuild README's table from bench/results/"
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNGs from bench/results/*.json"
    )
    args = parser.parse_args()
    if args.summary:
        print(f"summary written to {summary.write()}")
        return 0
    if args.replot:
        for path in sorted(harness.RESULTS.glob("*.json")):
            result = harness.from_json(json.loads(path.read_text()))
            print(plot.render(result, path.with_suffix(".png")))
        return 0
    names = ordered(args.scenario or available())
    unknown = set(names) - set(available())
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    console = Console(width=max(160, Console().width))
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        module = importlib.import_module(f"bench.scenarios.{name}")
        console.print(f"[bold]{module.TITLE}[/bold]")
        began = time.monotonic()
        try:
            result = module.run(quick=args.quick)
        except Exception:
            failed.append(name)
            console.print(f"[red]{name} failed:[/red]\n{traceback.format_exc()}", highlight=False)
            continue
        result.seconds = round(time.monotonic() - began, 1)
        print_result(console, result)
        path = harness.save(result, args.quick)
        shown = [str(path)]
        if plot.available():
            shown.append(str(plot.render(result, path.with_suffix(".png"))))
        else:
            console.print("  plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        console.print(
            f"  reproduce: [cyan]{result.command}[/cyan]   took {result.seconds:.0f} s   "
            f"results: {', '.join(shown)}\n"
        )
    console.print(f"all done in {time.monotonic() - started:.0f} s")
    if not args.quick:
        console.print(f"summary written to {summary.write()}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
