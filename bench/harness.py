"""The benchmark harness: scenarios, side-by-side rows, JSON results.

A scenario is a module in `bench/scenarios/` with a `NAME`, a one-line `TITLE`, and
`run(quick: bool) -> Result`. Absolute times on a shared 2-core machine are noise; the
figures that matter are the ratios between a baseline and Shoal measured in one run,
in interleaved rounds, reported as medians with their spread.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    metric: str
    unit: str
    baseline_name: str
    baseline: list[float]
    shoal: list[float]
    higher_is_better: bool = True
    target: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.shoal) / statistics.median(self.baseline)


@dataclass
class Result:
    scenario: str
    title: str
    command: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        for row, raw in zip(self.rows, document["rows"], strict=True):
            raw["baseline_median"] = statistics.median(row.baseline)
            raw["shoal_median"] = statistics.median(row.shoal)
            raw["ratio"] = row.ratio
        document["machine"] = machine()
        document["date"] = time.strftime("%Y-%m-%d")
        return document


def machine() -> dict[str, Any]:
    import os

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4g}"
    return f"{statistics.median(values):.4g} [{min(values):.4g}–{max(values):.4g}]"


def save(result: Result, quick: bool) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{result.scenario}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path
