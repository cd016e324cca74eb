"""The benchmark harness: scenarios, side-by-side rows, JSON results, plots.

A scenario is a module in `bench/scenarios/` with a `NAME`, a one-line `TITLE`, and
`run(quick: bool) -> Result`. Absolute times on a shared 2-core machine are noise; the
figures that matter are the ratios between a baseline and Shoal measured in one run,
in interleaved rounds, reported as medians with their spread.

A `Row` holds one value per round for the baseline and for Shoal. It compares them as
a ratio (`compare="ratio"`, e.g. requests/s) or as a difference (`compare="added"`, e.g.
latency Shoal adds to a direct call). A row with no baseline is a figure of Shoal's
alone (failover times); a row whose side could not be measured says why in `missing`
and carries no number. `bound` states a DESIGN §11 target so it is checked, not eyed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).parent / "results"
QUICK_RESULTS = RESULTS / "tmp"  # gitignored: quick runs (CI) leave the tree clean


@dataclass(frozen=True)
class Bound:
    """A target: `on` the ratio, the added amount, or Shoal's value, `op` a `limit`."""

    on: Literal["ratio", "added", "value"]
    op: Literal["<=", ">="]
    limit: float

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    @property
    def text(self) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        what = {"ratio": "ratio", "added": "added", "value": "value"}[self.on]
        return f"{what} {sign} {self.limit:g}"


@dataclass
class Row:
    metric: str
    unit: str
    baseline_name: str
    baseline: list[float]
    shoal: list[float]
    higher_is_better: bool = True
    target: str = ""  # free text shown beside the bound, e.g. "DESIGN §11"
    compare: Literal["ratio", "added"] = "ratio"
    bound: Bound | None = None
    missing: str = ""  # why a side has no values (not installed, failed to start, ...)
    shoal_name: str = "Shoal"  # what the Shoal side is, where that needs saying

    @property
    def ratio(self) -> float | None:
        if not self.baseline or not self.shoal:
            return None
        base = statistics.median(self.baseline)
        return statistics.median(self.shoal) / base if base else None

    @property
    def added(self) -> float | None:
        """Median over rounds of (Shoal - baseline), paired round by round when possible."""
        if not self.baseline or not self.shoal:
            return None
        if len(self.baseline) == len(self.shoal):
            return statistics.median(s - b for s, b in zip(self.shoal, self.baseline, strict=True))
        return statistics.median(self.shoal) - statistics.median(self.baseline)

    @property
    def added_spread(self) -> list[float]:
        if len(self.baseline) != len(self.shoal) or not self.shoal:
            return []
        return [s - b for s, b in zip(self.shoal, self.baseline, strict=True)]

    @property
    def comparison(self) -> float | None:
        return self.added if self.compare == "added" else self.ratio

    @property
    def met(self) -> bool | None:
        """Whether the bound holds; None when there is no bound or no number to check."""
        if self.bound is None:
            return None
        value = {
            "ratio": self.ratio,
            "added": self.added,
            "value": statistics.median(self.shoal) if self.shoal else None,
        }[self.bound.on]
        return None if value is None else self.bound.holds(value)

    @property
    def target_text(self) -> str:
        parts = [self.bound.text] if self.bound else []
        return "; ".join([*parts, self.target] if self.target else parts)


@dataclass
class Curve:
    """A figure beyond the rows' bars: named lines of (x, y) points, e.g. latency CDFs."""

    title: str
    x_label: str
    y_label: str
    lines: dict[str, tuple[list[float], list[float]]]
    log_x: bool = False


@dataclass
class Result:
    scenario: str
    title: str
    command: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    seconds: float = 0.0  # how long the scenario took, set by the runner

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        for row, raw in zip(self.rows, document["rows"], strict=True):
            raw["baseline_median"] = statistics.median(row.baseline) if row.baseline else None
            raw["shoal_median"] = statistics.median(row.shoal) if row.shoal else None
            raw["ratio"] = row.ratio
            raw["added"] = row.added
            raw["met"] = row.met
        document["machine"] = machine()
        document["source"] = source()
        document["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
        return document


def from_json(document: dict[str, Any]) -> Result:
    """A saved result back as a `Result` (to plot it again)."""
    fields = set(Row.__dataclass_fields__)
    rows = []
    for raw in document["rows"]:
        values = {k: v for k, v in raw.items() if k in fields}
        if values.get("bound"):
            values["bound"] = Bound(**values["bound"])
        rows.append(Row(**values))
    curves = [
        Curve(**{**c, "lines": {k: (v[0], v[1]) for k, v in c["lines"].items()}})
        for c in document.get("curves", [])
    ]
    return Result(
        document["scenario"], document["title"], document["command"], rows,
        document.get("notes", []), curves, document.get("seconds", 0.0),
    )  # fmt: skip


def machine() -> dict[str, Any]:
    from shoal.mesh.state import local_hardware  # what a node reports about itself

    hardware = local_hardware()
    cpu, memory = hardware.cpu, f"{hardware.ram_bytes / 2**30:.0f} GiB"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_1m_at_end": load,
    }


def source() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes at the time."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "src")),
    }


# -- statistics --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; values need not be sorted."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) < 2:
        return f"{values[0]:.4g}"
    return f"{statistics.median(values):.4g} [{min(values):.4g}–{max(values):.4g}]"


def cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


# -- output ------------------------------------------------------------------------------


def results_dir(quick: bool) -> Path:
    path = QUICK_RESULTS if quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(result: Result, quick: bool) -> Path:
    path = results_dir(quick) / f"{result.scenario}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path


def comparison_text(row: Row) -> str:
    value = row.comparison
    if value is None:
        return "—"
    if row.compare == "added":
        spread_text = ""
        if len(row.added_spread) > 1:
            spread_text = f" [{min(row.added_spread):+.3g}–{max(row.added_spread):+.3g}]"
        return f"{value:+.3g} {row.unit}{spread_text}"
    return f"{value:.3g}×"


def met_text(row: Row) -> str:
    return {True: "met", False: "NOT met", None: ""}[row.met]
