"""One PNG per scenario: a bar pair per row (median, min–max whiskers), then its curves.

matplotlib comes with the `bench` extra; without it the JSON is still written and the
runner says the plot was skipped.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import Result, Row, comparison_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _bar(ax: Axes, row: Row) -> None:
    sides = [
        (row.baseline_name or "—", row.baseline, "#9e9e9e"),
        (row.shoal_name, row.shoal, "#1f77b4"),
    ]
    sides = [side for side in sides if side[1]]
    names = [name for name, _, _ in sides]
    medians = [statistics.median(values) for _, values, _ in sides]
    low = [m - min(values) for m, (_, values, _) in zip(medians, sides, strict=True)]
    high = [max(values) - m for m, (_, values, _) in zip(medians, sides, strict=True)]
    ax.bar(names, medians, color=[c for _, _, c in sides], yerr=[low, high], capsize=4)
    for x, (_, values, _) in enumerate(sides):  # every round's value, not only the median
        ax.scatter([x] * len(values), values, s=8, color="black", zorder=3)
    if row.bound is not None and row.bound.on == "value":
        ax.axhline(row.bound.limit, color="red", linestyle="--", linewidth=1)
    title = f"{row.metric}\n({row.unit}) {comparison_text(row)}"
    if row.met is not None:
        title += "  target met" if row.met else "  target NOT met"
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def render(result: Result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result.rows if row.baseline or row.shoal]
    panels = len(rows) + len(result.curves)
    columns = min(3, max(1, panels))
    lines = max(1, math.ceil(panels / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax, row in zip(flat, rows, strict=False):
        _bar(ax, row)
    for ax, curve in zip(flat[len(rows) :], result.curves, strict=False):
        for name, (xs, ys) in curve.lines.items():
            ax.plot(xs, ys, label=name)
        if curve.log_x:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(curve.title, fontsize=8)
        ax.set_xlabel(curve.x_label, fontsize=7)
        ax.set_ylabel(curve.y_label, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    figure.suptitle(f"{result.title}\n{result.command}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
