"""`python -m bench [SCENARIO ...] [--quick]`: run scenarios and print them side by side."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich.console import Console
from rich.table import Table

from bench import harness, scenarios


def available() -> dict[str, str]:
    return {
        info.name: info.name
        for info in pkgutil.iter_modules(scenarios.__path__)
        if not info.name.startswith("_")
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", nargs="*", help=f"any of: {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="few rounds, for CI (< 2 min)")
    args = parser.parse_args()
    names = args.scenario or list(available())
    unknown = set(names) - set(available())
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    console = Console()
    for name in names:
        module = importlib.import_module(f"bench.scenarios.{name}")
        console.print(f"[bold]{module.TITLE}[/bold]")
        result = module.run(quick=args.quick)
        table = Table("metric", "baseline", "value", "Shoal", "ratio", "target")
        for row in result.rows:
            table.add_row(
                f"{row.metric} ({row.unit})",
                row.baseline_name,
                harness.spread(row.baseline),
                harness.spread(row.shoal),
                f"{row.ratio:.3f}",
                row.target,
            )
        console.print(table)
        for note in result.notes:
            console.print(f"  {note}", highlight=False)
        path = harness.save(result, args.quick)
        console.print(f"  reproduce: [cyan]{result.command}[/cyan]   results: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
